"""What the SUPIR nodes share: the model handle, presets, sizes, prompts and error messages.

Thin glue between ComfyUI's data (IMAGE [B,H,W,C] in 0..1, unscaled LATENT dicts, STRING lists)
and the pack's SUPIR code in ``supir/`` (images in [-1, 1], latents scaled by 0.13025). Every call
into ``supir/`` the nodes and the command line make goes through here; the model parts are imported
where they are used, so listing the nodes stays cheap.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..supir.pipeline import DEFAULT_A_PROMPT, DEFAULT_N_PROMPT
from . import comfy

SCALE_FACTOR = 0.13025  # SDXL latent scale: ComfyUI LATENT = scaled latent / SCALE_FACTOR
SIZE_KEY = "photorestore_size"  # LATENT extra key: (height, width) of the image the latent stands for
WORK_KEY = "photorestore_work"  # LATENT extra key: (height, width) of the unpadded part, in pixels
MIN_SIDE = 16  # smallest input side the first stage accepts (pixels)

# The official prompts (gradio_demo.py / options/SUPIR_v0.yaml), as the pipeline defines them.
OFFICIAL_POSITIVE = DEFAULT_A_PROMPT
OFFICIAL_NEGATIVE = DEFAULT_N_PROMPT

SAMPLERS = {"EDM": "edm", "DPM++ 2M SDE": "dpmpp_2m_sde"}
COLOR_FIXES = ("Wavelet", "AdaIN", "None")
CAPTION_MODES = ("official: caption + positive, cut at 77 tokens", "keep positive: caption fills the remaining tokens")


@dataclass(frozen=True)
class SamplerSettings:
    """Every knob of the SUPIR sampler (names as in the official code)."""

    sampler: str = "edm"  # "edm" | "dpmpp_2m_sde"
    steps: int = 50
    seed: int = 0
    cfg_scale_start: float = 4.0  # at sigma_max
    cfg_scale: float = 7.5  # at sigma 0 (the official `s_cfg`)
    control_scale_start: float = 1.0
    control_scale: float = 1.0
    restore_cfg: float = -1.0
    restore_cfg_s_tmin: float = 0.05
    s_churn: float = 5.0
    s_noise: float = 1.003
    eta: float = 1.0
    tiled: bool = False
    tile_size: int = 1024  # image pixels
    tile_stride: int = 512  # image pixels
    tile_batch_size: int = 4


# Official presets: the gradio demo's "Quality" / "Fidelity" resets (s_cfg = cfg at the end, spt_linear_CFG =
# cfg at the start) and options/SUPIR_v0_Juggernautv9_lightning.yaml `default_setting` (8 steps, cfg 2.0 with
# SUPIR-v0Q, 1.5 with v0F, constant), with the GUI's s_noise 1.003 / churn 5.
PRESETS: dict[str, SamplerSettings] = {
    "Quality": SamplerSettings(sampler="edm", steps=50, cfg_scale_start=4.0, cfg_scale=7.5, s_churn=5, s_noise=1.003),
    "Fidelity": SamplerSettings(sampler="edm", steps=50, cfg_scale_start=1.0, cfg_scale=4.0, s_churn=5, s_noise=1.003),
    "Lightning": SamplerSettings(sampler="dpmpp_2m_sde", steps=8, cfg_scale_start=2.0, cfg_scale=2.0, s_churn=5,
                                 s_noise=1.003, eta=1.0),
    "Lightning Fidelity": SamplerSettings(sampler="dpmpp_2m_sde", steps=8, cfg_scale_start=1.5, cfg_scale=1.5,
                                          s_churn=5, s_noise=1.003, eta=1.0),
}


# --------------------------------------------------------------------------------------------
# The model handle (PHOTORESTORE_SUPIR)
# --------------------------------------------------------------------------------------------

@dataclass
class SupirHandle:
    """What ``PHOTORESTORE_SUPIR`` carries: the loaded model and its parts under memory management.

    ``model`` is a ``supir.loader.SupirModel`` whose weights wait on the offload device; the
    ``Managed`` parts are brought to the compute device with :func:`comfy.load` before use.
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


