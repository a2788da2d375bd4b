"""The one SUPIR engine: settings, presets, size plan, first stage, conditioning plan, sample, decode, colour fix.

Every SUPIR node and the command line call these functions; nothing here knows ComfyUI. Images are float
tensors ``[B, 3, H, W]`` in [0, 1] at the caller's size (the engine plans, fits and crops); latents are SUPIR's
scaled latents (``x SCALE_FACTOR``). Model parts are a ``supir.loader.SupirModel``'s ``vae``, ``text`` and
``denoiser``; before a part runs the engine calls ``callbacks.load(part, bytes)`` so a host can bring it to its
compute device (see :mod:`.callbacks`).

Official (``SUPIRModel.batchify_sample``): ``z_lq = denoise_encoder`` posterior mode, ``x_stage1 = D(z_lq)``,
``x_center = E(x_stage1)`` as a posterior *sample*, positive prompt ``caption + a_prompt`` (no separator),
sampling, ``D(z)``, colour fix against ``x_stage1``.

Random numbers (the one convention, pinned by the parity tests): one CPU generator seeded with ``seed``
draws, in order, the posterior noise of ``x_center`` (always drawn, so a run with a given ``x_center`` or
without restoration guidance keeps the same noise), the initial noise, one 62-bit integer seeding the DPM++
Brownian tree, then the EDM per-step draws. Image ``i`` of a batch uses ``(seed + i) mod 2**64``.

Deliberately different: sizes are padded to multiples of 64 and cropped back (exact output size); plans above
``max_megapixels`` are refused; tiled sampling and the VAE accept any size; without an ``x_center`` and with
``restore_cfg <= 0`` the ``E(x_stage1)`` pass is skipped (it could not change the result); the DPM++ sampler
applies ``restore_cfg`` and the linear control scale (the official DPM++ sampler ignores both).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from . import memory
from .callbacks import Callbacks, compute_device, is_oom, notify
from .colorfix import color_fix
from .samplers import NoiseSource, gaussian_noise, restore_dpmpp_2m_sde_sample, restore_edm_sample
from .schedules import Guidance, dpmpp_sigmas, edm_sigmas
from .sizes import MAX_MEGAPIXELS, SizePlan, fit, plan_sizes, resize, unfit
from .tiled_sampling import tiled_restore_dpmpp_2m_sde_sample, tiled_restore_edm_sample
from .tiles import (LATENT_SCALE, TILE_MULTIPLE, check_pixel_tiles, image_windows, latent_windows, sampler_stride,
                    sampler_tile)
from .vae import VAETiling

DEFAULT_A_PROMPT = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed photo - "
    "realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, skin pore detailing, "
    "hyper sharpness, perfect without deformations.")
DEFAULT_N_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, "
    "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
    "jpeg artifacts, deformed, lowres, over-smooth")
SAMPLERS = ("edm", "dpmpp_2m_sde")
TILINGS = ("auto", "on", "off")
COLOR_FIXES = ("Wavelet", "AdaIN", "None")
CAPTION_MODES = ("official: caption + positive, cut at 77 tokens", "keep positive: caption fills the remaining tokens")
SEED_MODULUS = 2 ** 64


@dataclass(frozen=True)
class RestoreSettings:
    """Every knob of a SUPIR run, named like the node widgets (tile sizes in image pixels).

    ``cfg_scale`` / ``control_scale`` are the official names of the widgets ``cfg_scale_end`` /
    ``control_scale_end`` (the value at the last step); ``*_start`` = None means constant.
    Defaults: the Quality preset, untiled, no upscale.
    """

    # sizes
    upscale_by: float = 1.0
    min_short_side: int = 0  # official: 1024 (short side raised to at least this while sampling)
    max_megapixels: float = MAX_MEGAPIXELS  # size budget of the internal image; 0 = no limit
    size_multiple: int = 64
    fit: str = "pad"  # "pad" (exact, cropped back) or "resize" (official: nearest multiple)
    # sampler
    sampler: str = "edm"  # "edm" (RestoreEDM) or "dpmpp_2m_sde"
    steps: int = 50
    seed: int = 1234
    cfg_scale_start: float | None = 4.0
    cfg_scale: float = 7.5
    control_scale_start: float | None = None
    control_scale: float = 1.0
    restore_cfg: float = -1.0  # restoration guidance strength (s_stage1); <= 0 = off
    restore_cfg_s_tmin: float = 0.05
    s_churn: float = 5.0
    s_noise: float = 1.003
    eta: float = 1.0
    # tiled sampling (image pixels)
    tiling: str = "off"  # "auto" (above 1.5 x 1.5 tiles) | "on" | "off"
    tile_size: int = 1024
    tile_stride: int = 512
    tile_batch_size: int = 1
    # VAE (image pixels)
    tiled_vae: bool = False
    encoder_tile_size: int = 512
    decoder_tile_size: int = 512
    # text
    positive_prompt: str = DEFAULT_A_PROMPT
    negative_prompt: str = DEFAULT_N_PROMPT
    caption_mode: str = CAPTION_MODES[0]
    # output
    color_fix: str = "Wavelet"

    def guidance(self) -> Guidance:
        return Guidance(cfg_scale=self.cfg_scale, cfg_scale_start=self.cfg_scale_start,
                        control_scale=self.control_scale, control_scale_start=self.control_scale_start,
                        restore_cfg=self.restore_cfg, restore_cfg_s_tmin=self.restore_cfg_s_tmin)


# Official presets: the gradio demo's "Quality" / "Fidelity" buttons (s_cfg = cfg at the end, spt_linear_CFG = cfg
# at the start) and options/SUPIR_v0_Juggernautv9_lightning.yaml `default_setting` (8 steps; the demo's Quality
# button sets cfg 2.0, its Fidelity button 1.5, constant, whichever SUPIR checkpoint is loaded), with the GUI's
# s_noise 1.003 / churn 5.
PRESETS: dict[str, dict[str, Any]] = {
    "Quality": dict(sampler="edm", steps=50, cfg_scale_start=4.0, cfg_scale=7.5, s_churn=5.0, s_noise=1.003),
    "Fidelity": dict(sampler="edm", steps=50, cfg_scale_start=1.0, cfg_scale=4.0, s_churn=5.0, s_noise=1.003),
    "Lightning": dict(sampler="dpmpp_2m_sde", steps=8, cfg_scale_start=2.0, cfg_scale=2.0, s_churn=5.0,
                      s_noise=1.003, eta=1.0),
    "Lightning Fidelity": dict(sampler="dpmpp_2m_sde", steps=8, cfg_scale_start=1.5, cfg_scale=1.5, s_churn=5.0,
                               s_noise=1.003, eta=1.0),
}


def choice(value: str, choices: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``choices``; else a ValueError naming the setting and listing the choices."""
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of: {', '.join(map(str, choices))}.")
    return value


