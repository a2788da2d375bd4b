"""Shared by the bench scripts: import the pack from *this* checkout as ``photo_restoration``.

The repository root is the package (ComfyUI imports it under its folder name); the scripts run as
``python bench/<name>.py`` and import it the same way, whatever copy may be installed.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_pack():
    """The checkout as the ``photo_restoration`` package (imported once, relative imports inside)."""
    module = sys.modules.get("photo_restoration")
    if module is not None and Path(module.__file__).resolve().parent == ROOT:
        return module
    spec = importlib.util.spec_from_file_location("photo_restoration", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["photo_restoration"] = module
    spec.loader.exec_module(module)
    return module
