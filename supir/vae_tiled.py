"""Tiled VAE encoder/decoder with bounded device memory.

Both modes run the network as a flat *program* (the same list for both), read off the modules of
:mod:`.vae`: ``conv_in``; ResnetBlocks as ``store`` (shortcut of the block input), ``norm``, ``silu``,
``conv``, ``norm``, ``silu``, ``conv``, ``add``; the mid attention as ``store``, ``norm``, ``attn``,
``add``; down/upsampling; ``norm_out``, ``silu``, ``conv_out``.

``norm="official"`` -- SUPIR's tiled VAE (``init_tile_vae``): the input is cut into padded tiles
(pad 32 image pixels for encoders, 11 latent pixels for the decoder) and every tile runs the whole
program on its own; at each GroupNorm all tiles stop, the per-tile biased variances and means are
averaged with weights proportional to the tiles' pixel counts, and every tile is normalised with the
pooled values. Each finished tile is cropped to its output box. Receptive fields and attention are cut
at tile borders and the pooled variance ignores the spread between tiles, so the output differs from
the untiled network; this mode exists to reproduce the official results.

``norm="exact"`` (default) -- the program runs operation by operation over whole maps kept on the
staging device (CPU by default). Spatial operations (3x3 convolutions, down/upsampling) are computed
tile by tile on the network's device from input tiles grown by the operation's halo, and the pointwise
operations around them (GroupNorm with whole-map statistics, SiLU, residual adds) are fused into the
same pass. GroupNorm statistics are accumulated per tile (mean and centred sum of squares, merged in
float64 with Chan's formula). The mid attention is global: keys and values of the whole (latent
resolution) map are gathered on the device, queries run tile by tile. The result equals the untiled
network within float tolerance.

Tile sizes: image pixels for the encoders, latent pixels for the decoder (as the official).
``callbacks`` (duck-typed ``progress(step, total, preview=None)`` / ``check_interrupt()``) may be None.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .vae_blocks import GN_GROUPS, AttnBlock, Decoder, Encoder, ResnetBlock

ENCODER_PAD = 32
DECODER_PAD = 11


# ---- the program ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    kind: str  # conv | down | up | norm | silu | store | add | attn
    module: nn.Module | Callable | None = None


def _res_block(block: ResnetBlock) -> list[Op]:
    return [Op("store", block.shortcut), Op("norm", block.norm1), Op("silu"), Op("conv", block.conv1),
            Op("norm", block.norm2), Op("silu"), Op("conv", block.conv2), Op("add")]


def _attn_block(attn: AttnBlock) -> list[Op]:
    return [Op("store", None), Op("norm", attn.norm), Op("attn", attn), Op("add")]


def _mid(net) -> list[Op]:
    return _res_block(net.mid.block_1) + _attn_block(net.mid.attn_1) + _res_block(net.mid.block_2)


def build_program(net: nn.Module) -> list[Op]:
    """The network as a flat list of operations (see module docstring)."""
    ops = [Op("conv", net.conv_in)]
    if isinstance(net, Encoder):
        for level in net.down:
            for block in level.block:
                ops += _res_block(block)
            if hasattr(level, "downsample"):
                ops.append(Op("down", level.downsample))
        ops += _mid(net)
    elif isinstance(net, Decoder):
        ops += _mid(net)
        for level in reversed(net.up):
            for block in level.block:
                ops += _res_block(block)
            if hasattr(level, "upsample"):
                ops.append(Op("up", level.upsample))
    else:
        raise TypeError(f"tiled VAE: expected an Encoder or Decoder, got {type(net).__name__}")
    return ops + [Op("norm", net.norm_out), Op("silu"), Op("conv", net.conv_out)]


def _apply_local(op: Op, x: torch.Tensor) -> torch.Tensor:
    if op.kind == "silu":
        return F.silu(x)
    if op.kind == "attn":
        return op.module.attend(x)
    return op.module(x)  # conv / down / up


class _Callbacks:
    def __init__(self, callbacks, total: int):
        self.cb, self.total, self.step = callbacks, max(total, 1), 0

    def tick(self) -> None:
        if self.cb is None:
            return
        self.cb.check_interrupt()
        self.step += 1
        self.cb.progress(min(self.step, self.total), self.total)


# ---- public entry point ---------------------------------------------------------------------------

def tiled_forward(net: nn.Module, x: torch.Tensor, tile_size: int, decoder: bool, norm: str = "exact",
                  staging: torch.device | str = "cpu", callbacks=None) -> torch.Tensor:
    """Run an :class:`Encoder` (``decoder=False``) or :class:`Decoder` on ``x`` tile by tile.

    ``x`` may live anywhere; tiles are moved to the network's device one at a time. The result is on
    the staging device, in ``x``'s dtype.
    """
    if norm == "official":
        return official_tiled_forward(net, x, tile_size, decoder, staging, callbacks)
    if norm == "exact":
        return exact_tiled_forward(net, x, tile_size, staging, callbacks)
    raise ValueError(f"tiled VAE norm must be 'exact' or 'official', not {norm!r}")


# ---- official mode -------------------------------------------------------------------------------

def fit_tile(t: int, limit: int) -> int:
    """Round a tile side up to a multiple of 32, 16, 8, 4 or 2 (the first that stays <= limit)."""
    for d in (32, 16, 8, 4, 2):
        if t % d == 0:
            return t
        c = t - t % d + d
        if c <= limit:
            return c
    return t


def official_tiles(h: int, w: int, tile: int, pad: int, decoder: bool, factor: int = 8) -> tuple[list, list]:
    """Input boxes and output boxes ``[x1, x2, y1, y2]`` of the official tiled VAE, row-major.
    ``factor``: the network's resampling factor (8 for SDXL's VAE)."""
    n_h = max(math.ceil((h - 2 * pad) / tile), 1)
    n_w = max(math.ceil((w - 2 * pad) / tile), 1)
    t_h = fit_tile(math.ceil((h - 2 * pad) / n_h), tile)
    t_w = fit_tile(math.ceil((w - 2 * pad) / n_w), tile)
    ins, outs = [], []
    for i in range(n_h):
        for j in range(n_w):
            x1, x2 = pad + j * t_w, min(pad + (j + 1) * t_w, w)
            y1, y2 = pad + i * t_h, min(pad + (i + 1) * t_h, h)
            out = [x1 if x1 > pad else 0, x2 if x2 < w - pad else w,
                   y1 if y1 > pad else 0, y2 if y2 < h - pad else h]
            outs.append([v * factor if decoder else v // factor for v in out])
            ins.append([max(0, x1 - pad), min(w, x2 + pad), max(0, y1 - pad), min(h, y2 + pad)])
    return ins, outs


def _crop(t: torch.Tensor, box_in: list, box_out: list, decoder: bool, factor: int) -> torch.Tensor:
    """The part of a finished tile that lands in its output box (margins measured from the scaled input box)."""
    scaled = [v * factor if decoder else v // factor for v in box_in]
    m = [o - s for o, s in zip(box_out, scaled)]
    crop = t[:, :, m[2]:t.shape[2] + m[3], m[0]:t.shape[3] + m[1]]
    want = (box_out[3] - box_out[2], box_out[1] - box_out[0])
    if crop.shape[2:] != want:  # sizes that are not multiples of 8: keep the box from its start margin
        crop = t[:, :, m[2]:m[2] + want[0], m[0]:m[0] + want[1]]
    return crop


def _group_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean per (sample, group), flattened to [B * 32]."""
    b = x.shape[0]
    var, mean = torch.var_mean(x.reshape(b * GN_GROUPS, -1), dim=1, unbiased=False)
    return var, mean


