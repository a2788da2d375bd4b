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

Each of the three transforms is one GEMM with a Kronecker product (``B^T (x) B^T``, ``A^T (x) A^T``, ``G (x) G``),
applied to all tiles of a band at once: the band's overlapping input tiles are gathered position-major with
one copy, so ``V`` comes out in the layout the channel GEMMs read, and their output ``M`` is already the matrix
``A^T (x) A^T`` multiplies. (Elementwise row and column passes, 24-40 strided adds per band, cost 1.4-1.8x as
much on 64-256-channel maps: 0.59 against 0.33 s for 128 channels at 512x512 on one Xeon core.)

The map is processed in bands of tile rows, so the transformed tiles of a band (up to 2.25x its size) stay in
the CPU caches and their buffers are reused band after band; a band holds at least 128 tiles where the map has
them, since the GEMMs of a band stream the whole transformed kernel (with 1280-2560 channels a cache-sized band
left them 16-64 rows and ran them at half speed: 0.31 against 0.19 s for 1280 channels at 32x32, batch 2). The
kernel's transform is computed per call, never stored beside the weights; inside :func:`workspace`
(:func:`.scratch.scratch`: one denoiser call, one VAE pass, one CodeFormer call) it and the band buffers are
reused from call to call instead of being page-faulted in anew (64 against 20 ms for the F(2x2) transform of a
1280x1280 kernel).
"""
from __future__ import annotations

import torch
from torch import nn

from . import gemm
from . import scratch as scratch_buffers
from .layout import is_channels_last

# G (alpha x 3) of each variant, keyed by the output tile side m (alpha = m + 2 is the input tile side):
# F(2x2, 3x3) with the points 0, 1, -1, infinity; F(4x4, 3x3) with 0, 1, -1, 2, -2, infinity.
_G = {2: ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
      4: ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
          (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))}
# B^T (alpha x alpha: input tile -> transformed tile) and A^T (m x alpha: GEMM results -> output tile), same points.
_BT = {2: ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
       4: ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0),
           (0, 4, 0, -5, 0, 1))}
_AT = {2: ((1, 1, 1, 0), (0, 1, -1, -1)),
       4: ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))}

# Where each variant is taken, measured against oneDNN's direct kernel (python bench/winograd.py), first on one
# AMD EPYC core (AVX2), then on an Intel Xeon (AVX-512, AMX) at 1 and 2 threads. "Work" is output pixels over the
# batch times min(channels in, channels out). F(4x4, 3x3) from 1024 output pixels and a work of 250k up; F(2x2,
# 3x3) on smaller maps with many channels, where 4x4 tiles leave the GEMMs too few rows (1280 channels at 16x16
# and at 8x8, batch 2; the SUPIR UNet sends maps of <= 64 pixels per image to im2col + one GEMM first, faster
# still there: supir/conv.py), and its rounding stays at the direct kernel's (3-4e-7 against 5-9e-6 for F(4x4)).
# With more threads oneDNN's direct kernel scales better than the transforms' copies: on the Xeon at 1 thread 64
# channels at 512x512 win (0.83x of the direct time on a channels-last map), at 2 threads they lose (1.12x) and 128
# win (0.73-0.75x); the UNet's widths win at any count (0.4-0.8x). The channel minimum therefore grows with the
# thread count, 64 per thread up to 4x (256 channels from 4 threads on: an extrapolation, not measured here).
MIN_CHANNELS = 64
MAX_THREAD_FACTOR = 4
F4_MIN_PIXELS, F4_MIN_WORK = 1024, 250_000
F2_MIN_PIXELS, F2_MIN_WORK = 128, 150_000
BAND_BYTES = 6 << 20  # transformed input tiles of one band (alpha^2 positions x tiles x channels x 4 bytes)
MIN_BAND_TILES = 128  # ... but at least this many tiles (GEMM rows) per band, where the map has them
ONEDNN_MIN_CHANNELS = 640  # per thread: channel GEMMs one position at a time through oneDNN (channel_gemms)

_MATRICES: dict[tuple[str, int], torch.Tensor] = {}
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


def channel_minimum() -> int:
    """The fewest channels (min of in and out) for which a Winograd convolution beats the direct kernel here:
    64 per thread, up to 4 threads."""
    return MIN_CHANNELS * min(max(torch.get_num_threads(), 1), MAX_THREAD_FACTOR)


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


def _kron(name: str, m: int) -> torch.Tensor:
    """``T (x) T`` for the variant's ``T`` (``G``, ``B^T`` or ``A^T``), float32 on the CPU: row (i, j), column
    (k, l) holds T[i, k] * T[j, l], so that one GEMM with it applies ``T . T^T`` to every tile at once."""
    k = _MATRICES.get((name, m))
    if k is None:
        with torch.inference_mode(False):
            t = torch.tensor({"G": _G, "BT": _BT, "AT": _AT}[name][m], dtype=torch.float64)
            k = torch.einsum("ik,jl->ijkl", t, t).reshape(t.shape[0] ** 2, -1).to(torch.float32)
            _MATRICES[(name, m)] = k
    return k


def kernel_transform(weight: torch.Tensor, m: int = 4, out: torch.Tensor | None = None) -> torch.Tensor:
    """``U`` as [alpha^2, Co, Ci] for a [Co, Ci, 3, 3] kernel (one GEMM over the taps; into ``out`` when given,
    a flat buffer of alpha^2 * Co * Ci elements)."""
    co, ci = weight.shape[:2]
    k = _kron("G", m).to(weight.device)
    w9 = weight.reshape(co * ci, 9).t()
    u = torch.mm(k, w9) if out is None else torch.mm(k, w9, out=out.view(k.shape[0], co * ci))
    return u.view(k.shape[0], co, ci)


def channel_gemms(v: torch.Tensor, u: torch.Tensor, ut: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[p] = v[p] @ u[p].T`` for every transform position ``p`` (``ut`` is ``u.transpose(1, 2)``): one batched
    MKL GEMM, or from :data:`ONEDNN_MIN_CHANNELS` channels per thread (up to 4 threads) one oneDNN GEMM per
    position (:mod:`.gemm`). On a Zen 4 core, 128 tiles: 2-7 % faster at 640-2560 channels with 1 thread, even at
    320, slower at 128; with 2 threads 2-8 % faster at 1280-2560 channels, 8 % slower at 640."""
    if min(u.shape[1:]) >= ONEDNN_MIN_CHANNELS * min(max(torch.get_num_threads(), 1), MAX_THREAD_FACTOR) \
            and gemm.applies(v[0], u[0]):
        for p in range(v.shape[0]):
            out[p].copy_(gemm.linear(v[p], u[p]))
        return out
    return torch.bmm(v, ut, out=out)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, m: int | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a float32 CPU map and 3x3 kernel, in ``x``'s memory layout
    (channels-last or contiguous), with output tiles of side ``m`` (2 or 4; default :func:`tile_size`, else 4)."""
    m = m or tile_size(x, weight) or 4
    a = m + 2  # input tile side; a*a GEMM positions
    b, c, h, w = x.shape
    co = weight.shape[0]
    th, tw = -(-h // m), -(-w // m)
    wp = m * tw + 2
    u = kernel_transform(weight.to(x.dtype), m, _empty("kernel", a * a * co * c))  # [a*a, Co, C]
    ut = u.transpose(1, 2)  # [a*a, C, Co] view: the GEMMs take it transposed
    bt, at = _kron("BT", m), _kron("AT", m)  # [a*a, a*a], [m*m, a*a]
    src = x.permute(0, 2, 3, 1)  # [B, H, W, C] (a view when x is channels-last)
    nhwc = is_channels_last(x)
    # the result in x's layout, written band by band (a contiguous map gets no whole-map transposition at the end)
    out = torch.empty(b, h, w, co, dtype=x.dtype) if nhwc else torch.empty(b, co, h, w, dtype=x.dtype)
    rows_of = (lambda r0, r1: out[:, r0:r1]) if nhwc else (lambda r0, r1: out[:, :, r0:r1].permute(0, 2, 3, 1))
    exact = h % m == 0 and w % m == 0
    # a band's GEMMs need rows (tiles) enough to amortise streaming the transformed kernel: with many channels
    # the cache budget alone would leave them 16-64 rows
    band = max(1, min(th, max(BAND_BYTES // (a * a * b * tw * max(c, co) * 4), -(-MIN_BAND_TILES // (b * tw)))))
    # one flat buffer per intermediate, viewed at the band's size (the last band may be shorter and stays dense)
    tiles_max = b * band * tw
    shapes = {"xin": (b, m * band + 2, wp, c), "d": (a * a, tiles_max, c), "v": (a * a, tiles_max, c),
              "m": (a * a, tiles_max, co), "y": (m * m, tiles_max, co)}
    if not exact:
        shapes["tile_out"] = (b, band, m, tw, m, co)
    flat = {k: _empty(k, _numel(v)) for k, v in shapes.items()}

    def buf(name: str, *shape: int) -> torch.Tensor:
        return flat[name][:_numel(shape)].view(shape)

    for t0 in range(0, th, band):
        n = min(band, th - t0)
        tiles = b * n * tw
        r0 = m * t0 - 1  # image row of the band's first padded row
        xb = buf("xin", b, m * n + 2, wp, c).zero_()
        lo, hi = max(r0, 0), min(r0 + m * n + 2, h)
        xb[:, lo - r0:hi - r0, 1:w + 1].copy_(src[:, lo:hi])
        # the band's overlapping a x a input tiles, gathered position-major: d[(k, l), (batch, tile row, col), c]
        sb, sr, sw, _ = xb.stride()
        d = buf("d", a * a, tiles, c)
        d.view(a, a, b, n, tw, c).copy_(xb.as_strided((a, a, b, n, tw, c), (sr, sw, sb, m * sr, m * sw, 1)))
        v = torch.mm(bt, d.view(a * a, tiles * c), out=buf("v", a * a, tiles * c))  # B^T d B for every tile
        mb = channel_gemms(v.view(a * a, tiles, c), u, ut, buf("m", a * a, tiles, co))  # over the channels
        if bias is not None:
            mb[a + 1].add_(bias)  # A^T column 1 is all ones: position (1, 1) reaches every output pixel once
        y = torch.mm(at, mb.view(a * a, tiles * co), out=buf("y", m * m, tiles * co))  # A^T M A for every tile
        tiles_out = y.view(m, m, b, n, tw, co).permute(2, 3, 0, 4, 1, 5)  # [b, n, r, tw, s, co]
        if exact:  # [b, rows, w, co] view of the band's rows (strided when out is contiguous)
            rows_of(m * t0, m * (t0 + n)).unflatten(1, (n, m)).unflatten(3, (tw, m)).copy_(tiles_out)
        else:
            rr = min(m * n, h - m * t0)
            dest = buf("tile_out", b, n, m, tw, m, co)
            dest.copy_(tiles_out)
            rows_of(m * t0, m * t0 + rr).copy_(dest.view(b, m * n, m * tw, co)[:, :rr, :w])
    return out.permute(0, 3, 1, 2) if nhwc else out
