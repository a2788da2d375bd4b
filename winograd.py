"""Winograd convolutions: a 3x3 / stride 1 / padding 1 convolution with 2.25 (F(4x4, 3x3)) or 4 (F(2x2, 3x3))
instead of 9 multiply-adds per output value and channel pair, shared by the model families (SUPIR's UNet,
control adapter and VAE, CodeFormer's autoencoder).

Official: the networks run their 3x3 convolutions through ``F.conv2d`` (oneDNN's direct kernels on a CPU).
Deliberately different, same sums: on float32 CPU maps with enough pixels and channels (:func:`tile_size`) the
convolution runs as Lavin and Gray's minimal filtering algorithm (arXiv:1509.09308), with the interpolation
points 0, +-1, +-2, infinity (6x6 input tiles, 4x4 output tiles) or 0, +-1, infinity (4x4 in, 2x2 out). Every
input tile ``d`` and the kernel ``g`` are transformed (``V = B^T d B``, ``U = G g G^T``), the alpha^2 positions
of a tile are as many GEMMs over the channels (``M = V U``), and ``Y = A^T M A`` gives the output tile. The
result equals the direct convolution exactly in real arithmetic; in float32 it differs by rounding only:
about 3e-7 (F(2x2), as the direct kernel) and 6e-6 (F(4x4)) of the output's largest value per convolution.
cuDNN picks Winograd kernels on GPUs the same way; on a CPU ATen never does, which is where this module is used.

The map is processed in bands of tile rows, so the transformed tiles of a band (up to 2.25x its size) stay in
the CPU caches and their buffers are reused band after band; a band holds at least 128 tiles where the map has
them, since the GEMMs of a band stream the whole transformed kernel (with 1280-2560 channels a cache-sized band
left them 16-64 rows and ran them at half speed: 0.31 against 0.19 s for 1280 channels at 32x32, batch 2). The kernel's transform is computed per call (one
small GEMM), never stored beside the weights; inside :func:`workspace` (:func:`.scratch.scratch`: one denoiser
call, one VAE pass, one CodeFormer call) it and the band buffers are reused from call to call instead of being
page-faulted in anew (64 against 20 ms for the F(2x2) transform of a 1280x1280 kernel).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from . import scratch as scratch_buffers
from .layout import is_channels_last

# G (alpha x 3) of each variant, keyed by the output tile side m (alpha = m + 2 is the input tile side):
# F(2x2, 3x3) with the points 0, 1, -1, infinity; F(4x4, 3x3) with 0, 1, -1, 2, -2, infinity.
_G = {2: ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
      4: ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
          (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))}

# Where each variant is taken, measured on one AMD EPYC core inside the workspace (python bench/winograd.py)
# against oneDNN's direct kernel. "Work" is output pixels over the batch times min(channels in, channels out).
# F(4x4, 3x3) from 1024 output pixels and a work of 250k up: 0.44-0.74x the direct time (64 channels at 512x512:
# 0.88x; below 64 channels the data transforms cost more than the GEMMs save). F(2x2, 3x3) on smaller maps with
# many channels, where 4x4 tiles leave the GEMMs too few rows: 0.65-0.75x (1280 channels at 16x16 and at 8x8,
# batch 2), and its rounding stays at the direct kernel's (3-4e-7 against 5-9e-6 for F(4x4)).
# With more threads oneDNN's direct kernel scales better than the transforms' element-wise passes: at 2 threads
# 64 channels lose (1.0-1.5x) and 128 break even (0.86-1.04x), while 256+ channels and the UNet's widths still
# win (0.52-0.76x). The channel minimum therefore grows with the thread count, up to 4x (256 channels from 4
# threads on: an extrapolation, not measured here).
# On AVX-512 CPUs (one Intel Xeon with AMX measured, 1 and 2 threads) oneDNN's direct kernel is relatively
# faster: 64 channels at 512x512 lose at any thread count (1.2-1.5x), 128 channels win (0.75-0.91x), the UNet's
# widths win as on the AMD core (0.58-0.80x). There the minimum is 128 channels from the first thread on.
MIN_CHANNELS = 64
MIN_CHANNELS_AVX512 = 128
MAX_THREAD_FACTOR = 4
F4_MIN_PIXELS, F4_MIN_WORK = 1024, 250_000
F2_MIN_PIXELS, F2_MIN_WORK = 128, 150_000
BAND_BYTES = 6 << 20  # transformed input tiles of one band (alpha^2 positions x tiles x channels x 4 bytes)
MIN_BAND_TILES = 128  # ... but at least this many tiles (GEMM rows) per band, where the map has them

_KERNEL_MATRICES: dict[tuple[int, torch.device], torch.Tensor] = {}
_local = scratch_buffers._local  # the thread's scratch (``.buffers``), shared with the per-layer weight casts

workspace = scratch_buffers.scratch  # within: conv3x3's kernel transform and band buffers are reused, call to call


def _empty(name: str, n: int) -> torch.Tensor:
    """A float32 CPU buffer of ``n`` elements: the scratch's (:mod:`.scratch`) or, outside one, a fresh one."""
    reused = scratch_buffers.buffer(("winograd", name), n, torch.float32)
    return torch.empty(n, dtype=torch.float32) if reused is None else reused


