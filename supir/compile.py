"""Optional ``torch.compile`` of the sampler's denoiser call (the "compile" option of Load SUPIR; off by default).

Not in the official code. :func:`maybe_compile` compiles the two networks of one denoiser call -- GLVControl
and the adapted UNet -- in place (``nn.Module.compile``: parameter names, ``state_dict()`` and the memory
manager's view of the layers are unchanged). The first sampling step then takes longer (tracing and code
generation, once per new input shape: tile batch, latent size) and later steps may run faster. Measured on an
H200 (bf16, 512 px, CFG batch 2, torch 2.11): first call 166 s, then a median of 61.0 ms against 58.5 ms eager
(min 48.8 vs 56.8 ms), i.e. no reliable gain; a second latent size recompiled with dynamic shapes.
The cross-attention key/value cache of :class:`~.control.SupirDiffusion` is switched off for a compiled
model (its Python-side bookkeeping would re-trigger compilation).
"""
from __future__ import annotations

import logging
import shutil

import torch
from torch import nn

log = logging.getLogger(__name__)


def compiler_available(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """(whether ``torch.compile``'s default backend can generate code for ``device``, why not)."""
    if not hasattr(torch, "compile") or not hasattr(nn.Module, "compile"):
        return False, f"torch {torch.__version__} has no torch.compile / nn.Module.compile"
    if torch.device(device).type == "cpu" and not (shutil.which("g++") or shutil.which("clang++")
                                                   or shutil.which("c++")):
        return False, "no C++ compiler (g++/clang++) on PATH for the inductor CPU backend"
    if torch.device(device).type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "triton is not installed (needed by the inductor CUDA backend)"
    return True, ""


def is_compiled(diffusion: nn.Module) -> bool:
    return getattr(diffusion, "compiled", False)


def maybe_compile(diffusion: nn.Module, enabled: bool, backend: str = "inductor", mode: str | None = None,
                  dynamic: bool | None = None) -> nn.Module:
    """Compile ``diffusion`` (a :class:`~.control.SupirDiffusion`) in place when ``enabled``; returns it.

    Disabled: the model is returned untouched. Compiling an already compiled model does nothing.
    ``backend``/``mode``/``dynamic`` are passed to ``torch.compile`` (``"aot_eager"`` traces without
    generating code, useful where no compiler toolchain exists).
    """
    if not enabled or is_compiled(diffusion):
        return diffusion
    if backend == "inductor":
        try:
            device = next(diffusion.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        ok, why = compiler_available(device if device.type != "meta" else "cpu")
        if not ok:
            raise RuntimeError(f"compile was requested but cannot work here: {why}")
    diffusion.cache_text_kv = False
    clear = getattr(diffusion, "clear_kv_cache", None)
    if clear is not None:
        clear()
    for part in (diffusion.control_model, diffusion.diffusion_model):
        part.compile(backend=backend, mode=mode, dynamic=dynamic)
    diffusion.compiled = True
    log.info("SUPIR denoiser networks will be compiled (backend %s) at their first call", backend)
    return diffusion
