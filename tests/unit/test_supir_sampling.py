"""SUPIR sampling as a specification: schedules, the two sampler updates, tiled diffusion, colour fix and
the restore pipeline's size handling, with a toy per-pixel denoiser (no network needed)."""
from __future__ import annotations

import math

import pytest
import torch

from photo_restoration.supir.colorfix import adain, color_fix, wavelet, wavelet_decompose
from photo_restoration.supir.denoiser import ddpm_sigmas
from photo_restoration.supir.pipeline import RestoreSettings, plan_sizes, restore
from photo_restoration.supir.tiles import image_windows
from photo_restoration.supir.samplers import (dpmpp_2m_sde_step, gaussian_noise, replay_noise,
                                              restore_dpmpp_2m_sde_sample, restore_edm_sample)
from photo_restoration.supir.schedules import (SIGMA_MAX, Guidance, cfg_at, churn_gamma, control_scale_at,
                                               dpmpp_sigmas, edm_sigmas, karras_sigmas)
from photo_restoration.supir.samplers import brownian_noise
from photo_restoration.supir.tiled_sampling import (gaussian_tile_weights, tiled_restore_dpmpp_2m_sde_sample,
                                                    tiled_restore_edm_sample)
from photo_restoration.supir.tiles import tile_windows

TABLE = ddpm_sigmas()


class ToyDenoiser:
    """Per-pixel stand-in for SupirDenoiser: depends on x, sigma, cond, hint and control scale; counts calls
    and rows so tests can see batching."""

    def __init__(self):
        self.calls = 0
        self.rows = []
        self.sigmas = TABLE

    def __call__(self, x, sigma, cond, hint, control_scale=1.0):
        self.calls += 1
        self.rows.append(x.shape[0])
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        v = cond["vector"].mean(dim=1).reshape(-1, 1, 1, 1)
        c = cond["crossattn"].mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return torch.tanh(x / (s ** 2 + 1).sqrt()) * (1 + v) + 0.3 * c + control_scale * 0.5 * hint


def conds(b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: {"crossattn": torch.randn(b, 5, 6, generator=g), "vector": torch.randn(b, 7, generator=g)}
    return mk(), mk()


def latents(b, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 4, h, w, generator=g) for _ in range(3)]  # noise, hint, x_center


GUIDE = Guidance(cfg_scale=4.0, cfg_scale_start=7.5, control_scale=0.9, control_scale_start=0.3, restore_cfg=4.0)


# ---- schedules -------------------------------------------------------------------------------------

def test_edm_sigmas_follow_the_official_discretisation():
    s = edm_sigmas(TABLE, 50)
    assert s.shape == (51,) and s[-1] == 0
    idx = [int((TABLE - v).abs().argmin()) for v in s[:-1]]
    assert idx[:3] == [999, 979, 959] and idx[-1] == 19
    assert abs(s[0].item() - SIGMA_MAX) < 1e-4
    assert (s[:-1].diff() < 0).all()
    assert [int((TABLE - v).abs().argmin()) for v in edm_sigmas(TABLE, 3)[:-1]] == [999, 666, 333]


def test_karras_schedule_spans_the_discrete_range():
    s = dpmpp_sigmas(TABLE, 8)
    e = edm_sigmas(TABLE, 8)
    assert s.shape == (9,) and s[-1] == 0
    assert s[0].item() == pytest.approx(e[0].item(), rel=1e-6) and s[-2].item() == pytest.approx(e[-2].item(), rel=1e-6)
    k = karras_sigmas(4, 0.1, 10.0, rho=7.0)
    mid = (10 ** (1 / 7) + (1 / 3) * (0.1 ** (1 / 7) - 10 ** (1 / 7))) ** 7
    assert k[1].item() == pytest.approx(mid, rel=1e-6)


def test_linear_schedules_go_from_start_at_sigma_max_to_end_at_zero():
    g = Guidance(cfg_scale=4.0, cfg_scale_start=7.5, control_scale=0.9, control_scale_start=0.3)
    assert cfg_at(torch.tensor(SIGMA_MAX), g).item() == pytest.approx(7.5)
    assert cfg_at(torch.tensor(0.0), g).item() == pytest.approx(4.0)
    assert cfg_at(torch.tensor(SIGMA_MAX / 2), g).item() == pytest.approx(5.75)
    assert control_scale_at(SIGMA_MAX, g) == pytest.approx(0.3)
    assert control_scale_at(0.0, g) == pytest.approx(0.9)
    flat = Guidance(cfg_scale=4.0, control_scale=0.7)
    assert cfg_at(torch.tensor(3.0), flat).item() == pytest.approx(4.0)
    assert control_scale_at(3.0, flat) == 0.7