def applies(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation=(1, 1), groups: int = 1) -> bool:
    """Whether :func:`conv3x3` takes this convolution: float32 CPU, 3x3, stride 1, padding 1, and a map and
    channel count where :func:`tile_size` picks a variant."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and x.dim() == 4 and weight.dim() == 4 and tuple(weight.shape[-2:]) == (3, 3) and groups == 1
            and tuple(stride) == (1, 1) and tuple(padding) == (1, 1) and tuple(dilation) == (1, 1)
            and tile_size(x, weight) > 0
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


@functools.cache
def wide_vectors() -> bool:
    """Whether ATen runs this CPU's AVX-512 kernels (oneDNN's direct convolution is then relatively faster)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def channel_minimum() -> int:
    """The fewest channels (min of in and out) for which a Winograd convolution beats the direct kernel here:
    64 per thread up to 4 threads, and at least 128 on AVX-512 CPUs."""
    threads = min(max(torch.get_num_threads(), 1), MAX_THREAD_FACTOR)
    return max(MIN_CHANNELS * threads, MIN_CHANNELS_AVX512 if wide_vectors() else 0)


def tile_size(x: torch.Tensor, weight: torch.Tensor) -> int:
    """The output tile side for ``x`` and a [Co, Ci, 3, 3] ``weight``: 4 on large maps, 2 on smaller maps with
    many channels, 0 where the direct kernel is faster (too few channels for this CPU and thread count, too small
    a map)."""
    channels = min(weight.shape[0], weight.shape[1])
    pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
    if channels < channel_minimum():
        return 0
    if pixels >= F4_MIN_PIXELS:
        return 4 if pixels * channels >= F4_MIN_WORK else 0
    return 2 if pixels >= F2_MIN_PIXELS and pixels * channels >= F2_MIN_WORK else 0


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


def _kernel_matrix(m: int, device: torch.device) -> torch.Tensor:
    """[alpha^2, 9]: row (i, j), column (k, l) holds G[i, k] * G[j, l], so that U = K @ g over the taps."""
    key = (m, device)
    k = _KERNEL_MATRICES.get(key)
    if k is None:
        with torch.inference_mode(False):
            g = torch.tensor(_G[m], dtype=torch.float64)
            k = torch.einsum("ik,jl->ijkl", g, g).reshape(-1, 9).to(device=device, dtype=torch.float32)
            _KERNEL_MATRICES[key] = k
    return k


def kernel_transform(weight: torch.Tensor, m: int = 4, out: torch.Tensor | None = None) -> torch.Tensor:
    """``U`` as [alpha^2, Co, Ci] for a [Co, Ci, 3, 3] kernel (one GEMM over the taps; into ``out`` when given,
    a flat buffer of alpha^2 * Co * Ci elements)."""
    co, ci = weight.shape[:2]
    k = _kernel_matrix(m, weight.device)
    w9 = weight.reshape(co * ci, 9).t()
    u = torch.mm(k, w9) if out is None else torch.mm(k, w9, out=out.view(k.shape[0], co * ci))
    return u.view(k.shape[0], co, ci)


def _input_rows_f4(d: list[torch.Tensor], out: torch.Tensor, tmp: torch.Tensor) -> None:
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


def _output_rows_f4(m: list[torch.Tensor], out: list[torch.Tensor], tmp: torch.Tensor) -> None:
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


def _input_rows_f2(d: list[torch.Tensor], out: torch.Tensor, tmp: torch.Tensor) -> None:
    """``out[i] = sum_k B^T[i, k] d[k]`` for the four views ``d`` of F(2x2, 3x3)."""
    torch.sub(d[0], d[2], out=out[0])
    torch.add(d[1], d[2], out=out[1])
    torch.sub(d[2], d[1], out=out[2])
    torch.sub(d[1], d[3], out=out[3])


def _output_rows_f2(m: list[torch.Tensor], out: list[torch.Tensor], tmp: torch.Tensor) -> None:
    """``out[a] = sum_i A^T[a, i] m[i]`` for the four views ``m`` of F(2x2, 3x3)."""
    torch.add(m[0], m[1], out=out[0])
    out[0].add_(m[2])
    torch.sub(m[1], m[2], out=out[1])
    out[1].sub_(m[3])


