"""Parity checks of the SUPIR samplers, tiled sampler, colour fix and restore pipeline.

Networks are loaded through the production loader (``supir.loader.load_supir``) from the case's two weight
files; every random draw of the reference is replayed in order through ``replay_noise``.
"""
from __future__ import annotations

import functools

import torch

from photo_restoration.supir.colorfix import adain, wavelet
from photo_restoration.supir.samplers import replay_noise, restore_edm_sample
from photo_restoration.supir.schedules import Guidance, edm_sigmas
from photo_restoration.supir.tiled_sampling import gaussian_tile_weights, tiled_restore_edm_sample
from photo_restoration.supir.tiles import tile_windows

from .harness import Case, assert_close


@functools.lru_cache(maxsize=2)
def _load(sdxl: str, supir: str, num_head_channels: int):
    from photo_restoration.supir.loader import load_supir

    return load_supir(sdxl, supir, dtype=torch.float32, vae_dtype=torch.float32, device="cpu",
                      num_head_channels=num_head_channels)


def _model(case: Case):
    w = case["weights"]
    heads = int(case["config"]["unet"].get("num_head_channels", 64))  # not visible in the weights
    return _load(str(case.file(w["sdxl_base"])), str(case.file(w["supir"])), heads)


def _atol(case: Case, name: str) -> float:
    return case["outputs"][name]["atol"]


def _draws(case: Case) -> list[torch.Tensor]:
    t = case.tensors()
    return [t[d["tensor"]] for d in case.get("noise_draws", [])]


def _conds(t: dict) -> tuple[dict, dict]:
    cond = {"crossattn": t["input.c_crossattn"], "vector": t["input.c_vector"]}
    uncond = {"crossattn": t["input.uc_crossattn"], "vector": t["input.uc_vector"]}
    return cond, uncond


def _guidance(p: dict) -> Guidance:
    return Guidance(cfg_scale=p["cfg_scale"], cfg_scale_start=p["cfg_scale_start"], control_scale=p["control_scale"],
                    control_scale_start=p["control_scale_start"] if p["use_linear_control_scale"] else None,
                    restore_cfg=p["restore_cfg"], restore_cfg_s_tmin=p["restore_cfg_s_tmin"])


class _Trace:
    def __init__(self):
        self.xs: list[torch.Tensor] = []

    def step_done(self, i: int, x: torch.Tensor) -> None:
        self.xs.append(x.clone())


def check_color_fix(case: Case) -> None:
    t = case.tensors()
    assert_close("wavelet", wavelet(t["input.content"], t["input.style"]), t["output.wavelet"], _atol(case, "wavelet"))
    assert_close("adain", adain(t["input.content"], t["input.style"]), t["output.adain"], _atol(case, "adain"))


def check_restore_edm_sampler(case: Case) -> None:
    t, p = case.tensors(), case["params"]
    model = _model(case)
    sigmas = edm_sigmas(model.denoiser.sigmas, p["num_steps"])
    assert_close("sigmas", sigmas, t["output.sigmas"], _atol(case, "sigmas"))
    cond, uncond = _conds(t)
    noise = t["input.noise"]
    trace = _Trace()
    with torch.no_grad():
        x = restore_edm_sample(model.denoiser, noise, sigmas, cond, uncond, t["input.control"], t["input.x_center"],
                               guidance=_guidance(p), s_churn=p["s_churn"], s_noise=p["s_noise"],
                               noise_source=replay_noise(_draws(case)), callbacks=trace)
    assert torch.equal(noise, t["input.noise"]), "the caller's noise was modified"
    for i, xi in enumerate(trace.xs):
        if f"output.x_after_step_{i}" in t:
            assert_close(f"x_after_step_{i}", xi, t[f"output.x_after_step_{i}"], _atol(case, f"x_after_step_{i}"))
    assert_close("x_final", x, t["output.x_final"], _atol(case, "x_final"))


def check_tiled_restore_edm_sampler(case: Case) -> None:
    t, p = case.tensors(), case["params"]
    model = _model(case)
    tile, stride = p["tile_size"], p["tile_stride"]
    noise = t["input.noise"]
    windows = tile_windows(noise.shape[2], noise.shape[3], tile, stride)
    assert torch.equal(torch.tensor(windows, dtype=torch.int64), t["output.tile_windows"].long()), "tile_windows"
    assert_close("tile_weights", gaussian_tile_weights(tile, tile), t["output.tile_weights"], _atol(case, "tile_weights"))
    sigmas = edm_sigmas(model.denoiser.sigmas, p["num_steps"])
    assert_close("sigmas", sigmas, t["output.sigmas"], _atol(case, "sigmas"))
    cond, uncond = _conds(t)
    with torch.no_grad():
        x = tiled_restore_edm_sample(model.denoiser, noise, sigmas, cond, uncond, t["input.control"],
                                     t["input.x_center"], guidance=_guidance(p), s_churn=p["s_churn"],
                                     s_noise=p["s_noise"], tile_size=tile, tile_stride=stride, tile_batch_size=2,
                                     noise_source=replay_noise(_draws(case)))
    assert_close("x_final", x, t["output.x_final"], _atol(case, "x_final"))


def check_pipeline(case: Case) -> None:
    from photo_restoration.supir.pipeline import RestoreSettings, restore_tensor

    t, p = case.tensors(), case["params"]
    model = _model(case)
    settings = RestoreSettings(
        steps=p["num_steps"], restore_cfg=p["restoration_scale"], s_churn=p["s_churn"], s_noise=p["s_noise"],
        cfg_scale=p["cfg_scale"], cfg_scale_start=p["cfg_scale_start"] if p["use_linear_CFG"] else None,
        control_scale=p["control_scale"],
        control_scale_start=p["control_scale_start"] if p["use_linear_control_scale"] else None,
        color_fix=p["color_fix_type"])
    cond, uncond = _conds(t)
    with torch.no_grad():
        out = restore_tensor(t["input.image"], model, settings, cond=cond, uncond=uncond,
                             noise_source=replay_noise(_draws(case)))
    assert_close("samples", out, t["output.samples"], _atol(case, "samples"))


CHECKS = {
    ("supir", "color_fix"): check_color_fix,
    ("supir", "restore_edm_sampler"): check_restore_edm_sampler,
    ("supir", "tiled_restore_edm_sampler"): check_tiled_restore_edm_sampler,
    ("supir", "pipeline"): check_pipeline,
}
