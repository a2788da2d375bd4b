"""Any face restoration network, behind CodeFormer's call ``net(x, w=, adain=)`` on RGB [-1, 1] 512 crops,
so :func:`.pipeline.restore_faces` detects, aligns, restores and pastes with it unchanged.

* CodeFormer files load with the pack's own loader (:func:`.loader.load_codeformer`): fidelity works and no
  extra package is needed.
* Everything else goes through spandrel (shipped with ComfyUI; imported only here, only when needed):
  GFPGAN v1.3 / v1.4 (``GFPGANv1.4.pth``, the "clean" architecture) and RestoreFormer (``RestoreFormer.pth``)
  in spandrel itself (MIT); CodeFormer is also in spandrel_extra_arches (non-commercial licence), which this
  module never needs. RestoreFormer++ (``RestoreFormer++.ckpt``) is not supported by spandrel 0.4.x; such a
  file gets a clear error.

The networks are called as their official inference scripts call them, not through spandrel's
``descriptor(image)`` (which feeds GFPGAN 0..1 instead of its -1..1 and samples StyleGAN noise):

* GFPGAN: ``net(x, return_rgb=False)[0]`` as ``GFPGANer.enhance``; deliberately different: the trained
  constant noise buffers (``randomize_noise=False``) instead of fresh random noise, so a face restores the
  same on every run and at every batch position.
* RestoreFormer: ``net(x)[0]``. Neither uses ``w`` or ``adain``.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from .loader import SIGNATURE_KEYS as CODEFORMER_KEYS, load_codeformer
from .weights import load_state_dict

FOLDER = "facerestore_models"
PUBLISHED = ("https://github.com/sczhou/CodeFormer/releases (codeformer.pth), "
             "https://github.com/TencentARC/GFPGAN/releases (GFPGANv1.3.pth, GFPGANv1.4.pth, RestoreFormer.pth)")
KNOWN_FILES = ("codeformer.pth", "GFPGANv1.3.pth", "GFPGANv1.4.pth", "RestoreFormer.pth")
SPANDREL_MISSING = ("{name} is a {arch} model, which is loaded with spandrel; spandrel is not installed. It ships "
                    "with ComfyUI (requirements.txt); outside ComfyUI install it with 'pip install spandrel'.")


class SpandrelFace(torch.nn.Module):
    """A spandrel face network (GFPGAN, RestoreFormer, ...) with CodeFormer's call on [-1, 1] crops."""

    def __init__(self, net: torch.nn.Module, arch: str, descriptor: Any = None):
        super().__init__()
        self.net = net
        self.arch = arch
        self._descriptor = descriptor  # only for architectures without a known official call

    def forward(self, x: torch.Tensor, w: Any = None, adain: Any = None) -> torch.Tensor:
        x = x.contiguous()  # GFPGAN views its features (crops arrive as a permuted NHWC array)
        if self.arch == "GFPGAN":
            return self.net(x, return_rgb=False, randomize_noise=False)[0]
        if self.arch == "RestoreFormer":
            return self.net(x)[0]
        if self.arch == "CodeFormer":  # spandrel_extra_arches' copy
            return self.net(x, w=float(w) if not torch.is_tensor(w) else float(w.flatten()[0]), adain=bool(adain))[0]
        return self._descriptor((x + 1) / 2) * 2 - 1  # spandrel's own call on 0..1


def is_codeformer(state_dict: dict) -> bool:
    return all(k in state_dict for k in CODEFORMER_KEYS)


def _spandrel():
    try:
        import spandrel
    except ImportError:
        return None
    return spandrel


def _looks_like_restoreformer_pp(state_dict: dict) -> bool:
    return any(k.startswith("vqvae.") for k in state_dict)


def load_face_model(source: str | os.PathLike | dict, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A ready face network (eval, no grad) on ``device``/``dtype`` from a file or a state dict.

    CodeFormer -> :class:`.arch.CodeFormer`; any other face model spandrel detects -> :class:`SpandrelFace`.
    Errors name the file: unreadable, not a face model (e.g. an upscaler), dtype unsupported, spandrel missing.
    """
    sd, label = load_state_dict(source, kind="face restoration", files=KNOWN_FILES, folder=FOLDER,
                                published=PUBLISHED)
    if is_codeformer(sd):
        return load_codeformer(sd, device=device, dtype=dtype)
    if _looks_like_restoreformer_pp(sd):
        raise ValueError(f"{label} looks like RestoreFormer++ (keys 'vqvae.*'), which spandrel "
                         f"{getattr(_spandrel(), '__version__', '')} cannot load; supported: CodeFormer, GFPGAN "
                         f"v1.3/v1.4, RestoreFormer (RestoreFormer.pth)")
    spandrel = _spandrel()
    if spandrel is None:
        raise ImportError(SPANDREL_MISSING.format(name=label, arch="non-CodeFormer face"))
    try:
        with torch.random.fork_rng(devices=[]):  # spandrel builds with random init: keep the global RNG
            descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(sd)
    except Exception as exc:  # spandrel's UnsupportedModelError and shape errors
        raise ValueError(f"{label} is not a face restoration model spandrel {spandrel.__version__} knows "
                         f"({type(exc).__name__}: {str(exc)[:200]}); supported: CodeFormer, GFPGAN v1.3/v1.4, "
                         f"RestoreFormer") from None
    arch = descriptor.architecture.id if hasattr(descriptor.architecture, "id") else str(descriptor.architecture)
    if getattr(descriptor, "purpose", None) != "FaceSR":
        raise ValueError(f"{label} is a {arch} model for '{getattr(descriptor, 'purpose', '?')}', not a face "
                         f"restoration model; load upscalers with ComfyUI's Load Upscale Model")
    if dtype == torch.float16 and not descriptor.supports_half:
        raise ValueError(f"dtype: {arch} does not run in fp16 (spandrel: supports_half=False); choose fp32 or bf16")
    if dtype == torch.bfloat16 and not descriptor.supports_bfloat16:
        raise ValueError(f"dtype: {arch} does not run in bf16; choose fp32")
    net = descriptor.model.eval().requires_grad_(False)
    model = SpandrelFace(net, arch, descriptor)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def architecture_of(model: torch.nn.Module) -> str:
    """"CodeFormer", "GFPGAN", "RestoreFormer", ... for a model from :func:`load_face_model`."""
    return getattr(model, "arch", type(model).__name__)
