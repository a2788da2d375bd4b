"""Sub-pixel form of "nearest x2 upsample, then a 3x3 convolution", shared by the model families.

``conv3x3(nearest_x2(x))`` equals four 2x2 convolutions of ``x`` itself, one per output pixel phase
(a, c), whose kernels sum the 3x3 taps that fall on the same source pixel; the results interleave into
the 2x output. Same sums as the official two-step form up to float32 rounding order, 16 instead of 36
multiply-adds per output value, and the 4x larger upsampled map is never built. Used by SUPIR's UNet
and VAE decoder (``supir/conv.py``) and CodeFormer's generator (``codeformer/arch.py``).
"""
from __future__ import annotations

import torch

from .layout import is_channels_last

# which 3x3 taps (row or column 0..2) fall on source offset 0 / 1 of an output pixel of phase 0 / 1
_PHASE_TAPS = {0: ((0,), (1, 2)), 1: ((0, 1), (2,))}


def phase_kernels(w: torch.Tensor) -> list[torch.Tensor]:
    """The four 2x2 kernels [Co, Ci, 2, 2] (phases (0,0), (0,1), (1,0), (1,1)) of a 3x3 kernel ``w``: the taps
    that fall on one source pixel summed, first over rows, then over columns (element-wise sums over the weight:
    47 ms for a 1280-channel kernel on one Zen 4 core, against 116 ms for the same sums as four GEMMs
    ``[Co*Ci, 9] @ [9, 4]`` with 0/1 matrices, a shape MKL handles badly). Differentiable and traceable."""
    rows = [torch.stack([_sum_taps(w, taps, 2) for taps in _PHASE_TAPS[a]], 2) for a in (0, 1)]
    return [torch.stack([_sum_taps(rows[a], taps, 3) for taps in _PHASE_TAPS[c]], 3) for a in (0, 1) for c in (0, 1)]


def _sum_taps(w: torch.Tensor, taps: tuple[int, ...], dim: int) -> torch.Tensor:
    """``sum(w.select(dim, t) for t in taps)`` (one or two taps)."""
    first = w.select(dim, taps[0])
    return first if len(taps) == 1 else first + w.select(dim, taps[1])


def interleaved_output(x: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A new ``[b, channels, 2h, 2w]`` map for the sub-pixel result of ``x`` (``[b, c, h, w]``), channels-last
    when ``x`` is, and its ``[b, channels, h, 2, w, 2]`` view: phase (a, c) of source pixel (i, j) is
    ``view[:, :, i, a, j, c]``. (The map is allocated in its final layout: a permuted view of another shape
    would carry strides that make the next convolution copy it.)"""
    b, _, h, w = x.shape
    if is_channels_last(x):
        result = torch.empty((b, channels, 2 * h, 2 * w), dtype=x.dtype, device=x.device,
                             memory_format=torch.channels_last)
        return result, result.permute(0, 2, 3, 1).view(b, h, 2, w, 2, channels).permute(0, 5, 1, 2, 3, 4)
    result = x.new_empty(b, channels, 2 * h, 2 * w)
    return result, result.view(b, channels, h, 2, w, 2)