def test_churn_gamma_is_capped():
    assert churn_gamma(5, 50) == pytest.approx(0.1)
    assert churn_gamma(40, 10) == pytest.approx(math.sqrt(2) - 1)
    assert churn_gamma(0, 10) == 0


# ---- RestoreEDM ------------------------------------------------------------------------------------

def test_edm_sampler_is_the_documented_loop():
    c, u = conds()
    noise, hint, xc = latents(1, 6, 5)
    sigmas = edm_sigmas(TABLE, 4)
    draws = [torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    den = ToyDenoiser()
    got = restore_edm_sample(den, noise, sigmas, c, u, hint, xc, guidance=GUIDE, s_churn=0.5, s_noise=1.003,
                             noise_source=replay_noise(draws))
    # by hand, following the README's words
    x = noise * math.sqrt(1 + sigmas[0].item() ** 2)
    gamma = min(0.5 / 4, 2 ** 0.5 - 1)
    for i in range(4):
        s, nxt = sigmas[i].item(), sigmas[i + 1].item()
        s_hat = s * (1 + gamma)
        x = x + 1.003 * draws[i] * math.sqrt(s_hat ** 2 - s ** 2)
        cs = s / SIGMA_MAX * (0.3 - 0.9) + 0.9
        d_u, d_c = den(x, s_hat, u, hint, cs), den(x, s_hat, c, hint, cs)
        d = d_u + ((7.5 - 4.0) * s_hat / SIGMA_MAX + 4.0) * (d_c - d_u)
        if nxt > 0.05:
            d = d - (d - xc) * (s / SIGMA_MAX) ** 4.0
        x = x + (nxt - s_hat) * (x - d) / s_hat
    torch.testing.assert_close(got, x, atol=1e-4, rtol=1e-5)


def test_sampler_leaves_inputs_untouched_and_cfg_is_one_batch():
    c, u = conds()
    noise, hint, xc = latents(2, 4, 4)
    before = [t.clone() for t in (noise, hint, xc)]
    den = ToyDenoiser()
    restore_edm_sample(den, noise, edm_sigmas(TABLE, 3), c, u, hint, xc, guidance=GUIDE, s_churn=1.0)
    for a, b in zip(before, (noise, hint, xc)):
        assert torch.equal(a, b)
    assert den.rows == [4, 4, 4]  # [uncond; cond] for batch 2, one call per step


def test_seeds_reproduce_and_differ():
    c, u = conds()
    noise, hint, xc = latents(1, 4, 4)
    run = lambda seed: restore_edm_sample(ToyDenoiser(), noise, edm_sigmas(TABLE, 3), c, u, hint, xc,
                                          guidance=GUIDE, s_churn=2.0,
                                          noise_source=gaussian_noise(torch.Generator().manual_seed(seed)))
    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))


class Callbacks:
    def __init__(self, stop_after=None):
        self.checks, self.steps, self.stop_after = 0, [], stop_after

    def check_interrupt(self):
        self.checks += 1
        if self.stop_after is not None and self.checks > self.stop_after:
            raise InterruptedError

    def progress(self, step, total, preview=None):
        assert preview is not None
        self.steps.append((step, total))


@pytest.mark.parametrize("tiled", [False, True])
def test_interrupt_stops_within_one_step_and_progress_counts_steps(tiled):
    c, u = conds()
    noise, hint, xc = latents(1, 6, 6)
    sigmas = edm_sigmas(TABLE, 5)
    kw = dict(tile_size=4, tile_stride=2) if tiled else {}
    fn = tiled_restore_edm_sample if tiled else restore_edm_sample
    cb = Callbacks()
    fn(ToyDenoiser(), noise, sigmas, c, u, hint, xc, guidance=GUIDE, callbacks=cb, **kw)
    assert cb.steps == [(i, 5) for i in range(1, 6)]
    den, cb = ToyDenoiser(), Callbacks(stop_after=2)
    with pytest.raises(InterruptedError):
        fn(den, noise, sigmas, c, u, hint, xc, guidance=GUIDE, callbacks=cb, **kw)
    per_step = len(tile_windows(6, 6, 4, 2)) if tiled else 1
    assert den.calls == 2 * per_step


