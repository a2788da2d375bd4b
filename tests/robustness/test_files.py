"""Damaged, foreign and hostile weight files through every loader node: truncated, empty, text, a pickle
whose ``__reduce__`` would run a command, the safetensors/pickle formats behind each other's extension,
crafted safetensors headers, the wrong model family. Each case: the model loads, or a ValueError naming
the file; a hostile file never runs code."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch

from photo_restoration.nodes import comfy
from photo_restoration.weightfile import read_weights

from .fuzz import call, case, node, outcome

MARKER_NAME = "hostile_code_ran"


class Hostile:
    """Unpickling this creates the marker file: no loader may ever do that."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _crafted(header: object, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# damage -> (extension, make(good_file, marker) -> bytes)
DAMAGE: dict[str, tuple[str, Callable[[Path, Path], bytes]]] = {
    "truncated": (None, lambda good, m: good.read_bytes()[: good.stat().st_size // 2]),
    "truncated-header": (None, lambda good, m: good.read_bytes()[:12]),
    "empty": (None, lambda good, m: b""),
    "text": (None, lambda good, m: b"This is a README, not a model.\n" * 40),
    "html-error-page": (None, lambda good, m: b"<!DOCTYPE html><html><body>404 Not Found</body></html>"),
    "hostile": (".ckpt", None),
    "hostile-named-safetensors": (".safetensors", None),
    "safetensors-named-ckpt": (".ckpt", lambda good, m: _as_safetensors(good)),
    "pickle-named-safetensors": (".safetensors", lambda good, m: _as_pickle(good)),
    "header-a-list": (".safetensors", lambda good, m: _crafted([1, 2, 3], b"")),
    "bytes-shorter-than-shape": (".safetensors", lambda good, m: _crafted(
        {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}, b"\0" * 8)),
    "unknown-dtype": (".safetensors", lambda good, m: _crafted(
        {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")),
}


def _as_safetensors(good: Path) -> bytes:
    from safetensors.torch import save

    sd, _ = read_weights(good)
    return save({k: v.contiguous() for k, v in sd.items()})


def _as_pickle(good: Path) -> bytes:
    import io

    sd, _ = read_weights(good)
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def _write_damaged(damage: str, good: Path, folder: Path, stem: str) -> Path:
    ext, make = DAMAGE[damage]
    path = folder / f"{stem}{ext or good.suffix}"
    marker = folder.parent / MARKER_NAME
    if make is None:
        torch.save({"weight": torch.zeros(2), "payload": Hostile(marker)}, path)
    else:
        path.write_bytes(make(good, marker))
    return path


@pytest.fixture(autouse=True)
def no_code_ran(models_dir):
    yield
    assert not list(models_dir.rglob(MARKER_NAME)), "a weight file ran code while loading"


@pytest.fixture
def good(tiny_models, names) -> dict[str, Path]:
    root = tiny_models[0]
    return {"sdxl": root / "checkpoints" / names["sdxl"], "supir": root / "checkpoints" / names["supir"],
            "codeformer": root / "facerestore_models" / names["codeformer"],
            "detector": root / "facedetection" / names["detector"], "parser": root / "facedetection" / names["parser"]}


@pytest.mark.parametrize("role", ["sdxl", "supir"])
@pytest.mark.parametrize("damage", [case(f"LoadSupir-{d}", d) for d in DAMAGE])
def test_load_supir(models_dir, names, good, damage, role):
    path = _write_damaged(damage, good[role], models_dir / "checkpoints", f"{role}-{damage}")
    inputs = {"sdxl_checkpoint": names["sdxl"], "supir_checkpoint": names["supir"], "weight_dtype": "fp32",
              "vae_dtype": "fp32", f"{role}_checkpoint": path.name}
    outcome(lambda: call(node("SupirLoader"), inputs), inputs, [path.name])


@pytest.mark.parametrize("damage", [case(f"LoadCodeFormer-{d}", d) for d in DAMAGE])
def test_load_codeformer(models_dir, good, damage):
    path = _write_damaged(damage, good["codeformer"], models_dir / "facerestore_models", f"cf-{damage}")
    inputs = {"model_name": path.name, "dtype": "fp32"}
    outcome(lambda: call(node("LoadCodeFormer"), inputs), inputs, [path.name])


@pytest.mark.parametrize("damage", [case(f"LoadFaceModel-{d}", d) for d in DAMAGE])
def test_load_face_model(models_dir, good, damage):
    path = _write_damaged(damage, good["codeformer"], models_dir / "facerestore_models", f"fm-{damage}")
    inputs = {"model_name": path.name, "dtype": "fp32"}
    outcome(lambda: call(node("LoadFaceModel"), inputs), inputs, [path.name])


@pytest.mark.parametrize("role", ["detector", "parser"])
@pytest.mark.parametrize("damage", [case(f"LoadFaceDetector-{d}", d) for d in DAMAGE])
def test_load_face_detector(tmp_path, good, damage, role):
    """The detector and parser have fixed official names: each case gets its own models folder."""
    folder = tmp_path / "facedetection"
    folder.mkdir()
    for f in ("detector", "parser"):
        shutil.copy(good[f], folder / good[f].name)
    damaged = _write_damaged(damage, good[role], folder, "damaged")
    target = folder / good[role].name
    damaged.replace(target)
    comfy.set_models_dir(tmp_path)
    try:
        inputs = {"detector": "mobilenet0.25", "parser": "parsenet"}
        outcome(lambda: call(node("LoadFaceDetector"), inputs), inputs, [target.name])
    finally:
        comfy.set_models_dir(good["sdxl"].parent.parent)
    assert not (tmp_path / MARKER_NAME).exists()


LLAVA_DAMAGE = ["truncated", "truncated-header", "empty", "text", "hostile-bin", "header-a-list",
                "bytes-shorter-than-shape", "no-weights", "config-not-json", "config-not-llava"]


@pytest.mark.parametrize("damage", [case(f"LoadLlava-{d}", d) for d in LLAVA_DAMAGE])
def test_load_llava(models_dir, names, damage):
    src = models_dir / "LLM" / names["llava"]
    folder = models_dir / "LLM" / f"llava-{damage}"
    shutil.copytree(src, folder)
    weights = folder / "model.safetensors"
    if damage == "hostile-bin":
        weights.unlink()
        torch.save({"weight": torch.zeros(2), "payload": Hostile(models_dir / MARKER_NAME)},
                   folder / "pytorch_model.bin")
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "config-not-json":
        (folder / "config.json").write_text("{not json")
    elif damage == "config-not-llava":
        (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    else:
        weights.write_bytes(DAMAGE[damage][1](src / "model.safetensors", models_dir / MARKER_NAME))
    inputs = {"model": folder.name, "dtype": "fp32", "quantization": "none"}
    outcome(lambda: call(node("LoadLlava"), inputs), inputs, [folder.name])


@pytest.mark.parametrize("damage", [case("LoadSupir-wrong-family-codeformer-as-sdxl", "sdxl"),
                                    case("LoadSupir-wrong-family-sdxl-as-supir", "supir")])
def test_wrong_family(models_dir, names, good, damage):
    wrong = good["codeformer"] if damage == "sdxl" else good["sdxl"]
    copy = models_dir / "checkpoints" / f"wrong-{damage}{wrong.suffix}"
    shutil.copy(wrong, copy)
    inputs = {"sdxl_checkpoint": names["sdxl"], "supir_checkpoint": names["supir"], "weight_dtype": "fp32",
              "vae_dtype": "fp32", f"{damage}_checkpoint": copy.name}
    outcome(lambda: call(node("SupirLoader"), inputs), inputs, [copy.name])


def test_codeformer_file_given_the_sdxl_checkpoint(models_dir, good):
    copy = models_dir / "facerestore_models" / "sdxl-as-codeformer.safetensors"
    shutil.copy(good["sdxl"], copy)
    inputs = {"model_name": copy.name, "dtype": "fp32"}
    outcome(lambda: call(node("LoadCodeFormer"), inputs), inputs, [copy.name])
