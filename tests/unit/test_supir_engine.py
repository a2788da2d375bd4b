"""The one SUPIR engine (supir/pipeline.py) as a specification: the official semantics it follows, where it
deliberately differs, and the clear errors bad input gets (never NaN, never a deep trace).

Toy networks keep most tests instant; tests marked with the ``tiny`` fixture run the nodes on tiny weights.
"""
from __future__ import annotations

import pytest
import torch

from photo_restoration.nodes import comfy
from photo_restoration.nodes import supir_io as IO
from photo_restoration.nodes import supir_nodes as N
from photo_restoration.nodes import supir_sampler_nodes as SN
from photo_restoration.nodes.common import image_to_bchw
from photo_restoration.supir import caption as cap
from photo_restoration.supir import pipeline as E
from photo_restoration.supir.colorfix import adain, color_fix

from .test_supir_sampling import ToyModel

MAX_SEED = 2 ** 64 - 1


def toy_images(b=2, h=40, w=48, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


FAST = E.settings(steps=2, s_churn=1.0, seed=5)


# ---- random numbers ------------------------------------------------------------------------------------

def test_largest_seed_with_a_batch_wraps_like_the_sampler():
    """Image i uses seed + i, wrapped into 64 bits: seed 2^64-1 and a batch of 2 is image 0 at 2^64-1, image 1 at 0."""
    x = toy_images(2)
    both = E.restore(x, ToyModel(), E.settings(steps=2, s_churn=1.0, seed=MAX_SEED))
    second = E.restore(x[1:], ToyModel(), E.settings(steps=2, s_churn=1.0, seed=0))
    assert torch.equal(both[1:], second)
    assert E.seed_of(MAX_SEED, 1) == 0


def test_default_guidance_target_is_the_official_posterior_sample_of_the_stage1_image(monkeypatch):
    """Official batchify_sample: x_center = encode_first_stage(decode_first_stage(z_lq)), a posterior *sample*
    (sgm's AutoencoderKL.encode samples); its draw comes first from the seeded generator."""
    seen = {}
    real = E._run_sampler

    def spy(denoiser, noise, cond, uncond, hint, x_center, *a, **k):
        seen["x_center"], seen["noise"] = x_center, noise
        return real(denoiser, noise, cond, uncond, hint, x_center, *a, **k)

    monkeypatch.setattr(E, "_run_sampler", spy)
    model = ToyModel()
    hint = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    c, u = ({"crossattn": torch.zeros(1, 5, 6), "vector": torch.zeros(1, 7)} for _ in range(2))
    s = E.settings(steps=2, restore_cfg=4.0, seed=11)
    E.sample(model, hint, c, u, s)
    g = torch.Generator().manual_seed(11)
    posterior_draw = torch.randn(hint.shape, generator=g)
    expected = model.vae.encode(model.vae.decode(hint), noise=posterior_draw)
    assert torch.allclose(seen["x_center"], expected)
    noise = torch.randn(hint.shape, generator=g)
    assert torch.equal(seen["noise"], noise)  # then the initial noise
    # a given x_center keeps the same initial noise (the posterior draw is always taken)
    E.sample(model, hint, c, u, s, x_center=torch.zeros_like(hint))
    assert torch.equal(seen["noise"], noise) and torch.equal(seen["x_center"], torch.zeros_like(hint))


# ---- choices, tiles, sizes -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,value", [("preset", "Ultra"), ("tiling", "sometimes"), ("caption_mode", "mixed"),
                                        ("sampler", "euler"), ("color_fix", "Sepia")])
def test_unknown_choices_are_an_error_listing_the_choices(name, value):
    with pytest.raises(ValueError, match=f"Unknown {name} '{value}'; choose one of"):
        E.settings(value) if name == "preset" else E.settings(**{name: value})


def test_stride_larger_than_the_tile_is_refused_not_nan():
    with pytest.raises(ValueError, match="tile_stride"):
        E.settings(tiling="on", tile_size=512, tile_stride=1024)
    with pytest.raises(ValueError, match="tile_stride"):
        E.restore(toy_images(1), ToyModel(), E.RestoreSettings(tiling="on", tile_size=64, tile_stride=128))


def test_size_budget_refuses_a_strip_that_min_short_side_would_blow_up():
    s = E.settings("Quality", upscale_by=2.0, min_short_side=1024)
    with pytest.raises(ValueError, match=r"262144x1024 px.*max_megapixels"):
        E.plan(s, 16, 4096)
    assert E.plan(E.settings(upscale_by=2.0, min_short_side=1024, max_megapixels=0), 16, 4096).internal == (1024, 262144)
    with pytest.raises(ValueError, match="max_megapixels"):
        cap.tile_pictures(torch.rand(1, 3, 64, 64), 64, 32, max_megapixels=0.001)


