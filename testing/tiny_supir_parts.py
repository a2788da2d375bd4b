"""Tiny random-weight VAE (+ SUPIR denoise encoder) and SDXL text encoders in the official SGM key
layouts, for the SUPIR tiny checkpoint writer (``testing/tiny_supir.py``) and tests.

The widths are parameters so that they can match a tiny UNet: the cross-attention width is
``clip_l_width + clip_g_width`` (= the UNet's ``context_dim``) and the ADM width is
``pooled_dim + 6 * size_embed_dim`` (= the UNet's ``adm_in_channels``). The defaults match the
public ``tiny_a`` parity configuration (24 + 40 = 64, 32 + 6 * 16 = 128).
"""
from __future__ import annotations

import torch

from ..supir.text import ClipL, OpenClipText, SDXLTextConditioner
from ..supir.vae import SupirVAE, VAEConfig
from .tiny_checkpoints import random_state_dict

VOCAB = 49408  # the real BPE vocabulary, so the real tokeniser can drive the tiny encoders


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def tiny_vae_state_dict(seed: int, ch: int = 32, ch_mult: tuple[int, ...] = (1, 2, 1, 1), num_res_blocks: int = 1,
                        z_channels: int = 4, embed_dim: int = 4, denoise_encoder: bool = True,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``first_stage_model.*`` (encoder, decoder, quant convs and, optionally, ``denoise_encoder``)."""
    cfg = VAEConfig(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                    embed_dim=embed_dim, has_denoise_encoder=denoise_encoder)
    with torch.device("meta"):
        vae = SupirVAE(cfg)
    sd = random_state_dict(_shapes(vae), seed, dtype=dtype)
    return {f"first_stage_model.{k}": v for k, v in sd.items()}


def tiny_text_state_dict(seed: int, clip_l_width: int = 24, clip_g_width: int = 40, pooled_dim: int = 32,
                         clip_l_layers: int = 2, clip_g_layers: int = 2,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L) and ``conditioner.embedders.1.model.*``
    (OpenCLIP bigG) with the full 49408-token vocabulary and 77 positions."""
    with torch.device("meta"):
        cond = SDXLTextConditioner(
            ClipL(VOCAB, clip_l_width, clip_l_layers, 4 * clip_l_width),
            OpenClipText(VOCAB, clip_g_width, clip_g_layers, 4 * clip_g_width, pooled_dim),
        )
    sd = random_state_dict(_shapes(cond), seed, dtype=dtype)
    sd = {k: (v.abs() + 1.0 if k.endswith("logit_scale") else v) for k, v in sd.items()}
    return {f"conditioner.{k}": v for k, v in sd.items()}