def _norm_with(x: torch.Tensor, gn: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of ``x`` with given per-(sample, group) mean/var (flattened [B * 32]), then the affine."""
    b, c = x.shape[:2]
    shape = (b, GN_GROUPS, -1)
    y = (x.reshape(shape) - mean.reshape(b, GN_GROUPS, 1)) * torch.rsqrt(var.reshape(b, GN_GROUPS, 1) + gn.eps)
    y = y.reshape(x.shape)
    return y * gn.weight.reshape(1, c, 1, 1) + gn.bias.reshape(1, c, 1, 1)


@torch.no_grad()
def official_tiled_forward(net: nn.Module, x: torch.Tensor, tile_size: int, decoder: bool,
                           staging: torch.device | str = "cpu", callbacks=None) -> torch.Tensor:
    """SUPIR's tiled VAE (pooled per-tile GroupNorm statistics); see the module docstring."""
    device = next(net.parameters()).device
    dtype = x.dtype
    pad = DECODER_PAD if decoder else ENCODER_PAD
    b, _, h, w = x.shape
    if max(h, w) <= 2 * pad + tile_size:
        return net(x.to(device)).to(staging, dtype)
    ops = build_program(net)
    factor = 2 ** sum(op.kind in ("down", "up") for op in ops)
    ins, outs = official_tiles(h, w, tile_size, pad, decoder, factor)
    n = len(ins)
    tiles = [x[:, :, y1:y2, x1:x2].to(staging) for x1, x2, y1, y2 in ins]
    res: list[torch.Tensor | None] = [None] * n
    pc = [0] * n
    pooled: tuple | None = None  # (mean, var) every tile applies at its current norm op
    result = None
    n_norms = sum(op.kind == "norm" for op in ops)
    cb = _Callbacks(callbacks, n * (n_norms + 1))
    forward = True
    while True:
        var_list, mean_list, pixels = [], [], []
        for i in (range(n) if forward else reversed(range(n))):
            if pc[i] >= len(ops):
                continue
            t = tiles[i].to(device)
            if pooled is not None:  # finish the norm this tile stopped at
                t = _norm_with(t, ops[pc[i]].module, *pooled)
                pc[i] += 1
            while pc[i] < len(ops):
                op = ops[pc[i]]
                if op.kind == "norm":
                    var, mean = _group_var_mean(t)
                    var_list.append(var)
                    mean_list.append(mean)
                    pixels.append(t.shape[2] * t.shape[3])
                    break
                if op.kind == "store":
                    res[i] = (t if op.module is None else op.module(t)).to(staging)
                elif op.kind == "add":
                    t = t + res[i].to(device)
                    res[i] = None
                else:
                    t = _apply_local(op, t)
                pc[i] += 1
            if pc[i] >= len(ops):
                if result is None:
                    oh, ow = (h * factor, w * factor) if decoder else (h // factor, w // factor)
                    result = torch.zeros(b, t.shape[1], oh, ow, dtype=torch.float32, device=staging)
                x1, x2, y1, y2 = outs[i]
                result[:, :, y1:y2, x1:x2] = _crop(t, ins[i], outs[i], decoder, factor).to(staging, torch.float32)
                tiles[i] = None
            else:
                tiles[i] = t.to(staging)
            cb.tick()
        if all(p >= len(ops) for p in pc):
            break
        weights = torch.tensor(pixels, dtype=torch.float32, device=device) / max(pixels)
        weights = (weights / weights.sum()).unsqueeze(1)
        pooled = ((torch.vstack(mean_list) * weights).sum(0), (torch.vstack(var_list) * weights).sum(0))
        forward = not forward
    return result.to(dtype)


# ---- exact mode ----------------------------------------------------------------------------------

class _Stats:
    """Per (sample, channel) count, mean and centred sum of squares, merged over tiles in float64."""

    def __init__(self):
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, t: torch.Tensor) -> None:
        var, mean = torch.var_mean(t.float().flatten(2), dim=2, unbiased=False)
        k = t.shape[2] * t.shape[3]
        mean, m2 = mean.double().cpu(), var.double().cpu() * k
        if self.mean is None:
            self.n, self.mean, self.m2 = k, mean, m2
            return
        n = self.n + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / n)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * k / n)
        self.n = n

    def groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) per (sample, group), float64 [B, 32]."""
        b, c = self.mean.shape
        mean_c = self.mean.reshape(b, GN_GROUPS, c // GN_GROUPS)
        m2_c = self.m2.reshape(b, GN_GROUPS, c // GN_GROUPS)
        mean = mean_c.mean(2)
        m2 = (m2_c + (mean_c - mean[..., None]).square() * self.n).sum(2)
        return mean, m2 / (self.n * (c // GN_GROUPS))


@dataclass
class _Map:
    """A whole intermediate map on the staging device, with the statistics of its values."""

    data: torch.Tensor
    stats: _Stats | None = None


def _grid(size: int, side: int) -> list[tuple[int, int]]:
    n = max(math.ceil(size / max(side, 1)), 1)
    step = math.ceil(size / n)
    return [(a, min(a + step, size)) for a in range(0, size, step)]


def _norm_fn(gn: nn.GroupNorm, stats: _Stats, device) -> Callable[[torch.Tensor], torch.Tensor]:
    mean, var = stats.groups()
    mean = mean.to(device, torch.float32)
    rstd = torch.rsqrt(var + gn.eps).to(device, torch.float32)

    def apply(t: torch.Tensor) -> torch.Tensor:
        b, c = t.shape[:2]
        y = (t.float().reshape(b, GN_GROUPS, -1) - mean[..., None]) * rstd[..., None]
        y = y.reshape(t.shape) * gn.weight.float().reshape(1, c, 1, 1) + gn.bias.float().reshape(1, c, 1, 1)
        return y.to(t.dtype)

    return apply


class _ExactRunner:
    def __init__(self, net: nn.Module, tile: int, in_h: int, in_w: int, staging, callbacks):
        self.net, self.tile, self.in_h, self.in_w, self.staging = net, tile, in_h, in_w, staging
        self.device = next(net.parameters()).device
        self.cb = callbacks

    def boxes(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """Output tiles of a map of size h x w: the requested tile scaled to this map's resolution."""
        side_h = max(math.ceil(self.tile * h / self.in_h), 8)
        side_w = max(math.ceil(self.tile * w / self.in_w), 8)
        return [(y0, y1, x0, x1) for y0, y1 in _grid(h, side_h) for x0, x1 in _grid(w, side_w)]

    def spatial(self, op: Op, src: _Map, pre: list, res: tuple | None, want_stats: bool) -> _Map:
        """One streaming pass: out = op(pre(src)) (+ shortcut(res)), tile by tile with halos."""
        x = src.data
        b, _, h, w = x.shape
        # (output size, output -> input coordinate map, halo in input pixels)
        if op.kind == "conv":
            k = op.module.kernel_size[0]
            halo, oh, ow = k // 2, h, w
            to_in, from_in = (lambda v: v), (lambda v: v)
        elif op.kind == "down":
            halo, oh, ow = 2, (h - 2) // 2 + 1, (w - 2) // 2 + 1
            to_in, from_in = (lambda v: 2 * v), (lambda v: v // 2)
        elif op.kind == "up":
            halo, oh, ow = 1, 2 * h, 2 * w
            to_in, from_in = (lambda v: v // 2), (lambda v: 2 * v)
        else:
            raise ValueError(op.kind)
        out = None
        stats = _Stats() if want_stats else None
        for y0, y1, x0, x1 in self.boxes(oh, ow):
            iy0, ix0 = max(to_in(y0) - halo, 0), max(to_in(x0) - halo, 0)
            iy1, ix1 = min(to_in(y1 - 1) + 1 + halo, h), min(to_in(x1 - 1) + 1 + halo, w)
            t = x[:, :, iy0:iy1, ix0:ix1].to(self.device)
            for f in pre:
                t = f(t)
            t = op.module(t)
            oy, ox = y0 - from_in(iy0), x0 - from_in(ix0)
            t = t[:, :, oy:oy + (y1 - y0), ox:ox + (x1 - x0)]
            assert t.shape[2:] == (y1 - y0, x1 - x0), "tiled VAE: tile geometry error"
            if res is not None:
                r_map, r_fn = res
                r = r_map.data[:, :, y0:y1, x0:x1].to(self.device)
                t = t + (r if r_fn is None else r_fn(r))
            if out is None:
                out = torch.empty(b, t.shape[1], oh, ow, dtype=t.dtype, device=self.staging)
            out[:, :, y0:y1, x0:x1] = t.to(self.staging)
            if stats is not None:
                stats.add(t)
            self.cb.tick()
        return _Map(out, stats)

    def attention(self, attn: AttnBlock, src: _Map, pre: list, res: tuple | None) -> _Map:
        """Global single-head attention: keys/values of the whole map on the device, queries per tile."""
        x = src.data
        b, c, h, w = x.shape
        boxes = self.boxes(h, w)
        keys, values = [], []
        for y0, y1, x0, x1 in boxes:
            t = x[:, :, y0:y1, x0:x1].to(self.device)
            for f in pre:
                t = f(t)
            keys.append(AttnBlock.tokens(attn.k(t)))
            values.append(AttnBlock.tokens(attn.v(t)))
            self.cb.tick()
        k, v = torch.cat(keys, 2), torch.cat(values, 2)
        del keys, values
        out = torch.empty_like(x, device=self.staging)
        stats = _Stats()
        for y0, y1, x0, x1 in boxes:
            t = x[:, :, y0:y1, x0:x1].to(self.device)
            for f in pre:
                t = f(t)
            q = AttnBlock.tokens(attn.q(t))
            o = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(t.shape)
            o = attn.proj_out(o)
            if res is not None:
                r_map, r_fn = res
                r = r_map.data[:, :, y0:y1, x0:x1].to(self.device)
                o = o + (r if r_fn is None else r_fn(r))
            out[:, :, y0:y1, x0:x1] = o.to(self.staging)
            stats.add(o)
            self.cb.tick()
        return _Map(out, stats)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        ops = build_program(self.net)
        cur = _Map(x.to(self.staging))
        pre: list = []
        res: tuple | None = None
        i = 0
        while i < len(ops):
            op = ops[i]
            if op.kind == "norm":
                if pre or cur.stats is None:
                    raise RuntimeError("tiled VAE: a norm must follow a materialised map")
                pre.append(_norm_fn(op.module, cur.stats, self.device))
            elif op.kind == "silu":
                pre.append(F.silu)
            elif op.kind == "store":
                res = (cur, op.module)
            elif op.kind in ("conv", "down", "up", "attn"):
                fuse_add = i + 1 < len(ops) and ops[i + 1].kind == "add"
                want_stats = i + 1 + fuse_add < len(ops)
                use_res = res if fuse_add else None
                if op.kind == "attn":
                    cur = self.attention(op.module, cur, pre, use_res)
                else:
                    cur = self.spatial(op, cur, pre, use_res, want_stats)
                pre = []
                if fuse_add:
                    res = None
                    i += 1
            else:
                raise RuntimeError(f"tiled VAE: unexpected operation {op.kind}")
            i += 1
        return cur.data

    def passes(self) -> int:
        """How many tile steps :meth:`run` makes (for progress reporting)."""
        h, w, total = self.in_h, self.in_w, 0
        for op in build_program(self.net):
            if op.kind == "conv":
                total += len(self.boxes(h, w))
            elif op.kind == "down":
                h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
                total += len(self.boxes(h, w))
            elif op.kind == "up":
                h, w = 2 * h, 2 * w
                total += len(self.boxes(h, w))
            elif op.kind == "attn":
                total += 2 * len(self.boxes(h, w))
        return total


@torch.no_grad()
def exact_tiled_forward(net: nn.Module, x: torch.Tensor, tile_size: int, staging: torch.device | str = "cpu",
                        callbacks=None) -> torch.Tensor:
    """Tiled forward equal to ``net(x)`` within float tolerance; see the module docstring."""
    b, _, h, w = x.shape
    device = next(net.parameters()).device
    if h <= tile_size and w <= tile_size:
        return net(x.to(device)).to(staging)
    runner = _ExactRunner(net, tile_size, h, w, staging, None)
    runner.cb = _Callbacks(callbacks, runner.passes())
    dtype = next(net.parameters()).dtype
    return runner.run(x.to(dtype))
