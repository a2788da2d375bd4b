"""Channels-last maps on the CPU, shared by the model families (SUPIR's VAE, UNet and control adapter,
CodeFormer's autoencoder).

oneDNN's float32 3x3 convolutions run 10-30 % faster on channels-last maps of 64-256 channels (measured on
Intel and AMD cores); the pack keeps such maps channels-last from one convolution to the next, with the
exact GroupNorm of :mod:`.groupnorm` (ATen's channels-last GroupNorm is not exact enough) and with 1x1
convolutions as one GEMM on the channels-last storage (ATen sends those to its slow path, which first copies
the map to the contiguous layout: 0.8 s for a 256-channel 512x512 map).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import gemm


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` channels-last when it is a float32 CPU map (a copy unless it already is), else unchanged."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def pixel_rows(x: torch.Tensor) -> torch.Tensor | None:
    """The ``[n, h*w, c]`` rows (a view) of a channels-last map's storage, else None."""
    if not is_channels_last(x):
        return None
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)


def map_of_rows(rows: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The channels-last ``[n, c, h, w]`` map (a view) of contiguous rows ``[n, h*w, c]``."""
    n, _, c = rows.shape
    return rows.view(n, h, w, c).permute(0, 3, 1, 2)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 kernel; a channels-last ``x`` goes through one GEMM on its
    ``[n*h*w, c]`` storage (oneDNN where :mod:`.gemm` runs) and gives a channels-last result."""
    rows = pixel_rows(x)
    if rows is None or weight.dtype != x.dtype or weight.device != x.device:
        return F.conv2d(x, weight, bias)
    return map_of_rows(gemm.linear(rows, weight.reshape(weight.shape[0], -1), bias), x.shape[2], x.shape[3])
