"""Tiny models for the robustness suite: written once per session into a temporary models folder (names taken
from the writers' returned paths, so they follow the writers), loaded once per session through the loader nodes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from photo_restoration.nodes import comfy

from .fuzz import call, node

WRITERS = ("supir", "codeformer", "retinaface_mobilenet0.25", "parsing_parsenet", "llava")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[Path, dict[str, list[Path]]]:
    from photo_restoration.testing.tiny_checkpoints import write_all

    root = tmp_path_factory.mktemp("models")
    return root, write_all(root, WRITERS)


@pytest.fixture(autouse=True, scope="module")
def models_dir(tiny_models):
    """The models folder of the tiny weights, for every module of this suite (other suites reset it)."""
    comfy.set_models_dir(tiny_models[0])
    yield tiny_models[0]
    comfy.set_models_dir(None)


@pytest.fixture(scope="session")
def names(tiny_models) -> dict[str, str]:
    """Widget values naming the tiny files: sdxl, supir, codeformer, detector, parser, llava (a folder)."""
    root, files = tiny_models

    def rel(path: Path, folder: str) -> str:
        return path.relative_to(root / folder).as_posix()

    supir_files = files["supir"]
    sdxl = next(p for p in supir_files if "supir" not in p.name.lower())
    supir = next(p for p in supir_files if "supir" in p.name.lower())
    llava_dirs = sorted({p.parent for p in files["llava"] if p.name == "config.json"})
    llava = next((d for d in llava_dirs if "next" not in d.name), llava_dirs[0])
    return {"sdxl": rel(sdxl, "checkpoints"), "supir": rel(supir, "checkpoints"),
            "codeformer": rel(files["codeformer"][0], "facerestore_models"),
            "detector": files["retinaface_mobilenet0.25"][0].name, "parser": files["parsing_parsenet"][0].name,
            "llava": llava.name}


@pytest.fixture(scope="session")
def loader_inputs(names) -> dict[str, dict]:
    """Working inputs of every loader node (node short name -> inputs) on the tiny files, in fp32."""
    return {
        "SupirLoader": {"sdxl_checkpoint": names["sdxl"], "supir_checkpoint": names["supir"],
                        "weight_dtype": "fp32", "vae_dtype": "fp32"},
        "LoadCodeFormer": {"model_name": names["codeformer"], "dtype": "fp32"},
        "LoadFaceModel": {"model_name": names["codeformer"], "dtype": "fp32"},
        "LoadFaceDetector": {"detector": "mobilenet0.25", "parser": "parsenet"},
        "LoadLlava": {"model": names["llava"], "dtype": "fp32", "quantization": "none"},
    }


def _loaded(fixture_name: str, short: str):
    """A session fixture holding what loader node ``short`` returns for the tiny files."""
    @pytest.fixture(scope="session", name=fixture_name)
    def fixture(tiny_models, loader_inputs):
        comfy.set_models_dir(tiny_models[0])
        return call(node(short), loader_inputs[short])[0]
    return fixture


supir_fixture = _loaded("supir", "SupirLoader")
codeformer_fixture = _loaded("codeformer", "LoadCodeFormer")
face_model_fixture = _loaded("face_model", "LoadFaceModel")
face_detector_fixture = _loaded("face_detector", "LoadFaceDetector")
llava_fixture = _loaded("llava", "LoadLlava")


@pytest.fixture(scope="session")
def conditioning(supir):
    return call(node("SupirConditioner"), {"supir": supir, "positive_prompt": "sharp", "negative_prompt": "blur",
                                           "caption_mode": node("SupirConditioner").INPUT_TYPES()["required"]
                                           ["caption_mode"][0][0]})


@pytest.fixture(scope="session")
def control_latent(supir):
    """A First Stage LATENT of a 32x48 picture."""
    g = torch.Generator().manual_seed(5)
    return call(node("SupirFirstStage"), {"supir": supir, "image": torch.rand(1, 32, 48, 3, generator=g),
                                          "tiled_vae": False, "encoder_tile_size": 512,
                                          "decoder_tile_size": 512})[1]
