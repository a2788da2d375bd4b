"""SDXL UNet in the SGM (``generative-models``) key layout, with SDPA attention and GEGLU feed-forward.

The configuration is a plain dict (see :func:`unet_config`); every module name equals the official
one, so ``state_dict()`` keys are exactly those under ``model.diffusion_model.`` in an SDXL file.
Blocks are shared with GLVControl (:mod:`.control`), which reuses the encoder half.

Deliberately different from SGM (same sums, float32 rounding order only): attention through
``scaled_dot_product_attention`` (no materialised scores); on the CPU, transformer blocks with at most
:data:`CHANNEL_MAJOR_MAX_ROWS` tokens per batch (the 8x8 level of a 256 px call) keep their tokens
channel-major, ``[C, B, N]``, so every Linear is ``weight @ tokens`` (:func:`.ops.linear_cm`), which MKL
runs 15-20 % faster than ``tokens @ weight.T`` at 128 rows; cross-attention keys/values of an
unchanged text context are reused (:class:`CrossAttention`). Float32 CPU feature maps run channels-last
(:func:`channels_last_maps`): a transformer reads the map's storage as its tokens and sums its output into the
map inside ``proj_out``'s GEMM, the Winograd convolutions gather their tiles from it without a transposition,
and 1x1 convolutions are one GEMM over its pixel rows (512 px call, CFG batch 2, one Zen 4 core: 40.2-40.4
against 39.4-39.5 s, in copies saved); the eps comes back contiguous.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .. import gemm
from ..layout import conv1x1, is_channels_last, map_of_rows, pixel_rows
from .conv import conv2d, upsample_conv3x3
from .embeddings import timestep_embedding

# The official SDXL base / SUPIR v0 UNet (options/SUPIR_v0.yaml network_config).
SDXL_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "channel_mult": [1, 2, 4],
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 2, 10],
    "transformer_depth_middle": 10,
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "num_head_channels": 64,
}


def unet_config(**overrides) -> dict:
    """A full UNet config: SDXL's values with ``overrides``; ``num_res_blocks`` may be an int.

    ``transformer_depth[l] == 0`` means level ``l`` has no spatial transformers.
    """
    cfg = {**SDXL_CONFIG, **overrides}
    levels = len(cfg["channel_mult"])
    if isinstance(cfg["num_res_blocks"], int):
        cfg["num_res_blocks"] = [cfg["num_res_blocks"]] * levels
    cfg["channel_mult"] = list(cfg["channel_mult"])
    cfg["num_res_blocks"] = list(cfg["num_res_blocks"])
    cfg["transformer_depth"] = list(cfg["transformer_depth"])
    if len(cfg["num_res_blocks"]) != levels or len(cfg["transformer_depth"]) != levels:
        raise ValueError(f"num_res_blocks / transformer_depth need one entry per level ({levels}): {cfg}")
    return cfg


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    return ops.GroupNorm(32, channels, eps=eps)


def channels_last_maps(x: torch.Tensor) -> bool:
    """Whether the UNet's feature maps for input ``x`` run channels-last: float32 on the CPU, no autograd, not
    while compiling. A channels-last map's storage is the transformers' token-major ``[B, H*W, C]`` and the
    layout the Winograd convolutions gather from, so neither transposes it; elsewhere maps stay contiguous."""
    return (CHANNELS_LAST_ON_CPU and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling())


CHANNELS_LAST_ON_CPU = True  # tests compare both layouts


def map_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` channels-last where :func:`channels_last_maps` (a copy unless it already is), else unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last_maps(x) else x


class Conv2d(ops.Conv2d):
    """The casting Conv2d of :mod:`.ops` with :func:`conv2d`'s small-map CPU path; 1x1 convolutions of
    channels-last maps as one GEMM over the pixel rows."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (self.padding_mode != "zeros" or self.groups != 1 or self.dilation != (1, 1)
                or isinstance(self.padding, str)):
            return super()._conv_forward(x, weight, bias)
        if (tuple(weight.shape[-2:]) == (1, 1) and self.stride == (1, 1) and tuple(self.padding) == (0, 0)
                and is_channels_last(x)):
            return conv1x1(x, weight, bias)
        return conv2d(x, weight, bias, self.stride, self.padding)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + Linear(SiLU(emb)), GN-SiLU-conv, + skip (identity or 1x1 conv)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_channels, out_channels))
        # index 2 is the (inference no-op) dropout of the official block, kept for the key layout
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Identity(),
                                        Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # the Sequentials' layers one by one, in place on fresh intermediates (one large allocation less each)
        norm, _, conv = self.in_layers
        h = conv(F.silu(norm(x), inplace=True))
        h.add_(self.emb_layers(emb).to(h.dtype)[:, :, None, None])
        norm, _, _, conv = self.out_layers
        return conv(F.silu(norm(h), inplace=True)).add_(self.skip_connection(x))


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Token-major [B, N, heads*d] -> [B, heads, N, d] (channel = head * d + i)."""
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def split_heads_cm(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Channel-major [heads*d, B, N] -> [B, heads, N, d], ``d`` innermost (what the fused CPU attention
    kernel needs; a strided view would fall back to the materialised-scores kernel)."""
    c, b, n = t.shape
    return t.view(heads, c // heads, b, n).permute(2, 0, 3, 1).contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax attention on token-major [B, N, heads*d] tensors."""
    b, n, _ = q.shape
    out = F.scaled_dot_product_attention(*(split_heads(t, heads) for t in (q, k, v)))
    return out.transpose(1, 2).reshape(b, n, -1)


def channel_major(x: torch.Tensor) -> bool:
    """Whether the transformer blocks run on channel-major tokens ``[C, B, N]`` for the feature map ``x``
    [B, C, H, W]: float32 on the CPU with at most :data:`CHANNEL_MAJOR_MAX_ROWS` tokens in the batch, where every
    Linear as ``weight @ tokens`` (:func:`ops.linear_cm`) runs 15-20 % faster than ``tokens @ weight.T``
    (the 8x8 level of a 256 px call); above that the GEMMs are equal and the transposes would cost more.
    Not where the linear layers run through oneDNN (:mod:`photo_restoration.gemm`), which is faster still on
    token-major rows (103-109 against MKL's 89-102 GFLOP/s at 128 rows on a Zen 4 core). Elsewhere the tokens
    stay token-major ``[B, N, C]``."""
    return (CHANNEL_MAJOR_ON_CPU and x.device.type == "cpu" and x.dtype == torch.float32
            and x.shape[0] * x.shape[2] * x.shape[3] <= CHANNEL_MAJOR_MAX_ROWS and not gemm.runs_on(x))


CHANNEL_MAJOR_MAX_ROWS = 128  # measured on a 2-core AVX-512 CPU (bench/side_by_side.md)
CHANNEL_MAJOR_ON_CPU = True  # tests compare both layouts on the CPU


def constant_context(context: torch.Tensor) -> torch.Tensor:
    """Mark ``context`` (a tensor nobody modifies any more) as one whose keys and values may be cached."""
    context._kv_cacheable = True
    return context


def _weight_key(layer: nn.Module) -> tuple | None:
    """What identifies a linear layer's current weight; None when a host casts or patches it per call."""
    if getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None):
        return None
    w = layer.weight
    version = -1 if w.is_inference() else w._version  # inference tensors cannot change outside inference mode
    return (w.data_ptr(), version, w.dtype, w.device)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (itself when None).

    ``cache_kv``: keys and values of a context marked with :func:`constant_context` are kept until the
    context or the to_k/to_v weights change (the text context of a sampling run is the same at every step).
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, cache_kv: bool = False):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.cache_kv = cache_kv
        self.to_q = ops.Linear(query_dim, inner, bias=False)
        self.to_k = ops.Linear(context_dim, inner, bias=False)
        self.to_v = ops.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(ops.Linear(inner, query_dim), nn.Identity())
        # non-persistent buffers: not in state_dict(), but moved with the module by .to()
        self.register_buffer("kv_cache_k", None, persistent=False)
        self.register_buffer("kv_cache_v", None, persistent=False)
        self._kv_key: tuple | None = None
        self._kv_context: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``x`` over ``context`` (+ ``residual``, summed inside the output GEMM where it can)."""
        if context is None:
            k, v = self.to_k(x), self.to_v(x)
        else:
            k, v = self.context_kv(context)
        h = attention(self.to_q(x), k, v, self.heads)
        return self.to_out(h) if residual is None else ops.linear_add(self.to_out[0], h, residual)

    def forward_cm(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` for channel-major ``x`` [C, B, N]; ``context`` (if any) stays token-major."""
        q = split_heads_cm(ops.linear_cm(self.to_q, x), self.heads)
        if context is None:
            k, v = (split_heads_cm(ops.linear_cm(layer, x), self.heads) for layer in (self.to_k, self.to_v))
        else:
            k, v = (split_heads(t, self.heads) for t in self.context_kv(context))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d]
        b, h, n, d = out.shape
        return ops.linear_cm(self.to_out[0], out.permute(1, 3, 0, 2).reshape(h * d, b, n))

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling() or not (self.cache_kv and getattr(context, "_kv_cacheable", False)):
            return self.to_k(context), self.to_v(context)
        key = (_weight_key(self.to_k), _weight_key(self.to_v))
        if None in key:
            return self.to_k(context), self.to_v(context)
        if context is self._kv_context and key == self._kv_key and self.kv_cache_k is not None \
                and self.kv_cache_k.device == context.device:
            return self.kv_cache_k, self.kv_cache_v
        k, v = self.to_k(context), self.to_v(context)
        # the context itself is held, so no other tensor can take its id while the entry lives
        self.kv_cache_k, self.kv_cache_v, self._kv_key, self._kv_context = k, v, key, context
        return k, v

    def clear_kv_cache(self) -> None:
        self.kv_cache_k = self.kv_cache_v = None
        self._kv_key = self._kv_context = None


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = ops.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(a)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), ops.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``net(x)`` (+ ``residual``). On float32 CPU tokens the GEGLU and the sum run inside the GEMMs
        (:func:`.ops.geglu`, :func:`.ops.linear_add`)."""
        proj, out = self.net[0].proj, self.net[2]
        if not gemm.runs_on(x):  # the official sequence of layers
            h = self.net(x)
            return h if residual is None else h.add_(residual)
        h = ops.geglu(proj, x)
        return out(h) if residual is None else ops.linear_add(out, h, residual)

    def forward_cm(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = ops.linear_cm(self.net[0].proj, x).chunk(2, dim=0)
        return ops.linear_cm(self.net[2], F.gelu(gate).mul_(a))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, cache_kv=True)
        self.norm1 = ops.LayerNorm(dim)
        self.norm2 = ops.LayerNorm(dim)
        self.norm3 = ops.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # each residual sum inside the branch's last GEMM or in its fresh output (a + b == b + a in floating point)
        x = self.attn1(self.norm1(x), residual=x)
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)

    def forward_cm(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` on channel-major tokens [C, B, N] (each sum lands in the fresh branch output)."""
        x = self.attn1.forward_cm(ops.layer_norm_cm(self.norm1, x)).add_(x)
        x = self.attn2.forward_cm(ops.layer_norm_cm(self.norm2, x), context).add_(x)
        return self.ff.forward_cm(ops.layer_norm_cm(self.norm3, x)).add_(x)


