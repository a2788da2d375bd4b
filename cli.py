"""Command line: restore files or folders with the same pipelines the nodes use.

    python -m photo_restoration --help

Each sub-command is a function registered with ``@command``; models are found by path or in a
ComfyUI-style ``models`` directory (``--models``, default $PHOTO_RESTORE_MODELS or ./models).
Heavy imports stay inside the functions so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import logging
from typing import Callable

Run = Callable[[argparse.Namespace], int]
AddArgs = Callable[[argparse.ArgumentParser], None]
COMMANDS: dict[str, tuple[str, AddArgs, Run]] = {}


def command(name: str, help: str, arguments: AddArgs = lambda p: None) -> Callable[[Run], Run]:
    """Register ``run(args) -> exit code`` as sub-command ``name``; ``arguments`` fills its parser."""

    def wrap(run: Run) -> Run:
        COMMANDS[name] = (help, arguments, run)
        return run

    return wrap


def _tiny_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models_dir", help="models directory to fill (ComfyUI layout: checkpoints/, facedetection/, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="writer names (default: all)")


@command("tiny-models", "write tiny random-weight checkpoints in the official layouts (demos, tests)", _tiny_models_args)
def tiny_models(args: argparse.Namespace) -> int:
    from .testing.tiny_checkpoints import write_all

    for name, files in write_all(args.models_dir, args.only, seed=args.seed).items():
        for f in files:
            print(f"{name}: {f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m photo_restoration", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _run) in sorted(COMMANDS.items()):
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    return COMMANDS[args.command][2](args)


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out", help="output folder (gets models/, input.png and the results)")
    p.add_argument("--size", type=int, nargs=2, default=(128, 96), metavar=("W", "H"))
    p.add_argument("--steps", type=int, default=20, help="SUPIR steps for the demo (tiny weights: fast)")


@command("demo", "write tiny weights and a generated photo, then run every available pipeline on it", _demo_args)
def demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .testing.images import synthetic_photo
    from .testing.tiny_checkpoints import write_all

    torch.set_num_threads(1)  # tiny weights: more threads only add hand-off latency (many times slower when busy)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_all(out / "models")
    photo = synthetic_photo(*args.size)
    photo.save(out / "input.png")
    print(f"demo: wrote {out / 'input.png'} and tiny weights in {out / 'models'}")
    ckpts = out / "models" / "checkpoints"  # the tiny files under the published names
    restore_args = _RESTORE_PARSER().parse_args([
        str(out / "input.png"), "--out", str(out / "restored"), "--models", str(out / "models"),
        "--sdxl", str(ckpts / "sd_xl_base_1.0.safetensors"), "--supir", str(ckpts / "SUPIR-v0Q.ckpt"),
        "--upscale", "2", "--steps", str(args.steps), "--min-short-side", "0", "--seed", "0"])
    restore_args.faces = _faces_available()
    restore_args.quiet_missing = True
    code = restore(restore_args)
    if code == 0:
        print(f"demo: restored image(s) in {out / 'restored'}")
    return code


# --------------------------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------------------------

PRESET_NAMES = {"quality": "Quality", "fidelity": "Fidelity", "lightning": "Lightning",
                "lightning-fidelity": "Lightning Fidelity"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def _restore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="an image file or a folder of images")
    p.add_argument("--out", required=True, help="output folder (restored PNGs keep the input names)")
    p.add_argument("--models", help="ComfyUI-style models folder (default $PHOTO_RESTORE_MODELS or ./models)")
    p.add_argument("--sdxl", help="SDXL checkpoint file (default: the only non-SUPIR file in models/checkpoints)")
    p.add_argument("--supir", help="SUPIR checkpoint file (default: the file named *supir* in checkpoints/model_patches)")
    p.add_argument("--upscale", type=float, default=2.0, help="output = round(input x this) (default 2)")
    p.add_argument("--preset", choices=list(PRESET_NAMES), default="quality",
                   help="official settings: quality (EDM 50 steps, cfg 4->7.5), fidelity (cfg 1->4), lightning "
                        "(DPM++ 8 steps, cfg 2; SDXL Lightning models), lightning-fidelity (cfg 1.5)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", help="positive prompt (default: the official one)")
    p.add_argument("--negative", help="negative prompt (default: the official one)")
    p.add_argument("--caption", help="a caption to put before the prompt")
    p.add_argument("--caption-llava", metavar="NAME", help="caption each image with this LLaVA folder from models/LLM")
    p.add_argument("--caption-tokens", type=int, default=512, help="longest LLaVA caption in tokens (official 512)")
    p.add_argument("--tiled", action="store_true", help="always use tiled sampling (default: auto above 1.5x1.5 tiles)")
    p.add_argument("--no-tiling", action="store_true", help="never use tiled sampling")
    p.add_argument("--tile-size", type=int, default=1024, help="sampler tile in pixels (default 1024)")
    p.add_argument("--tile-stride", type=int, default=512, help="sampler tile stride in pixels (default 512)")
    p.add_argument("--min-short-side", type=int, default=1024, help="sample with the short side at least this (0=off)")
    p.add_argument("--color-fix", choices=["Wavelet", "AdaIN", "None"], default="Wavelet")
    p.add_argument("--no-tiled-vae", action="store_true", help="run the VAE untiled (more memory)")
    p.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32", "fp8"], default="auto", help="weight dtype")
    p.add_argument("--faces", action="store_true", help="restore faces with CodeFormer afterwards")
    p.add_argument("--fidelity", type=float, default=0.5, help="CodeFormer fidelity weight w (with --faces)")


def _RESTORE_PARSER() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="restore")
    _restore_args(p)
    return p


def _faces_available() -> bool:
    try:
        from .codeformer import pipeline  # noqa: F401
    except ImportError:
        return False
    return True


def _pick_models(args: argparse.Namespace) -> tuple[str, str]:
    """(sdxl, supir) paths from the arguments or the models folder."""
    from .nodes import comfy

    if args.models:
        comfy.set_models_dir(args.models)
    if args.sdxl and args.supir:
        return args.sdxl, args.supir
    ckpts = comfy.list_files("checkpoints")
    patches = comfy.list_files("model_patches")
    supirs = [("checkpoints", f) for f in ckpts if "supir" in f.lower()] + [("model_patches", f) for f in patches]
    sdxls = [f for f in ckpts if "supir" not in f.lower()]
    sdxl = args.sdxl
    if sdxl is None:
        if len(sdxls) != 1:
            raise SystemExit(f"restore: give --sdxl: found {len(sdxls)} SDXL candidates in "
                             f"{comfy.folder_paths_for('checkpoints')}: {sdxls}")
        sdxl = comfy.full_path("checkpoints", sdxls[0])
    supir = args.supir
    if supir is None:
        if len(supirs) != 1:
            raise SystemExit(f"restore: give --supir: found {len(supirs)} SUPIR candidates: {[f for _, f in supirs]}")
        supir = comfy.full_path(*supirs[0])
    return sdxl, supir


def _images(path: str) -> list:
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise SystemExit(f"restore: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {p}")
        return files
    if not p.is_file():
        raise SystemExit(f"restore: {p} does not exist")
    return [p]


def _load_image(path):
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as im:  # alpha is composited over white, as the official HWC3
        im = ImageOps.exif_transpose(im).convert("RGBA")
        arr = np.asarray(im, dtype=np.float32) / 255.0
    rgb, alpha = arr[..., :3], arr[..., 3:]
    return torch.from_numpy(rgb * alpha + (1 - alpha)).movedim(-1, 0)[None]


def _save_image(x, path) -> None:
    import numpy as np
    from PIL import Image

    arr = (x[0].clamp(0, 1).movedim(0, -1).cpu().numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


@command("restore", "restore and upscale photos with SUPIR (and optionally LLaVA captions, CodeFormer faces)",
         _restore_args)
def restore(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .nodes import comfy
    from .supir import pipeline as E
    from .supir.loader import load_supir

    files = _images(args.input)
    sdxl, supir = _pick_models(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"restore: loading {Path(sdxl).name} + {Path(supir).name}")
    device = comfy.torch_device()
    model = load_supir(sdxl, supir, dtype=comfy.pick_dtype(args.dtype, device, allow=("bf16", "fp16", "fp32")),
                       vae_dtype=comfy.pick_dtype("auto", device, allow=("bf16", "fp32")), device=device)
    settings = E.settings(
        PRESET_NAMES[args.preset], steps=args.steps, seed=args.seed, tile_size=args.tile_size,
        tile_stride=args.tile_stride, tile_batch_size=4, upscale_by=args.upscale, min_short_side=args.min_short_side,
        tiling="on" if args.tiled else "off" if args.no_tiling else "auto", color_fix=args.color_fix,
        tiled_vae=not args.no_tiled_vae, positive_prompt=args.prompt, negative_prompt=args.negative)
    captioner = _llava_captioner(args.caption_llava, model, args.caption_tokens) if args.caption_llava else None
    faces = _face_restorer(args) if args.faces else None
    for f in files:
        image = _load_image(f)
        captions = [args.caption] if args.caption else []
        if captioner is not None:
            captions = [captioner(image)]
            print(f"restore: {f.name}: caption: {captions[0][:200]}")
        with comfy.Progress(settings.steps, f"SUPIR {f.name}") as bar:
            result = E.restore(image, model, settings, bar, captions)
        if faces is not None:
            result = faces(result)
            print(f"restore: {f.name}: faces restored with CodeFormer (w={args.fidelity})")
        target = out / (f.stem + ".png")
        _save_image(result, target)
        print(f"restore: {f.name} {image.shape[-1]}x{image.shape[-2]} -> {target} "
              f"{result.shape[-1]}x{result.shape[-2]}")
    return 0


def _llava_captioner(name: str, model, max_new_tokens: int = 512):
    """image [1,3,H,W] 0..1 -> caption of its stage-1 (denoised) version, as the official pipeline does,
    with the pack's LLaVA code (folder models/LLM/<name>)."""
    import torch

    from .nodes import comfy
    from .supir import pipeline as E
    from .supir.caption import CaptionSettings, caption_images, load_llava

    llava = load_llava(comfy.full_path("LLM", name), torch.float32 if comfy.torch_device().type == "cpu"
                       else torch.float16, "none", comfy.torch_device())
    stage = E.settings(tiled_vae=True)

    def caption(image):
        _, stage1, _ = E.first_stage(image, model, stage)
        return caption_images(llava, stage1, CaptionSettings(max_new_tokens=max_new_tokens))[0]

    return caption


