"""SUPIR's face mode: the face pipeline of ``codeformer/pipeline.py`` with SUPIR as its face network.

Official (``gradio_demo_face.py``): faces are detected and aligned by the face helper, each aligned face is
resized (bilinear) to ``face_resolution``, restored by SUPIR with its own caption (same seed for every face),
resized back to the helper's face size and pasted with the parse mask onto the background, which is either
restored by SUPIR (``apply_bg``) or the input itself.

Nothing is copied: :class:`SupirFaceNet` is a face network with CodeFormer's call ``net(x, w=, adain=)`` on
RGB [-1, 1] 512 crops (the interface of :mod:`..codeformer.face_models`), so detection, alignment, colour
handling, parse masks and paste-back are :func:`..codeformer.pipeline.restore_faces` unchanged; each face is
one :func:`.pipeline.restore` call (so tiling, colour fix and cancel are the engine's); the background is the
same pipeline's ``background_enhance`` hook with :func:`supir_background` as its upscaler.

Deliberately different:

* the aligned crops are the pack's 512 px ones (the official helper there is built with ``face_size=1024``);
  ``face_resolution`` is the size SUPIR samples the face at, from which it comes back to 512;
* a ``face_resolution`` below 1024 is sampled as it is (``min_short_side`` 0), where the official pads the face
  with black to 1024 and crops the result;
* the background is restored at upscale 1 on the input's own frame (the official first resizes the input to a
  1024 short side and restores faces and background there).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.nn.functional as TF

from . import pipeline as E

FACE_SIZE = 512  # the face pipeline's aligned crop


class SupirFaceNet:
    """SUPIR as a face network: ``net(x, w=, adain=)`` on aligned crops ``[N,3,512,512]`` in [-1, 1].

    Face j (counted across calls, in the order the face pipeline restores them) gets ``captions[j]``, or the
    single caption for all when there is one, or none. ``received`` keeps the crop shapes it was given.
    """

    def __init__(self, model: Any, settings: E.RestoreSettings, face_resolution: int = 1024,
                 callbacks: Any = None, captions: Sequence[str] = ()):
        self.model = model
        self.settings = E.validate(replace(settings, upscale_by=1.0, min_short_side=0))
        self.face_resolution = int(face_resolution)
        self.callbacks = callbacks
        self.captions = list(captions)
        self.count = 0
        self.received: list[tuple[int, ...]] = []

    def caption(self, j: int) -> str:
        if len(self.captions) == 1:
            return self.captions[0]
        return self.captions[j] if j < len(self.captions) else ""

    def __call__(self, x: torch.Tensor, w: Any = None, adain: Any = None) -> torch.Tensor:
        out = []
        for crop in x:
            self.received.append(tuple(crop.shape))
            face = (crop[None].float().cpu() + 1) / 2
            r = self.face_resolution
            big = TF.interpolate(face, size=(r, r), mode="bilinear", align_corners=False).clamp(0, 1)
            caption = self.caption(self.count)
            y = E.restore(big, self.model, self.settings, self.callbacks, [caption] if caption else [])
            back = TF.interpolate(y, size=tuple(crop.shape[-2:]), mode="bilinear", align_corners=False)
            out.append(back * 2 - 1)
            self.count += 1
        return torch.cat(out).to(x.device)


def supir_background(model: Any, settings: E.RestoreSettings, callbacks: Any = None, caption: str = ""):
    """The face pipeline's background upscaler (BCHW 0..1 -> same): SUPIR restore at upscale 1."""
    s = E.validate(replace(settings, upscale_by=1.0))

    def run(x: torch.Tensor) -> torch.Tensor:
        return E.restore(x.float(), model, s, callbacks, [caption] if caption else [])

    return run


class FacePipelineCallbacks:
    """What the face pipeline gets: the host's interrupt, no progress (SUPIR's runs drive the bar)."""

    def __init__(self, host: Any = None):
        self.host = host

    def check_interrupt(self) -> None:
        if self.host is not None:
            self.host.check_interrupt()

    def progress(self, step: int, total: int | None = None, preview: Any = None) -> None:
        pass
