"""SUPIR's restoration-guided samplers: RestoreEDM (the official default) and DPM++ 2M SDE.

Both are written against a denoiser callable ``denoiser(x, sigma, cond, hint, control_scale) -> denoised``
(``SupirDenoiser``) with ``cond = {"crossattn": [B,77,C], "vector": [B,adm]}`` and ``hint`` the LQ latent.
Every step evaluates classifier-free guidance as one batch ``[uncond rows; cond rows]``, then optionally pulls
the denoised estimate towards ``x_center`` (restoration guidance), then moves ``x``.

Randomness comes only from the caller: ``noise`` (the unscaled initial draw) and ``noise_source(x, sigma,
sigma_next) -> standard normal like x`` for per-step draws (``gaussian_noise(generator)``, ``replay_noise(draws)``
or ``brownian_noise(...)``). ``callbacks`` (or ``None``) gets ``check_interrupt()`` before every step and
``progress(step, total, preview=denoised)`` after it (and ``step_done(i, x)`` if it has one, for tracing).

Official quirks kept on purpose: CFG sees the churned ``sigma_hat`` while restoration guidance and the linear
control scale see the un-churned ``sigma``; the Euler step uses ``sigma_hat`` unquantised; the DPM++ sampler
adds no noise on its first step. Unlike the reference, the caller's tensors are never modified in place.

Deliberately different: the official RestoreDPMPP2MSampler ignores restoration guidance and the linear control
scale (its ``denoise`` passes neither ``x_center`` nor a schedule); here DPM++ applies both like RestoreEDM, so
``restore_cfg`` and ``control_scale_start`` mean the same with either sampler (the node tooltips say so).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch

from .callbacks import notify
from .schedules import Guidance, cfg_at, churn_gamma, control_scale_at, restoration_weight

log = logging.getLogger(__name__)

Denoiser = Callable[..., torch.Tensor]
NoiseSource = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---- noise sources ------------------------------------------------------------------------------

def gaussian_noise(generator: torch.Generator | None = None) -> NoiseSource:
    """Standard-normal draws from a CPU ``generator`` (reproducible across devices), moved to x's device."""

    def draw(x: torch.Tensor, sigma=None, sigma_next=None) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)

    return draw


def replay_noise(draws: Iterable[torch.Tensor]) -> NoiseSource:
    """Hand out recorded draws in order (parity cases); fails clearly when they run out."""
    it = iter(draws)

    def draw(x: torch.Tensor, sigma=None, sigma_next=None) -> torch.Tensor:
        try:
            eps = next(it)
        except StopIteration:
            raise RuntimeError("replay_noise: the sampler asked for more noise draws than were recorded") from None
        return eps.to(x.device, x.dtype).reshape(x.shape)

    return draw


