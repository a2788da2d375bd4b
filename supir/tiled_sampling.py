"""Tiled diffusion (official TiledRestoreEDMSampler / TiledRestoreDPMPP2MSampler semantics, made robust).

Every step runs the single-step update of the plain sampler on every latent window of ``tile_windows`` (all
windows see the latent from *before* the step), then blends the results with a gaussian weight map:
``x = sum_w W * step(x[w]) / sum_w W``. One whole-latent noise field is drawn per step and cut per window.

Beyond the reference: latents smaller than a tile (the window shrinks to the latent), sizes off the stride
grid and any aspect ratio work; ``tile_batch_size`` windows share one network call (same result as one at a
time); ``cond`` may be a list with one conditioning per window (row-major window order), e.g. per-tile
captions. The caller's tensors are never modified.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .callbacks import notify
from .samplers import (Denoiser, NoiseSource, _per_batch, brownian_noise, dpmpp_2m_sde_step, edm_step,
                       gaussian_noise, rows)
from .schedules import Guidance, churn_gamma
from .tiles import tile_windows

Window = tuple[int, int, int, int]


def gaussian_tile_weights(height: int, width: int) -> torch.Tensor:
    """Float64 ``[height, width]`` blend weights: a gaussian of std 0.1 * size per axis, centred at
    ``height / 2`` on rows but ``(width - 1) / 2`` on columns (the reference's asymmetric centres)."""
    var = 0.01

    def g(size: int, mid: float) -> torch.Tensor:
        v = torch.arange(size, dtype=torch.float64)
        return torch.exp(-(v - mid) * (v - mid) / (size * size) / (2 * var)) / math.sqrt(2 * math.pi * var)

    return torch.outer(g(height, height / 2), g(width, (width - 1) / 2))


def _cut(t: torch.Tensor, w: Window) -> torch.Tensor:
    return t[:, :, w[0]:w[1], w[2]:w[3]]


def blend_tiles(step: Callable[..., dict], fields: dict, windows: list[Window], conds: list[dict],
                uncond: dict, tile_batch_size: int = 1) -> dict:
    """Run ``step(tiles, cond, uncond) -> {name: tensor}`` on groups of windows and blend every output.

    ``fields`` are whole-latent tensors [B, C, H, W] (or None) cut per window and stacked window-major
    (``len(group) * B`` rows); ``conds[j]`` is window j's conditioning.
    """
    ref = fields["x"]
    b = ref.shape[0]
    weights = gaussian_tile_weights(windows[0][1] - windows[0][0], windows[0][3] - windows[0][2])
    weights = weights.to(ref.device, torch.float32 if ref.device.type == "mps" else torch.float64)
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros_like(ref)
    for start in range(0, len(windows), max(1, tile_batch_size)):
        group = windows[start:start + max(1, tile_batch_size)]
        tiles = {k: (torch.cat([_cut(v, w) for w in group]) if v is not None else None) for k, v in fields.items()}
        group_conds = [rows(conds[start + j], b) for j in range(len(group))]
        cond = {k: torch.cat([c[k] for c in group_conds]) for k in group_conds[0]}
        unc = rows(uncond, b)
        unc = {k: torch.cat([v] * len(group)) for k, v in unc.items()}
        out = step(tiles, cond, unc)
        for name, value in out.items():
            acc = sums.setdefault(name, torch.zeros_like(ref))
            for j, w in enumerate(group):
                _cut(acc, w).add_(value[j * b:(j + 1) * b] * weights)
        for w in group:
            _cut(count, w).add_(weights.expand_as(_cut(count, w)))
    return {name: acc / count for name, acc in sums.items()}


def _windows_and_conds(x: torch.Tensor, cond, tile_size: int, tile_stride: int) -> tuple[list[Window], list[dict]]:
    windows = tile_windows(x.shape[2], x.shape[3], tile_size, tile_stride)
    if isinstance(cond, (list, tuple)):
        if len(cond) != len(windows):
            raise ValueError(f"per-tile conditioning has {len(cond)} entries but the latent "
                             f"{x.shape[2]}x{x.shape[3]} has {len(windows)} tiles (tile {tile_size}, stride {tile_stride})")
        return windows, list(cond)
    return windows, [cond] * len(windows)


def tiled_restore_edm_sample(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, cond, uncond: dict,
                             hint: torch.Tensor, x_center: torch.Tensor | None = None,
                             guidance: Guidance | None = None, s_churn: float = 0.0, s_noise: float = 1.0,
                             tile_size: int = 128, tile_stride: int = 64, tile_batch_size: int = 1,
                             noise_source: NoiseSource | None = None, callbacks=None) -> torch.Tensor:
    """TiledRestoreEDMSampler: RestoreEDM with every step run per window and blended (latent-pixel tiles)."""
    g = guidance or Guidance()
    noise_source = noise_source or gaussian_noise()
    windows, conds = _windows_and_conds(noise, cond, tile_size, tile_stride)
    n = len(sigmas) - 1
    gamma = churn_gamma(s_churn, n)
    at = _per_batch(sigmas, noise)
    x = noise.float() * torch.sqrt(1.0 + at(0)[:1] ** 2)
    for i in range(n):
        notify(callbacks, "check_interrupt")
        eps = noise_source(x, at(i), at(i + 1))  # drawn every step, like the reference

        def step(t: dict, c: dict, u: dict) -> dict:
            m = t["x"].shape[0]
            sig, nxt = at(i)[:1].expand(m), at(i + 1)[:1].expand(m)
            x_t, den = edm_step(denoiser, t["x"], sig, nxt, gamma, s_noise, t["eps"], c, u, t["hint"],
                                t["x_center"], g)
            return {"x": x_t, "denoised": den}

        out = blend_tiles(step, {"x": x, "eps": eps, "hint": hint, "x_center": x_center}, windows, conds, uncond,
                          tile_batch_size)
        x = out["x"]
        notify(callbacks, "step_done", i, x)
        notify(callbacks, "progress", i + 1, n, preview=out["denoised"])
    return x


def tiled_restore_dpmpp_2m_sde_sample(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, cond,
                                      uncond: dict, hint: torch.Tensor, x_center: torch.Tensor | None = None,
                                      guidance: Guidance | None = None, eta: float = 1.0, s_noise: float = 1.0,
                                      tile_size: int = 128, tile_stride: int = 64, tile_batch_size: int = 1,
                                      noise_source: NoiseSource | None = None, seed: int = 0,
                                      callbacks=None) -> torch.Tensor:
    """TiledRestoreDPMPP2MSampler: DPM++ 2M SDE per window; x and the previous denoised are both blended."""
    g = guidance or Guidance()
    windows, conds = _windows_and_conds(noise, cond, tile_size, tile_stride)
    n = len(sigmas) - 1
    at = _per_batch(sigmas, noise)
    if noise_source is None:
        noise_source = brownian_noise(noise, sigmas[n - 1].item(), sigmas[0].item(), seed)
    x = noise.float() * torch.sqrt(1.0 + at(0)[:1] ** 2)
    old, h_last = None, None
    for i in range(n):
        notify(callbacks, "check_interrupt")
        eps = noise_source(x, at(i), at(i + 1)) if i > 0 and sigmas[i + 1] > 0 else None

        def step(t: dict, c: dict, u: dict) -> dict:
            m = t["x"].shape[0]
            sig, nxt = at(i)[:1].expand(m), at(i + 1)[:1].expand(m)
            x_t, den = dpmpp_2m_sde_step(denoiser, t["x"], sig, nxt, t["old"], h_last, eta, s_noise, t["eps"],
                                         c, u, t["hint"], t["x_center"], g)
            return {"x": x_t, "denoised": den}

        out = blend_tiles(step, {"x": x, "eps": eps, "hint": hint, "x_center": x_center, "old": old}, windows,
                          conds, uncond, tile_batch_size)
        x, old = out["x"], out["denoised"]
        if sigmas[i + 1] > 0:
            h_last = (at(i)[:1].log() - at(i + 1)[:1].log()).view(-1, 1, 1, 1)
        notify(callbacks, "step_done", i, x)
        notify(callbacks, "progress", i + 1, n, preview=old)
    return x
