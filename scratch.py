"""Scratch buffers reused within one call, shared by the model families.

A fresh CPU tensor above glibc's mmap threshold is page-faulted in anew on every allocation (24 ms against 2.6 ms
reused for a 1280x10240 float32 weight). Inside :func:`scratch` (one SUPIR denoiser call, one VAE pass, one
CodeFormer call), code that needs a large temporary for one op asks :func:`buffer` for it by name and gets the
same memory back call after call; everything is freed when the outermost :func:`scratch` exits. Users: the
per-layer weight up-casts of ``supir/ops.py`` and the Winograd convolutions of ``winograd.py``.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterator

import torch

_local = threading.local()  # .buffers: the dict of the current scratch on this thread, or None
_largest: dict = {}  # key -> the most elements it was ever asked for (sizes only, no memory)


@contextlib.contextmanager
def scratch() -> Iterator[None]:
    """Within (on this thread): :func:`buffer` hands out reused buffers, freed on exit. Nested uses share the
    outer buffers."""
    previous = getattr(_local, "buffers", None)
    _local.buffers = {} if previous is None else previous
    try:
        yield
    finally:
        _local.buffers = previous


def active() -> bool:
    return getattr(_local, "buffers", None) is not None


def buffer(key: Hashable, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    """A flat CPU buffer of ``n`` elements of ``dtype`` for ``key``, grown when too small; None outside
    :func:`scratch`. Its contents are whatever the last user left: the caller overwrites it."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        return None
    key = (key, dtype)
    flat = buffers.get(key)
    if flat is None or flat.numel() < n:
        flat = buffers[key] = None  # drop every reference to the smaller buffer before the larger one is made
        # at the largest size this key ever needed: a buffer grown step by step within a call is faulted in anew
        # at every step (the Winograd kernel transform's grew 8 times per SUPIR call, 620 MiB of page faults)
        _largest[key] = size = max(n, _largest.get(key, 0))
        flat = buffers[key] = torch.empty(size, dtype=dtype)
    return flat[:n]
