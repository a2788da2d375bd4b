"""SUPIR restore: first stage -> conditioning -> sampling -> decode -> colour fix (official ``batchify_sample``).

``restore(images, model, settings)`` is what the nodes and the command line call: images ``[B, 3, H, W]`` in
[0, 1] go in, images of exactly ``round(H * upscale) x round(W * upscale)`` in [0, 1] come out.
``restore_tensor`` is the official core on [-1, 1] images whose size the networks accept (the parity case).

Size handling (``plan_sizes``): scale by ``upscale``; optionally raise the short side to ``min_size`` (the
official 1024 rule); then bring each side to a multiple of ``size_multiple`` (64) by padding (replicate pad
at the bottom/right, cropped off afterwards; default) or by resizing to the nearest multiple (official);
the result is resized back to the output size with bicubic interpolation and clamped.

Randomness: one CPU generator seeded with ``settings.seed`` makes, in the official order, the posterior
draw of ``x_center``, the initial noise and the per-step draws (the DPM++ sampler's Brownian tree is seeded
from it), so a seed reproduces on every device. Tests pass ``noise_source`` to replay recorded draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .colorfix import color_fix
from .samplers import NoiseSource, gaussian_noise, restore_dpmpp_2m_sde_sample, restore_edm_sample
from .schedules import Guidance, dpmpp_sigmas, edm_sigmas
from .tiled_sampling import tiled_restore_dpmpp_2m_sde_sample, tiled_restore_edm_sample
from .tiles import tile_windows

DEFAULT_A_PROMPT = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed photo - "
    "realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, skin pore detailing, "
    "hyper sharpness, perfect without deformations.")
DEFAULT_N_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, "
    "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
    "jpeg artifacts, deformed, lowres, over-smooth")
SAMPLERS = ("edm", "dpmpp_2m_sde")
LATENT_SCALE = 8


@dataclass
class RestoreSettings:
    """Every knob of a restore run (defaults: official ``test.py`` with the GUI's s_noise)."""

    # sizes
    upscale: float = 1.0
    min_size: int | None = None  # official: 1024 (short side raised to at least this while sampling)
    size_multiple: int = 64
    fit: str = "pad"  # "pad" (exact, cropped back) or "resize" (official: nearest multiple)
    # sampler
    sampler: str = "edm"  # "edm" (RestoreEDM) or "dpmpp_2m_sde"
    steps: int = 50
    s_churn: float = 5.0
    s_noise: float = 1.003
    eta: float = 1.0
    cfg_scale: float = 4.0
    cfg_scale_start: float | None = 1.0  # linear CFG from this (sigma_max) to cfg_scale; None = constant
    control_scale: float = 1.0
    control_scale_start: float | None = None  # linear control scale; None = constant
    restore_cfg: float = -1.0  # restoration guidance strength (s_stage1); <= 0 = off
    restore_cfg_s_tmin: float = 0.05
    seed: int = 1234
    # tiled diffusion (latent pixels)
    tiled: bool = False
    tile_size: int = 128
    tile_stride: int = 64
    tile_batch_size: int = 1
    # first stage (a supir.vae.VAETiling, or None for untiled)
    vae_tiling: Any = None
    # text
    prompt: str = ""
    a_prompt: str = DEFAULT_A_PROMPT
    n_prompt: str = DEFAULT_N_PROMPT
    # output
    color_fix: str = "Wavelet"

    def guidance(self) -> Guidance:
        return Guidance(cfg_scale=self.cfg_scale, cfg_scale_start=self.cfg_scale_start,
                        control_scale=self.control_scale, control_scale_start=self.control_scale_start,
                        restore_cfg=self.restore_cfg, restore_cfg_s_tmin=self.restore_cfg_s_tmin)


@dataclass
class SizePlan:
    output: tuple[int, int]  # what restore returns: round(H * upscale), round(W * upscale)
    work: tuple[int, int]  # the image size before fitting to the multiple (min_size applied)
    internal: tuple[int, int]  # what the networks see (multiples of size_multiple)
    padded: bool  # internal = work padded at bottom/right (else resized)


def _round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def plan_sizes(height: int, width: int, upscale: float = 1.0, min_size: int | None = None,
               size_multiple: int = 64, fit: str = "pad") -> SizePlan:
    """Output, working and internal sizes for an input of ``height x width`` pixels."""
    if upscale <= 0:
        raise ValueError(f"upscale must be positive, got {upscale}")
    if fit not in ("pad", "resize"):
        raise ValueError(f"fit must be 'pad' or 'resize', not {fit!r}")
    out = (max(1, _round_half_up(height * upscale)), max(1, _round_half_up(width * upscale)))
    scale = upscale
    if min_size and min(height, width) * scale < min_size:
        scale = min_size / min(height, width)
    work = (max(1, _round_half_up(height * scale)), max(1, _round_half_up(width * scale)))
    m = size_multiple
    if fit == "pad":
        internal = tuple(max(m, math.ceil(s / m) * m) for s in work)
    else:
        internal = tuple(max(m, _round_half_up(s / m) * m) for s in work)
    return SizePlan(out, work, internal, fit == "pad")


def latent_tile_windows(height: int, width: int, settings: RestoreSettings) -> list[tuple[int, int, int, int]]:
    """The sampler's tile windows (in *internal image pixels*) for an input image of ``height x width``:
    what a per-tile captioner should caption, in the order ``cond`` lists expect."""
    plan = plan_sizes(height, width, settings.upscale, settings.min_size, settings.size_multiple, settings.fit)
    h, w = plan.internal
    wins = tile_windows(h // LATENT_SCALE, w // LATENT_SCALE, settings.tile_size, settings.tile_stride)
    return [tuple(v * LATENT_SCALE for v in win) for win in wins]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=down)


def _fit(x: torch.Tensor, plan: SizePlan) -> torch.Tensor:
    x = _resize(x, plan.work)
    if not plan.padded:
        return _resize(x, plan.internal)
    ph, pw = plan.internal[0] - plan.work[0], plan.internal[1] - plan.work[1]
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


# ---- conditioning ---------------------------------------------------------------------------------

def text_conditioning(model, settings: RestoreSettings, batch: int, captions=None):
    """``(cond, uncond)`` from the model's text encoders: positive = caption + a_prompt (no separator, as
    the official), negative = n_prompt. ``captions``: None, one string per image, or per image a list with
    one string per tile (then ``cond`` is a list with one conditioning per tile)."""
    if model.text is None:
        raise ValueError("this SUPIR model has no text encoders: pass cond/uncond (e.g. from a CLIP node)")
    if captions is None:
        captions = [settings.prompt] * batch
    if isinstance(captions, str):
        captions = [captions] * batch
    if len(captions) == 1 and batch > 1:
        captions = list(captions) * batch
    if len(captions) != batch:
        raise ValueError(f"{len(captions)} captions for {batch} images")
    uncond = model.text.encode([settings.n_prompt] * batch)
    if all(isinstance(c, str) for c in captions):
        return model.text.encode([c + settings.a_prompt for c in captions]), uncond
    tiles = {len(c) for c in captions}
    if len(tiles) != 1:
        raise ValueError("per-tile captions: every image needs the same number of tile captions")
    return [model.text.encode([c[j] + settings.a_prompt for c in captions]) for j in range(tiles.pop())], uncond


# ---- the official core ------------------------------------------------------------------------------

def restore_tensor(x: torch.Tensor, model, settings: RestoreSettings, cond=None, uncond: dict | None = None,
                   captions=None, noise_source: NoiseSource | None = None, callbacks=None) -> torch.Tensor:
    """Official ``batchify_sample`` on ``x`` in [-1, 1] ``[B, 3, H, W]`` (H, W as the networks need them);
    returns the colour-fixed samples in about [-1, 1], not clamped."""
    if settings.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {settings.sampler!r}; expected one of {SAMPLERS}")
    generator = torch.Generator().manual_seed(int(settings.seed))
    explicit_noise = noise_source is not None
    noise_source = noise_source or gaussian_noise(generator)
    vae, tiling = model.vae, settings.vae_tiling
    with torch.no_grad():
        z_lq = vae.encode_lq(x, tiling=tiling, callbacks=callbacks)
        x_stage1 = vae.decode(z_lq, tiling=tiling, callbacks=callbacks)
        x_center = vae.encode(x_stage1, noise=noise_source(z_lq, None, None), tiling=tiling, callbacks=callbacks)
        if cond is None or uncond is None:
            cond, uncond = text_conditioning(model, settings, x.shape[0], captions)
        noise = noise_source(z_lq, None, None)
        latent = _sample(model.denoiser, noise, cond, uncond, z_lq, x_center, settings,
                         noise_source if explicit_noise or settings.sampler == "edm" else None,
                         int(torch.randint(0, 2 ** 62, (), generator=generator)), callbacks)
        samples = vae.decode(latent, tiling=tiling, callbacks=callbacks)
    return color_fix(samples, x_stage1, settings.color_fix)


def _sample(denoiser, noise, cond, uncond, hint, x_center, s: RestoreSettings, noise_source, seed, callbacks):
    g = s.guidance()
    tiles = dict(tile_size=s.tile_size, tile_stride=s.tile_stride, tile_batch_size=s.tile_batch_size)
    if s.sampler == "edm":
        sigmas = edm_sigmas(denoiser.sigmas, s.steps)
        fn = tiled_restore_edm_sample if s.tiled else restore_edm_sample
        extra = dict(s_churn=s.s_churn, s_noise=s.s_noise)
    else:
        sigmas = dpmpp_sigmas(denoiser.sigmas, s.steps)
        fn = tiled_restore_dpmpp_2m_sde_sample if s.tiled else restore_dpmpp_2m_sde_sample
        extra = dict(eta=s.eta, s_noise=s.s_noise, seed=seed)
    if not s.tiled and isinstance(cond, (list, tuple)):
        raise ValueError("per-tile conditioning needs tiled sampling (settings.tiled = True)")
    if s.tiled:
        extra.update(tiles)
    return fn(denoiser, noise, sigmas, cond, uncond, hint, x_center, guidance=g, noise_source=noise_source,
              callbacks=callbacks, **extra)


# ---- what nodes call ---------------------------------------------------------------------------------

def restore(images: torch.Tensor, model, settings: RestoreSettings | None = None, callbacks=None,
            captions: Sequence[str] | Sequence[Sequence[str]] | None = None, cond=None,
            uncond: dict | None = None) -> torch.Tensor:
    """Restore ``images`` ``[B, 3, H, W]`` in [0, 1]; returns ``[B, 3, round(H*upscale), round(W*upscale)]``
    in [0, 1] (float32, on the images' device)."""
    settings = settings or RestoreSettings()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"restore expects images [B, 3, H, W], got {tuple(images.shape)}")
    plan = plan_sizes(images.shape[2], images.shape[3], settings.upscale, settings.min_size,
                      settings.size_multiple, settings.fit)
    x = _fit(images.float(), plan).clamp(0, 1) * 2 - 1
    y = restore_tensor(x, model, settings, cond=cond, uncond=uncond, captions=captions, callbacks=callbacks)
    y = y.to(images.device)
    if plan.padded:
        y = y[:, :, :plan.work[0], :plan.work[1]]
    y = _resize((y + 1) / 2, plan.output)
    return y.clamp(0, 1)
