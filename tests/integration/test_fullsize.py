"""Full-size SDXL and SUPIR through ComfyUI's own loaders, on the newest ComfyUI tree (slow; CI runs it).

Random full-size files are written from the manifests of the published files (``testing/fullsize.py``:
``sd_xl_base_1.0.safetensors`` fp16 and ``SUPIR-v0Q.ckpt``, about 9.6 GB, deleted afterwards), then
1. ``CheckpointLoaderSimple`` -> ``LoraLoader`` (a random kohya LoRA) -> Load SUPIR (from MODEL/CLIP/VAE)
   -> SUPIR Restore, and
2. Load SUPIR (files) -> SUPIR Restore,
each at 256x256 with 2 steps in bf16, in its own ComfyUI process; the restored images must come out
256x256. This is the path users take with a real SDXL finetune and their LoRA stack.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .comfy_server import ComfyServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MANIFESTS = Path(__file__).resolve().parents[3] / "shared" / "parity" / "supir" / "manifests"
LORA_TARGETS = {  # kohya name -> (out, in) at full size
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048),
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2": (1280, 5120),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    "lora_te2_text_model_encoder_layers_0_self_attn_v_proj": (1280, 1280),
}


@pytest.fixture(scope="module")
def fullsize_base(tmp_path_factory):
    from photo_restoration.testing.fullsize import write_fullsize_sdxl, write_fullsize_supir, write_kohya_lora
    from photo_restoration.testing.images import synthetic_photo

    manifests = Path(__import__("os").environ.get("SUPIR_MANIFEST_DIR", MANIFESTS))
    if not (manifests / "sdxl_base_ckpt.json").is_file():
        pytest.skip(f"no full-size key manifests in {manifests}")
    base = tmp_path_factory.mktemp("fullsize")
    try:
        ckpts = base / "models" / "checkpoints"
        ckpts.mkdir(parents=True)
        (base / "models" / "loras").mkdir(parents=True)
        write_fullsize_sdxl(ckpts / "sd_xl_base_1.0.safetensors", manifests / "sdxl_base_ckpt.json")
        write_fullsize_supir(ckpts / "SUPIR-v0Q.ckpt", manifests / "supir_v0_ckpt.json")
        write_kohya_lora(base / "models" / "loras" / "fullsize_kohya.safetensors", LORA_TARGETS)
        (base / "input").mkdir()
        synthetic_photo(256, 256).save(base / "input" / "photo_256.png")
        yield base
    finally:
        shutil.rmtree(base / "models", ignore_errors=True)  # ~9.6 GB


def _restore(supir_from: list, seed: int) -> dict:
    return {
        "5": {"class_type": "PhotoRestoreSupirRestore",
              "inputs": {"supir": supir_from, "image": ["1", 0], "upscale_by": 1.0, "preset": "Quality",
                         "seed": seed, "steps": 2, "positive_prompt": "a photo", "negative_prompt": "blurry",
                         "min_short_side": 0, "tiling": "off", "tile_size": 1024, "tile_stride": 512,
                         "color_fix": "Wavelet", "tiled_vae": True}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": f"fullsize_{seed}"}},
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo_256.png"}},
    }


PROMPTS = {
    "checkpoint_loader_lora_from_model": lambda: {
        **_restore(["4", 0], seed=1),
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "3": {"class_type": "LoraLoader",
              "inputs": {"model": ["2", 0], "clip": ["2", 1], "lora_name": "fullsize_kohya.safetensors",
                         "strength_model": 0.8, "strength_clip": 0.8}},
        "4": {"class_type": "PhotoRestoreSupirLoaderFromModel",
              "inputs": {"model": ["3", 0], "clip": ["3", 1], "vae": ["2", 2], "supir_checkpoint": "SUPIR-v0Q.ckpt",
                         "weight_dtype": "bf16", "vae_dtype": "bf16"}},
    },
    "file_loader": lambda: {
        **_restore(["4", 0], seed=2),
        "4": {"class_type": "PhotoRestoreSupirLoader",
              "inputs": {"sdxl_checkpoint": "sd_xl_base_1.0.safetensors", "supir_checkpoint": "SUPIR-v0Q.ckpt",
                         "weight_dtype": "bf16", "vae_dtype": "bf16"}},
    },
}


@pytest.mark.parametrize("path", list(PROMPTS), ids=list(PROMPTS))
def test_fullsize_supir_restore_through_comfyui_loaders(newest_comfy_tree, fullsize_base, path):
    from PIL import Image

    # one ComfyUI process per path, so that only one full-size model set is in memory at a time;
    # ComfyUI keeps its SDXL in bf16 (the CPU default would be fp32, 10 GB more)
    with ComfyServer(newest_comfy_tree.path, fullsize_base, extra_args=("--bf16-unet",)) as server:
        entry = server.run_prompt(PROMPTS[path](), timeout=1500)
        status = entry["status"]
        assert status["status_str"] == "success", str(status.get("messages"))[-4000:]
        images = entry["outputs"]["6"]["images"]
        assert len(images) == 1
        with Image.open(fullsize_base / "output" / images[0].get("subfolder", "") / images[0]["filename"]) as im:
            assert im.size == (256, 256)
