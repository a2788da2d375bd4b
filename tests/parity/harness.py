"""Loader for the parity fixture folders (``../shared/parity/supir`` and ``../shared/parity/codeformer``).

A *case* is one JSON file made by running the official code on random weights; its ``kind`` says
which semantics it checks. The folder comes from ``SUPIR_PARITY_DIR`` / ``CODEFORMER_PARITY_DIR``,
defaulting to ``../shared/parity/<family>`` beside the repository. An explicitly set folder that is
missing or holds no case is an error; only a missing *default* folder is skipped.

Per-kind checks live in ``tests/parity/check_*.py`` modules, each exporting
``CHECKS = {("supir" | "codeformer", kind): function(case)}``; a kind without a check is skipped
with a message naming it.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

FAMILIES = {
    # family: (environment variable, default folder, glob of case files inside the folder)
    "supir": ("SUPIR_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity" / "supir", "*.json"),
    "codeformer": ("CODEFORMER_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity" / "codeformer", "cases/*.json"),
}


@dataclass
class Case:
    family: str
    name: str
    kind: str
    path: Path
    data: dict
    folder: Path
    _tensor_cache: dict = field(default_factory=dict, repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def file(self, relative: str) -> Path:
        """A file named relative to the fixture folder (as the case JSONs name them)."""
        p = self.folder / relative
        if not p.exists():
            raise FileNotFoundError(f"case {self.name}: {relative} is missing from {self.folder}")
        return p

    def tensors(self, relative: str | None = None) -> dict:
        """All tensors of a safetensors file of the fixture (default: ``<case>.safetensors``)."""
        from safetensors.torch import load_file

        p = self.file(relative) if relative else self.path.with_suffix(".safetensors")
        if p not in self._tensor_cache:
            self._tensor_cache[p] = load_file(str(p))
        return self._tensor_cache[p]

    def tensor(self, spec: dict):
        """The tensor a ``{file, key}`` spec of a CodeFormer case points at."""
        return self.tensors(spec["file"])[spec["key"]]


@dataclass
class FolderProblem:
    """Stands in for the cases when the folder cannot be used: fails or skips with its message."""

    family: str
    message: str
    fatal: bool
    name: str = "fixture-folder"


def fixture_folder(family: str) -> tuple[Path, bool]:
    """The fixture folder of a family and whether it was set explicitly."""
    var, default, _ = FAMILIES[family]
    value = os.environ.get(var)
    return (Path(value), True) if value else (default, False)


def load_cases(family: str) -> list[Case | FolderProblem]:
    """Every case of a family's folder, sorted by name (or one FolderProblem)."""
    var, _, pattern = FAMILIES[family]
    folder, explicit = fixture_folder(family)
    if not folder.is_dir():
        if explicit:
            return [FolderProblem(family, f"{var}={folder} does not exist", fatal=True)]
        return [FolderProblem(family, f"default parity folder {folder} is absent (set {var})", fatal=False)]
    cases = []
    for path in sorted(folder.glob(pattern)):
        data = json.loads(path.read_text())
        if "kind" not in data:
            continue
        cases.append(Case(family, data.get("name", path.stem), data["kind"], path, data, folder))
    if not cases:
        return [FolderProblem(family, f"no case files ({pattern}) in {folder}", fatal=explicit)]
    return cases


def case_params(family: str) -> list:
    """pytest params, one per case, with ids ``<family>-<case name>``."""
    return [pytest.param(c, id=f"{family}-{c.name}") for c in load_cases(family)]


def checks() -> dict[tuple[str, str], Callable[[Case], None]]:
    """Every registered per-kind check, gathered from ``check_*`` modules of this package."""
    found: dict = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("check_"):
            module = importlib.import_module(f"{__package__}.{info.name}")
            found.update(getattr(module, "CHECKS", {}))
    return found


def run_case(case: Case | FolderProblem) -> None:
    if isinstance(case, FolderProblem):
        (pytest.fail if case.fatal else pytest.skip)(case.message)
    check = checks().get((case.family, case.kind))
    if check is None:
        pytest.skip(f"no check registered for {case.family} kind '{case.kind}' yet")
    check(case)


# ---- comparison helpers shared by the checks ---------------------------------------------------

def assert_close(name: str, got, ref, atol: float, rtol: float = 0.0) -> float:
    """Elementwise |got-ref| <= atol + rtol*|ref|; returns the max abs error (for reports)."""
    import torch

    got = torch.as_tensor(got).double().cpu()
    ref = torch.as_tensor(ref).double().cpu()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != expected {tuple(ref.shape)}"
    err = (got - ref).abs()
    bound = atol + rtol * ref.abs()
    bad = err > bound
    assert not bad.any(), (
        f"{name}: {int(bad.sum())}/{err.numel()} values off; max |err| {err.max().item():.3g} "
        f"(atol {atol}, rtol {rtol})"
    )
    return err.max().item() if err.numel() else 0.0


def manifest(family: str, name: str) -> Path:
    """A full-size key manifest of the fixture folder (``manifests/<name>``); skips when the default
    folder is absent, fails when an explicitly set folder lacks it."""
    folder, explicit = fixture_folder(family)
    path = folder / "manifests" / name
    if not path.is_file():
        (pytest.fail if explicit else pytest.skip)(f"manifest {path} is absent")
    return path
