"""The one callbacks protocol every long SUPIR loop takes, with a no-op default.

A host (the ComfyUI nodes, the command line, a test) passes an object with any of these methods; a
missing method, or ``callbacks=None``, is a no-op (:func:`notify` is the only place that decides):

* ``check_interrupt()`` -- raise to cancel; called before every sampler step, VAE tile and caption.
* ``progress(step, total, preview=None)`` -- after every step (``preview``: the denoised latent, scaled).
* ``step_done(i, x)`` -- the latent after sampler step ``i`` (tracing, parity tests).
* ``load(part, memory_required)`` -- bring model part ``"diffusion"``, ``"vae"`` or ``"text"`` to the compute
  device before it runs (the host's memory manager; ``memory_required``: bytes of activations expected).
* ``device`` -- the compute device inputs go to (default: where the part's weights are).
"""
from __future__ import annotations

from typing import Any

import torch


class Callbacks:
    """Every hook as a no-op: subclass it and override what the host needs."""

    device: torch.device | None = None

    def check_interrupt(self) -> None:
        pass

    def progress(self, step: int, total: int, preview: Any = None) -> None:
        pass

    def step_done(self, i: int, x: torch.Tensor) -> None:
        pass

    def load(self, part: str, memory_required: int = 0) -> None:
        pass


NO_CALLBACKS = Callbacks()


def notify(callbacks: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``callbacks.<name>(*args, **kwargs)`` when there is one (``None`` and missing methods: no-op)."""
    fn = getattr(callbacks, name, None)
    return fn(*args, **kwargs) if fn is not None else None


def compute_device(callbacks: Any, part: Any) -> torch.device:
    """Where inputs of ``part`` go: the host's ``device`` if it names one, else the device of its weights."""
    device = getattr(callbacks, "device", None)
    if device is not None:
        return torch.device(device)
    for p in part.parameters() if isinstance(part, torch.nn.Module) else ():
        return p.device
    return torch.device("cpu")


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error of the compute device (CUDA, MPS, or a CPU allocation failure)."""
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()