def brownian_noise(like: torch.Tensor, sigma_min: float, sigma_max: float, seed: int) -> NoiseSource:
    """Brownian-tree noise (k-diffusion's ``BrownianTreeNoiseSampler``: increments of one Brownian motion
    over sigma, normalised to unit variance), via ``torchsde``. Without torchsde: plain gaussian draws
    from a generator seeded with ``seed`` (logged)."""
    try:
        import torchsde
    except ImportError:
        log.warning("torchsde is not installed: DPM++ 2M SDE uses independent gaussian noise instead of a Brownian tree")
        return gaussian_noise(torch.Generator().manual_seed(seed))
    lo, hi = float(sigma_min), float(sigma_max)
    w0 = torch.zeros(like.shape, dtype=torch.float32)
    # a hair wider than [lo, hi]: torchsde rounds its end points and would warn at the schedule's ends
    tree = torchsde.BrownianTree(lo * (1 - 1e-5), w0, hi * (1 + 1e-5), entropy=seed)

    def draw(x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
        a, b = float(sigma[0] if torch.is_tensor(sigma) and sigma.ndim else sigma), float(
            sigma_next[0] if torch.is_tensor(sigma_next) and sigma_next.ndim else sigma_next)
        t0, t1, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        w = tree(t0, t1) * sign
        return (w / abs(t1 - t0) ** 0.5).to(x.device, x.dtype)

    return draw


# ---- one guided network evaluation ---------------------------------------------------------------

def rows(cond: dict, b: int) -> dict:
    """Conditioning with ``b`` rows (a single row is repeated for every sample)."""
    return {k: (v.expand(b, *v.shape[1:]) if v.shape[0] == 1 and b > 1 else v) for k, v in cond.items()}


def _cat_rows(a: dict, b: dict, n: int) -> dict:
    a, b = rows(a, n), rows(b, n)
    return {k: torch.cat([a[k], b[k]]) for k in b}


def guided_denoise(denoiser: Denoiser, x: torch.Tensor, sigma_hat: torch.Tensor, sigma: torch.Tensor,
                   cond: dict, uncond: dict, hint: torch.Tensor, x_center: torch.Tensor | None,
                   sigma_next: torch.Tensor, g: Guidance) -> torch.Tensor:
    """CFG-combined denoised estimate at ``sigma_hat``, with restoration guidance applied.

    ``sigma_hat``, ``sigma``, ``sigma_next`` are float32 tensors of shape [B] (equal entries).
    """
    scale = control_scale_at(sigma[0].item(), g)
    both = denoiser(torch.cat([x, x]), torch.cat([sigma_hat, sigma_hat]), _cat_rows(uncond, cond, x.shape[0]),
                    torch.cat([hint, hint]), scale)
    d_u, d_c = both.float().chunk(2)
    denoised = d_u + cfg_at(sigma_hat, g).view(-1, 1, 1, 1) * (d_c - d_u)
    if x_center is not None and g.restore_cfg > 0 and sigma_next[0].item() > g.restore_cfg_s_tmin:
        denoised = denoised - (denoised - x_center) * restoration_weight(sigma.view(-1, 1, 1, 1), g)
    return denoised


# ---- single steps (shared with the tiled sampler) ---------------------------------------------

def edm_step(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, gamma: float,
             s_noise: float, eps: torch.Tensor | None, cond: dict, uncond: dict, hint: torch.Tensor,
             x_center: torch.Tensor | None, g: Guidance) -> tuple[torch.Tensor, torch.Tensor]:
    """One RestoreEDM step (churn, guided denoise, Euler); returns ``(x_next, denoised)``."""
    sigma_hat = sigma * (gamma + 1.0)
    if gamma > 0:
        x = x + (eps * s_noise) * (sigma_hat ** 2 - sigma ** 2).view(-1, 1, 1, 1) ** 0.5
    denoised = guided_denoise(denoiser, x, sigma_hat, sigma, cond, uncond, hint, x_center, sigma_next, g)
    d = (x - denoised) / sigma_hat.view(-1, 1, 1, 1)
    return x + (sigma_next - sigma_hat).view(-1, 1, 1, 1) * d, denoised


def dpmpp_2m_sde_step(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                      old_denoised: torch.Tensor | None, h_last: float | None, eta: float, s_noise: float,
                      eps: torch.Tensor | None, cond: dict, uncond: dict, hint: torch.Tensor,
                      x_center: torch.Tensor | None, g: Guidance) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) SDE step (midpoint variant); returns ``(x_next, denoised)``.

    With t = -log(sigma), h = t_next - t: x' = (sigma_next/sigma) e^{-eta h} x - expm1(-h - eta h) D', where
    D' = D on the first step and (1 + 1/2r) D - (1/2r) D_old after it (r = h_last / h), plus
    eps * sigma_next * sqrt(-expm1(-2 eta h)) * s_noise when ``eps`` is given. sigma_next = 0 gives x' = D.
    """
    denoised = guided_denoise(denoiser, x, sigma, sigma, cond, uncond, hint, x_center, sigma_next, g)
    if sigma_next[0].item() == 0:
        return denoised, denoised
    h = (sigma.log() - sigma_next.log()).view(-1, 1, 1, 1)
    eta_h = eta * h
    decay = (sigma_next / sigma).view(-1, 1, 1, 1) * (-eta_h).exp()
    gain = (-h - eta_h).expm1()
    if old_denoised is None:
        return decay * x - gain * denoised, denoised
    r = h_last / h
    mixed = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    x = decay * x - gain * mixed
    if eta and eps is not None:
        x = x + eps * sigma_next.view(-1, 1, 1, 1) * (-2 * eta_h).expm1().neg().sqrt() * s_noise
    return x, denoised


def _per_batch(sigmas: torch.Tensor, x: torch.Tensor) -> Callable[[int], torch.Tensor]:
    sig = sigmas.to(x.device, torch.float32)
    ones = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    return lambda i: ones * sig[i]


# ---- samplers ---------------------------------------------------------------------------------

def restore_edm_sample(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, cond: dict, uncond: dict,
                       hint: torch.Tensor, x_center: torch.Tensor | None = None, guidance: Guidance | None = None,
                       s_churn: float = 0.0, s_noise: float = 1.0, noise_source: NoiseSource | None = None,
                       callbacks=None) -> torch.Tensor:
    """RestoreEDMSampler from unscaled ``noise`` over ``sigmas`` (``edm_sigmas``); returns the final latent."""
    g = guidance or Guidance()
    noise_source = noise_source or gaussian_noise()
    n = len(sigmas) - 1
    gamma = churn_gamma(s_churn, n)
    at = _per_batch(sigmas, noise)
    x = noise.float() * torch.sqrt(1.0 + at(0)[:1] ** 2)
    for i in range(n):
        notify(callbacks, "check_interrupt")
        eps = noise_source(x, at(i), at(i + 1)) if gamma > 0 else None
        x, denoised = edm_step(denoiser, x, at(i), at(i + 1), gamma, s_noise, eps, cond, uncond, hint, x_center, g)
        notify(callbacks, "step_done", i, x)
        notify(callbacks, "progress", i + 1, n, preview=denoised)
    return x


def restore_dpmpp_2m_sde_sample(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, cond: dict,
                                uncond: dict, hint: torch.Tensor, x_center: torch.Tensor | None = None,
                                guidance: Guidance | None = None, eta: float = 1.0, s_noise: float = 1.0,
                                noise_source: NoiseSource | None = None, seed: int = 0,
                                callbacks=None) -> torch.Tensor:
    """RestoreDPMPP2M SDE over ``sigmas`` (``dpmpp_sigmas``); per-step noise from ``noise_source`` or a Brownian
    tree seeded with ``seed``. Restoration guidance applies when ``guidance.restore_cfg > 0``."""
    g = guidance or Guidance()
    n = len(sigmas) - 1
    at = _per_batch(sigmas, noise)
    if noise_source is None:
        noise_source = brownian_noise(noise, sigmas[n - 1].item(), sigmas[0].item(), seed)
    x = noise.float() * torch.sqrt(1.0 + at(0)[:1] ** 2)
    old, h_last = None, None
    for i in range(n):
        notify(callbacks, "check_interrupt")
        eps = noise_source(x, at(i), at(i + 1)) if i > 0 and sigmas[i + 1] > 0 else None
        x, denoised = dpmpp_2m_sde_step(denoiser, x, at(i), at(i + 1), old, h_last, eta, s_noise, eps,
                                        cond, uncond, hint, x_center, g)
        if sigmas[i + 1] > 0:
            h_last = (at(i).log() - at(i + 1).log()).view(-1, 1, 1, 1)
        old = denoised
        notify(callbacks, "step_done", i, x)
        notify(callbacks, "progress", i + 1, n, preview=denoised)
    return x
