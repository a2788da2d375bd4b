"""What the SUPIR nodes share: the model handle, the engine's callbacks in ComfyUI, LATENT and caption conventions.

Only conversions live here: ComfyUI data (IMAGE [B,H,W,C] in 0..1, unscaled LATENT dicts, STRING lists, its
memory manager and progress bar) to and from what the engine in ``supir/pipeline.py`` takes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..supir.callbacks import Callbacks
from ..supir.vae import SCALE_FACTOR
from . import comfy

SIZE_KEY = "photorestore_size"  # LATENT extra key: (height, width) of the image the latent stands for
WORK_KEY = "photorestore_work"  # LATENT extra key: (height, width) of the unpadded part, in pixels
SHAPE_KEY = "photorestore_samples"  # LATENT extra key: (h, w) of the samples the two sizes describe
SIZE_KEYS = (SIZE_KEY, WORK_KEY, SHAPE_KEY)


# --------------------------------------------------------------------------------------------
# The model handle (PHOTORESTORE_SUPIR)
# --------------------------------------------------------------------------------------------

@dataclass
class SupirHandle:
    """What ``PHOTORESTORE_SUPIR`` carries: the loaded model and its parts under memory management.

    ``model`` is a ``supir.loader.SupirModel`` whose weights wait on the offload device; the ``Managed`` parts
    are brought to the compute device by :class:`NodeCallbacks` when the engine asks for them.
    """

    model: Any
    diffusion: comfy.Managed
    vae: comfy.Managed
    text: comfy.Managed | None
    name: str = "SUPIR"
    info: dict = field(default_factory=dict)


class Part(torch.nn.Module):
    """A plain container around one part of the model for ComfyUI's ModelPatcher, which sets attributes such as
    ``device`` on the module it manages (the SUPIR parts expose read-only ``device``/``dtype`` properties)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.part = module


def make_handle(model: Any, name: str, **info: Any) -> SupirHandle:
    """Put the three parts of a loaded SupirModel under the host's memory management."""
    text = comfy.manage(Part(model.text)) if getattr(model, "text", None) is not None else None
    return SupirHandle(model, comfy.manage(Part(model.diffusion)), comfy.manage(Part(model.vae)), text, name,
                       dict(info))


def load_supir_files(sdxl: Any, supir: Any, weight_dtype: str, vae_dtype: str, name: str) -> SupirHandle:
    """Load SDXL + SUPIR (paths or state dicts) into a handle; dtype names as in the loader nodes."""
    from ..supir.loader import load_supir

    device = comfy.torch_device()
    dtype = comfy.pick_dtype(weight_dtype, device, allow=("bf16", "fp16", "fp32"))
    vdtype = comfy.pick_dtype(vae_dtype, device, allow=("bf16", "fp32"))
    model = load_supir(sdxl, supir, dtype=dtype, vae_dtype=vdtype, device=comfy.offload_device())
    return make_handle(model, name, dtype=str(dtype), vae_dtype=str(vdtype))


# --------------------------------------------------------------------------------------------
# The engine's callbacks inside ComfyUI
# --------------------------------------------------------------------------------------------

class NodeCallbacks(Callbacks):
    """The engine's callbacks for one node run: ComfyUI's progress bar (latent previews turned into pictures with
    ComfyUI's previewer when available), its interrupt, and its memory manager for the handle's parts."""

    def __init__(self, bar: comfy.Progress, handle: SupirHandle | None = None, previews: bool = False):
        self.bar = bar
        self.handle = handle
        self.preview_fn = comfy.latent_preview_fn() if previews else None
        self.device = comfy.torch_device()

    def check_interrupt(self) -> None:
        self.bar.check_interrupt()

    def progress(self, step: int, total: int, preview: Any = None) -> None:
        image = None
        if preview is not None and self.preview_fn is not None:
            try:
                if isinstance(preview, torch.Tensor) and preview.ndim == 4 and preview.shape[1] == 4:
                    image = self.preview_fn(preview.detach())
            except Exception:  # a preview is a nicety, never a failure
                image = None
        if isinstance(image, tuple) and len(image) == 3:  # ComfyUI's previewer: ("JPEG", PIL image, size)
            image = image[1]
        self.bar.progress(int(step), max(int(total), 1), image)

    def load(self, part: str, memory_required: int = 0) -> None:
        managed = getattr(self.handle, part, None) if self.handle is not None else None
        if managed is not None:
            comfy.load(managed, memory_required=int(memory_required))


