"""The size plan of a SUPIR run: output, working and internal (network) sizes, and the size budget.

Scale by ``upscale_by``; optionally raise the short side to ``min_short_side`` (the official 1024 rule);
then bring each side to a multiple of ``size_multiple`` (64) by padding (replicate pad at the bottom/right,
cropped off afterwards; default) or by resizing to the nearest multiple (official ``fit="resize"``). The
result is resized back to the output size with bicubic interpolation.

Deliberately different from the official: a plan whose internal image exceeds ``max_megapixels`` is refused
with an error naming the sizes and the settings to change, instead of trying to allocate it (a 16x4096 strip
with min_short_side 1024 would otherwise plan a 1024x262144 image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

MIN_SIDE = 16  # smallest input side SUPIR accepts (pixels)
MAX_MEGAPIXELS = 64.0  # default size budget of the internal image


@dataclass(frozen=True)
class SizePlan:
    output: tuple[int, int]  # what a restore returns: round(H * upscale), round(W * upscale)
    work: tuple[int, int]  # the image size before fitting to the multiple (min_short_side applied)
    internal: tuple[int, int]  # what the networks see (multiples of size_multiple)
    padded: bool  # internal = work padded at bottom/right (else resized)


def _round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def plan_sizes(height: int, width: int, upscale: float = 1.0, min_size: int | None = None,
               size_multiple: int = 64, fit: str = "pad", max_megapixels: float | None = None) -> SizePlan:
    """Output, working and internal sizes for an input of ``height x width`` pixels."""
    if not upscale > 0 or not math.isfinite(upscale):
        raise ValueError(f"upscale_by must be a positive number, got {upscale}.")
    if fit not in ("pad", "resize"):
        raise ValueError(f"fit must be 'pad' or 'resize', not {fit!r}.")
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"The image is too small for SUPIR: {width}x{height} px; each side needs at least "
                         f"{MIN_SIDE} px. Upscale it first (e.g. Upscale Image By).")
    out = (max(1, _round_half_up(height * upscale)), max(1, _round_half_up(width * upscale)))
    scale = upscale
    if min_size and min(height, width) * scale < min_size:
        scale = min_size / min(height, width)
    work = (max(1, _round_half_up(height * scale)), max(1, _round_half_up(width * scale)))
    m = size_multiple
    if fit == "pad":
        internal = tuple(max(m, math.ceil(s / m) * m) for s in work)
    else:
        internal = tuple(max(m, _round_half_up(s / m) * m) for s in work)
    plan = SizePlan(out, work, internal, fit == "pad")
    if max_megapixels:
        check_budget(plan, (height, width), upscale, min_size, max_megapixels)
    return plan


def check_budget(plan: SizePlan, size: Sequence[int], upscale: float, min_size: int | None,
                 max_megapixels: float) -> None:
    """Refuse a plan whose internal image exceeds ``max_megapixels``, saying what to change."""
    h, w = plan.internal
    mp = h * w / 1e6
    if mp <= max_megapixels:
        return
    raise ValueError(
        f"SUPIR would work on a {w}x{h} px image ({mp:.1f} megapixels) for this {size[1]}x{size[0]} px input "
        f"(upscale_by {upscale:g}, min_short_side {min_size or 0}), above the limit max_megapixels = "
        f"{max_megapixels:g}. Lower upscale_by or min_short_side (very long, thin images are scaled up a lot by "
        f"min_short_side), or raise max_megapixels if your machine can take it.")


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bicubic resize of a [B,C,H,W] image (antialiased when shrinking); a new tensor, never the input."""
    h, w = int(size[0]), int(size[1])
    if tuple(x.shape[-2:]) == (h, w):
        return x.clone()
    shrink = h < x.shape[-2] or w < x.shape[-1]
    return F.interpolate(x.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=shrink)


def fit(x: torch.Tensor, plan: SizePlan) -> torch.Tensor:
    """An image batch brought to the plan's internal size: resized to the work size, then replicate-padded at
    the bottom/right (or resized, for ``fit="resize"`` plans); undone by :func:`unfit`."""
    x = resize(x, plan.work)
    if not plan.padded:
        return resize(x, plan.internal)
    ph, pw = plan.internal[0] - plan.work[0], plan.internal[1] - plan.work[1]
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def unfit(x: torch.Tensor, plan: SizePlan, size: Sequence[int] | None = None) -> torch.Tensor:
    """Undo :func:`fit`: crop the padding (or resize back to the work size), then resize to ``size``
    (default: the plan's output size)."""
    x = x[..., :plan.work[0], :plan.work[1]] if plan.padded else resize(x, plan.work)
    return resize(x, plan.output if size is None else size)
