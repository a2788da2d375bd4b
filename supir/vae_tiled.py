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

``norm="exact"`` (default) -- equal to the untiled network within float tolerance, with bounded host
memory. The program is cut into pieces (one ResnetBlock each, with a following downsample; the mid
attention; an upsample opens the next piece so its large output is never kept). Only each piece's
input and output maps are kept whole, on the staging device (CPU by default). Inside a piece every
output tile is recomputed from the piece's input, grown by exactly the halo its 3x3 convolutions and
resampling need (zero padding only at the true image border), on the network's device. A GroupNorm
inside a piece first gets its whole-map statistics from one pass over tiles of its input, recomputed
the same way and dropped (mean and centred sum of squares per tile, merged in float64 with Chan's
formula); the statistics of a piece's output are gathered while it is written. The mid attention is
global: keys and values of the whole (latent resolution) map are gathered on the device, queries run
tile by tile. Cost: the first convolution of a block runs twice (an upsample three times). Host
memory: at most two whole maps of one level plus a few tiles (the untiled network holds three to five
maps at its largest level).

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
ATTN_SCORE_BYTES = 64 * 2 ** 20  # exact mode: bound on one chunk of attention scores


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

    def apply(t: torch.Tensor) -> torch.Tensor:  # a new tensor (t is never modified); in place after that
        b, c = t.shape[:2]
        y = t.float().reshape(b, GN_GROUPS, -1) - mean[..., None]
        y = y.mul_(rstd[..., None]).reshape(t.shape)
        y = y.mul_(gn.weight.float().reshape(1, c, 1, 1)).add_(gn.bias.float().reshape(1, c, 1, 1))
        return y.to(t.dtype)

    return apply


Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (end exclusive) in one map's pixels


def _sizes(ops: list[Op], h: int, w: int) -> list[tuple[int, int]]:
    """Map size at the input of each op, and (last) at the output."""
    sizes = [(h, w)]
    for op in ops:
        if op.kind == "down":
            h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
        elif op.kind == "up":
            h, w = 2 * h, 2 * w
        sizes.append((h, w))
    return sizes


