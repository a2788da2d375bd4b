"""Float32 CPU linear layers through oneDNN, with their element-wise epilogues fused into the GEMM.

Official: ``nn.Linear`` (ATen's ``addmm``: MKL's sgemm on the CPU), then GELU, products and residual sums as
separate passes over the result. Deliberately different (same products and sums; the rounding order of the
GEMM's blocking and of the GELU polynomial only): on float32 CPU tensors without autograd, :func:`linear`
runs ``x @ w.T + b`` through oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the kernel ATen itself
uses for bf16), and :func:`linear_gelu`, :func:`linear_mul` and :func:`linear_add` apply ``gelu``, ``* other``
or ``+ other`` to each output block while it is still in cache, instead of in another pass over memory.

Measured on one AMD EPYC (Zen 4) core at the SDXL transformer's shapes (``bench/gemm.py``): oneDNN 107-111
GFLOP/s against MKL's 94-104; the GEGLU feed-forward of 2048 tokens x 640 channels 226 -> 190 ms.
Elsewhere (GPUs, reduced precision, autograd, ``torch.compile``, a missing oneDNN): the plain ATen ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ENABLED = True  # tests compare both paths

_ops = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_AVAILABLE = _ops is not None and torch.backends.mkldnn.is_available()


def runs_on(x: torch.Tensor) -> bool:
    """Whether linear layers on ``x`` run through oneDNN (given float32 weights): a float32 CPU tensor, no
    autograd, not while compiling."""
    return (ENABLED and _AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 2
            and x.numel() > 0 and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.compiler.is_compiling())


def applies(x: torch.Tensor, w: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether ``x @ w.T`` (and its epilogue operands ``others``: bias, product or sum) run through oneDNN."""
    if not (runs_on(x) and w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2
            and x.shape[-1] == w.shape[1]):
        return False
    if torch.is_grad_enabled() and (w.requires_grad or any(o is not None and o.requires_grad for o in others)):
        return False
    return all(o is None or (o.device.type == "cpu" and o.dtype == torch.float32) for o in others)


def _bias(b: torch.Tensor | None) -> torch.Tensor | None:
    return None if b is None else b.contiguous()


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)``."""
    if applies(x, w, b):
        return _ops(x, w, _bias(b), "none", [], "")
    return F.linear(x, w, b)


def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.gelu(F.linear(x, w, b))`` (the exact, erf GELU)."""
    if applies(x, w, b):
        return _ops(x, w, _bias(b), "gelu", [], "none")
    return F.gelu(F.linear(x, w, b))


def _binary(x: torch.Tensor, other: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, attr: str):
    shape = (*x.shape[:-1], w.shape[0])
    if applies(x, w, b, other) and tuple(other.shape) == shape:
        return _ops.binary(x, other.contiguous(), w, _bias(b), attr)
    return None


def linear_mul(x: torch.Tensor, other: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b) * other`` (``other`` unchanged)."""
    out = _binary(x, other, w, b, "mul")
    return F.linear(x, w, b).mul_(other) if out is None else out


def linear_add(x: torch.Tensor, other: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b) + other`` (``other`` unchanged)."""
    out = _binary(x, other, w, b, "add")
    return F.linear(x, w, b).add_(other) if out is None else out