def settings(preset: str | None = None, **overrides: Any) -> RestoreSettings:
    """Settings from a preset name (or the defaults) with the non-None ``overrides`` applied, validated."""
    base = dict(PRESETS[choice(preset, list(PRESETS), "preset")]) if preset is not None else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return validate(RestoreSettings(**base))


def validate(s: RestoreSettings) -> RestoreSettings:
    """Refuse unknown choice values and settings that would give NaN (clear errors naming the setting)."""
    choice(s.sampler, SAMPLERS, "sampler")
    choice(s.tiling, TILINGS, "tiling")
    choice(s.caption_mode, CAPTION_MODES, "caption_mode")
    choice({"adain": "AdaIN"}.get(str(s.color_fix).lower(), s.color_fix), COLOR_FIXES, "color_fix")
    if s.steps < 1:
        raise ValueError(f"steps must be at least 1, got {s.steps}.")
    if s.tiling != "off":
        check_pixel_tiles(s.tile_size, s.tile_stride)
    if s.tile_batch_size < 1:
        raise ValueError(f"tile_batch_size must be at least 1, got {s.tile_batch_size}.")
    if s.tiled_vae and (s.encoder_tile_size < 8 or s.decoder_tile_size < 8):
        raise ValueError("encoder_tile_size and decoder_tile_size must be at least 8 px.")
    return s


