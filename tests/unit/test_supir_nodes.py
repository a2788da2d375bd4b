"""The SUPIR nodes as users wire them, on tiny random weights in the official layouts.

Every node, every option family (tiled/untiled VAE and sampling, both samplers, the presets, batches
of 2, odd sizes, core LATENTs in and out), the errors users can act on, that no node of the pack
modifies its inputs, and the ``restore`` / ``demo`` command lines.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from photo_restoration import NODE_CLASS_MAPPINGS
from photo_restoration.nodes import comfy
from photo_restoration.nodes import supir_nodes as N
from photo_restoration.nodes import supir_support as S

HAVE_WRITER = importlib.util.find_spec("photo_restoration.testing.tiny_supir") is not None
HAVE_VAE = importlib.util.find_spec("photo_restoration.supir.vae") is not None
HAVE_TEXT = importlib.util.find_spec("photo_restoration.supir.text") is not None

needs_model = pytest.mark.skipif(not HAVE_WRITER, reason="testing/tiny_supir.py (branch supir-unet) is not merged yet")
needs_vae = pytest.mark.skipif(not (HAVE_WRITER and HAVE_VAE),
                               reason="supir/vae.py (branch supir-vae-text) is not merged yet")
needs_text = pytest.mark.skipif(not (HAVE_WRITER and HAVE_TEXT),
                                reason="supir/text.py (branch supir-vae-text) is not merged yet")


def image(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, 3, generator=g)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    if not HAVE_WRITER:
        pytest.skip("testing/tiny_supir.py (branch supir-unet) is not merged yet")
    from photo_restoration.testing.tiny_checkpoints import write_all

    root = tmp_path_factory.mktemp("models")
    write_all(root, ["supir", "llava"])
    comfy.set_models_dir(root)
    yield root
    comfy.set_models_dir(None)


@pytest.fixture(scope="module")
def files(models_dir):
    ckpts = comfy.list_files("checkpoints")
    sdxl = next(f for f in ckpts if "supir" not in f.lower())
    supir = next(f for f in ckpts if "supir" in f.lower())
    return sdxl, supir


@pytest.fixture(scope="module")
def supir(files):
    sdxl, supir = files
    with torch.inference_mode():
        return N.LoadSupir().load(sdxl, supir, "fp32", "fp32")[0]


def cond(handle, n: int = 1, seed: int = 0) -> dict:
    """Text conditioning of the right shapes without the text encoders (random, deterministic)."""
    unet = handle.model.config["unet"]
    g = torch.Generator().manual_seed(seed)
    return {"crossattn": torch.randn(n, 77, unet["context_dim"], generator=g),
            "vector": torch.randn(n, unet["adm_in_channels"], generator=g), "texts": [""] * n}


def control(b: int, h: int, w: int, seed: int = 1) -> dict:
    """A LATENT as SUPIR First Stage makes it (unscaled, with our size keys)."""
    g = torch.Generator().manual_seed(seed)
    return S.latent_dict(torch.randn(b, 4, h // 8, w // 8, generator=g) * 0.8, (h, w), (h, w))


FAST = dict(seed=3, sampler="EDM", steps=1, cfg_scale_start=4.0, cfg_scale_end=7.5, control_scale_start=1.0,
            control_scale_end=0.9, restore_cfg=-1.0, s_churn=5.0, s_noise=1.003, eta=1.0, tiled=False,
            tile_size=64, tile_stride=32, tile_batch_size=8)


# ---- pure helpers ---------------------------------------------------------------------------------

def test_presets_follow_the_official_settings():
    q, f, l, lf = (S.PRESETS[k] for k in ("Quality", "Fidelity", "Lightning", "Lightning Fidelity"))
    assert (q.sampler, q.steps, q.cfg_scale_start, q.cfg_scale, q.s_churn, q.s_noise) == ("edm", 50, 4.0, 7.5, 5, 1.003)
    assert (f.sampler, f.steps, f.cfg_scale_start, f.cfg_scale) == ("edm", 50, 1.0, 4.0)
    assert (l.sampler, l.steps, l.cfg_scale_start, l.cfg_scale) == ("dpmpp_2m_sde", 8, 2.0, 2.0)
    assert (lf.sampler, lf.steps, lf.cfg_scale_start, lf.cfg_scale) == ("dpmpp_2m_sde", 8, 1.5, 1.5)
    assert all(p.restore_cfg == -1 and p.control_scale == 1.0 for p in (q, f, l, lf))


@pytest.mark.parametrize("h,w,up,min_side", [(80, 96, 2.0, 0), (37, 51, 2.0, 0), (100, 60, 1.5, 1024), (64, 64, 1, 0)])
def test_size_plan_output_is_exactly_input_times_upscale(h, w, up, min_side):
    p = S.plan(h, w, up, min_side)
    assert p.output == (math.floor(h * up + 0.5), math.floor(w * up + 0.5))
    assert all(s % 64 == 0 and s >= t for s, t in zip(p.internal, p.work))
    if min_side:
        assert min(p.work) >= min_side


def test_too_small_image_is_refused_with_the_size():
    with pytest.raises(ValueError, match="too small.*8x20 px"):
        S.plan(20, 8)


def test_latents_are_unscaled_in_comfyui_convention():
    z = torch.randn(1, 4, 6, 5)
    lat = S.latent_dict(z, (48, 40), (48, 40))
    assert torch.allclose(lat["samples"] * S.SCALE_FACTOR, z, atol=1e-6)
    assert torch.allclose(S.scaled_latent(lat), z, atol=1e-6)
    core = {"samples": lat["samples"]}  # what VAE Encode would give: no size keys
    assert S.latent_size(core) == (48, 40) and S.latent_work(core) == (48, 40)
    with pytest.raises(ValueError, match="4-channel"):
        S.scaled_latent({"samples": torch.zeros(1, 16, 4, 4)})


def test_official_caption_concatenation_and_keep_positive_mode():
    assert S.join_prompt("an old man", "sharp.") == "an old mansharp."  # official: no separator
    assert S.join_prompt("", "sharp.") == "sharp."
    long_caption = " ".join(["a very detailed photo of a tree"] * 30)
    kept = S.join_prompt(long_caption, S.OFFICIAL_POSITIVE, S.CAPTION_MODES[1])
    assert kept.endswith(", " + S.OFFICIAL_POSITIVE)
    from photo_restoration.supir.text import count_tokens

    assert count_tokens(kept) <= 75


def test_captions_from_lists_or_lines():
    assert S.split_captions(None) == []
    assert S.split_captions(["one\ntwo\n\n"]) == ["one", "two"]
    assert S.split_captions(["a", "b c"]) == ["a", "b c"]
    assert S.split_captions([["x", "y"]]) == ["x", "y"]


def test_conditioning_counts_map_to_images_or_tiles_or_fail_clearly():
    c = lambda n: {"crossattn": torch.zeros(n, 1, 1), "vector": torch.zeros(n, 1)}  # noqa: E731
    assert S.cond_plan(c(1), 2, None) == "shared"
    assert S.cond_plan(c(2), 2, 6) == "per_image"
    assert S.cond_plan(c(6), 1, 6) == "per_tile"
    assert S.cond_plan(c(12), 2, 6) == "per_image_tile"
    with pytest.raises(ValueError, match="3 prompts.*2 image"):
        S.cond_plan(c(3), 2, None)


def test_auto_tiling_above_one_and_a_half_tiles():
    assert not S.wants_tiles("auto", 1024, 1536, 1024)
    assert S.wants_tiles("auto", 2048, 2048, 1024)
    assert S.wants_tiles("on", 64, 64, 1024) and not S.wants_tiles("off", 4096, 4096, 1024)


def test_colour_fix_node_methods_and_reference_resize():
    img, ref = image(2, 40, 56), image(1, 20, 28, seed=5)
    for method in S.COLOR_FIXES:
        out = N.ColorFix().fix(img, ref, method)[0]
        assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(N.ColorFix().fix(img, ref, "None")[0], img)
    wav = N.ColorFix().fix(img, img, "Wavelet")[0]
    assert torch.allclose(wav, img, atol=1e-5)  # its own colours: unchanged
    with pytest.raises(ValueError, match="3 images for 2"):
        N.ColorFix().fix(img, image(3, 8, 8), "AdaIN")


def test_tiles_node_matches_the_sampler_grid():
    from photo_restoration.supir.pipeline import RestoreSettings, latent_tile_windows

    img = image(2, 200, 330)
    tiles, layout, count, rows, cols = N.Tiles().tile(img, 128, 64)
    windows = latent_tile_windows(200, 330, RestoreSettings(tile_size=16, tile_stride=8))
    assert count == len(windows) == rows * cols
    assert tiles.shape == (2 * count, 128, 128, 3)
    assert f"{rows} rows x {cols} columns" in layout
    # image-major: the first `count` tiles come from image 0, and tile 0 is its top-left corner
    assert torch.allclose(tiles[0], img[0, :128, :128], atol=1e-6)
    assert torch.allclose(tiles[count], img[1, :128, :128], atol=1e-6)
    # sized like SUPIR Restore: upscale x2 with the short-side rule
    up = N.Tiles().tile(img, 1024, 512, 2.0, 1024)
    grid = latent_tile_windows(200, 330, RestoreSettings(upscale=2.0, min_size=1024, tile_size=128, tile_stride=64))
    assert up[2] == len(grid) and up[0].shape[1:3] == (1024, 1024)


def test_oom_errors_say_what_to_change():
    err = S.oom_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "sampling",
                      2048, 1536, tiled=False)
    text = str(err)
    assert "1536x2048 px" in text and "tiled sampling" in text and "fp8" in text and "tiled VAE" in text
    vae = str(S.oom_error(RuntimeError("out of memory"), "decoding (VAE)", 4096, 4096, tiled=True))
    assert "256 px" in vae and "16.8 megapixels" in vae


# ---- loaders ---------------------------------------------------------------------------------------

@needs_model
def test_load_supir_lists_both_folders_and_loads(files, supir):
    spec = N.LoadSupir.INPUT_TYPES()["required"]
    assert files[0] in spec["sdxl_checkpoint"][0] and files[1] in spec["supir_checkpoint"][0]
    assert spec["weight_dtype"][0] == ["auto", "fp16", "bf16", "fp32", "fp8"]
    assert isinstance(supir, S.SupirHandle) and supir.model.denoiser is not None


@needs_model
def test_fp8_weights_sample(files):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8_e4m3fn")
    handle = N.LoadSupir().load(*files, "fp8", "fp32")[0]
    out = N.Sampler().sample(handle, cond(handle), cond(handle), control(1, 64, 64), **FAST)[0]
    assert torch.isfinite(out["samples"]).all()


@needs_model
def test_swapped_checkpoints_are_a_clear_error(files):
    sdxl, supir = files
    with pytest.raises(ValueError, match="(?i)supir|sdxl"):
        N.LoadSupir().load(supir, sdxl, "fp32", "fp32")


@needs_model
def test_load_from_model_clip_vae_reads_comfyui_state_dicts(files, monkeypatch):
    """The MODEL/CLIP/VAE loader asks ComfyUI for checkpoint-layout state dicts (patches baked in), by keyword:
    ComfyUI < 0.33 through ``BaseModel.state_dict_for_saving(clip_state_dict=, vae_state_dict=)``, ComfyUI >= 0.33
    through the patcher's own ``state_dict_for_saving``, whose lazily patched tensors are materialised."""
    from photo_restoration.supir.loader import read_state_dict

    sd = read_state_dict(comfy.full_path("checkpoints", files[0]))
    clip_sd, vae_sd = {"clip.w": torch.ones(1)}, {"vae.w": torch.ones(1)}
    calls = []

    class Lazy(torch.nn.Parameter):  # like ComfyUI 0.33's LazyCastingParam: .to() gives the patched weight
        def to(self, *args, **kwargs):
            return torch.full_like(self.data, 7.0)

    class OldInner:  # ComfyUI 0.8: BaseModel.state_dict_for_saving(clip_state_dict, vae_state_dict, ...)
        def state_dict_for_saving(self, clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None):
            calls.append("old")
            assert clip_state_dict == clip_sd and vae_state_dict is vae_sd and clip_vision_state_dict is None
            return dict(sd)

    class OldModel:
        model = OldInner()

    class NewModel:  # ComfyUI 0.33: the patcher builds the patched UNet dict itself
        model = OldInner()

        def state_dict_for_saving(self, clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None):
            calls.append("new")
            assert clip_state_dict["clip.w"].item() == 7.0  # materialised before ComfyUI converts the layout
            out = dict(sd)
            k = next(k for k in out if k.startswith("model.diffusion_model."))
            out[k] = Lazy(out[k].float(), requires_grad=False)
            return out

    class FakeClip:
        def load_model(self):
            return "clip-patcher"

        def get_sd(self):
            return dict(clip_sd)

        def state_dict_for_saving(self):
            return {"clip.w": Lazy(torch.ones(1), requires_grad=False)}

    class FakeVae:
        def get_sd(self):
            return vae_sd

    handle = N.LoadSupirFromModel().load(OldModel(), FakeClip(), FakeVae(), files[1], "fp32", "fp32")[0]
    assert isinstance(handle, S.SupirHandle)
    new = comfy.state_dicts_from_comfy(NewModel(), FakeClip(), FakeVae())
    k = next(k for k in new if k.startswith("model.diffusion_model."))
    assert type(new[k]) is torch.Tensor and bool((new[k] == 7.0).all())
    assert calls == ["old", "new"]
    with pytest.raises(ValueError, match="ComfyUI MODEL"):
        comfy.state_dicts_from_comfy(object(), None, None)


