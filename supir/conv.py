"""Exact convolution paths that are faster than the plain ones where measured (bench/side_by_side.md).

Official: SGM runs every convolution through ``F.conv2d`` and upsamples with ``F.interpolate`` before the
3x3 convolution. Deliberately different (same sums, float32 rounding order only):

* :func:`conv2d`: on small CPU feature maps (<= 64 output pixels per image: the 8x8 level of a 256 px
  SUPIR call) the convolution runs as im2col + one GEMM over the whole batch; oneDNN's direct kernel
  reaches about half the GEMM rate there, and Winograd F(2x2) with 32 tile rows about 0.7x (1280 channels at
  8x8, batch 2, one Xeon core: im2col 34 ms, F(2x2) 49 ms, direct 58 ms). Elsewhere: ``F.conv2d``.
* :func:`conv2d`: other 3x3 convolutions (stride and padding 1) of float32 CPU maps with enough pixels and
  channels run through Winograd F(4x4, 3x3) or F(2x2, 3x3), :mod:`photo_restoration.winograd` (2.25 or 4 instead of 9
  multiply-adds per output value; at most about 1e-5 relative rounding difference per convolution).
* :func:`upsample_conv3x3`: nearest x2 upsampling followed by a 3x3 convolution equals four 2x2
  convolutions of the *input* (one per output pixel phase, with the 3x3 taps that fall on the same
  source pixel summed), interleaved: 16 instead of 36 multiply-adds per output pixel and channel, and
  the 4x larger upsampled map is never built. Used in float32 only (16-bit weights would round the
  summed taps). The phase kernels come from :func:`photo_restoration.subpixel.phase_kernels`. From
  :data:`UPSAMPLE_WINOGRAD_MIN_CHANNELS` channels on large CPU maps, the upsampled map is built after all and
  convolved through Winograd F(4x4) (2.25 multiply-adds, the transforms cheap next to the channel GEMMs).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ..subpixel import interleaved_output, phase_kernels
from .. import gemm, winograd
from ..layout import is_channels_last

GEMM_CONV_MAX_PIXELS = 64


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format

# From this many channels a Winograd F(4x4) convolution of the upsampled map beats the four phase convolutions
# (one Zen 4 core, batch 2: 1280 channels at 16x16 -> 32x32 246 against 313 ms; 640 at 32x32 292 against 258 ms)
UPSAMPLE_WINOGRAD_MIN_CHANNELS = 1024


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int] = (1, 1),
           padding: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``F.conv2d`` with zero padding, no dilation or groups; small float32 CPU maps go through one GEMM, large
    ones with a 3x3 kernel through a Winograd convolution (:mod:`photo_restoration.winograd`)."""
    kh, kw = weight.shape[-2:]
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4:
        b, _, h, w = x.shape
        ho = (h + 2 * padding[0] - kh) // stride[0] + 1
        wo = (w + 2 * padding[1] - kw) // stride[1] + 1
        if ho * wo <= GEMM_CONV_MAX_PIXELS:
            co = weight.shape[0]
            cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # [b, K, ho*wo]
            wmat = weight.reshape(co, -1)
            if gemm.applies(cols.transpose(1, 2), wmat, bias):  # pixel rows, oneDNN
                rows = cols.transpose(1, 2).reshape(b * ho * wo, cols.shape[1])  # [b*ho*wo, K]
                out = gemm.linear(rows, wmat, bias).view(b, ho, wo, co).permute(0, 3, 1, 2)
                return out if is_channels_last(x) else out.contiguous()
            cols = cols.transpose(0, 1).reshape(cols.shape[1], b * ho * wo)  # [K, b*ho*wo]
            out = torch.addmm(bias[:, None], wmat, cols) if bias is not None else wmat @ cols
            return out.view(co, b, ho, wo).transpose(0, 1).contiguous(memory_format=_layout_of(x))
    if winograd.applies(x, weight, stride, padding):
        return winograd.conv3x3(x, weight, bias)
    return F.conv2d(x, weight, bias, stride, padding)


def _upsample_geometry_ok(x: torch.Tensor, conv: nn.Module) -> bool:
    """Whether ``conv`` is a 3x3 / pad 1 / stride 1 convolution whose sub-pixel form applies to ``x``."""
    w = conv.weight
    return (x.dtype == torch.float32 and w is not None and w.dtype.is_floating_point
            and tuple(w.shape[-2:]) == (3, 3) and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (1, 1)
            and conv.groups == 1 and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros")


def upsample_conv3x3(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, padding 1 convolution.

    The weights come through the layer's own casting (:func:`supir.ops.cast_weights`), so a memory manager
    that casts or patches them per call (partial loading) gets the same sums as a full load."""
    if not _upsample_geometry_ok(x, conv):
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    if hasattr(conv, "_host_managed"):
        with ops.layer_weights(conv, x) as (weight, bias):
            return _upsample_phases(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    # 16-bit storage is up-cast as the casting layers do per call; the taps are summed in float32
    weight = conv.weight.to(device=x.device, dtype=x.dtype)
    bias = None if conv.bias is None else conv.bias.to(device=x.device, dtype=x.dtype)
    return _upsample_phases(x, weight, bias)


def _upsample_phases(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    b, _, h, w = x.shape
    co = weight.shape[0]
    small = h * w <= GEMM_CONV_MAX_PIXELS
    if (not small and not torch.compiler.is_compiling() and co >= UPSAMPLE_WINOGRAD_MIN_CHANNELS
            and x.shape[1] >= UPSAMPLE_WINOGRAD_MIN_CHANNELS  # and Winograd for the upsampled map's shape:
            and winograd.applies(x[:, :, :1, :1].expand(b, x.shape[1], 2 * h, 2 * w), weight, (1, 1), (1, 1))):
        # 2.25 multiply-adds per output value instead of 4
        return winograd.conv3x3(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias)
    xp = F.pad(x, (1, 1, 1, 1)) if small else None
    result, out = interleaved_output(x, co)  # the 2x map in x's layout; its [b, co, h, a, w, c] view
    for p, kernel in enumerate(phase_kernels(weight)):
        a, c = divmod(p, 2)
        if small:  # the phase's (h+1) x (w+1) input window through the GEMM path
            out[:, :, :, a, :, c] = conv2d(xp[:, :, a:a + h + 1, c:c + w + 1], kernel, bias)
        else:  # the 2x2 kernel over the zero-padded input; phase (a, c) is the window at (a, c) of the result
            out[:, :, :, a, :, c] = F.conv2d(x, kernel, bias, padding=1)[:, :, a:a + h, c:c + w]
    return result
