"""Small helpers shared by the node modules: IMAGE/tensor conversions and the category name."""
from __future__ import annotations

from typing import Any

import torch

CATEGORY = "image/restoration"
PREFIX = "PhotoRestore"


def image_to_bchw(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] in 0..1 -> float RGB [B,3,H,W] (a new tensor).

    Channels as the official ``HWC3``: gray (1) is repeated to RGB, gray + alpha (2) and RGBA (4) are composited
    over white (``rgb * alpha + (1 - alpha)``); anything else is a ValueError naming the input.
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise ValueError(f"{name}: expected an IMAGE [B, H, W, C], got shape {tuple(image.shape)}.")
    x = image.movedim(-1, 1).float()
    c = x.shape[1]
    if c not in (1, 2, 3, 4):
        raise ValueError(f"{name}: an IMAGE needs 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA) channels, got {c}.")
    if c in (2, 4):
        alpha = x[:, -1:]
        x = x[:, :-1] * alpha + (1 - alpha)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.clone()


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """float [B,C,H,W] in 0..1 -> ComfyUI IMAGE [B,H,W,C] float32 on the CPU, clamped."""
    return x.detach().float().clamp(0, 1).movedim(1, -1).contiguous().cpu()


def plain_tensor(v: Any) -> Any:
    """A plain tensor for a state-dict value. ComfyUI 0.33's saving dicts hold lazily patched parameters
    (``LazyCastingParam``: a Parameter subclass whose ``.to()`` computes the patched weight); their own
    data is the *unpatched* weight, so they are materialised through ``.to`` before anything reads them."""
    if isinstance(v, torch.nn.Parameter) and type(v) is not torch.nn.Parameter:
        v = v.to("cpu")
    return v.detach() if isinstance(v, torch.Tensor) else v