def bring(managed: comfy.Managed, memory_required: int = 0) -> Any:
    """The part of a handle on the compute device (evicting other models in ComfyUI when needed)."""
    return comfy.load(managed, memory_required=int(memory_required)).part


def load_supir_files(sdxl: Any, supir: Any, weight_dtype: str, vae_dtype: str, name: str) -> SupirHandle:
    """Load SDXL + SUPIR (paths or state dicts) into a handle; dtype names as in the loader nodes."""
    from ..supir.loader import load_supir

    device = comfy.torch_device()
    dtype = comfy.pick_dtype(weight_dtype, device, allow=("bf16", "fp16", "fp32"))
    vdtype = comfy.pick_dtype(vae_dtype, device, allow=("bf16", "fp32"))
    model = load_supir(sdxl, supir, dtype=dtype, vae_dtype=vdtype, device=comfy.offload_device())
    return make_handle(model, name, dtype=str(dtype), vae_dtype=str(vdtype))


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

def plan(h: int, w: int, upscale: float = 1.0, min_short_side: int = 0) -> Any:
    """The pipeline's size plan (``supir.pipeline.SizePlan``: output, work and internal sizes) with an
    error users can act on for images that are too small."""
    from ..supir.pipeline import plan_sizes

    if min(h, w) < MIN_SIDE:
        raise ValueError(f"The image is too small for SUPIR: {w}x{h} px; each side needs at least {MIN_SIDE} px.")
    return plan_sizes(h, w, upscale, min_short_side or None)


