"""Winograd F(4x4, 3x3): a 3x3 / stride 1 / padding 1 convolution with 2.25 instead of 9 multiply-adds per
output value and channel pair, shared by the model families (SUPIR's VAE, CodeFormer's autoencoder).

Official: both networks run their 3x3 convolutions through ``F.conv2d`` (oneDNN's direct kernels on a CPU).
Deliberately different, same sums: on large float32 CPU maps the convolution runs as Lavin and Gray's
minimal filtering algorithm (arXiv:1509.09308) with the interpolation points 0, +-1, +-2 and infinity.
Every 6x6 input tile ``d`` and kernel ``g`` are transformed (``V = B^T d B``, ``U = G g G^T``), the 36
positions of a tile are 36 GEMMs over the channels (``M = V U``), and ``Y = A^T M A`` gives the 4x4 output
tile. The result equals the direct convolution exactly in real arithmetic; in float32 it differs by rounding
only (about 1e-6 relative per convolution, like another BLAS kernel). cuDNN picks Winograd kernels on GPUs the
same way; on a CPU ATen never does, which is where this module is used.

The map is processed in bands of tile rows, so the transformed tiles of a band (2.25x its size) stay in the
CPU caches and their buffers are reused band after band, instead of page-faulting a fresh 2.25x copy of the
whole map. The kernel's transform is computed per call (one small GEMM), never stored beside the weights.
"""
from __future__ import annotations

import torch
from torch import nn

from .layout import is_channels_last

# B^T (6x6), G (6x3) and A^T (4x6) for the points 0, 1, -1, 2, -2 and infinity
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))

# Measured on one AMD EPYC core (bench/winograd.py): 0.45-0.71x the time of oneDNN's direct kernel from 128
# channels and 2048 output pixels (all images of the batch) up; 0.94x at 64 channels, 0.96-1.84x on smaller maps,
# where the per-call kernel transform and the band overheads eat the gain.
MIN_OUTPUT_PIXELS = 2048
MIN_CHANNELS = 128
BAND_BYTES = 6 << 20  # transformed input tiles of one band (36 positions x tiles x channels x 4 bytes)

_KERNEL_MATRICES: dict[torch.device, torch.Tensor] = {}


