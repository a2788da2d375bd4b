"""ComfyUI layouts of SDXL weights, for tests: a ComfyUI CLIP ``get_sd()`` <-> the official SGM layout, and an
SGM-layout SDXL state dict from ComfyUI's UNet / VAE / CLIP state dicts.

The pack itself asks ComfyUI for checkpoint-layout state dicts (``nodes/comfy.state_dicts_from_comfy``); these
converters let unit tests build ComfyUI-layout inputs from the tiny checkpoints without ComfyUI.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..supir.text import CLIP_G_PREFIX, CLIP_L_PREFIX


_G_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}


def comfy_clip_to_sgm(sd: dict) -> dict:
    """ComfyUI ``CLIP.get_sd()`` of an SDXL CLIP (``clip_l.transformer.text_model.*``,
    ``clip_g.transformer.text_model.*`` in Hugging Face names, ``clip_g.transformer.text_projection.weight``,
    ``clip_*.logit_scale``) -> our ``conditioner.embedders.``-relative official layout."""
    out: dict = {}
    qkv: dict = {}
    lp, gp = "clip_l.transformer.text_model.", "clip_g.transformer.text_model."
    for k, v in sd.items():
        if k.startswith(lp):
            if not k.endswith("position_ids"):
                out[CLIP_L_PREFIX + k[len(lp):]] = v
        elif k.startswith(gp):
            r = k[len(gp):]
            if r == "embeddings.token_embedding.weight":
                out[CLIP_G_PREFIX + "token_embedding.weight"] = v
            elif r == "embeddings.position_embedding.weight":
                out[CLIP_G_PREFIX + "positional_embedding"] = v
            elif r.startswith("final_layer_norm."):
                out[CLIP_G_PREFIX + "ln_final." + r.split(".")[-1]] = v
            elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", r):
                n, name, kind = m.groups()
                if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                    qkv.setdefault((n, kind), {})[name[10]] = v
                elif name in _G_BLOCK:
                    out[f"{CLIP_G_PREFIX}transformer.resblocks.{n}.{_G_BLOCK[name]}.{kind}"] = v
        elif k == "clip_g.transformer.text_projection.weight":
            out[CLIP_G_PREFIX + "text_projection"] = v.transpose(0, 1).contiguous()
        elif k == "clip_g.logit_scale":
            out[CLIP_G_PREFIX + "logit_scale"] = v
    for (n, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"ComfyUI CLIP weights: layer {n} of clip_g lacks some of q/k/v")
        out[f"{CLIP_G_PREFIX}transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def sgm_to_comfy_clip(sd: dict) -> dict:
    """Inverse of :func:`comfy_clip_to_sgm`."""
    out: dict = {}
    inv = {v: k for k, v in _G_BLOCK.items()}
    lp, gp = "clip_l.transformer.text_model.", "clip_g.transformer.text_model."
    for k, v in sd.items():
        if k.startswith(CLIP_L_PREFIX):
            out[lp + k[len(CLIP_L_PREFIX):]] = v
        elif k.startswith(CLIP_G_PREFIX):
            r = k[len(CLIP_G_PREFIX):]
            if r == "token_embedding.weight":
                out[gp + "embeddings.token_embedding.weight"] = v
            elif r == "positional_embedding":
                out[gp + "embeddings.position_embedding.weight"] = v
            elif r.startswith("ln_final."):
                out[gp + "final_layer_norm." + r.split(".")[-1]] = v
            elif r == "text_projection":
                out["clip_g.transformer.text_projection.weight"] = v.transpose(0, 1).contiguous()
            elif r == "logit_scale":
                out["clip_g.logit_scale"] = v
            elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", r):
                n, name, kind = m.groups()
                out[f"{gp}encoder.layers.{n}.{inv[name]}.{kind}"] = v
            elif m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r):
                n, kind = m.groups()
                for name, part in zip(("q", "k", "v"), v.chunk(3, dim=0)):
                    out[f"{gp}encoder.layers.{n}.self_attn.{name}_proj.{kind}"] = part
    return out


def sdxl_state_dict_from_comfy(unet_sd: Mapping[str, torch.Tensor], vae_sd: Mapping[str, torch.Tensor] | None = None,
                               clip_sd: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """An SGM-layout SDXL state dict (what :func:`load_supir` takes as ``sdxl``) from ComfyUI's parts:
    the MODEL's UNet (``diffusion_model.*`` or bare ``input_blocks.*`` keys), ``VAE.get_sd()`` and
    ``CLIP.get_sd()`` (``clip_l.*`` / ``clip_g.*``). Tensors are shared, not copied."""
    out: dict[str, torch.Tensor] = {}
    for k, v in unet_sd.items():
        for p in ("model.diffusion_model.", "diffusion_model.", ""):
            if k.startswith(p):
                out["model.diffusion_model." + k[len(p):]] = v
                break
    for k, v in (vae_sd or {}).items():
        out["first_stage_model." + k.removeprefix("first_stage_model.")] = v
    if clip_sd:
        out.update({"conditioner.embedders." + k: v for k, v in comfy_clip_to_sgm(dict(clip_sd)).items()})
    return out
