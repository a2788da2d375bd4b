"""Run any image upscaler (e.g. a spandrel descriptor, ComfyUI's UPSCALE_MODEL) in overlapping tiles.

An upscaler here is a callable ``f(x) -> y`` on float ``[B, 3, H, W]`` in 0..1 returning
``[B, 3, H*s, W*s]``. Tiles overlap and are blended with linear ramps, so seams do not show.
"""
from __future__ import annotations

from typing import Callable

import torch

Upscaler = Callable[[torch.Tensor], torch.Tensor]


def _ramp(n: int, overlap: int, start: bool, end: bool) -> torch.Tensor:
    w = torch.ones(n)
    if overlap > 0:
        r = torch.linspace(0, 1, overlap + 2)[1:-1]
        if start:
            w[:overlap] = r[: min(overlap, n)]
        if end:
            w[-overlap:] = torch.minimum(w[-overlap:], r.flip(0)[: min(overlap, n)])
    return w


def _starts(size: int, tile: int, step: int) -> list[int]:
    if size <= tile:
        return [0]
    s = list(range(0, size - tile, step))
    return s + [size - tile]


@torch.no_grad()
def tiled_upscale(fn: Upscaler, x: torch.Tensor, tile: int = 512, overlap: int = 32,
                  check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """``fn`` on ``x`` ``[B,3,H,W]`` tile by tile (``tile`` px input tiles, ``overlap`` px shared)."""
    b, c, h, w = x.shape
    if h <= tile and w <= tile:
        return fn(x).float().clamp(0, 1)
    step = max(tile - overlap, 1)
    out = weight = None
    scale = None
    ys, xs = _starts(h, tile, step), _starts(w, tile, step)
    for y0 in ys:
        for x0 in xs:
            if check_interrupt is not None:
                check_interrupt()
            part = x[:, :, y0:y0 + tile, x0:x0 + tile]
            res = fn(part).float()
            if scale is None:
                scale = res.shape[-1] / part.shape[-1]
                out = torch.zeros(b, res.shape[1], round(h * scale), round(w * scale))
                weight = torch.zeros(1, 1, out.shape[2], out.shape[3])
            th, tw = res.shape[-2:]
            oy, ox = round(y0 * scale), round(x0 * scale)
            ov = round(overlap * scale)
            wy = _ramp(th, ov, y0 > 0, y0 + tile < h)
            wx = _ramp(tw, ov, x0 > 0, x0 + tile < w)
            wt = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, oy:oy + th, ox:ox + tw] += res.cpu() * wt
            weight[:, :, oy:oy + th, ox:ox + tw] += wt
    return (out / weight.clamp_min(1e-8)).clamp(0, 1)


def model_upscaler(model: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, tile: int = 512, overlap: int = 32,
                   check_interrupt: Callable[[], None] | None = None) -> Upscaler:
    """An :data:`Upscaler` around a network or spandrel descriptor, tiled, computing on ``device``."""

    def run(part: torch.Tensor) -> torch.Tensor:
        p = part.to(device or part.device)
        if dtype is not None:
            p = p.to(dtype)
        return model(p)

    return lambda x: tiled_upscale(run, x, tile, overlap, check_interrupt)
