"""Tiny random-weight SUPIR checkpoints in the official layouts.

``models/checkpoints/tiny_sdxl.safetensors``: float16 SGM-layout SDXL checkpoint (``model.diffusion_model.*``
UNet, ``first_stage_model.*`` VAE and ``conditioner.embedders.*`` text encoders; VAE and text parts from
``testing/tiny_supir_parts.py``).
``models/checkpoints/tiny_supir_v0.safetensors``: float32 SUPIR-v0 checkpoint (``model.control_model.*``,
``model.diffusion_model.project_modules.*``, ``first_stage_model.denoise_encoder.*``).
``write_all`` (the registered writer) puts the same weights under the published names the example
workflows use: ``sd_xl_base_1.0.safetensors``, and ``SUPIR-v0Q.ckpt`` as a flat weights-only pickle like
the published ``.ckpt`` files.
The UNet is a scaled-down SDXL (3 levels, transformers on levels 1-2, widths 32/64/64) whose
attention heads are 64 wide like the official ones, so the default ``num_head_channels`` loads it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .tiny_checkpoints import random_state_dict

# The published file names (example workflows name these; tests put tiny weights under them).
PUBLISHED_SDXL = "sd_xl_base_1.0.safetensors"
PUBLISHED_SUPIR_Q = "SUPIR-v0Q.ckpt"

TINY_UNET = {
    "in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": [1, 2, 2],
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 1, 2], "transformer_depth_middle": 2,
    "context_dim": 64, "adm_in_channels": 128, "num_head_channels": 64,
}
TINY_ADAPTER = {"sft_hidden": 16, "project_channel_scale": 2}
TINY_HEAD_CHANNELS = TINY_UNET["num_head_channels"]


def tiny_diffusion_shapes(unet: dict | None = None, adapter: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of SupirDiffusion (keys as in the official model, without the leading ``model.``)."""
    from ..supir.loader import build_diffusion

    model = build_diffusion(unet or TINY_UNET, adapter or TINY_ADAPTER, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def tiny_state_dicts(seed: int = 0, unet: dict | None = None, adapter: dict | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(SDXL part, SUPIR part) of the diffusion weights with their official ``model.`` key prefixes."""
    shapes = tiny_diffusion_shapes(unet, adapter)
    sd = random_state_dict({"model." + k: s for k, s in shapes.items()}, seed)
    sdxl = {k: v for k, v in sd.items()
            if k.startswith("model.diffusion_model.") and ".project_modules." not in k}
    supir = {k: v for k, v in sd.items() if k not in sdxl}
    return sdxl, supir


def _parts(seed: int) -> tuple[dict, dict]:
    """VAE (+ denoise encoder) and text-encoder weights whose widths fit TINY_UNET
    (context 24 + 40 = 64, ADM 32 + 6 * 16 = 128)."""
    from . import tiny_supir_parts as parts

    vae = parts.tiny_vae_state_dict(seed)
    sdxl_extra = {k: v for k, v in vae.items() if ".denoise_encoder." not in k}
    supir_extra = {k: v for k, v in vae.items() if ".denoise_encoder." in k}
    # three layers per text encoder: ComfyUI's SDXL CLIP takes the penultimate layer and asserts there is one
    # before it, so a real comfy.sd.CLIP can be built on these weights (tests/integration)
    sdxl_extra.update(parts.tiny_text_state_dict(seed, clip_l_layers=3, clip_g_layers=3))
    return sdxl_extra, supir_extra


def write_tiny_supir(models_dir: Path, seed: int = 0) -> list[Path]:
    from safetensors.torch import save_file

    sdxl, supir = tiny_state_dicts(seed)
    sdxl_extra, supir_extra = _parts(seed)
    sdxl.update(sdxl_extra)
    supir.update(supir_extra)
    out = Path(models_dir) / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    p_sdxl, p_supir = out / "tiny_sdxl.safetensors", out / "tiny_supir_v0.safetensors"
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sdxl.items()}, str(p_sdxl),
              metadata={"format": "pt"})
    save_file({k: v.float().contiguous() for k, v in supir.items()}, str(p_supir), metadata={"format": "pt"})
    return [p_sdxl, p_supir]


def write_supir_checkpoints(models_dir: Path, seed: int = 0) -> list[Path]:
    """The tiny weights under the published names: ``sd_xl_base_1.0.safetensors`` (SDXL) and ``SUPIR-v0Q.ckpt``, a
    flat weights-only pickle like the published file (one SUPIR file, so that nothing has to choose)."""
    p_sdxl, p_supir = write_tiny_supir(models_dir, seed)
    out = p_sdxl.parent
    published = [out / PUBLISHED_SDXL, out / PUBLISHED_SUPIR_Q]
    p_sdxl.replace(published[0])
    p_supir.unlink()
    _, supir = tiny_state_dicts(seed)
    supir.update(_parts(seed)[1])
    torch.save({k: v.float().contiguous() for k, v in supir.items()}, published[1])
    return published


WRITERS = {"supir": write_supir_checkpoints}