def _need(op: Op, o0: int, o1: int, n: int) -> tuple[int, int]:
    """Input rows (of a map with n rows) that output rows [o0, o1) of ``op`` read."""
    if op.kind == "conv":
        p = op.module.kernel_size[0] // 2
        return max(o0 - p, 0), min(o1 + p, n)
    if op.kind == "down":  # pad 1 at the end, 3x3 stride 2: output i reads 2i .. 2i+2
        return 2 * o0, min(2 * o1 + 1, n)
    if op.kind == "up":  # nearest x2 then 3x3: output j reads upsampled j-1 .. j+1
        return max((o0 - 1) // 2, 0), min(o1 // 2 + 1, n)
    return o0, o1


def _plan(ops: list[Op], sizes: list[tuple[int, int]], box: Box) -> list[Box]:
    """``boxes[k]``: the region of the map at the input of ``ops[k]`` a tile must hold to produce
    ``box`` of the output exactly (``boxes[-1] == box``); residuals widen the box at their store."""
    boxes: list[Box] = [box] * (len(ops) + 1)
    pending: list[Box] = []
    for k in reversed(range(len(ops))):
        op, b = ops[k], boxes[k + 1]
        h, w = sizes[k]
        if op.kind == "add":
            pending.append(b)
            boxes[k] = b
        elif op.kind == "store":
            r = pending.pop() if pending else b  # a prefix may end before its residual add
            boxes[k] = (min(b[0], r[0]), max(b[1], r[1]), min(b[2], r[2]), max(b[3], r[3]))
        else:
            boxes[k] = (*_need(op, b[0], b[1], h), *_need(op, b[2], b[3], w))
    return boxes


def _cut(t: torch.Tensor, have: Box, want: Box) -> torch.Tensor:
    y, x = want[0] - have[0], want[2] - have[2]
    out = t[:, :, y:y + want[1] - want[0], x:x + want[3] - want[2]]
    assert out.shape[2:] == (want[1] - want[0], want[3] - want[2]), "tiled VAE: tile geometry error"
    return out


def _segments(ops: list[Op]) -> list[tuple[str, list[Op]]]:
    """The program cut where whole maps are kept: after every ResnetBlock (with a following
    downsample, which shrinks the map), around the global attention, before the output head.
    An upsample starts the next piece, so its (large) output is never kept whole."""
    out: list[tuple[str, list[Op]]] = []
    cur: list[Op] = []
    i = 0
    while i < len(ops):
        op = ops[i]
        if op.kind == "store" and i + 2 < len(ops) and ops[i + 2].kind == "attn":
            if cur:
                out.append(("stream", cur))
                cur = []
            out.append(("attn", ops[i:i + 4]))
            i += 4
            continue
        cur.append(op)
        if op.kind == "add":
            if i + 1 < len(ops) and ops[i + 1].kind == "down":
                cur.append(ops[i + 1])
                i += 1
            out.append(("stream", cur))
            cur = []
        i += 1
    if cur:
        out.append(("stream", cur))
    return out


class _ExactRunner:
    """Runs the program piece by piece (:func:`_segments`); only each piece's input and output maps
    are kept whole (on the staging device). Inside a piece every tile is recomputed from the piece's
    input with the halo it needs (:func:`_plan`); a GroupNorm inside a piece first gets its whole-map
    statistics from one pass over tiles of its input, recomputed the same way and then dropped."""

    def __init__(self, net: nn.Module, tile: int, in_h: int, in_w: int, staging, callbacks):
        self.net, self.tile, self.in_h, self.in_w, self.staging = net, tile, in_h, in_w, staging
        self.device = next(net.parameters()).device
        self.cb = callbacks

    def boxes(self, h: int, w: int) -> list[Box]:
        """Output tiles of a map of size h x w: the requested tile scaled to this map's resolution."""
        side_h = max(math.ceil(self.tile * h / self.in_h), 8)
        side_w = max(math.ceil(self.tile * w / self.in_w), 8)
        return [(y0, y1, x0, x1) for y0, y1 in _grid(h, side_h) for x0, x1 in _grid(w, side_w)]

    def _tile(self, ops: list[Op], sizes, src: torch.Tensor, box: Box, norms: dict) -> torch.Tensor:
        """``box`` of the map after ``ops``, computed from the piece's input ``src`` (whole map)."""
        plan = _plan(ops, sizes, box)
        have = plan[0]
        t = src[:, :, have[0]:have[1], have[2]:have[3]].to(self.device)
        saved: list[tuple[torch.Tensor, Box]] = []
        for k, op in enumerate(ops):
            if op.kind == "norm":
                t = norms[k](t)
            elif op.kind == "silu":  # in place on the fresh output of the norm before it
                t = F.silu(t, inplace=k > 0 and ops[k - 1].kind == "norm")
            elif op.kind == "store":
                saved.append((t if op.module is None else op.module(t), have))
            elif op.kind == "add":
                r, r_box = saved.pop()
                t = t.add_(_cut(r, r_box, have))  # t: the fresh output of the convolution before
            else:  # conv / down / up
                t = _cut(t, have, plan[k])
                have = plan[k]
                t = op.module(t)
                if op.kind == "down":
                    start = (have[0] // 2, have[2] // 2)
                elif op.kind == "up":
                    start = (2 * have[0], 2 * have[2])
                else:
                    start = (have[0], have[2])
                n_h, n_w = t.shape[2:]
                t = _cut(t, (start[0], start[0] + n_h, start[1], start[1] + n_w), plan[k + 1])
                have = plan[k + 1]
        return _cut(t, have, box)

    def stream(self, ops: list[Op], src: _Map) -> _Map:
        """One piece without attention: statistics passes for its inner norms, then the output pass."""
        h, w = src.data.shape[2:]
        sizes = _sizes(ops, h, w)
        norms: dict[int, Callable] = {}
        for k, op in enumerate(ops):
            if op.kind != "norm":
                continue
            if all(o.kind == "store" for o in ops[:k]):
                stats = src.stats  # the norm reads the piece's input map
            else:
                stats = _Stats()
                for box in self.boxes(*sizes[k]):
                    stats.add(self._tile(ops[:k], sizes, src.data, box, norms))
                    self.cb.tick()
            norms[k] = _norm_fn(op.module, stats, self.device)
        oh, ow = sizes[-1]
        out, stats = None, _Stats()
        for box in self.boxes(oh, ow):
            t = self._tile(ops, sizes, src.data, box, norms)
            if out is None:
                out = torch.empty(t.shape[0], t.shape[1], oh, ow, dtype=t.dtype, device=self.staging)
            out[:, :, box[0]:box[1], box[2]:box[3]] = t.to(self.staging)
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
        k, v = torch.cat(keys, 2).contiguous(), torch.cat(values, 2).contiguous()
        del keys, values
        out = torch.empty_like(x, device=self.staging)
        stats = _Stats()
        for y0, y1, x0, x1 in boxes:
            t = x[:, :, y0:y1, x0:x1].to(self.device)
            for f in pre:
                t = f(t)
            q = AttnBlock.tokens(attn.q(t)).contiguous()  # last-dim stride 1: the fused (flash) kernel
            # query rows in chunks: exact (softmax is per row) and the score matrix stays bounded even
            # where attention falls back to materialising it (the keys span the whole map)
            rows = max(ATTN_SCORE_BYTES // (k.shape[2] * k.element_size() * 2), 1)
            o = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + rows], k, v)
                           for i in range(0, q.shape[2], rows)], 2)
            o = o.squeeze(1).transpose(1, 2).reshape(t.shape)
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
        cur = _Map(x.to(self.staging))
        for kind, ops in _segments(build_program(self.net)):
            if kind == "attn":  # store, norm, attn, add
                store, norm = ops[0], ops[1]
                pre = [_norm_fn(norm.module, cur.stats, self.device)]
                cur = self.attention(ops[2].module, cur, pre, (cur, store.module))
            else:
                cur = self.stream(ops, cur)
        return cur.data

    def passes(self) -> int:
        """How many tile steps :meth:`run` makes (for progress reporting)."""
        h, w, total = self.in_h, self.in_w, 0
        for kind, ops in _segments(build_program(self.net)):
            sizes = _sizes(ops, h, w)
            if kind == "attn":
                total += 2 * len(self.boxes(h, w))
            else:
                for k, op in enumerate(ops):
                    if op.kind == "norm" and not all(o.kind == "store" for o in ops[:k]):
                        total += len(self.boxes(*sizes[k]))
                total += len(self.boxes(*sizes[-1]))
            h, w = sizes[-1]
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