# ---- sizes ---------------------------------------------------------------------------------------------

def plan(s: RestoreSettings, height: int, width: int) -> SizePlan:
    """The size plan of an input of ``height x width`` under these settings (size budget enforced)."""
    return plan_sizes(height, width, s.upscale_by, s.min_short_side or None, s.size_multiple, s.fit,
                      s.max_megapixels or None)


def wants_tiles(s: RestoreSettings, height: int, width: int) -> bool:
    """Tiled sampling on/off for an internal image of ``height x width``; "auto" tiles above 1.5 x 1.5 tiles."""
    if s.tiling in ("on", "off"):
        return s.tiling == "on"
    return height * width > (1.5 * s.tile_size) ** 2


def tile_count(s: RestoreSettings, lat_h: int, lat_w: int) -> int:
    """How many tiles the sampler uses on a latent of ``lat_h x lat_w`` (padded to its multiple)."""
    return len(latent_windows(_padded(lat_h), _padded(lat_w), s.tile_size, s.tile_stride))


def _padded(n: int) -> int:
    return -(-n // TILE_MULTIPLE) * TILE_MULTIPLE


def vae_tiling(s: RestoreSettings) -> VAETiling | None:
    """The tiled-VAE options (encoder tiles in image pixels, decoder tiles in latent pixels), or None."""
    if not s.tiled_vae:
        return None
    return VAETiling(encoder_tile_size=int(s.encoder_tile_size),
                     decoder_tile_size=max(int(s.decoder_tile_size) // LATENT_SCALE, 1))


def check_images(images: torch.Tensor, name: str = "image") -> torch.Tensor:
    """Refuse what SUPIR cannot restore: not [B,3,H,W], an empty batch, NaN or infinite values."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: expected images [B, 3, H, W], got shape {tuple(images.shape)}.")
    return check_values(images, name)


def check_values(x: torch.Tensor, name: str) -> torch.Tensor:
    """Refuse an empty batch and NaN / infinite values (the documented rule: never spread them silently)."""
    if x.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty (0 images); connect a node that outputs at least one.")
    bad = ~torch.isfinite(x)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} values are NaN or infinite; SUPIR refuses them instead of "
                         "spreading them over the whole result. Fix or replace the node that produced them.")
    return x


# ---- memory and errors ---------------------------------------------------------------------------------

def oom_error(exc: BaseException, what: str, h: int, w: int, tiled: bool) -> RuntimeError:
    """An out-of-memory error users can act on, with numbers. ``tiled``: whether the failing stage was tiled
    (tiled sampling for the sampler, the tiled VAE for VAE stages)."""
    if "VAE" in what:
        tips = ["lower the VAE tile size to 256 px" if tiled else "turn on the tiled VAE (512 px tiles)",
                "use vae_dtype bf16 in Load SUPIR"]
    else:
        tips = ["lower tile_batch_size to 1 or the tile size to 768 px" if tiled else
                "turn on tiled sampling (tile 1024 px, stride 512 px; tile_batch_size 1 uses least memory)",
                "turn on the tiled VAE (512 px encoder/decoder tiles)",
                "load the weights as fp8 in Load SUPIR (about half the memory of fp16)"]
    return RuntimeError(f"SUPIR ran out of memory in {what} at {w}x{h} px ({h * w / 1e6:.1f} megapixels). To fit: "
                        + "; ".join(tips) + f". (Original error: {str(exc).splitlines()[0][:200] if str(exc) else exc!r})")


class _OomAdvice:
    def __init__(self, what: str, h: int, w: int, tiled: bool):
        self.args = (what, h, w, tiled)

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and isinstance(exc, Exception) and is_oom(exc):
            raise oom_error(exc, *self.args) from exc
        return False


def oom_advice(what: str, h: int, w: int, tiled: bool) -> _OomAdvice:
    """A ``with`` block turning an out-of-memory error into :func:`oom_error` (a cancel passes through)."""
    return _OomAdvice(what, h, w, tiled)


# ---- callbacks helpers ----------------------------------------------------------------------------------

class _Part(Callbacks):
    """Sub-run ``index`` of ``count`` of a host's callbacks: progress laid end to end on one bar; with
    ``quiet`` only interrupt checks pass (VAE passes inside a sampling run)."""

    def __init__(self, host: Any, index: int = 0, count: int = 1, quiet: bool = False):
        self.host, self.index, self.count, self.quiet = host, index, max(1, count), quiet
        self.device = getattr(host, "device", None)

    def check_interrupt(self) -> None:
        notify(self.host, "check_interrupt")

    def progress(self, step: int, total: int, preview: Any = None) -> None:
        if not self.quiet:
            total = max(int(total), 1)
            notify(self.host, "progress", self.index * total + int(step), self.count * total, preview)

    def step_done(self, i: int, x: torch.Tensor) -> None:
        notify(self.host, "step_done", i, x)

    def load(self, part: str, memory_required: int = 0) -> None:
        notify(self.host, "load", part, memory_required)


def _param_dtype(module: Any) -> torch.dtype | None:
    """The dtype a network computes in (its first parameter's), or None for stand-ins without parameters."""
    params = getattr(module, "parameters", None)
    return next((p.dtype for p in params()), None) if callable(params) else None


def _vae(model, callbacks: Any, h: int, w: int, s: "RestoreSettings"):
    """The VAE on the compute device, after telling the host what a pass at h x w pixels needs."""
    dtype = _param_dtype(model.vae)
    tile = s.encoder_tile_size if s.tiled_vae else None
    notify(callbacks, "load", "vae", memory.vae_memory(h, w, dtype, tile_size=tile))
    return model.vae, compute_device(callbacks, model.vae)


def seed_of(seed: int, index: int) -> int:
    """The seed of image ``index``: ``seed + index`` wrapped into 64 bits (any widget value works)."""
    return (int(seed) + int(index)) % SEED_MODULUS


# ---- first stage, encode, decode -------------------------------------------------------------------------

def first_stage(images: torch.Tensor, model, s: RestoreSettings, callbacks: Any = None
                ) -> tuple[torch.Tensor, torch.Tensor, SizePlan]:
    """SUPIR's first stage of images [B,3,H,W] in 0..1, one image at a time: ``(z_lq, stage1, plan)`` with
    ``z_lq`` the scaled control latents (denoise encoder's posterior mode, at the internal size) and ``stage1``
    the decoded images in 0..1 at the input size."""
    check_images(images)
    b, _, h, w = images.shape
    p = plan(s, h, w)
    zs, stage1 = [], []
    for i in range(b):
        notify(callbacks, "check_interrupt")
        vae, device = _vae(model, callbacks, *p.internal, s)
        x = fit(images[i:i + 1].float(), p).clamp(0, 1).to(device) * 2 - 1
        with oom_advice("the first stage (VAE)", *p.internal, s.tiled_vae), torch.inference_mode():
            z = vae.encode_lq(x, tiling=vae_tiling(s), callbacks=_Part(callbacks, 2 * i, 2 * b))
            x1 = vae.decode(z, tiling=vae_tiling(s), callbacks=_Part(callbacks, 2 * i + 1, 2 * b))
        zs.append(z.float().cpu())
        stage1.append(unfit(((x1.float().cpu() + 1) / 2).clamp(0, 1), p, (h, w)).clamp(0, 1))
        notify(callbacks, "progress", i + 1, b)
    return torch.cat(zs), torch.cat(stage1), p


def encode(images: torch.Tensor, model, s: RestoreSettings, callbacks: Any = None, sample: bool = True
           ) -> tuple[torch.Tensor, SizePlan]:
    """Scaled latents of images [B,3,H,W] in 0..1 with the regular VAE encoder, at the internal size: a posterior
    sample (official ``encode_first_stage``; image i draws from seed + i) or the posterior mode."""
    check_images(images)
    b, _, h, w = images.shape
    p = plan(s, h, w)
    zs = []
    for i in range(b):
        notify(callbacks, "check_interrupt")
        vae, device = _vae(model, callbacks, *p.internal, s)
        x = fit(images[i:i + 1].float(), p).clamp(0, 1).to(device) * 2 - 1
        generator = torch.Generator().manual_seed(seed_of(s.seed, i))
        with oom_advice("encoding (VAE)", *p.internal, s.tiled_vae), torch.inference_mode():
            z = vae.encode(x, generator=generator, sample=sample, tiling=vae_tiling(s),
                           callbacks=_Part(callbacks, i, b))
        zs.append(z.float().cpu())
        notify(callbacks, "progress", i + 1, b)
    return torch.cat(zs), p


MIN_DECODE = 8  # latent sides below this are replicate-padded for decoding and cropped back


def decode(latents: torch.Tensor, model, s: RestoreSettings, callbacks: Any = None,
           work: Sequence[int] | None = None, size: Sequence[int] | None = None) -> torch.Tensor:
    """Images in 0..1 [B,3,H,W] of scaled latents, one at a time: 8x the latent, cropped to ``work`` (the
    unpadded part) and resized to ``size`` when given."""
    check_values(latents, "latent")
    b, _, lh, lw = latents.shape
    ph, pw = max(0, MIN_DECODE - lh), max(0, MIN_DECODE - lw)
    work = tuple(work) if work is not None else (lh * LATENT_SCALE, lw * LATENT_SCALE)
    out = []
    for i in range(b):
        notify(callbacks, "check_interrupt")
        z = latents[i:i + 1].float()
        if ph or pw:
            z = F.pad(z, (0, pw, 0, ph), mode="replicate")
        vae, device = _vae(model, callbacks, z.shape[-2] * 8, z.shape[-1] * 8, s)
        with oom_advice("decoding (VAE)", z.shape[-2] * 8, z.shape[-1] * 8, s.tiled_vae), torch.inference_mode():
            x = vae.decode(z.to(device), tiling=vae_tiling(s), callbacks=_Part(callbacks, i, b))
        x = ((x.float().cpu() + 1) / 2).clamp(0, 1)[..., :work[0], :work[1]]
        out.append((resize(x, size) if size is not None else x).clamp(0, 1))
        notify(callbacks, "progress", i + 1, b)
    return torch.cat(out)


def color_fix_images(images: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """Colour fix of images [B,3,H,W] in 0..1 against a reference batch (one for all or one per image),
    resized to the images; ``method`` one of :data:`COLOR_FIXES`."""
    choice(method, COLOR_FIXES, "color_fix method")
    check_values(images, "image")
    check_values(reference, "reference")
    if method == "None":
        return images.clone()
    if reference.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"The reference has {reference.shape[0]} images for {images.shape[0]} images: give one, "
                         "or one per image.")
    ref = resize(reference, images.shape[-2:]).expand(images.shape[0], -1, -1, -1)
    out = color_fix(images.float() * 2 - 1, ref * 2 - 1, method)
    return ((out + 1) / 2).clamp(0, 1)


# ---- text conditioning -----------------------------------------------------------------------------------

def join_prompt(caption: str, positive: str, mode: str = CAPTION_MODES[0]) -> str:
    """The positive text for one image or tile. Official: ``caption + positive`` with no separator (the text
    encoders cut at 77 tokens). "keep positive": the positive prompt is kept whole and the caption, followed by
    ", ", is cut word by word to the tokens left. An empty caption gives the positive prompt alone."""
    from .text import assemble_prompt

    caption = (caption or "").strip()
    if choice(mode, CAPTION_MODES, "caption_mode") == CAPTION_MODES[0]:
        return assemble_prompt(caption, positive, "official")
    return assemble_prompt(caption, positive, "keep_positive", separator=", ")


def encode_texts(model, texts: Sequence[str], callbacks: Any = None) -> dict:
    """Text conditioning of every prompt: ``{"crossattn": [N,77,C], "vector": [N,adm], "texts": texts}`` (CPU)."""
    if model.text is None:
        raise ValueError("This SUPIR model has no text encoders (the SDXL checkpoint had no `conditioner.` weights); "
                         "load an SDXL checkpoint that includes CLIP-L and OpenCLIP bigG.")
    notify(callbacks, "load", "text", 0)
    with torch.inference_mode():
        cond = model.text.encode(list(texts))
    return {"crossattn": cond["crossattn"].float().cpu(), "vector": cond["vector"].float().cpu(),
            "texts": list(texts)}


def cond_plan(n: int, batch: int, tiles: int | None) -> str:
    """How N prompts apply to a batch: "shared", "per_image", "per_tile" or "per_image_tile" (error otherwise)."""
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


def _row(cond: dict, i: int) -> dict:
    return {"crossattn": cond["crossattn"][i:i + 1], "vector": cond["vector"][i:i + 1]}


def cond_for_image(cond: dict, how: str, index: int, tiles: int | None) -> dict | list[dict]:
    """The conditioning of image ``index`` under plan ``how``: one dict, or one dict per tile."""
    if how == "shared":
        return _row(cond, 0)
    if how == "per_image":
        return _row(cond, index)
    start = 0 if how == "per_tile" else index * tiles
    return [_row(cond, start + t) for t in range(tiles)]


# ---- sampling: the one entry point ---------------------------------------------------------------------

def _to(cond: dict | list, device: torch.device) -> dict | list:
    if isinstance(cond, (list, tuple)):
        return [_to(c, device) for c in cond]
    return {k: cond[k].to(device, torch.float32) for k in ("crossattn", "vector")}


def sample(model, hint: torch.Tensor, cond, uncond: dict, s: RestoreSettings, callbacks: Any = None,
           x_center: torch.Tensor | None = None, stage1: torch.Tensor | None = None,
           noise_source: NoiseSource | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample latents from a scaled control latent ``hint`` [B,4,h,w] (any size: padded to the sampler's multiple
    and cropped back) -- the one sampling entry point, in the random-number order of the module docstring.

    ``cond``: one conditioning for all rows, or a list with one per tile (tiled sampling). ``x_center``: the
    restoration-guidance target; None = the official ``E(D(hint))`` posterior sample (``stage1``: ``D(hint)`` in
    [-1, 1] when the caller has it). ``noise_source`` replays recorded draws (parity tests).
    """
    check_values(hint, "control_latent")
    generator = generator if generator is not None else torch.Generator().manual_seed(seed_of(s.seed, 0))
    explicit = noise_source is not None
    noise_source = noise_source or gaussian_noise(generator)
    lh, lw = hint.shape[-2:]
    ph, pw = (-lh) % TILE_MULTIPLE, (-lw) % TILE_MULTIPLE
    pad = (lambda t: F.pad(t, (0, pw, 0, ph), mode="replicate")) if ph or pw else (lambda t: t)
    posterior_noise = noise_source(pad(hint), None, None)
    if x_center is None and s.restore_cfg > 0:
        x_center = _x_center(model, hint, stage1, posterior_noise, s, callbacks)
    hint = pad(hint.float())
    x_center = None if x_center is None else pad(x_center.float())
    noise = noise_source(hint, None, None)
    dpm_seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
    tiled = wants_tiles(s, hint.shape[-2] * LATENT_SCALE, hint.shape[-1] * LATENT_SCALE)
    dtype = _param_dtype(getattr(model, "diffusion", None))
    notify(callbacks, "load", "diffusion", memory.sampling_memory(
        hint.shape[-2] * LATENT_SCALE, hint.shape[-1] * LATENT_SCALE, dtype, cfg=True,
        tile_size=s.tile_size if tiled else None, tile_batch_size=s.tile_batch_size))
    device = compute_device(callbacks, getattr(model, "diffusion", None))
    with oom_advice("sampling", hint.shape[-2] * 8, hint.shape[-1] * 8, tiled), torch.inference_mode():
        z = _run_sampler(model.denoiser, noise.to(device), _to(cond, device), _to(uncond, device),
                         hint.to(device), None if x_center is None else x_center.to(device), s, tiled,
                         noise_source if explicit or s.sampler == "edm" else None, dpm_seed, callbacks)
    return z[..., :lh, :lw].float()


def _x_center(model, hint: torch.Tensor, stage1: torch.Tensor | None, posterior_noise: torch.Tensor,
              s: RestoreSettings, callbacks: Any) -> torch.Tensor:
    """Official restoration-guidance target ``E(D(hint))``, a posterior sample with the given draw."""
    vae, device = _vae(model, callbacks, hint.shape[-2] * 8, hint.shape[-1] * 8, s)
    quiet = _Part(callbacks, quiet=True)
    with oom_advice("the guidance target (VAE)", hint.shape[-2] * 8, hint.shape[-1] * 8, s.tiled_vae), \
            torch.inference_mode():
        if stage1 is None:
            stage1 = vae.decode(hint.to(device), tiling=vae_tiling(s), callbacks=quiet)
        lh, lw = hint.shape[-2:]
        x = vae.encode(stage1.to(device), noise=posterior_noise[..., :lh, :lw], tiling=vae_tiling(s), callbacks=quiet)
    return x.float()


def _run_sampler(denoiser, noise, cond, uncond, hint, x_center, s: RestoreSettings, tiled: bool,
                 noise_source, dpm_seed: int, callbacks):
    if not tiled and isinstance(cond, (list, tuple)):
        raise ValueError("Per-tile captions need tiled sampling: turn on tiling (SUPIR Sampler 'tiled', or "
                         "SUPIR Restore 'tiling' on).")
    if s.sampler == "edm":
        sigmas = edm_sigmas(denoiser.sigmas, s.steps)
        fn = tiled_restore_edm_sample if tiled else restore_edm_sample
        extra = dict(s_churn=s.s_churn, s_noise=s.s_noise)
    else:
        sigmas = dpmpp_sigmas(denoiser.sigmas, s.steps)
        fn = tiled_restore_dpmpp_2m_sde_sample if tiled else restore_dpmpp_2m_sde_sample
        extra = dict(eta=s.eta, s_noise=s.s_noise, seed=dpm_seed)
    if tiled:
        check_pixel_tiles(s.tile_size, s.tile_stride)
        extra.update(tile_size=sampler_tile(s.tile_size), tile_stride=sampler_stride(s.tile_stride),
                     tile_batch_size=s.tile_batch_size)
    return fn(denoiser, noise, sigmas, cond, uncond, hint, x_center, guidance=s.guidance(), noise_source=noise_source,
              callbacks=callbacks, **extra)


def sample_batch(model, hints: torch.Tensor, positive: dict, negative: dict, s: RestoreSettings,
                 callbacks: Any = None, x_center: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`sample` for every image of a batch of control latents, one at a time (image i: seed + i), with
    ``positive`` holding 1 prompt, one per image, one per tile or one per tile per image."""
    check_values(hints, "control_latent")
    if x_center is not None:
        check_values(x_center, "x_center")
    s = validate(s)
    b, _, lh, lw = hints.shape
    tiled = wants_tiles(s, _padded(lh) * LATENT_SCALE, _padded(lw) * LATENT_SCALE)
    tiles = tile_count(s, lh, lw) if tiled else None
    how = cond_plan(positive["crossattn"].shape[0], b, tiles)
    uncond = _row(negative, 0)
    out = []
    for i in range(b):
        si = replace(s, seed=seed_of(s.seed, i))
        xc = None if x_center is None else x_center[i:i + 1]
        out.append(sample(model, hints[i:i + 1], cond_for_image(positive, how, i, tiles), uncond, si,
                          _Part(callbacks, i, b), x_center=xc).cpu())
    return torch.cat(out)


# ---- the whole restoration -------------------------------------------------------------------------------

def restore_tensor(x: torch.Tensor, model, settings: RestoreSettings, cond=None, uncond: dict | None = None,
                   captions: Sequence[str] | None = None, noise_source: NoiseSource | None = None,
                   callbacks: Any = None) -> torch.Tensor:
    """Official ``batchify_sample`` on ``x`` in [-1, 1] ``[B, 3, H, W]`` (H, W multiples of 64, one generator for
    the batch); returns the colour-fixed samples in about [-1, 1], not clamped. Without ``cond``/``uncond`` the
    prompts are ``caption + positive_prompt`` per image (``captions``: None or one per image)."""
    s = validate(settings)
    generator = torch.Generator().manual_seed(seed_of(s.seed, 0))
    quiet = _Part(callbacks, quiet=True)
    vae, device = _vae(model, callbacks, x.shape[-2], x.shape[-1], s)
    tiling = vae_tiling(s)
    with oom_advice("the first stage (VAE)", x.shape[-2], x.shape[-1], s.tiled_vae), torch.no_grad():
        z_lq = vae.encode_lq(x.to(device), tiling=tiling, callbacks=quiet)
        x_stage1 = vae.decode(z_lq, tiling=tiling, callbacks=quiet)
    if cond is None or uncond is None:
        texts = [join_prompt(c, s.positive_prompt, s.caption_mode) for c in (captions or [""] * x.shape[0])]
        cond, uncond = encode_texts(model, texts, callbacks), encode_texts(model, [s.negative_prompt], callbacks)
    latent = sample(model, z_lq, cond, uncond, s, callbacks, stage1=x_stage1, noise_source=noise_source,
                    generator=generator)
    vae, device = _vae(model, callbacks, x.shape[-2], x.shape[-1], s)
    with oom_advice("decoding (VAE)", x.shape[-2], x.shape[-1], s.tiled_vae), torch.no_grad():
        samples = vae.decode(latent.to(device), tiling=tiling, callbacks=quiet)
    return color_fix(samples, x_stage1.to(samples.device), s.color_fix)


def restore(images: torch.Tensor, model, settings: RestoreSettings | None = None, callbacks: Any = None,
            captions: Sequence[str] = ()) -> torch.Tensor:
    """Restore images [B,3,H,W] in 0..1, one at a time (image i: seed + i): returns [B,3,round(H*upscale_by),
    round(W*upscale_by)] in 0..1 (float32, CPU).

    ``captions``: none, one for all, one per image, or one per sampler tile (per image: B x tiles, image-major);
    an empty caption means "no caption" for its image or tile (the positive prompt alone).
    """
    s = validate(settings or RestoreSettings())
    check_images(images)
    b, _, h, w = images.shape
    p = plan(s, h, w)
    tiled = wants_tiles(s, *p.internal)
    tiles = tile_count(s, p.internal[0] // LATENT_SCALE, p.internal[1] // LATENT_SCALE) if tiled else None
    texts = [join_prompt(c, s.positive_prompt, s.caption_mode) for c in captions] or [s.positive_prompt]
    how = cond_plan(len(texts), b, tiles)
    cond_all = encode_texts(model, texts, callbacks)
    uncond = encode_texts(model, [s.negative_prompt], callbacks)
    out = []
    for i in range(b):
        notify(callbacks, "check_interrupt")
        x = fit(images[i:i + 1].float(), p).clamp(0, 1) * 2 - 1
        cond = cond_for_image(cond_all, how, i, tiles)
        y = restore_tensor(x, model, replace(s, seed=seed_of(s.seed, i), tiling="on" if tiled else "off"),
                           cond=cond, uncond=uncond, callbacks=_Part(callbacks, i, b))
        out.append(unfit(((y.float().cpu() + 1) / 2), p).clamp(0, 1))
    return torch.cat(out)


def cut_tiles(images: torch.Tensor, s: RestoreSettings) -> tuple[torch.Tensor, list[tuple[int, int, int, int]],
                                                                  SizePlan]:
    """The sampler's tile grid over images [B,3,H,W] sized as the engine sizes them (``upscale_by``,
    ``min_short_side``, padding to the internal size): ``(tiles [B*T,3,th,tw] image-major, windows in internal
    image pixels, plan)`` -- what a per-tile captioner must caption, in the order per-tile prompts are used."""
    check_images(images)
    p = plan(s, images.shape[-2], images.shape[-1])
    x = fit(images.float(), p).clamp(0, 1)
    windows = image_windows(p.internal[0], p.internal[1], s.tile_size, s.tile_stride)
    tiles = torch.stack([x[:, :, h0:h1, w0:w1] for h0, h1, w0, w1 in windows], 1).flatten(0, 1)
    return tiles, windows, p
