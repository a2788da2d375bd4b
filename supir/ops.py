"""Layers whose stored weights may differ in dtype from the activations (fp16/bf16/fp8 storage).

Each layer casts its parameters to the input's dtype at call time when they differ, so a model can
keep float8_e4m3fn weights in memory and compute in bfloat16/float16/float32 ("per-layer up-cast").
When storage and compute dtypes agree no copy is made.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)

DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
if FP8_DTYPES:
    DTYPE_NAMES.update({"fp8": FP8_DTYPES[0], "fp8_e4m3fn": FP8_DTYPES[0], "float8_e4m3fn": FP8_DTYPES[0]})


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float16`` or a name such as ``"fp16"``, ``"bf16"``, ``"fp8_e4m3fn"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_NAMES)}") from None


def default_compute_dtype(storage: torch.dtype) -> torch.dtype:
    """fp8 storage computes in bfloat16; every other dtype computes in itself."""
    return torch.bfloat16 if is_fp8(storage) else storage


def _cast(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    if p is None or (p.dtype == x.dtype and p.device == x.device):
        return p
    return p.to(device=x.device, dtype=x.dtype)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _cast(self.weight, x), _cast(self.bias, x))


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, _cast(self.weight, x), _cast(self.bias, x), self.eps)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)


def storage_dtype_for(name: str, tensor_dim: int, dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    """Dtype a parameter is stored in: fp8 only for matrices/kernels (ndim >= 2); vectors (biases,
    norm affines) stay in the compute dtype, which costs little and keeps the norms exact."""
    if is_fp8(dtype) and tensor_dim < 2:
        return compute_dtype
    return dtype