# ---- sampler (latents in and out) --------------------------------------------------------------------

@needs_model
@pytest.mark.parametrize("sampler", list(S.SAMPLERS))
@pytest.mark.parametrize("tiled", [False, True])
def test_sampler_each_sampler_tiled_and_untiled(supir, sampler, tiled):
    lat = control(1, 96, 72)  # odd latent 12x9: padded to 16x16 inside; tiles 8/4 (64/32 px)
    args = {**FAST, "sampler": sampler, "tiled": tiled}
    out = N.Sampler().sample(supir, cond(supir), cond(supir, seed=9), lat, **args)[0]
    assert out["samples"].shape == lat["samples"].shape and torch.isfinite(out["samples"]).all()
    assert out[S.SIZE_KEY] == (96, 72)
    again = N.Sampler().sample(supir, cond(supir), cond(supir, seed=9), lat, **args)[0]
    assert torch.equal(out["samples"], again["samples"])  # same seed, same result


@needs_model
def test_sampler_batch_of_two_uses_seed_plus_index(supir):
    lat = control(2, 64, 64)
    both = N.Sampler().sample(supir, cond(supir), cond(supir), lat, **FAST)[0]["samples"]
    lat1 = {"samples": lat["samples"][1:]}
    second = N.Sampler().sample(supir, cond(supir), cond(supir), lat1, **{**FAST, "seed": FAST["seed"] + 1})[0]
    assert torch.allclose(both[1:], second["samples"], atol=1e-5)


