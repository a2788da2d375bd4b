"""Colour fix of the restored image against the stage-1 image (official ``SUPIR/utils/colorfix.py`` semantics).

Both functions take ``content`` (the decoded sample) and ``style`` (the colour reference, the stage-1 image),
float tensors ``[B, C, H, W]``; nothing is clamped.

* ``adain``: per sample and channel, shift/scale the content to the style's mean and standard deviation
  (unbiased variance + 1e-5; a 1x1 image counts as variance 0 instead of the official's NaN).
* ``wavelet``: keep the content's high frequencies (5 levels of a dilated 3x3 blur) and take the style's
  residual low band.

A style of another size than the content is resized (bicubic) to the content's size first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIX_TYPES = ("None", "AdaIn", "Wavelet")
ADAIN_EPS = 1e-5
WAVELET_LEVELS = 5


def _match_size(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    if style.shape[-2:] != content.shape[-2:]:
        style = F.interpolate(style, size=content.shape[-2:], mode="bicubic", align_corners=False)
    return style.to(content.dtype)


def _mean_std(x: torch.Tensor, eps: float = ADAIN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    mean = flat.mean(dim=2)[..., None, None]
    # unbiased as the official; a one-pixel image has no spread (its unbiased variance would be 0/0 = NaN)
    std = (flat.var(dim=2, unbiased=flat.shape[2] > 1) + eps).sqrt()[..., None, None]
    return mean, std


def adain(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Adaptive instance normalisation of ``content`` to the per-channel statistics of ``style``."""
    style = _match_size(style, content)
    mean_c, std_c = _mean_std(content)
    mean_s, std_s = _mean_std(style)
    return (content - mean_c) / std_c * std_s + mean_s


def wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Replicate-pad by ``radius``, then a depthwise 3x3 binomial blur dilated by ``radius``."""
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (k1[:, None] * k1[None, :]) / 16
    channels = x.shape[1]
    kernel = kernel.expand(channels, 1, 3, 3)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(x, kernel, groups=channels, dilation=radius)


def wavelet_decompose(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(high, low)``: summed detail bands of radii 1, 2, 4, ... and the remaining low band."""
    high = torch.zeros_like(x)
    for level in range(levels):
        low = wavelet_blur(x, 2 ** level)
        high = high + (x - low)
        x = low
    return high, x


def wavelet(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """The content's detail bands on the style's low band."""
    style = _match_size(style, content)
    high, _ = wavelet_decompose(content)
    _, low = wavelet_decompose(style)
    return high + low


def color_fix(content: torch.Tensor, style: torch.Tensor, kind: str = "Wavelet") -> torch.Tensor:
    """Apply the named colour fix (``"Wavelet"``, ``"AdaIn"`` or ``"None"``, case-insensitive)."""
    key = (kind or "none").lower()
    if key == "wavelet":
        return wavelet(content, style)
    if key == "adain":
        return adain(content, style)
    if key == "none":
        return content
    raise ValueError(f"unknown colour fix {kind!r}; expected one of {COLOR_FIX_TYPES}")
