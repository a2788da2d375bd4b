"""Test-suite set-up: ``photo_restoration`` resolves to *this* checkout (not another installed copy), the
way ComfyUI imports the pack (the repository root as a package, relative imports inside); and one torch
thread for the whole suite."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The suite runs tiny networks: one intra-op thread is faster than several contending for a
    small (often shared) CI machine, where thread hand-offs cost more than the work itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
