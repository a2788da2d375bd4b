"""SUPIR's control side: GLVControl (trimmed UNet encoder reading the LQ latent), the ZeroSFT /
ZeroCrossAttn adapters and the adapted UNet decoder pass (LightGLVUNet), wrapped as SupirDiffusion.

Module names equal the official ones: ``SupirDiffusion().state_dict()`` keys are those of the official
model under ``model.`` (``diffusion_model.*`` incl. ``project_modules.*``, ``control_model.*``).
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .unet import (Conv2d, CrossAttention, SDXLUNet, Upsample, channel_major, constant_context, decoder_layout,
                   embed, group_norm, make_embeddings, make_encoder, map_layout, run_layer, unet_config)

Scale = float | torch.Tensor

# official adapter hyper-parameters (options/SUPIR_v0.yaml, mode "XL-base")
ADAPTER_CONFIG = {"sft_hidden": 128, "project_channel_scale": 2, "cross_attn_head_dim": 64, "cross_attn_heads": None}


def _scale(s: Scale, like: torch.Tensor) -> Scale:
    """A per-sample control scale [B] becomes [B, 1, 1, 1]; floats stay floats."""
    if isinstance(s, torch.Tensor):
        s = s.to(device=like.device, dtype=like.dtype)
        return s.reshape(-1, 1, 1, 1) if s.ndim else s
    return s


def _is_one(s: Scale) -> bool:
    """Whether the control scale is the plain number 1 (the default): then ``h * s + h_raw * (1 - s)`` equals
    ``h`` for finite values (up to the sign of a zero)."""
    return not isinstance(s, torch.Tensor) and s == 1.0


class ZeroSFT(nn.Module):
    """Spatial feature transform of the decoder stream by a control feature (+ zero conv), blended by s."""

    def __init__(self, label_nc: int, norm_nc: int, concat_channels: int = 0, hidden: int = 128):
        super().__init__()
        self.param_free_norm = group_norm(norm_nc + concat_channels)
        self.mlp_shared = nn.Sequential(Conv2d(label_nc, hidden, 3, padding=1), nn.SiLU())
        self.zero_mul = Conv2d(hidden, norm_nc + concat_channels, 3, padding=1)
        self.zero_add = Conv2d(hidden, norm_nc + concat_channels, 3, padding=1)
        self.zero_conv = Conv2d(label_nc, norm_nc, 1)
        self.pre_concat = concat_channels != 0

    def forward(self, c: torch.Tensor, h: torch.Tensor, h_ori: torch.Tensor | None = None,
                control_scale: Scale = 1.0) -> torch.Tensor:
        concat = h_ori is not None and self.pre_concat
        full = _is_one(control_scale)  # h * 1 + h_raw * 0 is h: the blend and h_raw are skipped
        h_raw = None if full else (torch.cat([h_ori, h], dim=1) if concat else h)
        h = self.zero_conv(c).add_(h)  # h + zero_conv(c), summed in the fresh conv output
        if concat:
            h = torch.cat([h_ori, h], dim=1)
        actv = self.mlp_shared(c)
        h = self.param_free_norm(h).mul_(self.zero_mul(actv).add_(1)).add_(self.zero_add(actv))
        if h_ori is not None and not self.pre_concat:
            h = torch.cat([h_ori, h], dim=1)
        if full:
            return h
        s = _scale(control_scale, h)
        return h * s + h_raw * (1 - s)


class ZeroCrossAttn(nn.Module):
    """x + s * attention(GN(x) -> q, GN(control feature) -> k, v) over the H*W tokens."""

    def __init__(self, context_dim: int, query_dim: int, heads: int | None = None, dim_head: int = 64):
        super().__init__()
        heads = query_dim // dim_head if heads is None else heads
        self.attn = CrossAttention(query_dim, context_dim, heads, dim_head)
        self.norm1 = group_norm(query_dim)
        self.norm2 = group_norm(context_dim)

    def forward(self, context: torch.Tensor, x: torch.Tensor, control_scale: Scale = 1.0) -> torch.Tensor:
        b, c, h, w = x.shape
        cn = self.norm2(context).flatten(2).transpose(1, 2).contiguous()  # one copy, not one per Linear
        if channel_major(x):
            y = self.attn.forward_cm(self.norm1(x).flatten(2).transpose(0, 1), cn).transpose(0, 1)
        else:
            y = self.attn(self.norm1(x).flatten(2).transpose(1, 2).contiguous(), cn).transpose(1, 2)
        y = y.reshape(b, c, h, w)
        return x + y * _scale(control_scale, y)


class GLVControl(nn.Module):
    """UNet encoder + middle block with its own embeddings, plus ``input_hint_block`` for the LQ latent.

    Returns the 10 (for SDXL) features: every input block's output, then the middle block's.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.config = cfg = unet_config(**cfg)
        self.model_channels = cfg["model_channels"]
        self.time_embed, self.label_emb = make_embeddings(cfg)
        self.input_blocks, self.middle_block, self.input_channels = make_encoder(cfg)
        self.input_hint_block = nn.Sequential(Conv2d(cfg["in_channels"], cfg["model_channels"], 3, padding=1))

    def forward(self, hint: torch.Tensor, timesteps: torch.Tensor, xt: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor) -> list[torch.Tensor]:
        dtype = hint.dtype
        xt, context = xt.to(dtype), context.to(dtype)
        emb = embed(self.time_embed, self.label_emb, self.model_channels, timesteps, y, dtype)
        guided = self.input_hint_block(hint)
        feats = []
        h = xt
        for k, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if k == 0:
                h = h + guided
            feats.append(h)
        feats.append(self.middle_block(h, emb, context))
        return feats


