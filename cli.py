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

    from .testing.images import synthetic_photo
    from .testing.tiny_checkpoints import write_all

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_all(out / "models")
    photo = synthetic_photo(*args.size)
    photo.save(out / "input.png")
    print(f"demo: wrote {out / 'input.png'} and tiny weights in {out / 'models'}")
    restore_args = _RESTORE_PARSER().parse_args([
        str(out / "input.png"), "--out", str(out / "restored"), "--models", str(out / "models"),
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

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def _restore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="an image file or a folder of images")
    p.add_argument("--out", required=True, help="output folder (restored PNGs keep the input names)")
    p.add_argument("--models", help="ComfyUI-style models folder (default $PHOTO_RESTORE_MODELS or ./models)")
    p.add_argument("--sdxl", help="SDXL checkpoint file (default: the only non-SUPIR file in models/checkpoints)")
    p.add_argument("--supir", help="SUPIR checkpoint file (default: the file named *supir* in checkpoints/model_patches)")
    p.add_argument("--upscale", type=float, default=2.0, help="output = round(input x this) (default 2)")
    p.add_argument("--preset", choices=["quality", "fidelity", "lightning"], default="quality")
    p.add_argument("--steps", type=int, help="sampling steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", help="positive prompt (default: the official one)")
    p.add_argument("--negative", help="negative prompt (default: the official one)")
    p.add_argument("--caption", help="a caption to put before the prompt")
    p.add_argument("--caption-llava", metavar="NAME", help="caption each image with this LLaVA folder from models/LLM")
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

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).movedim(-1, 0)[None]


def _save_image(x, path) -> None:
    import numpy as np
    from PIL import Image

    arr = (x[0].clamp(0, 1).movedim(0, -1).cpu().numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


@command("restore", "restore and upscale photos with SUPIR (and optionally LLaVA captions, CodeFormer faces)",
         _restore_args)
def restore(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from .nodes import supir_support as S

    files = _images(args.input)
    sdxl, supir = _pick_models(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"restore: loading {Path(sdxl).name} + {Path(supir).name}")
    handle = S.load_supir_files(sdxl, supir, args.dtype, "auto", name=Path(supir).name)
    preset = S.PRESETS[args.preset.capitalize()]
    settings = S.with_settings(preset, steps=args.steps, seed=args.seed, tile_size=args.tile_size,
                               tile_stride=args.tile_stride)
    options = S.RestoreOptions(
        settings=settings, upscale=args.upscale, min_short_side=args.min_short_side,
        tiling="on" if args.tiled else "off" if args.no_tiling else "auto", color_fix=args.color_fix,
        tiled_vae=not args.no_tiled_vae)
    if args.prompt is not None:
        options = replace(options, positive=args.prompt)
    if args.negative is not None:
        options = replace(options, negative=args.negative)
    captioner = _llava_captioner(args.caption_llava) if args.caption_llava else None
    faces = _face_restorer(args) if args.faces else None
    for f in files:
        image = _load_image(f)
        captions = [args.caption] if args.caption else []
        if captioner is not None:
            captions = [captioner(image)]
            print(f"restore: {f.name}: caption: {captions[0]}")
        result = S.restore(handle, image, options, captions)
        if faces is not None:
            result = faces(result)
        target = out / (f.stem + ".png")
        _save_image(result, target)
        print(f"restore: {f.name} {image.shape[-1]}x{image.shape[-2]} -> {target} "
              f"{result.shape[-1]}x{result.shape[-2]}")
    return 0


def _llava_captioner(name: str):
    """image [1,3,H,W] 0..1 -> caption, with the pack's LLaVA code (models/LLM/<name>)."""
    raise SystemExit("restore: --caption-llava needs the LLaVA captioner (supir/caption.py), not in this build yet")


def _face_restorer(args: argparse.Namespace):
    """image [1,3,H,W] 0..1 -> image with faces restored by CodeFormer."""
    if getattr(args, "quiet_missing", False) and not _faces_available():
        return None
    raise SystemExit("restore: --faces needs the CodeFormer pipeline (codeformer/pipeline.py), not in this build yet")