# --------------------------------------------------------------------------------------------
# LATENT conventions
# --------------------------------------------------------------------------------------------

def latent_dict(z_scaled: torch.Tensor, size: Sequence[int] | None = None, work: Sequence[int] | None = None) -> dict:
    """A ComfyUI LATENT from a scaled SUPIR latent: ``samples`` unscaled (core convention), plus the image size it
    stands for and the unpadded work size when known, with the samples shape they describe."""
    out = {"samples": (z_scaled.float() / SCALE_FACTOR).to(comfy.intermediate_device())}
    if size is not None:
        out[SIZE_KEY] = (int(size[0]), int(size[1]))
        out[WORK_KEY] = (int(work[0]), int(work[1])) if work is not None else out[SIZE_KEY]
        out[SHAPE_KEY] = tuple(int(v) for v in z_scaled.shape[-2:])
    return out


def scaled_latent(latent: dict, name: str = "latent") -> torch.Tensor:
    """The scaled latent SUPIR samples in, from any LATENT (ours or core's): samples x SCALE_FACTOR (a new tensor)."""
    z = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != 4:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{name}: SUPIR needs a 4-channel SDXL latent [B,4,h,w]; got {shape}.")
    return z.float() * SCALE_FACTOR


def _recorded(latent: dict) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(size, work) the recorded keys give for the *current* samples, or None when they no longer describe them.

    Core latent nodes copy the dict and replace ``samples`` (upscale, crop, batch...), leaving our keys behind.
    The same shape: the keys hold. A uniform rescale (LatentUpscaleBy: one factor k gives both sides as
    round(side * k)): the sizes scale with it, keeping the picture's aspect and padding. Anything else (crop,
    resize to another aspect): stale, ignored -- the latent decodes at 8x its samples. (A crop of a square
    latent to a square is indistinguishable from a downscale and is treated as one.)
    """
    shape = latent.get(SHAPE_KEY)
    if SIZE_KEY not in latent or shape is None:
        return None
    (rh, rw), (h, w) = (int(v) for v in shape), latent["samples"].shape[-2:]
    size, work = tuple(latent[SIZE_KEY]), tuple(latent.get(WORK_KEY, latent[SIZE_KEY]))
    if (h, w) == (rh, rw):
        return size, work
    if max((h - 0.5) / rh, (w - 0.5) / rw) >= min((h + 0.5) / rh, (w + 0.5) / rw):
        return None  # no one scale k gives both sides as round(side * k)
    kh, kw = h / rh, w / rw
    scale = lambda v, k, cap: min(max(1, round(v * k)), cap)  # noqa: E731
    return ((scale(size[0], kh, 1 << 30), scale(size[1], kw, 1 << 30)),
            (scale(work[0], kh, h * 8), scale(work[1], kw, w * 8)))


def latent_size(latent: dict) -> tuple[int, int]:
    """The image size a LATENT stands for: our recorded size while it describes the samples, else 8x the samples."""
    recorded = _recorded(latent)
    return recorded[0] if recorded else (latent["samples"].shape[-2] * 8, latent["samples"].shape[-1] * 8)


def latent_work(latent: dict) -> tuple[int, int]:
    """The unpadded part of the decoded latent in pixels (all of it for core or changed latents)."""
    recorded = _recorded(latent)
    return recorded[1] if recorded else (latent["samples"].shape[-2] * 8, latent["samples"].shape[-1] * 8)


def size_keys(latent: dict) -> dict:
    """The size keys describing a LATENT's current samples, for a derived LATENT of the same shape."""
    recorded = _recorded(latent)
    if recorded is None:
        return {}
    return {SIZE_KEY: recorded[0], WORK_KEY: recorded[1], SHAPE_KEY: tuple(latent["samples"].shape[-2:])}


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

def split_captions(values: Sequence[Any] | None) -> list[str]:
    """Captions from a STRING input seen as a list (INPUT_IS_LIST): a list of strings, one string holding one
    caption per line, or nothing. Empty captions keep their place (an empty caption means "no caption for that
    image or tile"); only trailing blank lines of a one-string input are dropped."""
    if values is None:
        return []
    flat: list[str] = []
    for v in values if isinstance(values, (list, tuple)) else [values]:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            flat.extend("" if s is None else str(s) for s in v)
        else:
            flat.append(str(v))
    if len(flat) == 1:
        flat = flat[0].rstrip().split("\n") if flat[0].strip() else []
    captions = [s.strip() for s in flat]
    return captions if any(captions) else []
