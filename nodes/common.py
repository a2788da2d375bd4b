"""Small helpers shared by the node modules: IMAGE/tensor conversions and the category name."""
from __future__ import annotations

import torch

CATEGORY = "image/restoration"
PREFIX = "PhotoRestore"


def image_to_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] in 0..1 -> float [B,3,H,W] (a new tensor; RGBA drops alpha, gray expands)."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    x = image.movedim(-1, 1).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] > 3:
        x = x[:, :3]
    return x.clone()


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """float [B,C,H,W] in 0..1 -> ComfyUI IMAGE [B,H,W,C] float32 on the CPU, clamped."""
    return x.detach().float().clamp(0, 1).movedim(1, -1).contiguous().cpu()