def adapter_layout(unet_cfg: dict, adapter_cfg: dict | None = None) -> list[dict]:
    """The ``project_modules`` list in official order: for each control feature k ascending, a
    ZeroCrossAttn first when the output block using skip k ends with an Upsample, then ZeroSFT k
    (the last one, k = n, acts on the middle block output).

    Entries: ``{"type": "sft", "k", "label", "feature", "concat", "hidden"}`` or
    ``{"type": "cross_attn", "k", "context", "query", "heads", "dim_head"}``.
    """
    cfg = unet_config(**unet_cfg)
    a = {**ADAPTER_CONFIG, **(adapter_cfg or {})}
    chans = encoder_channels(cfg)
    n = len(chans)  # feature n is the middle block output
    dec = decoder_layout(cfg, chans)
    stream = {n - 1 - j: spec["in"] for j, spec in enumerate(dec)}  # skip index k -> stream channels
    up = {n - 1 - j: spec["out"] for j, spec in enumerate(dec) if spec["up"]}
    features = chans + [chans[-1]]
    heads = a.get("cross_attn_heads") or {}
    layout = []
    for k, feat in enumerate(features):
        label = int(feat / 2 * a["project_channel_scale"])
        if k in up:
            q = up[k]
            layout.append({"type": "cross_attn", "k": k, "context": feat, "query": q,
                           "heads": heads.get(k, heads.get(str(k), q // a["cross_attn_head_dim"])),
                           "dim_head": a["cross_attn_head_dim"]})
        layout.append({"type": "sft", "k": k, "label": label, "feature": feat, "concat": stream.get(k, 0),
                       "hidden": a["sft_hidden"]})
    return layout


def encoder_channels(cfg: dict) -> list[int]:
    """Channels of every input block output (cheap: no modules built)."""
    mc = cfg["model_channels"]
    chans = [mc]
    levels = len(cfg["channel_mult"])
    for level, mult in enumerate(cfg["channel_mult"]):
        chans += [mult * mc] * cfg["num_res_blocks"][level]
        if level != levels - 1:
            chans.append(mult * mc)
    return chans


class LightGLVUNet(SDXLUNet):
    """SDXL UNet whose decoder mixes in control features through ``project_modules``."""

    def __init__(self, cfg: dict, adapter_cfg: dict | None = None):
        super().__init__(cfg)
        self.adapter_config = {**ADAPTER_CONFIG, **(adapter_cfg or {})}
        modules = []
        for spec in adapter_layout(self.config, self.adapter_config):
            if spec["type"] == "sft":
                modules.append(ZeroSFT(spec["label"], spec["feature"], spec["concat"], spec["hidden"]))
            else:
                modules.append(ZeroCrossAttn(spec["context"], spec["query"], spec["heads"], spec["dim_head"]))
        self.project_modules = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                control: list[torch.Tensor] | None = None, control_scale: Scale = 1.0) -> torch.Tensor:
        if control is None:
            return super().forward(x, timesteps, context, y)
        dtype = control[0].dtype
        x, context = x.to(dtype), context.to(dtype)
        emb = self.embed(timesteps, y, dtype)
        h, hs = self.encode(x, emb, context)
        adapters = iter(reversed(self.project_modules))
        k = len(control) - 1
        h = next(adapters)(control[k], h, control_scale=control_scale)
        for block in self.output_blocks:
            k -= 1
            h = next(adapters)(control[k], hs.pop(), h, control_scale=control_scale)
            if isinstance(block[-1], Upsample):
                for layer in block[:-1]:
                    h = run_layer(layer, h, emb, context)
                h = next(adapters)(control[k], h, control_scale=control_scale)
                h = block[-1](h)
            else:
                h = block(h, emb, context)
        return self.out(h)


class SupirDiffusion(nn.Module):
    """``diffusion_model`` (LightGLVUNet) + ``control_model`` (GLVControl): one eps prediction."""

    def __init__(self, cfg: dict, adapter_cfg: dict | None = None):
        super().__init__()
        self.diffusion_model = LightGLVUNet(cfg, adapter_cfg)
        self.control_model = GLVControl(cfg)
        self.config = self.diffusion_model.config
        self.compute_dtype: torch.dtype | None = None  # None: the dtype of the inputs
        self.cache_text_kv = True  # reuse cross-attention keys/values while the text context is unchanged
        self._context: torch.Tensor | None = None

    def text_context(self, context: torch.Tensor) -> torch.Tensor:
        """The held copy of ``context`` when its values equal the last call's (the samplers rebuild the
        same CFG context every step), else a new held copy: cross-attention keys and values computed
        from it are reused by the transformer blocks (:class:`~.unet.CrossAttention`)."""
        if not self.cache_text_kv:
            return context
        prev = self._context
        if (prev is not None and prev.shape == context.shape and prev.dtype == context.dtype
                and prev.device == context.device and torch.equal(prev, context)):
            return prev
        self.clear_kv_cache()
        self._context = constant_context(context.detach().clone())
        return self._context

    def clear_kv_cache(self) -> None:
        """Drop the held text context and every cached key/value (frees their memory)."""
        self._context = None
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.clear_kv_cache()

    def forward(self, x_in: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                hint: torch.Tensor, control_scale: Scale = 1.0) -> torch.Tensor:
        """eps for ``x_in`` (already multiplied by c_in) at integer sigma indices ``timesteps``."""
        dtype = self.compute_dtype or x_in.dtype
        out_dtype = x_in.dtype
        x_in, context, y, hint = (t.to(dtype) for t in (x_in, context, y, hint))
        if not getattr(self, "compiled", False):  # a compiled graph keeps the layout it was traced with
            x_in, hint = map_layout(x_in), map_layout(hint)
        with ops.reused_cast_buffer():  # also the Winograd convolutions' scratch (photo_restoration.scratch)
            context = self.text_context(context)
            timesteps = torch.as_tensor(timesteps, device=x_in.device).reshape(-1).expand(x_in.shape[0])
            control = self.control_model(hint, timesteps, x_in, context, y)
            eps = self.diffusion_model(x_in, timesteps, context, y, control, control_scale)
        return eps.to(out_dtype).contiguous()