def _face_restorer(args: argparse.Namespace):
    """image [1,3,H,W] 0..1 -> image with faces restored by CodeFormer (None when quietly unavailable)."""
    from .nodes import comfy

    try:
        from .codeformer.detection import DETECTOR_FILES, load_retinaface
        from .codeformer.loader import load_codeformer
        from .codeformer.parsing import PARSER_FILES, load_parser
        from .codeformer.pipeline import FaceSettings, restore_faces
        net = load_codeformer(comfy.full_path("facerestore_models", "codeformer.pth"), device=comfy.torch_device())
        detector = load_retinaface(comfy.full_path("facedetection", DETECTOR_FILES["resnet50"]),
                                   device=comfy.torch_device())
        parser = load_parser(comfy.full_path("facedetection", PARSER_FILES["parsenet"]), device=comfy.torch_device())
    except (ImportError, FileNotFoundError) as exc:
        if getattr(args, "quiet_missing", False):
            return None
        raise SystemExit(f"restore: --faces: {exc}")
    settings = FaceSettings(w=args.fidelity)

    def restore(image):
        res = restore_faces(image.movedim(1, -1), net, detector, parser, settings)
        return res.images.movedim(-1, 1)[:, :3]

    return restore


def _faces_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="an image file or a folder of images")
    p.add_argument("--out", default="out", help="output folder")
    p.add_argument("--models", default=None, help="models directory (ComfyUI layout; default $PHOTO_RESTORE_MODELS or ./models)")
    p.add_argument("--codeformer", default=None, help="CodeFormer weights (default: <models>/facerestore_models/codeformer.pth)")
    p.add_argument("-w", "--fidelity", type=float, default=0.5, help="fidelity w: 0 = quality, 1 = closer to the input")
    p.add_argument("-s", "--upscale", type=int, default=1, help="output scale of the whole picture")
    p.add_argument("--detector", choices=["resnet50", "mobilenet0.25"], default="resnet50")
    p.add_argument("--parser", choices=["parsenet", "bisenet", "none"], default="parsenet")
    p.add_argument("--helper", choices=["codeformer", "facexlib"], default="codeformer")
    p.add_argument("--threshold", type=float, default=0.8, help="detection confidence")
    p.add_argument("--only-center-face", action="store_true")
    p.add_argument("--no-adain", action="store_true")
    p.add_argument("--min-face", type=int, default=0)
    p.add_argument("--max-face", type=int, default=0)
    p.add_argument("--max-faces", type=int, default=0)
    p.add_argument("--face-index", default="")
    p.add_argument("--batch", type=int, default=8, help="faces per network call")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--save-faces", action="store_true", help="also write the aligned crops before/after")


