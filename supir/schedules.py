"""Noise-level schedules and the per-step guidance knobs of the SUPIR samplers.

* ``edm_sigmas``: the official discretisation: ``floor(linspace(999, 0, n, endpoint=False))`` indices into the
  1000 DDPM sigmas, in decreasing order, followed by 0.
* ``karras_sigmas``: the Karras et al. (rho = 7) schedule of the DPM++ 2M SDE sampler, followed by 0.
* ``churn_gamma``: EDM churn ``min(s_churn / n, sqrt(2) - 1)``.
* ``cfg_at`` / ``control_scale_at``: the linear CFG and linear control-scale schedules, both lerps on
  ``sigma / sigma_max`` (start value at ``sigma_max``, end value at 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SIGMA_MAX = 14.6146  # hard-coded by the official guiders and samplers
NUM_TIMESTEPS = 1000


@dataclass
class Guidance:
    """Per-step knobs shared by every sampler.

    ``cfg_scale`` is the classifier-free guidance at sigma 0; with ``cfg_scale_start`` set the scale moves
    linearly from it (at ``sigma_max``) to ``cfg_scale`` (LinearCFG; ``None`` = VanillaCFG).
    ``control_scale`` likewise with ``control_scale_start`` (``None`` = constant).
    ``restore_cfg`` > 0 turns on restoration guidance towards ``x_center`` for steps whose next sigma is
    above ``restore_cfg_s_tmin``.
    """

    cfg_scale: float = 4.0
    cfg_scale_start: float | None = None
    control_scale: float = 1.0
    control_scale_start: float | None = None
    restore_cfg: float = -1.0
    restore_cfg_s_tmin: float = 0.05
    sigma_max: float = SIGMA_MAX


def edm_sigmas(table: torch.Tensor, num_steps: int) -> torch.Tensor:
    """``num_steps + 1`` decreasing sigmas picked from the ascending 1000-entry ``table``, then 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    last = table.shape[0] - 1
    idx = np.linspace(last, 0, num_steps, endpoint=False).astype(int)
    picked = table.detach().cpu().float()[torch.from_numpy(idx.copy())]
    return torch.cat([picked, picked.new_zeros(1)])


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. schedule: ``num_steps`` sigmas from ``sigma_max`` down to ``sigma_min``, then 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def dpmpp_sigmas(table: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The official DPM++ schedule: Karras between the smallest and largest discrete sigma of ``edm_sigmas``."""
    discrete = edm_sigmas(table, num_steps)
    return karras_sigmas(num_steps, discrete[-2].item(), discrete[0].item())


def churn_gamma(s_churn: float, num_steps: int) -> float:
    """EDM churn of every step (``s_tmin = 0``, ``s_tmax = inf`` as in the official pipeline)."""
    return min(s_churn / num_steps, 2 ** 0.5 - 1)


def lerp_on_sigma(sigma, start: float, end: float, sigma_max: float = SIGMA_MAX):
    """``(start - end) * sigma / sigma_max + end``: ``start`` at ``sigma_max``, ``end`` at 0."""
    return (start - end) * sigma / sigma_max + end


def cfg_at(sigma: torch.Tensor, g: Guidance) -> torch.Tensor:
    """Classifier-free guidance scale per batch element at (churned) ``sigma``."""
    start = g.cfg_scale if g.cfg_scale_start is None else g.cfg_scale_start
    return lerp_on_sigma(sigma, start, g.cfg_scale, g.sigma_max)


def control_scale_at(sigma: float, g: Guidance) -> float:
    """Control scale at the (un-churned) ``sigma`` of the step (a plain float, like the official)."""
    if g.control_scale_start is None:
        return float(g.control_scale)
    return (float(sigma) / g.sigma_max) * (g.control_scale_start - g.control_scale) + g.control_scale


def restoration_weight(sigma: torch.Tensor, g: Guidance) -> torch.Tensor:
    """``(sigma / sigma_max) ** restore_cfg``: how far the denoised estimate moves towards ``x_center``."""
    return (sigma / g.sigma_max) ** g.restore_cfg