@needs_model
def test_sampler_takes_a_core_latent_and_gives_one(supir):
    core = {"samples": torch.randn(1, 4, 8, 8)}  # e.g. from VAE Encode: unscaled, no size keys
    out = N.Sampler().sample(supir, cond(supir), cond(supir), core, **FAST)[0]
    assert set(out) == {"samples"} and out["samples"].shape == (1, 4, 8, 8)
    assert out["samples"].abs().mean() > 1.0  # unscaled convention: ~1/0.13025 larger than SUPIR's space


@needs_model
def test_sampler_per_tile_prompts_need_tiling_and_the_right_count(supir):
    lat = control(1, 128, 64)
    tiles = S.tile_count(16, 8, 64, 32)
    assert tiles == 3
    out = N.Sampler().sample(supir, cond(supir, tiles), cond(supir), lat, **{**FAST, "tiled": True})[0]
    assert out["samples"].shape == lat["samples"].shape
    with pytest.raises(ValueError, match="prompts"):
        N.Sampler().sample(supir, cond(supir, tiles), cond(supir), lat, **FAST)


@needs_model
def test_sampler_restore_cfg_uses_x_center(supir):
    lat = control(1, 64, 64)
    other = control(1, 64, 64, seed=7)
    args = {**FAST, "restore_cfg": 4.0, "steps": 2}
    a = N.Sampler().sample(supir, cond(supir), cond(supir), lat, **args)[0]["samples"]
    b = N.Sampler().sample(supir, cond(supir), cond(supir), lat, **args, x_center=other)[0]["samples"]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="differ in shape"):
        N.Sampler().sample(supir, cond(supir), cond(supir), lat, **args, x_center=control(1, 128, 64))


