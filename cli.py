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