_TRANSFORMS = {2: (_input_rows_f2, _output_rows_f2), 4: (_input_rows_f4, _output_rows_f4)}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, m: int | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a float32 CPU map and 3x3 kernel, in ``x``'s memory layout
    (channels-last or contiguous), with output tiles of side ``m`` (2 or 4; default :func:`tile_size`, else 4)."""
    m = m or tile_size(x, weight) or 4
    input_rows, output_rows = _TRANSFORMS[m]
    a = m + 2  # input tile side; a*a GEMM positions
    b, c, h, w = x.shape
    co = weight.shape[0]
    th, tw = -(-h // m), -(-w // m)
    wp = m * tw + 2
    u = kernel_transform(weight.to(x.dtype), m, _empty("kernel", a * a * co * c))  # [a*a, Co, C]
    ut = u.transpose(1, 2)  # [a*a, C, Co] view: the GEMMs take it transposed
    src = x.permute(0, 2, 3, 1)  # [B, H, W, C] (a view when x is channels-last)
    out = torch.empty(b, h, w, co, dtype=x.dtype)
    exact = h % m == 0 and w % m == 0
    # a band's GEMMs need rows (tiles) enough to amortise streaming the transformed kernel: with many channels
    # the cache budget alone would leave them 16-64 rows
    band = max(1, min(th, max(BAND_BYTES // (a * a * b * tw * max(c, co) * 4), -(-MIN_BAND_TILES // (b * tw)))))
    # one flat buffer per intermediate, viewed at the band's size (the last band may be shorter and stays dense)
    shapes = {"xin": (b, m * band + 2, wp, c), "rows": (a, b, band, wp, c), "tmp_rows": (2, b, band, wp, c),
              "v": (a, a, b, band, tw, c), "tmp_cols": (2, a, b, band, tw, c), "m": (a * a, b * band * tw, co),
              "half": (m, a, b, band, tw, co), "tmp_out": (4, a, b, band, tw, co)}
    if not exact:
        shapes["tile_out"] = (b, band, m, tw, m, co)
    flat = {k: _empty(k, _numel(v)) for k, v in shapes.items()}

    def buf(name: str, *shape: int) -> torch.Tensor:
        return flat[name][:_numel(shape)].view(shape)

    for t0 in range(0, th, band):
        n = min(band, th - t0)
        r0 = m * t0 - 1  # image row of the band's first padded row
        xb = buf("xin", b, m * n + 2, wp, c).zero_()
        lo, hi = max(r0, 0), min(r0 + m * n + 2, h)
        xb[:, lo - r0:hi - r0, 1:w + 1].copy_(src[:, lo:hi])
        rb = buf("rows", a, b, n, wp, c)
        input_rows([xb[:, k:k + m * n:m] for k in range(a)], rb, buf("tmp_rows", 2, b, n, wp, c))
        vb = buf("v", a, a, b, n, tw, c)  # [i, j, ...]: the columns of all row positions at once
        input_rows([rb[:, :, :, k:k + m * tw:m] for k in range(a)], vb.transpose(0, 1),
                   buf("tmp_cols", 2, a, b, n, tw, c))
        tiles = b * n * tw
        mb = torch.bmm(vb.view(a * a, tiles, c), ut, out=buf("m", a * a, tiles, co))
        if bias is not None:
            mb[a + 1].add_(bias)  # A^T column 1 is all ones: position (1, 1) reaches every output pixel once
        ma = mb.view(a, a, b, n, tw, co)
        hb = buf("half", m, a, b, n, tw, co)
        tmp = buf("tmp_out", 4, a, b, n, tw, co)
        output_rows([ma[i] for i in range(a)], [hb[r] for r in range(m)], tmp)
        dest = (out[:, m * t0:m * (t0 + n)].view(b, n, m, tw, m, co) if exact
                else buf("tile_out", b, n, m, tw, m, co))
        # the columns of all output rows at once: dest[:, :, r, :, s] for r = 0..m-1
        output_rows([hb[:, j] for j in range(a)], [dest[:, :, :, :, s].permute(2, 0, 1, 3, 4) for s in range(m)],
                    tmp[:, :m])
        if not exact:
            rr = min(m * n, h - m * t0)
            out[:, m * t0:m * t0 + rr].copy_(dest.reshape(b, m * n, m * tw, co)[:, :rr, :w])
    out = out.permute(0, 3, 1, 2)
    return out if is_channels_last(x) else out.contiguous()
