"""The building blocks of SDXL's AutoencoderKL (official SGM module and parameter names): ResnetBlock, AttnBlock,
down/upsampling, the mid block, Encoder and Decoder. :mod:`.vae` assembles them into SUPIR's VAE and
:mod:`.vae_tiled` runs them tile by tile; both import from here, neither from the other's internals.

Deliberately different, same values within float32 rounding: on the CPU in float32, levels of at most
:data:`CHANNELS_LAST_MAX` channels run channels-last (oneDNN's 3x3 convolutions take 0.8-0.9x the time there),
with the pack's exact GroupNorm (:func:`.ops.group_norm`), whose second norm of each ResnetBlock and the final
norm write in place into fresh intermediates (no new map per norm), and 1x1 shortcuts as one GEMM; the
decoder's output is returned contiguous. The convolutions are :class:`.ops.Conv2d`, whose 3x3 ones on large float32 CPU
maps run as Winograd convolutions (:mod:`photo_restoration.winograd`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import channels_last as cpu_channels_last
from . import ops
from .conv import upsample_conv3x3

GN_GROUPS = 32
GN_EPS = 1e-6


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GN_GROUPS, channels, eps=GN_EPS, affine=True)


CHANNELS_LAST_MAX = 256  # widest level run channels-last on the CPU (oneDNN gains 20-30 % at 128, ~5 % at 256,
                         # nothing at 512)


def channels_last(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``x`` in the layout a level of ``channels`` runs in: channels-last for float32 CPU levels of at most
    :data:`CHANNELS_LAST_MAX` channels (exact through :func:`ops.group_norm`), else contiguous."""
    return cpu_channels_last(x) if channels <= CHANNELS_LAST_MAX else x.contiguous()


class ResnetBlock(nn.Module):
    """GN, SiLU, conv3, GN, SiLU, conv3 plus a shortcut (``nin_shortcut`` 1x1 conv when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = ops.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = ops.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = ops.Conv2d(in_channels, out_channels, 1)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return ops.conv1x1(self.nin_shortcut, x) if self.in_channels != self.out_channels else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(ops.group_norm(self.norm1, x, silu=True))
        h = self.conv2(ops.group_norm(self.norm2, h, silu=True, out=h))  # in place on the fresh conv output
        return h.add_(self.shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (q/k/v/proj_out are 1x1 convs), residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = ops.Conv2d(channels, channels, 1)
        self.k = ops.Conv2d(channels, channels, 1)
        self.v = ops.Conv2d(channels, channels, 1)
        self.proj_out = ops.Conv2d(channels, channels, 1)

    @staticmethod
    def tokens(x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1, H*W, C] (one head, positions row-major), channels innermost: a strided
        view would send the attention to its materialised-scores kernel (2.5x the time at 64x64)."""
        return x.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()

    def attend(self, hn: torch.Tensor) -> torch.Tensor:
        """Attention of an already normalised map (without the residual)."""
        b, c, h, w = hn.shape
        q, k, v = (self.tokens(m(hn)) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C): one head of width C
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return self.proj_out(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attend(self.norm(x))


class Downsample(nn.Module):
    """Zero-pad one pixel on the right and bottom, then a 3x3 convolution with stride 2 (no padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv3x3(self.conv, x)


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    has_denoise_encoder: bool = True


class Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks) and an optional ``downsample``/``upsample``."""

    def __init__(self, blocks: Sequence[ResnetBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, name, resample)


class Encoder(nn.Module):
    """Image [B, 3, H, W] -> moments [B, 2*z, H/8, W/8] (before ``quant_conv``)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = ops.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = ch
        for i, m in enumerate(mult):
            c_out = ch * m
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks)]
            last = i == len(mult) - 1
            self.down.append(Level(blocks, None if last else Downsample(c_out), "downsample"))
            c_in = c_out
        self.mid = Mid(c_in)
        self.norm_out = group_norm(c_in)
        self.conv_out = ops.Conv2d(c_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(channels_last(x, self.conv_in.out_channels))
        for level in self.down:
            h = channels_last(h, level.block[-1].out_channels)
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h.contiguous())
        return self.conv_out(ops.group_norm(self.norm_out, h, silu=True, out=h))


class Decoder(nn.Module):
    """Latent [B, z, h, w] (after ``post_quant_conv``) -> image [B, 3, 8h, 8w]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        c = ch * mult[-1]
        self.conv_in = ops.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = Mid(c)
        levels: list[Level] = []
        for i in reversed(range(len(mult))):
            c_out = ch * mult[i]
            blocks = [ResnetBlock(c if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks + 1)]
            levels.insert(0, Level(blocks, Upsample(c_out) if i != 0 else None, "upsample"))
            c = c_out
        self.up = nn.ModuleList(levels)  # indexed by level; run from the last to 0
        self.norm_out = group_norm(c)
        self.conv_out = ops.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            h = channels_last(h, level.block[-1].out_channels)
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):  # in the next level's layout: the 2x map is not copied again
                h = level.upsample(channels_last(h, self.up[i - 1].block[-1].out_channels))
        return self.conv_out(ops.group_norm(self.norm_out, h, silu=True, out=h)).contiguous()