def fit(x: torch.Tensor, p: Any) -> torch.Tensor:
    """An image batch [B,C,H,W] brought to the plan's internal size: resized to the work size, then
    replicate-padded at the bottom/right (cropped off again by :func:`unfit`)."""
    x = resize(x, *p.work)
    ph, pw = p.internal[0] - p.work[0], p.internal[1] - p.work[1]
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def unfit(x: torch.Tensor, work: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Crop the padding of :func:`fit` off and resize to ``size`` (h, w)."""
    return resize(x[..., :work[0], :work[1]], int(size[0]), int(size[1]))


def resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bicubic resize of a [B,C,H,W] image (antialiased when shrinking); a new tensor, never the input."""
    if tuple(x.shape[-2:]) == (h, w):
        return x.clone()
    shrink = h < x.shape[-2] or w < x.shape[-1]
    return F.interpolate(x.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=shrink)


# --------------------------------------------------------------------------------------------
# LATENT conventions
# --------------------------------------------------------------------------------------------

def latent_dict(z_scaled: torch.Tensor, size: Sequence[int] | None = None, work: Sequence[int] | None = None) -> dict:
    """A ComfyUI LATENT from a scaled SUPIR latent: ``samples`` unscaled (core convention), plus the image
    size it stands for and the unpadded work size when known."""
    out = {"samples": (z_scaled.float() / SCALE_FACTOR).to(comfy.intermediate_device())}
    if size is not None:
        out[SIZE_KEY] = (int(size[0]), int(size[1]))
    if work is not None:
        out[WORK_KEY] = (int(work[0]), int(work[1]))
    return out


def scaled_latent(latent: dict) -> torch.Tensor:
    """The scaled latent SUPIR samples in, from any LATENT (ours or core's): samples x 0.13025 (a new tensor)."""
    z = latent["samples"]
    if z.ndim != 4 or z.shape[1] != 4:
        raise ValueError(f"SUPIR needs a 4-channel SDXL latent [B,4,h,w]; got a latent of shape {tuple(z.shape)}.")
    return z.float() * SCALE_FACTOR


def latent_size(latent: dict) -> tuple[int, int]:
    """The image size a LATENT stands for: our recorded size, else 8x the latent."""
    if SIZE_KEY in latent:
        return tuple(latent[SIZE_KEY])
    return latent["samples"].shape[-2] * 8, latent["samples"].shape[-1] * 8


def latent_work(latent: dict) -> tuple[int, int]:
    """The unpadded part of the decoded latent, in pixels (all of it for core latents)."""
    if WORK_KEY in latent:
        return tuple(latent[WORK_KEY])
    return latent["samples"].shape[-2] * 8, latent["samples"].shape[-1] * 8


def size_keys(latent: dict) -> dict:
    """The extra size keys of a LATENT, to carry over to a derived LATENT."""
    return {k: latent[k] for k in (SIZE_KEY, WORK_KEY) if k in latent}


# --------------------------------------------------------------------------------------------
# Prompts and captions
# --------------------------------------------------------------------------------------------

def join_prompt(caption: str, positive: str, mode: str = CAPTION_MODES[0]) -> str:
    """The positive text for one image or tile (``supir.text.assemble_prompt``).

    Official: ``caption + positive`` with no separator (the text encoders then cut at 77 tokens, so
    a long caption pushes the positive prompt out). "keep positive": the positive prompt is kept
    whole and the caption, followed by ", ", is cut word by word to the tokens left.
    """
    from ..supir.text import assemble_prompt

    caption = (caption or "").strip()
    if mode == CAPTION_MODES[0]:
        return assemble_prompt(caption, positive, "official")
    return assemble_prompt(caption, positive, "keep_positive", separator=", ")


def split_captions(values: Sequence[Any] | None) -> list[str]:
    """Captions from a STRING input seen as a list (INPUT_IS_LIST): a list of strings, one string
    holding one caption per line, or nothing. Empty entries are dropped."""
    if values is None:
        return []
    flat: list[str] = []
    for v in values if isinstance(values, (list, tuple)) else [values]:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            flat.extend(str(s) for s in v)
        else:
            flat.append(str(v))
    if len(flat) == 1:
        flat = flat[0].split("\n")
    return [s.strip() for s in flat if s.strip()]


def encode_prompts(handle: SupirHandle, texts: list[str]) -> dict:
    """Text conditioning of every prompt: {"crossattn": [N,77,C], "vector": [N,adm], "texts": texts}."""
    if handle.text is None:
        raise ValueError("This SUPIR model has no text encoders (the SDXL checkpoint had no `conditioner.` weights); "
                         "load an SDXL checkpoint that includes CLIP-L and OpenCLIP bigG.")
    text = bring(handle.text)
    with torch.inference_mode():
        cond = text.encode(list(texts))
    device = comfy.intermediate_device()
    return {"crossattn": cond["crossattn"].float().to(device), "vector": cond["vector"].float().to(device),
            "texts": list(texts)}


def select_cond(cond: dict, index: int) -> dict:
    """Entry ``index`` of a conditioning (one per image or tile), or the only one."""
    n = cond["crossattn"].shape[0]
    i = 0 if n == 1 else index
    return {"crossattn": cond["crossattn"][i:i + 1], "vector": cond["vector"][i:i + 1]}


def cond_plan(cond: dict, batch: int, tiles: int | None) -> str:
    """How a conditioning with N entries applies: "shared", "per_image" or "per_tile" (clear error otherwise)."""
    n = cond["crossattn"].shape[0]
    if n == 1:
        return "shared"
    if n == batch:
        return "per_image"
    if tiles is not None and n == tiles:
        return "per_tile"
    if tiles is not None and n == tiles * batch:
        return "per_image_tile"
    grid = f", or {tiles} per tile" if tiles is not None else " (or turn on tiled sampling for per-tile captions)"
    raise ValueError(f"The conditioning holds {n} prompts but the batch has {batch} image(s): give 1 prompt, "
                     f"one per image ({batch}){grid}.")


# --------------------------------------------------------------------------------------------
# Progress, previews and errors
# --------------------------------------------------------------------------------------------

class Callbacks:
    """The callbacks object the SUPIR code takes, forwarding to a :class:`comfy.Progress`.

    A preview handed over as a latent ([B,4,h,w], scaled) is turned into a picture with ComfyUI's
    previewer when one is available and dropped otherwise; steps of several sub-runs (images of a
    batch) are laid end to end on one bar.
    """

    def __init__(self, progress: comfy.Progress, preview_fn: Callable | None = None, runs: int = 1,
                 steps_only: bool = False):
        self.bar = progress
        self.steps_only = steps_only  # count only sampler steps (the calls that carry a preview)
        self.preview_fn = preview_fn
        self.runs = max(1, runs)
        self.run = 0

    def progress(self, step: int, total: int, preview: Any = None) -> None:
        if self.steps_only and preview is None:
            self.bar.check_interrupt()
            return
        image = None
        if preview is not None and self.preview_fn is not None:
            try:
                if isinstance(preview, torch.Tensor) and preview.ndim == 4 and preview.shape[1] == 4:
                    image = self.preview_fn(preview.detach())
                else:
                    image = preview
            except Exception:  # a preview is a nicety, never a failure
                image = None
        total = max(int(total), 1)
        self.bar.progress(self.run * total + int(step), self.runs * total, _preview_image(image))

    def check_interrupt(self) -> None:
        self.bar.check_interrupt()


def _preview_image(image: Any) -> Any:
    # ComfyUI's previewer returns a ("JPEG", PIL image, size) tuple; Progress wants the picture.
    if isinstance(image, tuple) and len(image) == 3:
        return image[1]
    return image


def oom_error(exc: BaseException, what: str, h: int, w: int, tiled: bool) -> RuntimeError:
    """An out-of-memory error users can act on, with numbers. ``tiled``: whether the failing stage was tiled
    (tiled sampling for the sampler, the tiled VAE for VAE stages)."""
    tips = []
    if "VAE" in what:
        tips.append("lower the VAE tile size to 256 px" if tiled else "turn on the tiled VAE (512 px tiles)")
        tips.append("use vae_dtype bf16 in Load SUPIR")
    else:
        if not tiled:
            tips.append("turn on tiled sampling (tile 1024 px, stride 512 px; tile_batch_size 1 uses least memory)")
        else:
            tips.append("lower tile_batch_size to 1 or the tile size to 768 px")
        tips.append("turn on the tiled VAE (512 px encoder/decoder tiles)")
        tips.append("load the weights as fp8 in Load SUPIR (about half the memory of fp16)")
    mp = h * w / 1e6
    return RuntimeError(f"SUPIR ran out of memory in {what} at {w}x{h} px ({mp:.1f} megapixels). To fit: "
                        + "; ".join(tips) + f". (Original error: {str(exc).splitlines()[0][:200]})")


@contextlib.contextmanager
def oom_advice(what: str, h: int, w: int, tiled: bool):
    """Turn an out-of-memory error inside the block into :func:`oom_error`."""
    try:
        yield
    except Exception as exc:
        if comfy.is_oom(exc):
            raise oom_error(exc, what, h, w, tiled) from exc
        raise


def with_settings(base: SamplerSettings, **overrides: Any) -> SamplerSettings:
    """A copy of ``base`` with the non-None overrides applied."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


LATENT_MULTIPLE = 8  # latent sides the sampler works on are multiples of this (64 px)


def padded(n: int) -> int:
    """A latent side rounded up to the sampler's multiple."""
    return -(-n // LATENT_MULTIPLE) * LATENT_MULTIPLE


def tile_latent(tile_px: int) -> int:
    """Sampler tile size in latent pixels: a multiple of 8 (64 px) so every tile passes the UNet."""
    return max(LATENT_MULTIPLE, int(tile_px) // 64 * LATENT_MULTIPLE)


def tile_count(lat_h: int, lat_w: int, tile_px: int, stride_px: int) -> int:
    """How many tiles the sampler uses on a latent of ``lat_h x lat_w``."""
    from ..supir.tiles import tile_windows

    return len(tile_windows(lat_h, lat_w, tile_latent(tile_px), max(int(stride_px) // 8, 1)))


def math_isclose(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=0, abs_tol=1e-9)


# --------------------------------------------------------------------------------------------
# Calls into the SUPIR code (the only place the nodes reach into supir/)
# --------------------------------------------------------------------------------------------

def _vae(handle: SupirHandle, pixels: int) -> Any:
    # activation estimate for the memory manager: ~ a few hundred bytes per pixel for the SDXL VAE
    return bring(handle.vae, memory_required=int(pixels) * 400)


def _tiling(tile_px: int | None) -> Any:
    """Tiled-VAE options for a tile size in image pixels (None = untiled)."""
    if tile_px is None:
        return None
    from ..supir.vae import VAETiling

    return VAETiling(encoder_tile_size=int(tile_px), decoder_tile_size=max(int(tile_px) // 8, 1))


def first_stage(handle: SupirHandle, x: torch.Tensor, enc_tile: int | None, dec_tile: int | None,
                callbacks: Any = None):
    """(z_lq scaled, x_stage1 in [-1,1]) of an image batch in [-1,1] at processing size."""
    vae = _vae(handle, x.shape[-1] * x.shape[-2])
    with torch.inference_mode():
        z = vae.encode_lq(x.to(comfy.torch_device()), tiling=_tiling(enc_tile), callbacks=callbacks)
        stage1 = vae.decode(z, tiling=_tiling(dec_tile), callbacks=callbacks)
    return z.float(), stage1.float()


def vae_encode(handle: SupirHandle, x: torch.Tensor, tile: int | None, callbacks: Any = None) -> torch.Tensor:
    """Scaled latent (posterior mode) of an image batch in [-1,1]."""
    vae = _vae(handle, x.shape[-1] * x.shape[-2])
    with torch.inference_mode():
        z = vae.encode(x.to(comfy.torch_device()), sample=False, tiling=_tiling(tile), callbacks=callbacks)
    return z.float()


def vae_decode(handle: SupirHandle, z: torch.Tensor, tile: int | None, callbacks: Any = None) -> torch.Tensor:
    """Image in [-1,1] (float32, unclamped) of a scaled latent batch."""
    vae = _vae(handle, z.shape[-1] * z.shape[-2] * 64)
    with torch.inference_mode():
        x = vae.decode(z.to(comfy.torch_device()), tiling=_tiling(tile), callbacks=callbacks)
    return x.float()


def _guidance(s: SamplerSettings) -> Any:
    from ..supir.schedules import Guidance

    return Guidance(cfg_scale=float(s.cfg_scale), cfg_scale_start=float(s.cfg_scale_start),
                    control_scale=float(s.control_scale),
                    control_scale_start=None if math_isclose(s.control_scale_start, s.control_scale)
                    else float(s.control_scale_start),
                    restore_cfg=float(s.restore_cfg), restore_cfg_s_tmin=float(s.restore_cfg_s_tmin))


def _sigmas(denoiser: Any, s: SamplerSettings) -> torch.Tensor:
    from ..supir import schedules

    table = denoiser.sigmas.float().cpu()
    return (schedules.edm_sigmas if s.sampler == "edm" else schedules.dpmpp_sigmas)(table, int(s.steps))


def _to(cond: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {k: cond[k].to(device, dtype) for k in ("crossattn", "vector")}


def sample_one(handle: SupirHandle, hint: torch.Tensor, x_center: torch.Tensor | None, cond: dict | list[dict],
               uncond: dict, s: SamplerSettings, seed: int, callbacks: Any = None) -> torch.Tensor:
    """Sample one latent [1,4,h,w] (scaled) with the SUPIR sampler; ``cond`` is one dict or one per tile."""
    from ..supir import samplers, tiled_sampling

    lh, lw = hint.shape[-2:]
    ph, pw = (-lh) % LATENT_MULTIPLE, (-lw) % LATENT_MULTIPLE
    if ph or pw:  # a foreign latent (e.g. core VAE Encode of any size): pad, sample, crop
        hint = F.pad(hint, (0, pw, 0, ph), mode="replicate")
        x_center = None if x_center is None else F.pad(x_center, (0, pw, 0, ph), mode="replicate")
    lat_px = hint.shape[-1] * hint.shape[-2]
    network = bring(handle.diffusion, memory_required=int(lat_px) * 64 * 1024 * (2 if not s.tiled else 1))
    denoiser = handle.model.denoiser
    device, dtype = comfy.torch_device(), torch.float32  # the network casts to its compute dtype itself
    generator = torch.Generator("cpu").manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
    noise = torch.randn(hint.shape, generator=generator, dtype=torch.float32).to(device)
    hint = hint.to(device, dtype)
    x_center = (hint if x_center is None else x_center.to(device, dtype))
    conds = [_to(c, device, dtype) for c in cond] if isinstance(cond, list) else _to(cond, device, dtype)
    uncond = _to(uncond, device, dtype)
    common = dict(x_center=x_center, guidance=_guidance(s), s_noise=float(s.s_noise), callbacks=callbacks)
    if s.sampler == "edm":
        common.update(s_churn=float(s.s_churn), noise_source=samplers.gaussian_noise(generator))
    else:
        common.update(eta=float(s.eta), seed=int(seed) & 0x7FFFFFFF)
    sigmas = _sigmas(denoiser, s)
    with torch.inference_mode():
        if s.tiled:
            tiles = dict(tile_size=tile_latent(s.tile_size), tile_stride=max(int(s.tile_stride) // 8, 1),
                         tile_batch_size=int(s.tile_batch_size))
            fn = (tiled_sampling.tiled_restore_edm_sample if s.sampler == "edm"
                  else tiled_sampling.tiled_restore_dpmpp_2m_sde_sample)
            z = fn(denoiser, noise, sigmas, conds, uncond, hint, **common, **tiles)
        else:
            if isinstance(conds, list):
                raise ValueError("Per-tile captions need tiled sampling: turn on 'tiled' in SUPIR Sampler.")
            fn = samplers.restore_edm_sample if s.sampler == "edm" else samplers.restore_dpmpp_2m_sde_sample
            z = fn(denoiser, noise, sigmas, conds, uncond, hint, **common)
    return z[..., :lh, :lw].float()


def conds_for_image(cond: dict, plan: str, index: int, tiles: int | None) -> dict | list[dict]:
    """The conditioning of image ``index``: one dict, or a list with one dict per tile."""
    n = cond["crossattn"].shape[0]
    if plan == "shared":
        return select_cond(cond, 0)
    if plan == "per_image":
        return select_cond(cond, index)
    start = 0 if plan == "per_tile" else index * tiles
    return [select_cond(cond, start + t) for t in range(tiles)] if n > 1 else select_cond(cond, 0)


def sample_batch(handle: SupirHandle, hint: torch.Tensor, x_center: torch.Tensor | None, positive: dict,
                 negative: dict, s: SamplerSettings, progress_desc: str = "SUPIR sampling") -> torch.Tensor:
    """Sample every image of a scaled control-latent batch (one at a time: bounded memory, per-image prompts).

    Image i uses seed + i. OOM errors come back with advice.
    """
    b, _, lh, lw = hint.shape
    tiles = tile_count(padded(lh), padded(lw), s.tile_size, s.tile_stride) if s.tiled else None
    plan = cond_plan(positive, b, tiles)
    uncond = select_cond(negative, 0)
    out = []
    with comfy.Progress(b * s.steps, progress_desc) as bar:
        cb = Callbacks(bar, comfy.latent_preview_fn(), runs=b)
        for i in range(b):
            cb.run = i
            c = conds_for_image(positive, plan, i, tiles)
            xc = None if x_center is None else x_center[i:i + 1]
            try:
                out.append(sample_one(handle, hint[i:i + 1], xc, c, uncond, s, s.seed + i, cb).cpu())
            except Exception as exc:
                if comfy.is_oom(exc):
                    raise oom_error(exc, "sampling", lh * 8, lw * 8, s.tiled) from exc
                raise
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Colour fix, tiles, the whole restoration
# --------------------------------------------------------------------------------------------

def color_fix_images(image: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """Colour fix of a ComfyUI IMAGE batch against a reference IMAGE (one for all or one per image)."""
    from ..supir.colorfix import color_fix
    from .common import bchw_to_image, image_to_bchw

    if method == "None":
        return image.clone()
    x, ref = image_to_bchw(image), image_to_bchw(reference)
    if ref.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"The reference has {ref.shape[0]} images for {x.shape[0]} images: give one, or one per image.")
    ref = resize(ref, x.shape[-2], x.shape[-1]).expand(x.shape[0], -1, -1, -1)
    kind = "AdaIn" if method == "AdaIN" else method
    out = color_fix(x * 2 - 1, ref * 2 - 1, kind)
    return bchw_to_image((out + 1) / 2)


def cut_tiles(x: torch.Tensor, tile_px: int, stride_px: int, upscale: float = 1.0, min_short_side: int = 0
              ) -> tuple[torch.Tensor, str, int, int]:
    """The sampler's tile grid over an image batch [B,3,H,W], sized as SUPIR Restore / the first stage size it
    (upscale, short-side rule, padding to the internal size): (tiles batch, layout text, rows, columns)."""
    from ..supir.tiles import tile_windows

    b, _, h, w = x.shape
    p = plan(h, w, upscale, min_short_side)
    x = fit(x, p)
    windows = [tuple(v * 8 for v in win) for win in
               tile_windows(p.internal[0] // 8, p.internal[1] // 8, tile_latent(tile_px), max(int(stride_px) // 8, 1))]
    rows = len({win[0] for win in windows})
    cols = len(windows) // rows
    tiles = torch.stack([x[:, :, h0:h1, w0:w1] for h0, h1, w0, w1 in windows], 1).flatten(0, 1)
    th, tw = windows[0][1] - windows[0][0], windows[0][3] - windows[0][2]
    boxes = " ".join(f"({h0},{h1},{w0},{w1})" for h0, h1, w0, w1 in windows)
    layout = (f"{rows} rows x {cols} columns = {len(windows)} tiles of {tw}x{th} px per image, stride {stride_px} px, "
              f"on the {p.internal[1]}x{p.internal[0]} px sampling grid; boxes (top,bottom,left,right): {boxes}")
    return tiles, layout, rows, cols


@dataclass(frozen=True)
class RestoreOptions:
    """Everything the all-in-one restoration needs besides the model, the images and the captions."""

    settings: SamplerSettings = PRESETS["Quality"]
    upscale: float = 2.0
    min_short_side: int = 1024
    tiling: str = "auto"  # "auto" | "on" | "off"
    color_fix: str = "Wavelet"
    tiled_vae: bool = True
    vae_tile_size: int = 512  # image pixels, encoder and decoder
    positive: str = OFFICIAL_POSITIVE
    negative: str = OFFICIAL_NEGATIVE
    caption_mode: str = CAPTION_MODES[0]


def wants_tiles(tiling: str, h: int, w: int, tile_px: int) -> bool:
    """Tiled sampling on/off; "auto" tiles when the sampled image exceeds 1.5 x 1.5 tiles."""
    if tiling in ("on", "off"):
        return tiling == "on"
    return h * w > (1.5 * tile_px) ** 2


def pipeline_settings(o: RestoreOptions, tiled: bool, seed: int) -> Any:
    """``supir.pipeline.RestoreSettings`` for these options (tile sizes converted to latent pixels)."""
    from ..supir.pipeline import RestoreSettings

    s = o.settings
    return RestoreSettings(
        upscale=float(o.upscale), min_size=int(o.min_short_side) or None, sampler=s.sampler, steps=int(s.steps),
        s_churn=float(s.s_churn), s_noise=float(s.s_noise), eta=float(s.eta), cfg_scale=float(s.cfg_scale),
        cfg_scale_start=float(s.cfg_scale_start), control_scale=float(s.control_scale),
        control_scale_start=None if math_isclose(s.control_scale_start, s.control_scale) else float(s.control_scale_start),
        restore_cfg=float(s.restore_cfg), restore_cfg_s_tmin=float(s.restore_cfg_s_tmin), seed=int(seed),
        tiled=tiled, tile_size=tile_latent(s.tile_size), tile_stride=max(int(s.tile_stride) // 8, 1),
        tile_batch_size=int(s.tile_batch_size), vae_tiling=_tiling(o.vae_tile_size if o.tiled_vae else None),
        prompt="", a_prompt="", n_prompt=o.negative, color_fix="AdaIn" if o.color_fix == "AdaIN" else o.color_fix)


def restore(handle: SupirHandle, images: torch.Tensor, o: RestoreOptions, captions: Sequence[str] = ()) -> torch.Tensor:
    """The whole SUPIR restoration (``supir.pipeline.restore``) of images [B,3,H,W] in 0..1, one image at a
    time under memory management: restored images in 0..1 at exactly round(H x upscale) x round(W x upscale).

    ``captions``: none, one for all, one per image, or one per sampler tile (per image: B x tiles, image-major).
    Image i uses seed + i.
    """
    from ..supir import pipeline

    b, _, h, w = images.shape
    p = plan(h, w, o.upscale, o.min_short_side)
    tiled = wants_tiles(o.tiling, *p.internal, o.settings.tile_size)
    tiles = tile_count(p.internal[0] // 8, p.internal[1] // 8, o.settings.tile_size, o.settings.tile_stride) \
        if tiled else None
    texts = [join_prompt(c, o.positive, o.caption_mode) for c in captions] or [o.positive]
    cond = {"crossattn": torch.zeros(len(texts), 1, 1), "vector": torch.zeros(len(texts), 1)}
    how = cond_plan(cond, b, tiles)
    model = handle.model
    out = []
    with comfy.Progress(b * o.settings.steps, "SUPIR restore") as bar:
        cb = Callbacks(bar, comfy.latent_preview_fn(), runs=b, steps_only=True)
        for i in range(b):
            cb.run = i
            if how == "shared":
                caps = [texts[0]]
            elif how == "per_image":
                caps = [texts[i]]
            else:
                start = 0 if how == "per_tile" else i * tiles
                caps = [texts[start:start + tiles]]
            bring(handle.vae, memory_required=p.internal[0] * p.internal[1] * 400)
            if handle.text is not None:
                bring(handle.text)
            bring(handle.diffusion, memory_required=p.internal[0] * p.internal[1] * 1024 * (1 if tiled else 2))
            x = images[i:i + 1].to(comfy.torch_device())
            try:
                with torch.inference_mode():
                    y = pipeline.restore(x, model, pipeline_settings(o, tiled, o.settings.seed + i), cb, captions=caps)
            except Exception as exc:
                if comfy.is_oom(exc):
                    raise oom_error(exc, "restoration", *p.internal, tiled) from exc
                raise
            out.append(y.float().cpu())
    return torch.cat(out)
