"""Progress reporting for one node run (the callbacks object the pipelines take), free of ComfyUI: the host's
bar and interrupt check are handed in by :func:`nodes.comfy.Progress`."""
from __future__ import annotations

from typing import Any, Callable

import torch


class Progress:
    """Progress reporting for one node run; doubles as the callbacks object the pipelines take.

    ``progress(step, total, preview)`` updates the host's progress bar ``bar`` (ComfyUI's ProgressBar, given by
    ``nodes.comfy.Progress``; an optional preview, a PIL image or a [H,W,3] tensor in 0..1) or, without one, a
    tqdm bar; ``check_interrupt()`` calls ``interrupt`` (raises when the user cancels).
    """

    def __init__(self, total: int, desc: str = "", preview_size: int = 512, bar: Any = None,
                 interrupt: Callable[[], None] | None = None):
        self.total = max(int(total), 1)
        self.preview_size = preview_size
        self._bar = bar
        self._tqdm = None
        self._interrupt = interrupt
        if bar is None:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=self.total, desc=desc or "photo_restoration", leave=False, disable=None)
        self._n = 0

    def progress(self, step: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None and total != self.total:
            self.total = max(int(total), 1)
            if self._tqdm is not None:
                self._tqdm.total = self.total
        step = min(int(step), self.total)
        if self._bar is not None:
            self._bar.update_absolute(step, self.total, _preview_tuple(preview, self.preview_size))
        elif self._tqdm is not None:
            self._tqdm.update(step - self._n)
        self._n = step

    def advance(self, n: int = 1, preview: Any = None) -> None:
        self.progress(self._n + n, None, preview)

    def check_interrupt(self) -> None:
        if self._interrupt is not None:
            self._interrupt()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _preview_tuple(preview: Any, max_size: int):
    if preview is None:
        return None
    from PIL import Image

    if isinstance(preview, torch.Tensor):
        t = preview.detach().float().clamp(0, 1).cpu()
        if t.ndim == 4:
            t = t[0]
        if t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.movedim(0, -1)
        preview = Image.fromarray((t.numpy() * 255).round().astype("uint8").squeeze())
    return ("JPEG", preview, max_size)
