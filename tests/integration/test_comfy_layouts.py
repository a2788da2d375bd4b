"""SUPIR built from ComfyUI's own MODEL / CLIP / VAE objects equals SUPIR loaded from the files.

Runs inside a real ComfyUI (``COMFYUI_PATH``), in a subprocess: the tiny SDXL checkpoint is turned
into ComfyUI objects by ComfyUI's code (UNet config detected by ``comfy.model_detection``, an SDXL
``BaseModel`` under a ``ModelPatcher``, a ``comfy.sd.VAE``, and the CLIP state dict in ComfyUI's
layout from ``supported_models.SDXL.process_clip_state_dict``), then handed to the
"Load SUPIR (from MODEL/CLIP/VAE)" node. Its weights must equal those of "Load SUPIR" on the files.
(ComfyUI's own checkpoint loader refuses a tiny SDXL — it recognises SDXL by its full-size
configuration — so the objects are built here with the same ComfyUI functions it uses.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
REPO_ROOT = Path(__file__).resolve().parents[2]

if not COMFYUI_PATH:
    pytest.skip("COMFYUI_PATH is not set: no ComfyUI checkout to test against", allow_module_level=True)

SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    import torch
    sys.path.insert(0, os.getcwd())
    from comfy.cli_args import args
    args.cpu = True
    import folder_paths
    base, repo = sys.argv[1], sys.argv[2]
    folder_paths.models_dir = os.path.join(base, "models")
    folder_paths.folder_names_and_paths["checkpoints"] = ([os.path.join(base, "models", "checkpoints")],
                                                          folder_paths.supported_pt_extensions)
    import comfy.model_detection, comfy.model_management, comfy.model_patcher, comfy.sd
    import comfy.supported_models, comfy.utils
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("pack_under_test", os.path.join(repo, "__init__.py"),
                                                  submodule_search_locations=[repo])
    pack = importlib.util.module_from_spec(spec); sys.modules["pack_under_test"] = pack
    spec.loader.exec_module(pack)
    N = sys.modules["pack_under_test.nodes.supir_nodes"]
    vae_mod = sys.modules.get("pack_under_test.supir.vae") or __import__("pack_under_test.supir.vae").supir.vae

    ckpt = load_file(os.path.join(base, "models", "checkpoints", "tiny_sdxl.safetensors"))
    ckpt = {k: v.float() for k, v in ckpt.items()}

    # MODEL, as ComfyUI builds it from a checkpoint
    unet_config = comfy.model_detection.detect_unet_config(ckpt, "model.diffusion_model.")
    model_config = comfy.supported_models.SDXL(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model(ckpt, "model.diffusion_model.")
    base_model.load_model_weights(ckpt, "model.diffusion_model.")
    model = comfy.model_patcher.ModelPatcher(base_model, load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))

    # VAE, as comfy.sd.VAE builds it (tiny widths given explicitly, as ComfyUI only guesses full size)
    vae_sd = comfy.utils.state_dict_prefix_replace(ckpt, {"first_stage_model.": ""}, filter_keys=True)
    vae_sd = {k: v for k, v in vae_sd.items() if not k.startswith("denoise_encoder.")}
    cfg = vae_mod.detect_vae_config(vae_sd)
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    ddconfig = {"double_z": True, "z_channels": get("z_channels"), "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": get("ch"), "ch_mult": list(get("ch_mult")),
                "num_res_blocks": get("num_res_blocks"), "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd=vae_sd, config={"params": {"ddconfig": ddconfig, "embed_dim": get("embed_dim")}})

    # CLIP: its state dict in ComfyUI's layout (clip_l.* / clip_g.* Hugging Face style)
    class Clip:
        def __init__(self):
            self.sd = model_config.process_clip_state_dict(dict(ckpt))
            self.patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(1, 1), torch.device("cpu"),
                                                            torch.device("cpu"))
        def get_sd(self):
            return dict(self.sd)
        def load_model(self):
            return self.patcher

    clip = Clip()
    out = {"clip_keys": sorted(clip.sd)[:3], "unet_config_channels": unet_config["model_channels"]}
    from_objects = N.LoadSupirFromModel().load(model, clip, vae, "tiny_supir_v0.safetensors", "fp32", "fp32")[0]
    from_files = N.LoadSupir().load("tiny_sdxl.safetensors", "tiny_supir_v0.safetensors", "fp32", "fp32")[0]
    diffs = {}
    for part in ("diffusion", "vae", "text"):
        a = getattr(from_objects.model, part).state_dict()
        b = getattr(from_files.model, part).state_dict()
        diffs[part] = {"keys_equal": sorted(a) == sorted(b),
                       "max_abs": max((a[k].float() - b[k].float()).abs().max().item() for k in a) if a else 0.0,
                       "n": len(a)}
    out["diffs"] = diffs
    print("RESULT" + json.dumps(out))
    """
)


def test_load_supir_from_comfyui_objects_equals_loading_the_files(tmp_path):
    from photo_restoration.testing.tiny_checkpoints import write_all

    write_all(tmp_path / "models", only=["supir"])
    proc = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", SCRIPT, str(tmp_path),
                           str(REPO_ROOT)], cwd=COMFYUI_PATH, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, (proc.stdout + proc.stderr)[-5000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["clip_keys"][0].startswith(("clip_g.", "clip_l.")), out
    for part, d in out["diffs"].items():
        assert d["n"] > 0 and d["keys_equal"], (part, d)
        assert d["max_abs"] == 0.0, (part, d)
