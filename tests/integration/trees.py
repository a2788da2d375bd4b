"""Which real ComfyUI source trees the integration tests run against.

``COMFYUI_PATH`` set: that one tree (it must be a ComfyUI checkout; a wrong path fails). Unset: every
tree under ``../shared/comfyui/`` beside the repository (each sub-folder holding a ``main.py``), so CI
runs the suite against every ComfyUI version users run. Test ids name the version, e.g.
``[comfyui-0.33.0]``. No tree at all: the integration tests skip with a message saying why.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_TREES = REPO_ROOT.parent / "shared" / "comfyui"


class Tree:
    """One ComfyUI source tree: its path and its version (from ``comfyui_version.py``)."""

    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.version = _version(self.path)

    @property
    def id(self) -> str:
        return f"comfyui-{self.version}"

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", self.version)[:3]) or (0,)

    def __repr__(self) -> str:
        return f"Tree({self.id} at {self.path})"


def _version(path: Path) -> str:
    f = path / "comfyui_version.py"
    if f.is_file():
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read_text())
        if m:
            return m.group(1)
    return path.name


def comfy_trees() -> list[Tree]:
    """The trees to test against (see the module docstring); raises for a wrong ``COMFYUI_PATH``."""
    explicit = os.environ.get("COMFYUI_PATH")
    if explicit:
        if not (Path(explicit) / "main.py").is_file():
            raise FileNotFoundError(f"COMFYUI_PATH={explicit} is not a ComfyUI checkout (no main.py)")
        return [Tree(Path(explicit))]
    if not SHARED_TREES.is_dir():
        return []
    found = [Tree(p) for p in sorted(SHARED_TREES.iterdir()) if (p / "main.py").is_file()]
    return sorted(found, key=lambda t: t.version_tuple)


def newest_tree() -> Tree | None:
    trees = comfy_trees()
    return trees[-1] if trees else None


NO_TREE_REASON = ("no ComfyUI source tree: set COMFYUI_PATH or put ComfyUI trees in ../shared/comfyui/ "
                  "beside the repository")
