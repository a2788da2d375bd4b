"""Exact convolution paths that are faster than the plain ones where measured (bench/side_by_side.md).

Official: SGM runs every convolution through ``F.conv2d`` and upsamples with ``F.interpolate`` before the
3x3 convolution. Deliberately different (same sums, float32 rounding order only):

* :func:`conv2d`: on small CPU feature maps (<= 64 output pixels per image: the 8x8 level of a 256 px
  SUPIR call) the convolution runs as im2col + one GEMM over the whole batch; oneDNN's direct kernel
  reaches about half the GEMM rate there. Elsewhere: ``F.conv2d``.
* :func:`upsample_conv3x3`: nearest x2 upsampling followed by a 3x3 convolution equals four 2x2
  convolutions of the *input* (one per output pixel phase, with the 3x3 taps that fall on the same
  source pixel summed), interleaved: 16 instead of 36 multiply-adds per output pixel and channel, and
  the 4x larger upsampled map is never built. Used in float32 only (16-bit weights would round the
  summed taps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GEMM_CONV_MAX_PIXELS = 64


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int] = (1, 1),
           padding: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``F.conv2d`` with zero padding, no dilation or groups; small float32 CPU maps go through one GEMM."""
    kh, kw = weight.shape[-2:]
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4:
        b, _, h, w = x.shape
        ho = (h + 2 * padding[0] - kh) // stride[0] + 1
        wo = (w + 2 * padding[1] - kw) // stride[1] + 1
        if ho * wo <= GEMM_CONV_MAX_PIXELS:
            co = weight.shape[0]
            cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # [b, K, ho*wo]
            cols = cols.transpose(0, 1).reshape(cols.shape[1], b * ho * wo)  # [K, b*ho*wo]
            wmat = weight.reshape(co, -1)
            out = torch.addmm(bias[:, None], wmat, cols) if bias is not None else wmat @ cols
            return out.view(co, b, ho, wo).transpose(0, 1).contiguous()
    return F.conv2d(x, weight, bias, stride, padding)


def _phase_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Along ``dim`` (size 3): the 2 taps seen by even output pixels (w0, w1 + w2) and by odd ones (w0 + w1, w2)."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def upsample_conv_weights(x: torch.Tensor, conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a 3x3 / pad 1 / stride 1 ``conv`` usable as they are for ``x``, else None
    (a host casts or patches the layer per call, dtypes differ, or the layer is not such a convolution)."""
    if (getattr(conv, "comfy_cast_weights", False) or getattr(conv, "weight_function", None)
            or getattr(conv, "bias_function", None)):
        return None
    w, b = conv.weight, conv.bias
    if (x.dtype != torch.float32 or not w.dtype.is_floating_point or w.device != x.device
            or tuple(w.shape[-2:]) != (3, 3) or tuple(conv.stride) != (1, 1) or tuple(conv.padding) != (1, 1)
            or conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros"
            or (b is not None and b.device != x.device)):
        return None
    # 16-bit storage is up-cast as the casting layers do per call; the taps are summed in float32
    return w.to(x.dtype), (None if b is None else b.to(x.dtype))


def upsample_conv3x3(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, padding 1 convolution."""
    wb = upsample_conv_weights(x, conv)
    if wb is None:
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    weight, bias = wb
    b, _, h, w = x.shape
    xp = F.pad(x, (1, 1, 1, 1))
    out = x.new_empty(b, weight.shape[0], h, 2, w, 2)
    for a, rows in enumerate(_phase_taps(weight, 2)):
        for c, kernel in enumerate(_phase_taps(rows, 3)):
            out[:, :, :, a, :, c] = conv2d(xp[:, :, a:a + h + 1, c:c + w + 1], kernel, bias)
    return out.view(b, weight.shape[0], 2 * h, 2 * w)
