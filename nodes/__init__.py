"""ComfyUI node classes (thin wrappers over ``supir/`` and ``codeformer/``).

Every module named ``*_nodes.py`` in this folder contributes ``NODE_CLASS_MAPPINGS`` and
``NODE_DISPLAY_NAME_MAPPINGS``; they are gathered here. Node ids and custom type names carry the
``PhotoRestore`` / ``PHOTORESTORE_`` prefix so they never clash with other packs.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil

log = logging.getLogger("photo_restoration")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
IMPORT_ERRORS: dict[str, BaseException] = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.endswith("_nodes"):
        continue
    try:
        _module = importlib.import_module(f".{_info.name}", __name__)
    except Exception as exc:  # one broken family must not hide the others
        IMPORT_ERRORS[_info.name] = exc
        log.exception("photo_restoration: could not import nodes/%s.py", _info.name)
        continue
    NODE_CLASS_MAPPINGS.update(getattr(_module, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
