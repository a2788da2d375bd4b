"""GroupNorm (+ SiLU) for large float32 CPU maps, written into a buffer the caller owns, in either memory
layout; shared by the model families.

Official: ``F.silu(F.group_norm(x, G, w, b, eps))`` (SGM's and CodeFormer's ResBlocks). Deliberately
different, same statistics: the group means and variances are combined from chunks of the map (each chunk
centred on its own mean, the chunks joined with Chan's parallel formula in float64), so they are as exact as
ATen's own moments, and the affine step writes into ``out``: the block's fresh convolution output (in place)
or a dead buffer of the same shape. ATen allocates a new map per norm, and on the CPU a fresh map above
glibc's mmap threshold costs a page fault per 4 KiB (about 45 ms per 128 MiB, more than the norm itself).
The statistics do not depend on the layout, so channels-last maps (where oneDNN's convolutions run 20-30 %
faster at 64-128 channels) get exact norms too; ATen's channels-last GroupNorm is off by up to 5e-4 on
unit data (float32 ``E[x^2] - E[x]^2``). Other devices, dtypes and small maps use ATen.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 1 << 15  # elements per group and chunk: the chunk's centred copy stays in cache
# channels-last maps: elements per sample and chunk of pixel rows (a [n, rows, c] chunk of 2 MiB per sample;
# 32k-element chunks spent their time dispatching: 9.2 against 5.7 ms for 2 x 960 x 64 x 64, 49 against 15 ms
# for 128 x 512 x 512 at 2 threads, one Zen 4 core)
NHWC_CHUNK = 1 << 19
MIN_ELEMENTS = 1 << 21  # per sample, contiguous maps: below this ATen's fused kernel wins even into a new map


def _layout(x: torch.Tensor) -> str | None:
    if x.dim() != 4:
        return None
    if x.is_contiguous():
        return "nchw"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return None


def fast_path(x: torch.Tensor, into_buffer: bool) -> bool:
    """Whether :func:`group_norm` computes ``x`` itself rather than through ATen: float32 on the CPU, 4-D, and
    either channels-last (always: ATen's is inexact there) or contiguous, large enough and written into a
    buffer (into a new map ATen's fused kernel is as fast)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return False
    layout = _layout(x)
    return layout == "nhwc" or (layout == "nchw" and into_buffer and x.numel() >= MIN_ELEMENTS * x.shape[0])


def _moments(means: torch.Tensor, m2: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan's combination of partial (mean, sum of squared deviations, count) along the last dimension of
    ``[n, groups, parts]`` into the mean and (biased) variance of each ``[n, groups]``."""
    means, m2, counts = means.double(), m2.double(), counts.double()
    total = counts.sum()
    mean = (means * counts).sum(-1) / total
    var = (m2.sum(-1) + (counts * (means - mean[..., None]).square()).sum(-1)) / total
    return mean, var


def _stats_nchw(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    xv = x.view(n, groups, -1)
    k = xv.shape[-1]
    tmp = torch.empty(n, groups, min(CHUNK, k), dtype=x.dtype)
    means, m2, counts = [], [], []
    for s in range(0, k, CHUNK):
        part = xv[..., s:s + CHUNK]
        mean = part.mean(-1, keepdim=True)
        d = torch.sub(part, mean, out=tmp[..., :part.shape[-1]])
        means.append(mean[..., 0])
        m2.append(d.mul_(d).sum(-1))
        counts.append(part.shape[-1])
    return _moments(torch.stack(means, -1), torch.stack(m2, -1), torch.tensor(counts))  # [n, groups]


def _stats_nhwc(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel moments of row chunks of the ``[n, h*w, c]`` storage (reductions over the outer dimension,
    vectorised along the channels), then joined into groups."""
    n, c, h, w = x.shape
    xv = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view of channels-last storage
    rows = max(1, NHWC_CHUNK // c)
    tmp = torch.empty(n, min(rows, h * w), c, dtype=x.dtype)
    means, m2, counts = [], [], []
    for s in range(0, h * w, rows):
        part = xv[:, s:s + rows]
        mean = part.mean(1, keepdim=True)
        d = torch.sub(part, mean, out=tmp[:, :part.shape[1]])
        means.append(mean[:, 0])
        m2.append(d.mul_(d).sum(1))
        counts.append(part.shape[1])
    cg = c // groups
    stacked = [torch.stack(t, -1).view(n, groups, cg * len(counts)) for t in (means, m2)]  # [n, G, cg*K]
    return _moments(*stacked, torch.tensor(counts).repeat(cg))


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, *, silu: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.group_norm`` (then ``F.silu`` when ``silu``), written into ``out`` when it is given and fits (the
    same shape, dtype and memory layout as ``x``; ``out`` may be ``x`` itself, for an in-place norm), else
    into a new tensor. Always use the returned tensor. ``x`` is never modified unless it is ``out``."""
    fits = (out is not None and out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
            and _layout(out) == _layout(x))
    if not fast_path(x, fits):
        y = F.group_norm(x, groups, weight, bias, eps)
        return F.silu(y, inplace=True) if silu else y
    layout = _layout(x)
    n, c = x.shape[:2]
    mean, var = (_stats_nchw if layout == "nchw" else _stats_nhwc)(x, groups)
    scale = (var + eps).rsqrt()[..., None].expand(n, groups, c // groups).reshape(n, c)  # float64
    shift = -mean[..., None].expand(n, groups, c // groups).reshape(n, c) * scale
    if weight is not None:
        scale = scale * weight.double()
        shift = shift * weight.double()
    if bias is not None:
        shift = shift + bias.double()
    y = out if fits else torch.empty_like(x)
    shape = (n, c, 1, 1)
    torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape), out=y)
    return F.silu(y, inplace=True) if silu else y