class SpatialTransformer(nn.Module):
    """GN(eps 1e-6) -> tokens -> Linear proj_in -> transformer blocks -> Linear proj_out -> + input."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int):
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = ops.Linear(channels, heads * dim_head)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(heads * dim_head, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = ops.Linear(heads * dim_head, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        context = context.to(x.dtype)
        if channel_major(x):
            t = ops.linear_cm(self.proj_in, self.norm(x).flatten(2).transpose(0, 1))  # [C, B, HW]
            for block in self.transformer_blocks:
                t = block.forward_cm(t, context)
            t = ops.linear_cm(self.proj_out, t)
            return x + t.transpose(0, 1).reshape(b, c, h, w)  # x first: the sum takes x's layout
        xt = pixel_rows(x)
        if xt is not None and gemm.runs_on(x):  # channels-last: the map's storage is the tokens
            t = self.proj_in(pixel_rows(self.norm(x)).contiguous())
            for block in self.transformer_blocks:
                t = block(t, context)
            return map_of_rows(ops.linear_add(self.proj_out, t, xt), h, w)  # + x inside the GEMM
        # tokens made contiguous once: a strided [B, HW, C] input would make every Linear a batched GEMM
        # that packs its weight once per sample
        t = self.norm(x).flatten(2).transpose(1, 2).contiguous()
        t = self.proj_in(t)
        context = context.to(t.dtype)
        for block in self.transformer_blocks:
            t = block(t, context)
        t = self.proj_out(t)
        # x first: the sum takes x's (contiguous) layout, not the channels-last strides of the token view,
        # which would make every following convolution reorder its weight
        return x + t.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv3x3(self.conv, x)


class Block(nn.Sequential):
    """An SGM ``TimestepEmbedSequential``: passes ``emb`` to ResBlocks and ``context`` to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = run_layer(layer, x, emb, context)
        return x