# ---- DPM++ 2M SDE ------------------------------------------------------------------------------------

def published_dpmpp_2m_sde(model, x, sigmas, noise, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE, midpoint variant, as published (k-diffusion's equations), except that like
    the official SUPIR sampler no noise is added on the first step."""
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        d = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = d
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * d
            if old is not None:
                r = h_last / h
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (d - old)
                x = x + noise[i] * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
            h_last = h
        old = d
    return x


@pytest.mark.parametrize("restore_cfg", [-1.0, 3.0])
def test_dpmpp_2m_sde_matches_the_published_update(restore_cfg):
    c, u = conds()
    noise, hint, xc = latents(1, 5, 7)
    sigmas = dpmpp_sigmas(TABLE, 6)
    g = Guidance(cfg_scale=3.0, cfg_scale_start=5.0, control_scale=0.8, restore_cfg=restore_cfg)
    draws = [torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(10 + i)) for i in range(6)]
    den = ToyDenoiser()
    got = restore_dpmpp_2m_sde_sample(den, noise, sigmas, c, u, hint, xc, guidance=g, eta=0.7, s_noise=1.01,
                                      noise_source=replay_noise(draws[1:]))

    def model(x, sigma):
        s = sigma.item()
        d_u, d_c = den(x, s, u, hint, 0.8), den(x, s, c, hint, 0.8)
        d = d_u + ((5.0 - 3.0) * s / SIGMA_MAX + 3.0) * (d_c - d_u)
        nxt = sigmas[(sigmas == sigma).nonzero()[0, 0] + 1].item()
        if restore_cfg > 0 and nxt > 0.05:
            d = d - (d - xc) * (s / SIGMA_MAX) ** restore_cfg
        return d

    x0 = noise * torch.sqrt(1 + sigmas[0] ** 2)
    ref = published_dpmpp_2m_sde(model, x0, sigmas.double().float(), draws, eta=0.7, s_noise=1.01)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


def test_dpmpp_brownian_noise_is_seeded():
    c, u = conds()
    noise, hint, xc = latents(1, 4, 4)
    run = lambda seed: restore_dpmpp_2m_sde_sample(ToyDenoiser(), noise, dpmpp_sigmas(TABLE, 4), c, u, hint,
                                                   guidance=Guidance(), seed=seed)
    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_brownian_noise_falls_back_to_gaussian_without_torchsde(monkeypatch, caplog):
    import sys

    like = torch.zeros(1, 4, 3, 3)
    monkeypatch.setitem(sys.modules, "torchsde", None)  # import torchsde -> ImportError
    draw = brownian_noise(like, 0.1, 10.0, seed=3)
    assert "torchsde" in caplog.text
    assert draw(like, torch.tensor([2.0]), torch.tensor([1.0])).shape == like.shape


def test_tiled_dpmpp_with_one_tile_equals_the_untiled_sampler():
    c, u = conds()
    noise, hint, xc = latents(1, 6, 7)
    sigmas = dpmpp_sigmas(TABLE, 4)
    g = Guidance(cfg_scale=3.0, restore_cfg=2.0)
    plain = restore_dpmpp_2m_sde_sample(ToyDenoiser(), noise, sigmas, c, u, hint, xc, guidance=g, seed=11)
    tiled = tiled_restore_dpmpp_2m_sde_sample(ToyDenoiser(), noise, sigmas, c, u, hint, xc, guidance=g, seed=11,
                                              tile_size=8, tile_stride=4)
    torch.testing.assert_close(tiled, plain, atol=1e-5, rtol=1e-6)


def test_dpmpp_last_step_returns_the_denoised_estimate():
    c, u = conds()
    x, hint, _ = latents(1, 3, 3)
    sig = torch.tensor([0.5]), torch.tensor([0.0])
    out, den = dpmpp_2m_sde_step(ToyDenoiser(), x, *sig, None, None, 1.0, 1.0, None, c, u, hint, None, Guidance())
    assert torch.equal(out, den)


# ---- tiled diffusion ------------------------------------------------------------------------------------

def test_tile_weights_have_the_reference_asymmetric_centres():
    w = gaussian_tile_weights(16, 16)
    assert w.dtype == torch.float64 and w.shape == (16, 16)
    assert int(w[:, 0].argmax()) == 8  # rows centred at tile / 2
    assert w[0, 7] == w[0, 8]  # columns centred at (tile - 1) / 2
    peak = 1 / (2 * math.pi * 0.01)  # product of two 1/sqrt(2 pi var) peaks; columns never hit theirs exactly
    assert w[8, 7].item() == pytest.approx(peak * math.exp(-0.25 / 256 / 0.02), rel=1e-9)


def _tiled(den, noise, hint, xc, c, u, **kw):
    return tiled_restore_edm_sample(den, noise, edm_sigmas(TABLE, 3), c, u, hint, xc, guidance=GUIDE, s_churn=1.0,
                                    s_noise=1.003, noise_source=gaussian_noise(torch.Generator().manual_seed(5)), **kw)


@pytest.mark.parametrize("size", [(12, 20), (9, 14), (20, 9)])
def test_batched_tiles_equal_sequential_tiles(size):
    c, u = conds(b=2)
    noise, hint, xc = latents(2, *size)
    n_tiles = len(tile_windows(*size, 8, 5))
    per_tile = [conds(b=2, seed=40 + j)[0] for j in range(n_tiles)]
    for cond in (c, per_tile):
        one = _tiled(ToyDenoiser(), noise, hint, xc, cond, u, tile_size=8, tile_stride=5, tile_batch_size=1)
        den = ToyDenoiser()
        many = _tiled(den, noise, hint, xc, cond, u, tile_size=8, tile_stride=5, tile_batch_size=4)
        torch.testing.assert_close(many, one, atol=1e-5, rtol=1e-6)
        assert max(den.rows) == 2 * 2 * min(4, n_tiles)


def test_per_tile_conditioning_is_used_and_checked():
    c, u = conds()
    noise, hint, xc = latents(1, 8, 12)
    n = len(tile_windows(8, 12, 8, 4))
    per_tile = [conds(seed=60 + j)[0] for j in range(n)]
    a = _tiled(ToyDenoiser(), noise, hint, xc, per_tile, u, tile_size=8, tile_stride=4)
    b = _tiled(ToyDenoiser(), noise, hint, xc, [c] * n, u, tile_size=8, tile_stride=4)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="tiles"):
        _tiled(ToyDenoiser(), noise, hint, xc, per_tile[:-1], u, tile_size=8, tile_stride=4)


@pytest.mark.parametrize("size", [(5, 7), (8, 8), (3, 16)])
def test_one_tile_grid_equals_the_untiled_sampler(size):
    """A latent no larger than the tile (also smaller: the reference crashes there) is one window."""
    c, u = conds()
    noise, hint, xc = latents(1, *size)
    sigmas = edm_sigmas(TABLE, 3)
    src = lambda: gaussian_noise(torch.Generator().manual_seed(9))
    plain = restore_edm_sample(ToyDenoiser(), noise, sigmas, c, u, hint, xc, guidance=GUIDE, s_churn=1.0,
                               noise_source=src())
    tiled = tiled_restore_edm_sample(ToyDenoiser(), noise, sigmas, c, u, hint, xc, guidance=GUIDE, s_churn=1.0,
                                     tile_size=16, tile_stride=8, noise_source=src())
    if size[0] < 16 and size[1] < 16:
        torch.testing.assert_close(tiled, plain, atol=1e-5, rtol=1e-6)
    assert tiled.shape == noise.shape and torch.isfinite(tiled).all()


def test_tiled_sampler_is_seamless_for_a_position_independent_model():
    """With a per-pixel model and no x-dependent noise the blend of overlapping tiles is the untiled result."""
    c, u = conds()
    noise, hint, xc = latents(1, 13, 21)
    sigmas = edm_sigmas(TABLE, 3)
    plain = restore_edm_sample(ToyDenoiser(), noise, sigmas, c, u, hint, xc, guidance=GUIDE)
    tiled = tiled_restore_edm_sample(ToyDenoiser(), noise, sigmas, c, u, hint, xc, guidance=GUIDE, tile_size=8,
                                     tile_stride=4, tile_batch_size=3)
    torch.testing.assert_close(tiled, plain, atol=1e-4, rtol=1e-5)


# ---- colour fix -----------------------------------------------------------------------------------------

def test_wavelet_bands_sum_to_the_image_and_fix_keeps_details():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 20, 30, generator=g), torch.randn(2, 3, 20, 30, generator=g)
    high, low = wavelet_decompose(a)
    torch.testing.assert_close(high + low, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(wavelet(a, a), a, atol=1e-5, rtol=0)
    out = wavelet(a, b)
    torch.testing.assert_close(out - wavelet_decompose(b)[1], high, atol=1e-5, rtol=0)
    assert wavelet(a[:, :, :5, :6], b[:, :, :5, :6]).shape == (2, 3, 5, 6)  # smaller than the 16-px radius


def test_adain_takes_the_style_statistics():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 16, 12, generator=g), 3 * torch.randn(2, 3, 16, 12, generator=g) + 1
    out = adain(a, b)
    torch.testing.assert_close(out.mean(dim=(2, 3)), b.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(2, 3)), b.std(dim=(2, 3)), atol=1e-3, rtol=1e-3)
    assert torch.equal(color_fix(a, b, "None"), a)
    with pytest.raises(ValueError):
        color_fix(a, b, "bogus")


# ---- pipeline -------------------------------------------------------------------------------------------

class ToyVAE:
    scale_factor = 0.5

    def encode_lq(self, x, tiling=None, callbacks=None):
        return torch.nn.functional.avg_pool2d(x, 8).repeat(1, 2, 1, 1)[:, :4] * self.scale_factor

    def decode(self, z, tiling=None, callbacks=None):
        return torch.nn.functional.interpolate(z[:, :3] / self.scale_factor, scale_factor=8.0)

    def encode(self, x, generator=None, sample=True, noise=None, tiling=None, callbacks=None):
        return self.encode_lq(x) + 0.01 * noise


class ToyText:
    def __init__(self):
        self.prompts = []

    def encode(self, prompts):
        self.prompts.append(list(prompts))
        v = torch.tensor([[float(len(p) % 7)] * 7 for p in prompts])
        return {"crossattn": v[:, None, :6].repeat(1, 5, 1) * 0.1, "vector": v * 0.1}


class ToyModel:
    def __init__(self):
        self.vae, self.text, self.denoiser = ToyVAE(), ToyText(), ToyDenoiser()


@pytest.mark.parametrize("size,upscale,fit", [((37, 50), 1.0, "pad"), ((37, 50), 1.5, "resize"),
                                              ((64, 24), 2.0, "pad")])
def test_restore_returns_exactly_the_upscaled_size(size, upscale, fit):
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    s = RestoreSettings(upscale_by=upscale, fit=fit, steps=2, size_multiple=16, s_churn=1.0)
    out = restore(images, ToyModel(), s, captions=["a cat", "a dog"])
    assert out.shape == (2, 3, round(size[0] * upscale), round(size[1] * upscale))
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, restore(images, ToyModel(), s, captions=["a cat", "a dog"]))  # seeded


def test_size_plan_rules():
    p = plan_sizes(300, 500, upscale=2.0)
    assert p.output == (600, 1000) and p.work == (600, 1000) and p.internal == (640, 1024) and p.padded
    p = plan_sizes(300, 500, upscale=1.0, min_size=1024, fit="resize")  # official test.py rule
    assert p.output == (300, 500) and p.work == (1024, 1707) and p.internal == (1024, 1728)
    assert plan_sizes(16, 16, 1.0).internal == (64, 64)
    with pytest.raises(ValueError, match="at least 16 px"):
        plan_sizes(10, 10, 1.0)


def test_prompts_are_caption_plus_a_prompt_and_per_tile_captions_make_a_cond_list():
    model = ToyModel()
    images = torch.rand(1, 3, 64, 96)
    s = RestoreSettings(steps=1, positive_prompt=", sharp", negative_prompt="blurry", tiling="on", tile_size=64,
                        tile_stride=32)
    restore(images, model, s, captions=["a cat"])
    assert sorted(model.text.prompts) == [["a cat, sharp"], ["blurry"]]
    wins = image_windows(64, 128, 64, 32)  # the sampling size: 96 px padded to 128
    assert len(wins) == len(tile_windows(8, 16, 8, 4)) == 3 and wins[0] == (0, 64, 0, 64)
    model = ToyModel()
    captions = [f"tile {j}" for j in range(len(wins))]
    captions[1] = ""  # no caption for tile 1: it keeps its place and gets the positive prompt alone
    out = restore(images, model, s, captions=captions)
    assert out.shape == (1, 3, 64, 96)
    assert model.text.prompts[0] == [c + ", sharp" for c in captions]
