"""Make ``photo_restoration`` resolve to *this* checkout (not another installed copy), the way
ComfyUI imports the pack: the repository root as a package, relative imports inside."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_pack_from_checkout() -> None:
    mod = sys.modules.get("photo_restoration")
    if mod is not None and Path(mod.__file__).resolve().parent == ROOT:
        return
    for name in [m for m in sys.modules if m == "photo_restoration" or m.startswith("photo_restoration.")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        "photo_restoration", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["photo_restoration"] = module
    spec.loader.exec_module(module)


_import_pack_from_checkout()