def run_layer(layer: nn.Module, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, ResBlock):
        return layer(x, emb)
    if isinstance(layer, SpatialTransformer):
        return layer(x, context)
    return layer(x)


def _transformer(cfg: dict, ch: int, depth: int) -> SpatialTransformer:
    d = cfg["num_head_channels"]
    return SpatialTransformer(ch, ch // d, d, depth, cfg["context_dim"])


def make_embeddings(cfg: dict) -> tuple[nn.Sequential, nn.Sequential]:
    """``time_embed`` and ``label_emb`` (the "sequential" ADM embedding) of width 4*model_channels."""
    mc = cfg["model_channels"]
    time_embed = nn.Sequential(ops.Linear(mc, 4 * mc), nn.SiLU(), ops.Linear(4 * mc, 4 * mc))
    label_emb = nn.Sequential(nn.Sequential(ops.Linear(cfg["adm_in_channels"], 4 * mc), nn.SiLU(),
                                            ops.Linear(4 * mc, 4 * mc)))
    return time_embed, label_emb


def make_encoder(cfg: dict) -> tuple[nn.ModuleList, Block, list[int]]:
    """The input blocks, the middle block and the channels of every input block's output."""
    mc, emb_ch = cfg["model_channels"], 4 * cfg["model_channels"]
    blocks = nn.ModuleList([Block(Conv2d(cfg["in_channels"], mc, 3, padding=1))])
    chans = [mc]
    ch = mc
    levels = len(cfg["channel_mult"])
    for level, mult in enumerate(cfg["channel_mult"]):
        for _ in range(cfg["num_res_blocks"][level]):
            layers: list[nn.Module] = [ResBlock(ch, emb_ch, mult * mc)]
            ch = mult * mc
            if cfg["transformer_depth"][level] > 0:
                layers.append(_transformer(cfg, ch, cfg["transformer_depth"][level]))
            blocks.append(Block(*layers))
            chans.append(ch)
        if level != levels - 1:
            blocks.append(Block(Downsample(ch)))
            chans.append(ch)
    middle = Block(ResBlock(ch, emb_ch), _transformer(cfg, ch, cfg["transformer_depth_middle"]), ResBlock(ch, emb_ch))
    return blocks, middle, chans


def decoder_layout(cfg: dict, input_chans: Sequence[int]) -> list[dict]:
    """Per output block: ``in`` (stream channels), ``skip``, ``out`` channels, ``level``,
    ``attn`` (transformer depth or 0) and ``up`` (ends with an Upsample)."""
    mc = cfg["model_channels"]
    skips = list(input_chans)
    ch = input_chans[-1]
    layout = []
    for level in reversed(range(len(cfg["channel_mult"]))):
        n = cfg["num_res_blocks"][level] + 1
        for i in range(n):
            skip = skips.pop()
            out = mc * cfg["channel_mult"][level]
            layout.append({"in": ch, "skip": skip, "out": out, "level": level,
                           "attn": cfg["transformer_depth"][level], "up": level > 0 and i == n - 1})
            ch = out
    return layout


def make_decoder(cfg: dict, input_chans: Sequence[int]) -> nn.ModuleList:
    emb_ch = 4 * cfg["model_channels"]
    blocks = nn.ModuleList()
    for spec in decoder_layout(cfg, input_chans):
        layers: list[nn.Module] = [ResBlock(spec["in"] + spec["skip"], emb_ch, spec["out"])]
        if spec["attn"]:
            layers.append(_transformer(cfg, spec["out"], spec["attn"]))
        if spec["up"]:
            layers.append(Upsample(spec["out"]))
        blocks.append(Block(*layers))
    return blocks


def embed(time_embed: nn.Module, label_emb: nn.Module, model_channels: int,
          timesteps: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """time_embed(sinusoid(timesteps)) + label_emb(y), in ``dtype``."""
    t_emb = timestep_embedding(timesteps, model_channels).to(dtype)
    return time_embed(t_emb) + label_emb(y.to(dtype))


class SDXLUNet(nn.Module):
    """The SDXL UNet (``model.diffusion_model`` without SUPIR's adapters)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.config = cfg = unet_config(**cfg)
        self.model_channels = cfg["model_channels"]
        self.time_embed, self.label_emb = make_embeddings(cfg)
        self.input_blocks, self.middle_block, self.input_channels = make_encoder(cfg)
        self.output_blocks = make_decoder(cfg, self.input_channels)
        self.out = nn.Sequential(group_norm(cfg["model_channels"]), nn.SiLU(),
                                 Conv2d(cfg["model_channels"], cfg["out_channels"], 3, padding=1))

    def embed(self, timesteps: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return embed(self.time_embed, self.label_emb, self.model_channels, timesteps, y, dtype)

    def encode(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, list]:
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        return self.middle_block(h, emb, context), hs

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        """Plain SDXL eps prediction (no control)."""
        emb = self.embed(timesteps, y, x.dtype)
        context = context.to(x.dtype)
        h, hs = self.encode(x, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)
