"""Write tiny random-weight checkpoints in the OFFICIAL key layouts into a ComfyUI ``models`` tree.

Each model family lives in a module ``testing/tiny_<family>.py`` that defines
``WRITERS: dict[str, Callable[[Path, int], list[Path]]]``: a writer takes the ``models`` directory
and a seed, writes its files where ComfyUI (and the pack's loaders) look for them, e.g.
``models/facerestore_models/codeformer.pth``, and returns their paths. Writers are deterministic
for a given seed.

Command line::

    python -m photo_restoration.testing.tiny_checkpoints MODELS_DIR [--only NAME ...] [--seed N]
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from pathlib import Path
from typing import Callable, Iterable

import torch

Writer = Callable[[Path, int], "list[Path]"]


def writers() -> dict[str, Writer]:
    """Every registered writer, gathered from the ``tiny_*`` modules of this package."""
    found: dict[str, Writer] = {}
    from . import __path__ as pkg_path

    for info in sorted(pkgutil.iter_modules(pkg_path), key=lambda m: m.name):
        if info.name.startswith("tiny_") and info.name != "tiny_checkpoints":
            module = importlib.import_module(f".{info.name}", __package__)
            found.update(getattr(module, "WRITERS", {}))
    return found


def write_all(models_dir: str | Path, only: Iterable[str] | None = None, seed: int = 0) -> dict[str, list[Path]]:
    """Run the chosen writers (all by default) into ``models_dir``; returns name -> written files."""
    models_dir = Path(models_dir)
    available = writers()
    names = list(only) if only else sorted(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise KeyError(f"unknown tiny checkpoint writer(s) {unknown}; available: {sorted(available)}")
    return {name: available[name](models_dir, seed) for name in names}


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int, std: float = 0.05,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors for a key -> shape table, deterministic per seed and key order.

    Norm weights (keys ending in ``norm*.weight`` or ``ln*.weight``) start near one so that tiny
    networks stay numerically tame; everything else is N(0, std).
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=gen) * std
        leaf = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else key
        if key.endswith(".weight") and ("norm" in leaf or leaf.startswith("ln")) and len(shape) == 1:
            t = t + 1.0
        out[key] = t.to(dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models_dir", help="the models directory to fill (created if missing)")
    parser.add_argument("--only", nargs="*", help=f"writer names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the writers and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(sorted(writers())))
        return 0
    for name, files in write_all(args.models_dir, args.only, args.seed).items():
        for f in files:
            print(f"{name}: {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
