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
    return 0


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