@pytest.mark.parametrize("w,h", [(1540, 1000), (2100, 777), (1030, 1030)])
def test_tiles_node_captions_and_sampler_agree(w, h, monkeypatch):
    """Tile 1024, stride 512: SUPIR Tiles, LLaVA per-tile captions and the sampler cut the same grid (the
    picture padded to multiples of 64 px, as the first stage's latent)."""
    img = torch.rand(1, h, w, 3)
    count = N.Tiles().tile(img, 1024, 512)[2]
    p = E.plan(E.settings(), h, w)
    sampler = E.tile_count(E.settings(tiling="on"), p.internal[0] // 8, p.internal[1] // 8)
    monkeypatch.setattr(cap, "caption_group", lambda llava, group, settings, cb=None: ["c"] * len(group))
    captions = cap.caption_tiles(None, img.movedim(-1, 1), 1024, 512)
    assert count == sampler == len(captions) == cap.tiles_per_picture(h, w, 1024, 512)
    assert (w, h, count) in {(1540, 1000, 3), (2100, 777, 4), (1030, 1030, 4)}


# ---- images in --------------------------------------------------------------------------------------------

def test_alpha_is_composited_over_white_like_the_official_hwc3():
    rgba = torch.zeros(1, 2, 2, 4)
    rgba[..., 0] = 1.0  # red
    rgba[0, 0, 0, 3] = 1.0  # one opaque pixel; the rest transparent
    x = image_to_bchw(rgba)
    assert x[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0] and x[0, :, 1, 1].tolist() == [1.0, 1.0, 1.0]
    gray_alpha = torch.tensor([[[[0.2, 0.5]]]])  # gray 0.2 at half opacity over white = 0.6
    assert torch.allclose(image_to_bchw(gray_alpha), torch.full((1, 3, 1, 1), 0.6))
    assert image_to_bchw(torch.rand(1, 4, 4, 1)).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="image.*channels"):
        image_to_bchw(torch.rand(1, 4, 4, 5))


def test_nan_pixels_and_empty_batches_are_errors_naming_the_input():
    bad = toy_images(1)
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="image: 1 values are NaN"):
        E.restore(bad, ToyModel(), FAST)
    with pytest.raises(ValueError, match="image: the batch is empty"):
        E.restore(toy_images(0), ToyModel(), FAST)
    with pytest.raises(ValueError, match="control_latent: the batch is empty"):
        E.sample_batch(ToyModel(), torch.zeros(0, 4, 8, 8), {}, {}, FAST)
    with pytest.raises(ValueError, match="latent: the batch is empty"):
        E.decode(torch.zeros(0, 4, 8, 8), ToyModel(), FAST)
    with pytest.raises(ValueError, match="image: the batch is empty"):
        E.color_fix_images(toy_images(0), toy_images(1), "Wavelet")
    with pytest.raises(ValueError, match="image: the batch is empty"):
        cap.tile_pictures(torch.zeros(0, 3, 64, 64), 64, 32)


def test_adain_on_a_single_pixel_is_finite():
    one = torch.rand(1, 3, 1, 1)
    assert torch.isfinite(adain(one, torch.rand(1, 3, 1, 1))).all()
    assert torch.isfinite(color_fix(one, one, "Wavelet")).all()
    out = E.color_fix_images(one, torch.rand(1, 3, 1, 1), "AdaIN")
    assert torch.isfinite(out).all()


# ---- LATENT interop with core nodes (plain dicts doing what core nodes do) -------------------------------------

def _ours():
    return IO.latent_dict(torch.randn(2, 4, 17, 25) * 0.5, (130, 196), (130, 196))


def test_sizes_survive_nodes_that_keep_the_samples_shape():
    lat = _ours()
    for derived in ({**lat, "samples": lat["samples"].repeat(2, 1, 1, 1)},  # RepeatLatentBatch
                    {**lat, "samples": lat["samples"][1:]},  # LatentFromBatch
                    {**lat, "samples": lat["samples"].clone()}):  # LatentComposite (destination shape)
        assert IO.latent_size(derived) == (130, 196) and IO.latent_work(derived) == (130, 196)


def test_sizes_scale_with_a_uniform_upscale_and_go_stale_on_other_changes():
    lat = _ours()
    up = dict(lat)  # LatentUpscaleBy x2: s = samples.copy(); s["samples"] = upscaled
    up["samples"] = torch.nn.functional.interpolate(lat["samples"], scale_factor=2.0)
    assert IO.latent_size(up) == IO.latent_work(up) == (260, 392)  # the picture x2, padding cropped as before
    assert IO.size_keys(up)[IO.SHAPE_KEY] == (34, 50)
    crop = dict(lat)  # LatentCrop
    crop["samples"] = lat["samples"][..., 2:12, 3:19]
    resized = dict(lat)  # LatentUpscale to another aspect
    resized["samples"] = torch.nn.functional.interpolate(lat["samples"], size=(24, 32))
    for changed in (crop, resized):
        h, w = changed["samples"].shape[-2:]
        assert IO.latent_size(changed) == IO.latent_work(changed) == (8 * h, 8 * w)
        assert IO.size_keys(changed) == {}
    core = {"samples": torch.zeros(1, 4, 9, 11)}
    assert IO.latent_size(core) == (72, 88)