@needs_model
def test_sampler_is_cancellable(supir, monkeypatch):
    calls = []

    class Cancelled(Exception):
        pass

    def interrupt():
        calls.append(1)
        if len(calls) > 1:
            raise Cancelled()

    monkeypatch.setattr(comfy, "check_interrupt", interrupt)
    with pytest.raises(Cancelled):
        N.Sampler().sample(supir, cond(supir), cond(supir), control(1, 64, 64), **{**FAST, "steps": 3})


@needs_model
def test_sampler_out_of_memory_becomes_advice(supir, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(S, "sample_one", oom)
    with pytest.raises(RuntimeError, match="tiled sampling"):
        N.Sampler().sample(supir, cond(supir), cond(supir), control(1, 64, 64), **FAST)


# ---- VAE nodes ----------------------------------------------------------------------------------------

@needs_vae
@pytest.mark.parametrize("tiled", [False, True])
def test_first_stage_batch_of_two_odd_size(supir, tiled):
    img = image(2, 72, 100)
    stage1, lat = N.FirstStage().run(supir, img, tiled, 64, 64)
    assert stage1.shape == img.shape and stage1.min() >= 0 and stage1.max() <= 1
    assert lat["samples"].shape == (2, 4, 128 // 8, 128 // 8)  # internal size: multiples of 64
    assert lat[S.SIZE_KEY] == (72, 100) and lat[S.WORK_KEY] == (72, 100)
    # LATENT is unscaled: x 0.13025 gives the denoise encoder's scaled latent
    x = S.fit(img[:1].movedim(-1, 1), S.plan(72, 100)) * 2 - 1
    with torch.inference_mode():
        z = supir.model.vae.encode_lq(x)
    assert torch.allclose(lat["samples"][:1] * S.SCALE_FACTOR, z, atol=1e-4)


@needs_vae
def test_tiled_vae_matches_untiled(supir):
    img = image(1, 96, 160)
    a = N.FirstStage().run(supir, img, False, 64, 64)
    b = N.FirstStage().run(supir, img, True, 64, 64)
    assert torch.allclose(a[1]["samples"], b[1]["samples"], atol=1e-3)
    assert torch.allclose(a[0], b[0], atol=1e-3)


@needs_vae
def test_encode_decode_keep_the_size(supir):
    img = image(2, 72, 100)
    lat = N.Encode().encode(supir, img, True, 64)[0]
    assert lat["samples"].shape == (2, 4, 16, 16) and lat[S.SIZE_KEY] == (72, 100)
    out = N.Decode().decode(supir, lat, True, 64)[0]
    assert out.shape == img.shape
    core = N.Decode().decode(supir, {"samples": lat["samples"][:1, :, :5, :7]}, False, 64)[0]
    assert core.shape == (1, 40, 56, 3)


@needs_vae
def test_decode_of_the_sampler_output(supir):
    stage1, lat = N.FirstStage().run(supir, image(1, 80, 96), True, 512, 512)
    out = N.Sampler().sample(supir, cond(supir), cond(supir), lat, **FAST)[0]
    img = N.Decode().decode(supir, out, True, 512)[0]
    assert img.shape == (1, 80, 96, 3)


# ---- text, all in one -------------------------------------------------------------------------------

@needs_text
def test_conditioner_with_and_without_captions(supir):
    pos, neg = N.Conditioner().condition([supir], ["sharp"], ["blurry"], [S.CAPTION_MODES[0]])
    assert pos["crossattn"].shape[:2] == (1, 77) and neg["crossattn"].shape[0] == 1
    pos, _ = N.Conditioner().condition([supir], ["sharp"], ["blurry"], [S.CAPTION_MODES[1]], ["a dog", "a cat"])
    assert pos["crossattn"].shape[0] == 2 and pos["texts"] == ["a dog, sharp", "a cat, sharp"]
    pos, _ = N.Conditioner().condition([supir], ["sharp"], ["blurry"], [S.CAPTION_MODES[0]], ["a dog\na cat\na cow"])
    assert pos["texts"] == ["a dogsharp", "a catsharp", "a cowsharp"]


@needs_vae
@needs_text
@pytest.mark.parametrize("preset", ["Quality", "Fidelity", "Lightning"])
def test_restore_presets_batch_of_two_exact_output_size(supir, preset):
    img = image(2, 37, 45)
    out = N.Restore().restore([supir], [img], [2.0], [preset], [1], [2], ["sharp"], ["blurry"], [0], ["off"],
                              [1024], [512], ["Wavelet"], [True])[0]
    assert out.shape == (2, 74, 90, 3) and out.min() >= 0 and out.max() <= 1


@needs_vae
@needs_text
def test_restore_tiled_with_per_tile_captions(supir):
    img = image(1, 96, 160)
    tiles = N.Tiles().tile(img, 128, 64)[2]
    caps = [f"tile {i}" for i in range(tiles)]
    out = N.Restore().restore([supir], [img], [1.0], ["Lightning"], [0], [2], ["sharp"], ["blurry"], [0], ["on"],
                              [128], [64], ["AdaIN"], [False], caps)[0]
    assert out.shape == (1, 96, 160, 3)


# ---- no node changes what it is given --------------------------------------------------------------------

def _snapshot(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    return value


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return True


def _default(spec):
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        return kind[0] if kind else None
    if "default" in opts:
        return opts["default"]
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}.get(kind)


WIDGETS = {"INT", "FLOAT", "BOOLEAN", "STRING"}
TENSOR_TYPES = {"IMAGE", "MASK", "LATENT", "PHOTORESTORE_SUPIR_COND"}
FAST_WIDGETS = {"steps": 1, "tile_size": 64, "tile_stride": 32, "upscale_by": 1.0, "min_short_side": 0,
                "encoder_tile_size": 64, "decoder_tile_size": 64, "max_new_tokens": 3,
                "max_faces": 1}


def build_inputs(cls, provided: dict, resolve) -> dict | None:
    """Inputs for a node: linked types from ``provided``/``resolve``, widget defaults (sped up) otherwise;
    None when a required input cannot be had."""
    spec = cls.INPUT_TYPES()
    kwargs = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind = entry[0]
            if isinstance(kind, str) and kind not in WIDGETS:
                value = provided.get(kind) if kind in provided else resolve(kind)
                if value is None:
                    if section == "required":
                        return None
                    continue
                kwargs[name] = value
            elif section == "required" or name in FAST_WIDGETS:
                value = FAST_WIDGETS.get(name, _default(entry))
                if value is None:
                    return None
                kwargs[name] = value
    if getattr(cls, "INPUT_IS_LIST", False):
        kwargs = {k: [v] for k, v in kwargs.items()}
    return kwargs


@pytest.fixture(scope="module")
def graph(request, tmp_path_factory):
    """Inputs of every type the pack's nodes take: tensors made here, models from the pack's own loader nodes
    on the tiny weights of every family (loaders whose files are missing are left out)."""
    from photo_restoration.testing.tiny_checkpoints import write_all

    provided = {"IMAGE": image(2, 72, 88), "MASK": torch.rand(2, 72, 88), "LATENT": control(2, 64, 64)}
    if HAVE_WRITER:
        handle = request.getfixturevalue("supir")
        provided.update({"PHOTORESTORE_SUPIR": handle, "PHOTORESTORE_SUPIR_COND": cond(handle)})
    models = tmp_path_factory.mktemp("all_models")
    write_all(models)
    previous = comfy._models_dir_override
    comfy.set_models_dir(models)
    loaded: dict = {}

    def resolve(kind):
        if kind not in loaded:
            loaded[kind] = None
            for node_id, cls in sorted(NODE_CLASS_MAPPINGS.items()):
                kwargs = build_inputs(cls, {}, lambda k: None) if kind in cls.RETURN_TYPES else None
                if kwargs is None:
                    continue
                try:
                    with torch.inference_mode():
                        out = getattr(cls(), cls.FUNCTION)(**kwargs)
                except (FileNotFoundError, ValueError):
                    continue
                loaded[kind] = out[cls.RETURN_TYPES.index(kind)]
                break
        return loaded[kind]

    yield provided, resolve
    comfy.set_models_dir(previous)


def _takes_tensors(cls) -> bool:
    kinds = {e[0] for sec in ("required", "optional") for e in cls.INPUT_TYPES().get(sec, {}).values()
             if isinstance(e[0], str)}
    return bool(kinds & TENSOR_TYPES)


PROCESSING_NODES = sorted(n for n, c in NODE_CLASS_MAPPINGS.items() if _takes_tensors(c))


@pytest.mark.parametrize("node_id", PROCESSING_NODES)
def test_no_node_of_the_pack_modifies_its_inputs(graph, node_id):
    """Each node of the pack that takes IMAGE / MASK / LATENT / conditioning runs on tiny data; every tensor it
    was given (also inside dicts and lists) is compared before and after."""
    cls = NODE_CLASS_MAPPINGS[node_id]
    if node_id.startswith("PhotoRestoreSupir"):
        if not HAVE_WRITER:
            pytest.skip("testing/tiny_supir.py (branch supir-unet) is not merged yet")
        if not HAVE_VAE and node_id.endswith(("FirstStage", "Encode", "Decode", "Restore")):
            pytest.skip("supir/vae.py (branch supir-vae-text) is not merged yet")
        if not HAVE_TEXT and node_id.endswith(("Conditioner", "Restore")):
            pytest.skip("supir/text.py (branch supir-vae-text) is not merged yet")
    provided, resolve = graph
    kwargs = build_inputs(cls, provided, resolve)
    if kwargs is None:
        pytest.skip(f"{node_id}: no loader in the pack could build one of its model inputs from tiny weights")
    before = _snapshot(kwargs)
    with torch.inference_mode():
        getattr(cls(), cls.FUNCTION)(**kwargs)
    assert _same(before, kwargs), f"{node_id} modified its inputs"


# ---- command line -------------------------------------------------------------------------------------

@needs_vae
@needs_text
def test_cli_restore_a_folder(models_dir, tmp_path):
    from PIL import Image

    from photo_restoration.cli import main
    from photo_restoration.testing.images import synthetic_photo

    src = tmp_path / "in"
    src.mkdir()
    synthetic_photo(45, 37).save(src / "a.png")
    synthetic_photo(40, 40, seed=1).save(src / "b.jpg")
    code = main(["restore", str(src), "--out", str(tmp_path / "out"), "--models", str(models_dir), "--steps", "2",
                 "--min-short-side", "0", "--preset", "lightning", "--caption", "a photo", "--tiled", "--tile-size", "64",
                 "--tile-stride", "32"])
    assert code == 0
    code = main(["restore", str(src / "a.png"), "--out", str(tmp_path / "llava"), "--models", str(models_dir),
                 "--steps", "1", "--min-short-side", "0", "--caption-llava", "llava-1.5-7b-hf", "--caption-tokens", "4",
                 "--upscale", "1"])
    assert code == 0
    with Image.open(tmp_path / "llava" / "a.png") as im:
        assert im.size == (45, 37)
    with Image.open(tmp_path / "out" / "a.png") as im:
        assert im.size == (90, 74)
    with Image.open(tmp_path / "out" / "b.png") as im:
        assert im.size == (80, 80)


@needs_vae
@needs_text
def test_cli_demo_writes_the_restored_photo(tmp_path):
    from PIL import Image

    from photo_restoration.cli import main

    assert main(["demo", "--out", str(tmp_path), "--size", "48", "40", "--steps", "2"]) == 0
    with Image.open(tmp_path / "restored" / "input.png") as im:
        assert im.size == (96, 80)
    comfy.set_models_dir(None)


# ---- inside ComfyUI -----------------------------------------------------------------------------------

PREVIEW_SCRIPT = """
import sys, os, json, importlib.util, torch
sys.path.insert(0, os.getcwd())
from comfy.cli_args import args, LatentPreviewMethod
args.cpu = True
args.preview_method = LatentPreviewMethod.Latent2RGB
import folder_paths, comfy.model_management, comfy.utils
spec = importlib.util.spec_from_file_location("pack_under_test", os.path.join(sys.argv[1], "__init__.py"),
                                              submodule_search_locations=[sys.argv[1]])
pack = importlib.util.module_from_spec(spec); sys.modules["pack_under_test"] = pack; spec.loader.exec_module(pack)
adapter = sys.modules["pack_under_test.nodes.comfy"]
support = sys.modules["pack_under_test.nodes.supir_support"]
seen = []
comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: seen.append([v, t, type(p[1]).__name__ if p else None]))
with adapter.Progress(4, "x") as bar:
    cb = support.Callbacks(bar, adapter.latent_preview_fn(), runs=2)
    cb.run = 1
    cb.progress(1, 2, preview=torch.randn(1, 4, 8, 8))
    cb.progress(2, 2, preview=None)
print("RESULT" + json.dumps(seen))
"""


def test_sampler_progress_carries_latent_previews_in_comfyui(tmp_path):
    """Inside ComfyUI a sampler step's denoised latent becomes a preview picture on the node's progress bar;
    steps of image 2 of a batch continue the bar."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set: no ComfyUI checkout to test against")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", PREVIEW_SCRIPT, str(root)],
                          cwd=path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert seen == [[3, 4, "Image"], [4, 4, None]]
