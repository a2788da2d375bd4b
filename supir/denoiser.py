"""SUPIR's denoiser (SGM ``DiscreteDenoiserWithControl`` with eps scaling and the legacy DDPM schedule).

``denoised = x - sigma_q * eps(x * c_in, idx)`` where ``sigma`` is snapped to the nearest of 1000
discrete sigmas, ``idx`` is that sigma's index (the UNet's timestep) and ``c_in = 1 / sqrt(sigma_q^2 + 1)``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

NUM_IDX = 1000
LINEAR_START, LINEAR_END = 0.00085, 0.012


def ddpm_sigmas(num: int = NUM_IDX, linear_start: float = LINEAR_START, linear_end: float = LINEAR_END) -> torch.Tensor:
    """The 1000 discrete sigmas, ascending (S_0 ~ 0.029, S_999 ~ 14.6146), float32.

    betas: squared linspace of sqrt(start)..sqrt(end) in float64; abar = cumprod(1 - beta);
    r = (1 - abar) / abar in float64, rounded to float32, square-rooted in float32.
    """
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, num, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas, axis=0)
    ratio = torch.tensor((1.0 - abar) / abar, dtype=torch.float32)
    return ratio ** 0.5


def quantize_sigma(sigma: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest discrete sigma (first on ties), that sigma) per element of ``sigma``."""
    sigma = torch.as_tensor(sigma, dtype=sigmas.dtype, device=sigmas.device)
    idx = (sigma.reshape(1, -1) - sigmas[:, None]).abs().argmin(dim=0).reshape(sigma.shape)
    return idx, sigmas[idx]


class SupirDenoiser:
    """x0 estimate from a noisy latent, given the (float or per-sample) control scale.

    ``network`` is a :class:`~.control.SupirDiffusion` (or any callable with its signature).
    """

    def __init__(self, network: nn.Module, sigmas: torch.Tensor | None = None):
        self.network = network
        self.sigmas = ddpm_sigmas() if sigmas is None else sigmas
        self.sigma_max = float(self.sigmas[-1])
        self.sigma_min = float(self.sigmas[0])

    def quantize(self, sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_sigma(torch.as_tensor(sigma, dtype=torch.float32).cpu(), self.sigmas)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict, hint: torch.Tensor,
                 control_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        idx, sigma_q = self.quantize(sigma)
        sigma_q = sigma_q.to(device=x.device, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        c_in = 1 / (sigma_q ** 2 + 1.0) ** 0.5
        eps = self.network(x * c_in, idx.to(x.device), cond["crossattn"], cond["vector"], hint, control_scale)
        return eps.to(x.dtype) * -sigma_q + x
