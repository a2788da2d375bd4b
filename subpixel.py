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


_PHASE_MATRICES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _phase_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[4 phases, 9 taps, 4 taps]: 0/1 entries summing the 3x3 taps into each phase's 2x2 kernel (cached,
    made outside inference mode so that any later caller may use it; built in place while compiling)."""
    if torch.compiler.is_compiling():
        return _build_phase_matrix(dtype, device)
    m = _PHASE_MATRICES.get((dtype, device))
    if m is None:
        with torch.inference_mode(False):
            m = _PHASE_MATRICES[(dtype, device)] = _build_phase_matrix(dtype, device)
    return m


def _build_phase_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    m = torch.zeros(4, 9, 4, dtype=dtype, device=device)
    for a in (0, 1):
        for c in (0, 1):
            for i in (0, 1):
                for j in (0, 1):
                    for r in _PHASE_TAPS[a][i]:
                        for s in _PHASE_TAPS[c][j]:
                            m[2 * a + c, 3 * r + s, 2 * i + j] = 1
    return m


def phase_kernels(w: torch.Tensor) -> list[torch.Tensor]:
    """The four 2x2 kernels [Co, Ci, 2, 2] (phases (0,0), (0,1), (1,0), (1,1)) of a 3x3 kernel ``w``, each
    one small GEMM over the taps (one pass over the weight per phase, no stacked intermediates)."""
    co, ci = w.shape[:2]
    w9 = w.reshape(co * ci, 9)
    m = _phase_matrix(w.dtype, w.device)
    return [torch.mm(w9, m[p]).view(co, ci, 2, 2) for p in range(4)]


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