def applies(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation=(1, 1), groups: int = 1) -> bool:
    """Whether :func:`conv3x3` takes this convolution: float32 CPU, 3x3, stride 1, padding 1, large map."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and x.dim() == 4 and weight.dim() == 4 and tuple(weight.shape[-2:]) == (3, 3) and groups == 1
            and tuple(stride) == (1, 1) and tuple(padding) == (1, 1) and tuple(dilation) == (1, 1)
            and x.shape[0] * x.shape[-2] * x.shape[-1] >= MIN_OUTPUT_PIXELS
            and min(weight.shape[0], weight.shape[1]) >= MIN_CHANNELS
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def conv_forward(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv._conv_forward(x, weight, bias)``, through :func:`conv3x3` where :func:`applies`."""
    if (conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and applies(x, weight, conv.stride, conv.padding, conv.dilation, conv.groups)):
        return conv3x3(x, weight, bias)
    return nn.Conv2d._conv_forward(conv, x, weight, bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose large float32 CPU 3x3 convolutions run through :func:`conv3x3`."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return conv_forward(self, x, weight, bias)


def _kernel_matrix(device: torch.device) -> torch.Tensor:
    """[36, 9]: row (i, j), column (k, l) holds G[i, k] * G[j, l], so that U = K @ g over the taps."""
    m = _KERNEL_MATRICES.get(device)
    if m is None:
        with torch.inference_mode(False):
            g = torch.tensor(_G, dtype=torch.float64)
            m = torch.einsum("ik,jl->ijkl", g, g).reshape(36, 9).to(device=device, dtype=torch.float32)
            _KERNEL_MATRICES[device] = m
    return m


def kernel_transform(weight: torch.Tensor) -> torch.Tensor:
    """``U`` as [36, Co, Ci] for a [Co, Ci, 3, 3] kernel (one GEMM over the taps)."""
    co, ci = weight.shape[:2]
    return torch.mm(_kernel_matrix(weight.device), weight.reshape(co * ci, 9).t()).view(36, co, ci)


def _input_rows(d: list[torch.Tensor], out: torch.Tensor, tmp: torch.Tensor) -> None:
    """``out[i] = sum_k B^T[i, k] d[k]`` for the six views ``d`` (rows or columns 0..5 of every tile)."""
    p, q = tmp[0], tmp[1]
    torch.add(d[4], d[2], alpha=-5, out=out[0])
    out[0].add_(d[0], alpha=4)
    torch.add(d[4], d[2], alpha=-4, out=p)  # d4 - 4 d2
    torch.add(d[3], d[1], alpha=-4, out=q)  # d3 - 4 d1
    torch.add(p, q, out=out[1])
    torch.sub(p, q, out=out[2])
    torch.sub(d[4], d[2], out=p)  # d4 - d2
    torch.sub(d[1], d[3], out=q)  # d1 - d3
    torch.add(p, q, alpha=-2, out=out[3])
    torch.add(p, q, alpha=2, out=out[4])
    torch.add(d[5], d[3], alpha=-5, out=out[5])
    out[5].add_(d[1], alpha=4)


def _output_rows(m: list[torch.Tensor], out: list[torch.Tensor], tmp: torch.Tensor) -> None:
    """``out[a] = sum_i A^T[a, i] m[i]`` for the six views ``m``."""
    s12, d12, s34, d34 = tmp[0], tmp[1], tmp[2], tmp[3]
    torch.add(m[1], m[2], out=s12)
    torch.sub(m[1], m[2], out=d12)
    torch.add(m[3], m[4], out=s34)
    torch.sub(m[3], m[4], out=d34)
    torch.add(m[0], s12, out=out[0])
    out[0].add_(s34)
    torch.add(d12, d34, alpha=2, out=out[1])
    torch.add(s12, s34, alpha=4, out=out[2])
    torch.add(m[5], d12, out=out[3])
    out[3].add_(d34, alpha=8)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a float32 CPU map and 3x3 kernel, in ``x``'s memory layout
    (channels-last or contiguous)."""
    b, c, h, w = x.shape
    co = weight.shape[0]
    th, tw = -(-h // 4), -(-w // 4)
    wp = 4 * tw + 2
    u = kernel_transform(weight.to(x.dtype))  # [36, Co, C]
    ut = u.transpose(1, 2)  # [36, C, Co] view: the GEMMs take it transposed
    src = x.permute(0, 2, 3, 1)  # [B, H, W, C] (a view when x is channels-last)
    out = torch.empty(b, h, w, co, dtype=x.dtype)
    exact = h % 4 == 0 and w % 4 == 0
    band = max(1, min(th, BAND_BYTES // (36 * b * tw * max(c, co) * 4)))
    # one flat buffer per intermediate, viewed at the band's size (the last band may be shorter and stays dense)
    shapes = {"xin": (b, 4 * band + 2, wp, c), "rows": (6, b, band, wp, c), "tmp_rows": (2, b, band, wp, c),
              "v": (6, 6, b, band, tw, c), "tmp_cols": (2, 6, b, band, tw, c), "m": (36, b * band * tw, co),
              "half": (4, 6, b, band, tw, co), "tmp_out": (4, 6, b, band, tw, co)}
    if not exact:
        shapes["tile_out"] = (b, band, 4, tw, 4, co)
    flat = {k: x.new_empty(_numel(v)) for k, v in shapes.items()}

    def buf(name: str, *shape: int) -> torch.Tensor:
        return flat[name][:_numel(shape)].view(shape)

    for t0 in range(0, th, band):
        n = min(band, th - t0)
        r0 = 4 * t0 - 1  # image row of the band's first padded row
        xb = buf("xin", b, 4 * n + 2, wp, c).zero_()
        lo, hi = max(r0, 0), min(r0 + 4 * n + 2, h)
        xb[:, lo - r0:hi - r0, 1:w + 1].copy_(src[:, lo:hi])
        rb = buf("rows", 6, b, n, wp, c)
        _input_rows([xb[:, k:k + 4 * n:4] for k in range(6)], rb, buf("tmp_rows", 2, b, n, wp, c))
        vb = buf("v", 6, 6, b, n, tw, c)  # [i, j, ...]: the columns of all six row positions at once
        _input_rows([rb[:, :, :, k:k + 4 * tw:4] for k in range(6)], vb.transpose(0, 1),
                    buf("tmp_cols", 2, 6, b, n, tw, c))
        tiles = b * n * tw
        mb = torch.bmm(vb.view(36, tiles, c), ut, out=buf("m", 36, tiles, co))
        if bias is not None:
            mb[7].add_(bias)  # A^T column 1 is all ones: position (1, 1) reaches every output pixel once
        m6 = mb.view(6, 6, b, n, tw, co)
        hb = buf("half", 4, 6, b, n, tw, co)
        tmp = buf("tmp_out", 4, 6, b, n, tw, co)
        _output_rows([m6[i] for i in range(6)], [hb[a] for a in range(4)], tmp)
        dest = (out[:, 4 * t0:4 * (t0 + n)].view(b, n, 4, tw, 4, co) if exact
                else buf("tile_out", b, n, 4, tw, 4, co))
        # the columns of all four output rows at once: dest[:, :, a, :, s] for a = 0..3
        _output_rows([hb[:, j] for j in range(6)], [dest[:, :, :, :, s].permute(2, 0, 1, 3, 4) for s in range(4)],
                     tmp[:, :4])
        if not exact:
            rr = min(4 * n, h - 4 * t0)
            out[:, 4 * t0:4 * t0 + rr].copy_(dest.reshape(b, 4 * n, 4 * tw, co)[:, :rr, :w])
    out = out.permute(0, 3, 1, 2)
    return out if is_channels_last(x) else out.contiguous()