# ---- nodes on tiny weights --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from photo_restoration.testing.tiny_checkpoints import write_all

    root = tmp_path_factory.mktemp("models")
    write_all(root, ["supir"])
    comfy.set_models_dir(root)
    ckpts = comfy.list_files("checkpoints")
    sdxl = next(f for f in ckpts if "supir" not in f.lower())
    supir = next(f for f in ckpts if "supir" in f.lower())
    with torch.inference_mode():
        yield N.LoadSupir().load(sdxl, supir, "fp32", "fp32")[0]
    comfy.set_models_dir(None)


def test_decode_after_core_latent_nodes_gives_the_current_size(tiny):
    lat = N.Encode().encode(tiny, torch.rand(1, 100, 68, 3), True, 512)[0]
    assert N.Decode().decode(tiny, lat, True, 512)[0].shape == (1, 100, 68, 3)
    up = dict(lat)
    up["samples"] = torch.nn.functional.interpolate(lat["samples"], scale_factor=2.0)
    assert N.Decode().decode(tiny, up, True, 512)[0].shape == (1, 200, 136, 3)  # not the old 100x68
    crop = dict(lat)
    crop["samples"] = lat["samples"][..., :6, :5]
    assert N.Decode().decode(tiny, crop, True, 512)[0].shape == (1, 48, 40, 3)


def test_encode_samples_the_posterior_by_default_like_the_official_guidance_path(tiny):
    img = torch.rand(1, 64, 64, 3)
    a, b = (N.Encode().encode(tiny, img, False, 512, "sample", seed)[0]["samples"] for seed in (0, 1))
    mode = N.Encode().encode(tiny, img, False, 512, "mode")[0]["samples"]
    assert not torch.equal(a, b) and not torch.equal(a, mode)
    assert torch.equal(a, N.Encode().encode(tiny, img, False, 512)[0]["samples"])  # default: sample, seed 0


def test_odd_inputs_to_the_vae_nodes(tiny):
    two_channel = torch.rand(1, 40, 40, 2)  # gray + alpha
    stage1, lat = N.FirstStage().run(tiny, two_channel, False, 512, 512)
    assert stage1.shape == (1, 40, 40, 3) and torch.isfinite(stage1).all()
    one = N.Decode().decode(tiny, {"samples": torch.randn(1, 4, 1, 1)}, False, 512)[0]
    assert one.shape == (1, 8, 8, 3) and torch.isfinite(one).all()
    with pytest.raises(ValueError, match="image: the batch is empty"):
        N.FirstStage().run(tiny, torch.rand(0, 40, 40, 3), False, 512, 512)
    with pytest.raises(ValueError, match="image: the batch is empty"):
        N.Encode().encode(tiny, torch.rand(0, 40, 40, 3), False, 512)
    with pytest.raises(ValueError, match="max_megapixels"):
        N.FirstStage().run(tiny, torch.rand(1, 64, 64, 3), False, 512, 512, max_megapixels=0.001)


class Cancelled(BaseException):
    """Like ComfyUI >= 0.33's InterruptProcessingException: a BaseException."""


class CancelAfter:
    """An interrupt check that lets ``n`` checks pass, then cancels."""

    def __init__(self, n: int):
        self.left = n

    def __call__(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise Cancelled()


def test_first_stage_cancel_reaches_the_vae_tiles(tiny, monkeypatch):
    monkeypatch.setattr(comfy, "check_interrupt", CancelAfter(2))  # the third check is inside the tiled VAE pass
    with pytest.raises(Cancelled):
        N.FirstStage().run(tiny, torch.rand(1, 128, 128, 3), True, 64, 64)


def test_restore_node_refuses_a_gappy_stride_and_an_oversized_plan(tiny):
    img = torch.rand(1, 16, 64, 3)
    args = [[tiny], [img], [2.0], ["Quality"], [0], [1], ["p"], ["n"], [1024], ["on"], [256], [512], ["None"], [False]]
    with pytest.raises(ValueError, match="tile_stride"):
        SN.Restore().restore(*args)
    args[11] = [128]
    with pytest.raises(ValueError, match="max_megapixels"):
        SN.Restore().restore(*args, max_megapixels=[1.0])


def test_tooltips_say_what_the_official_does():
    restore = SN.Restore.INPUT_TYPES()["required"]["preset"][1]["tooltip"]
    assert "Quality setting, cfg 2" in restore and "Fidelity setting, cfg 1.5" in restore and "v0Q" not in restore
    sampler = SN.Sampler.INPUT_TYPES()["required"]["sampler"][1]["tooltip"]
    assert "official DPM++ sampler" in sampler and "restore_cfg" in sampler