@command("faces", "restore the faces of image files with CodeFormer (same pipeline as the nodes)", _faces_args)
def faces(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image

    from .codeformer.detection import DETECTOR_FILES, load_retinaface
    from .codeformer.loader import load_codeformer
    from .codeformer.parsing import PARSER_FILES, load_parser
    from .codeformer.pipeline import FaceSettings, restore_faces

    models = Path(args.models or os.environ.get("PHOTO_RESTORE_MODELS") or "models")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    src = Path(args.input)
    exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in exts) if src.is_dir() else [src]
    if not files:
        print(f"faces: no images in {src}")
        return 1
    net = load_codeformer(args.codeformer or models / "facerestore_models" / "codeformer.pth", device=device, dtype=dtype)
    detector = load_retinaface(models / "facedetection" / DETECTOR_FILES[args.detector], device=device)
    parser = None if args.parser == "none" else load_parser(models / "facedetection" / PARSER_FILES[args.parser], device=device)
    settings = FaceSettings(w=args.fidelity, upscale=args.upscale, adain=not args.no_adain, helper=args.helper,
                            conf_threshold=args.threshold, only_center_face=args.only_center_face,
                            use_parse=parser is not None, min_face_size=args.min_face, max_face_size=args.max_face,
                            max_faces=args.max_faces, face_index=args.face_index, batch_size=args.batch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    to_pil = lambda t: Image.fromarray((t.clamp(0, 1).numpy() * 255).round().astype(np.uint8).squeeze(-1) if t.shape[-1] == 1 else (t.clamp(0, 1).numpy() * 255).round().astype(np.uint8))  # noqa: E731
    for f in files:
        img = Image.open(f)
        mode = img.mode if img.mode in ("RGB", "RGBA", "L") else "RGB"
        arr = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
        x = torch.from_numpy(arr[..., None] if arr.ndim == 2 else arr)[None]
        res = restore_faces(x, net, detector, parser, settings)
        to_pil(res.images[0]).save(out / f"{f.stem}.png")
        if args.save_faces and res.faces:
            for i, (a, b) in enumerate(zip(res.cropped_faces, res.restored_faces)):
                to_pil(a).save(out / f"{f.stem}_face{i:02d}_in.png")
                to_pil(b).save(out / f"{f.stem}_face{i:02d}_out.png")
        print(f"{f.name} -> {out / (f.stem + '.png')}\n{res.info}")
    return 0
