"""The SUPIR nodes as users wire them, on tiny random weights in the official layouts.

Every node, every option family (tiled/untiled VAE and sampling, both samplers, the presets, batches
of 2, odd sizes, core LATENTs in and out), the errors users can act on, that no node of the pack
modifies its inputs, and the ``restore`` / ``demo`` command lines.
"""
from __future__ import annotations

import math

import pytest
import torch

from photo_restoration import NODE_CLASS_MAPPINGS
from photo_restoration.nodes import comfy
from photo_restoration.nodes import supir_io as IO
from photo_restoration.nodes import supir_nodes as N
from photo_restoration.nodes import supir_sampler_nodes as SN
from photo_restoration.supir import pipeline as E
from photo_restoration.supir.sizes import fit
from photo_restoration.supir.vae import SCALE_FACTOR


def image(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, 3, generator=g)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
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
    return IO.latent_dict(torch.randn(b, 4, h // 8, w // 8, generator=g) * 0.8, (h, w), (h, w))


FAST = dict(seed=3, sampler="EDM", steps=1, cfg_scale_start=4.0, cfg_scale_end=7.5, control_scale_start=1.0,
            control_scale_end=0.9, restore_cfg=-1.0, s_churn=5.0, s_noise=1.003, eta=1.0, tiled=False,
            tile_size=64, tile_stride=32, tile_batch_size=8)


# ---- pure helpers ---------------------------------------------------------------------------------

def test_presets_follow_the_official_settings():
    q, f, l, lf = (E.settings(k) for k in ("Quality", "Fidelity", "Lightning", "Lightning Fidelity"))
    assert (q.sampler, q.steps, q.cfg_scale_start, q.cfg_scale, q.s_churn, q.s_noise) == ("edm", 50, 4.0, 7.5, 5, 1.003)
    assert (f.sampler, f.steps, f.cfg_scale_start, f.cfg_scale) == ("edm", 50, 1.0, 4.0)
    assert (l.sampler, l.steps, l.cfg_scale_start, l.cfg_scale) == ("dpmpp_2m_sde", 8, 2.0, 2.0)
    assert (lf.sampler, lf.steps, lf.cfg_scale_start, lf.cfg_scale) == ("dpmpp_2m_sde", 8, 1.5, 1.5)
    assert all(p.restore_cfg == -1 and p.control_scale == 1.0 for p in (q, f, l, lf))


@pytest.mark.parametrize("h,w,up,min_side", [(80, 96, 2.0, 0), (37, 51, 2.0, 0), (100, 60, 1.5, 1024), (64, 64, 1, 0)])
def test_size_plan_output_is_exactly_input_times_upscale(h, w, up, min_side):
    p = E.plan(E.settings(upscale_by=up, min_short_side=min_side), h, w)
    assert p.output == (math.floor(h * up + 0.5), math.floor(w * up + 0.5))
    assert all(s % 64 == 0 and s >= t for s, t in zip(p.internal, p.work))
    if min_side:
        assert min(p.work) >= min_side


def test_too_small_image_is_refused_with_the_size():
    with pytest.raises(ValueError, match="too small.*8x20 px"):
        E.plan(E.settings(), 20, 8)


def test_latents_are_unscaled_in_comfyui_convention():
    z = torch.randn(1, 4, 6, 5)
    lat = IO.latent_dict(z, (48, 40), (48, 40))
    assert torch.allclose(lat["samples"] * SCALE_FACTOR, z, atol=1e-6)
    assert torch.allclose(IO.scaled_latent(lat), z, atol=1e-6)
    core = {"samples": lat["samples"]}  # what VAE Encode would give: no size keys
    assert IO.latent_size(core) == (48, 40) and IO.latent_work(core) == (48, 40)
    with pytest.raises(ValueError, match="latent.*4-channel"):
        IO.scaled_latent({"samples": torch.zeros(1, 16, 4, 4)})


def test_official_caption_concatenation_and_keep_positive_mode():
    assert E.join_prompt("an old man", "sharp.") == "an old mansharp."  # official: no separator
    assert E.join_prompt("", "sharp.") == "sharp."
    long_caption = " ".join(["a very detailed photo of a tree"] * 30)
    kept = E.join_prompt(long_caption, E.DEFAULT_A_PROMPT, E.CAPTION_MODES[1])
    assert kept.endswith(", " + E.DEFAULT_A_PROMPT)
    from photo_restoration.supir.text import count_tokens

    assert count_tokens(kept) <= 75


def test_captions_from_lists_or_lines():
    assert IO.split_captions(None) == []
    assert IO.split_captions(["one\ntwo\n\n"]) == ["one", "two"]
    assert IO.split_captions(["a", "b c"]) == ["a", "b c"]
    assert IO.split_captions([["x", "y"]]) == ["x", "y"]
    # an empty caption keeps its place (no caption for that tile); all empty = no captions
    assert IO.split_captions(["a", "", "b"]) == ["a", "", "b"]
    assert IO.split_captions(["a\n\nb"]) == ["a", "", "b"]
    assert IO.split_captions(["", " "]) == []


def test_conditioning_counts_map_to_images_or_tiles_or_fail_clearly():
    assert E.cond_plan(1, 2, None) == "shared"
    assert E.cond_plan(2, 2, 6) == "per_image"
    assert E.cond_plan(6, 1, 6) == "per_tile"
    assert E.cond_plan(12, 2, 6) == "per_image_tile"
    with pytest.raises(ValueError, match="3 prompts.*2 image"):
        E.cond_plan(3, 2, None)


def test_auto_tiling_above_one_and_a_half_tiles():
    auto, on, off = (E.settings(tiling=t, tile_size=1024) for t in ("auto", "on", "off"))
    assert not E.wants_tiles(auto, 1024, 1536)
    assert E.wants_tiles(auto, 2048, 2048)
    assert E.wants_tiles(on, 64, 64) and not E.wants_tiles(off, 4096, 4096)


def test_colour_fix_node_methods_and_reference_resize():
    img, ref = image(2, 40, 56), image(1, 20, 28, seed=5)
    for method in E.COLOR_FIXES:
        out = N.ColorFix().fix(img, ref, method)[0]
        assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(N.ColorFix().fix(img, ref, "None")[0], img)
    wav = N.ColorFix().fix(img, img, "Wavelet")[0]
    assert torch.allclose(wav, img, atol=1e-5)  # its own colours: unchanged
    with pytest.raises(ValueError, match="3 images for 2"):
        N.ColorFix().fix(img, image(3, 8, 8), "AdaIN")


def test_tiles_node_matches_the_sampler_grid():
    from photo_restoration.supir.tiles import image_windows

    img = image(2, 200, 330)
    tiles, layout, count, rows, cols = N.Tiles().tile(img, 128, 64)
    windows = image_windows(256, 384, 128, 64)  # the sampling grid: 200x330 padded to 256x384
    assert count == len(windows) == rows * cols
    assert tiles.shape == (2 * count, 128, 128, 3)
    assert f"{rows} rows x {cols} columns" in layout
    # image-major: the first `count` tiles come from image 0, and tile 0 is its top-left corner
    assert torch.allclose(tiles[0], img[0, :128, :128], atol=1e-6)
    assert torch.allclose(tiles[count], img[1, :128, :128], atol=1e-6)
    # sized like SUPIR Restore: upscale x2 with the short-side rule
    up = N.Tiles().tile(img, 1024, 512, 2.0, 1024)
    grid = image_windows(*E.plan(E.settings(upscale_by=2.0, min_short_side=1024), 200, 330).internal, 1024, 512)
    assert up[2] == len(grid) and up[0].shape[1:3] == (1024, 1024)


def test_oom_errors_say_what_to_change():
    err = E.oom_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "sampling",
                      2048, 1536, tiled=False)
    text = str(err)
    assert "1536x2048 px" in text and "tiled sampling" in text and "fp8" in text and "tiled VAE" in text
    vae = str(E.oom_error(RuntimeError("out of memory"), "decoding (VAE)", 4096, 4096, tiled=True))
    assert "256 px" in vae and "16.8 megapixels" in vae


# ---- loaders ---------------------------------------------------------------------------------------

def test_load_supir_lists_both_folders_and_loads(files, supir):
    spec = N.LoadSupir.INPUT_TYPES()["required"]
    assert files[0] in spec["sdxl_checkpoint"][0] and files[1] in spec["supir_checkpoint"][0]
    assert spec["weight_dtype"][0] == ["auto", "fp16", "bf16", "fp32", "fp8"]
    assert isinstance(supir, IO.SupirHandle) and supir.model.denoiser is not None


def test_fp8_weights_sample(files):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8_e4m3fn")
    handle = N.LoadSupir().load(*files, "fp8", "fp32")[0]
    out = SN.Sampler().sample(handle, cond(handle), cond(handle), control(1, 64, 64), **FAST)[0]
    assert torch.isfinite(out["samples"]).all()


def test_swapped_checkpoints_are_a_clear_error(files):
    sdxl, supir = files
    with pytest.raises(ValueError, match="(?i)supir|sdxl"):
        N.LoadSupir().load(supir, sdxl, "fp32", "fp32")


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
    assert isinstance(handle, IO.SupirHandle)
    new = comfy.state_dicts_from_comfy(NewModel(), FakeClip(), FakeVae())
    k = next(k for k in new if k.startswith("model.diffusion_model."))
    assert type(new[k]) is torch.Tensor and bool((new[k] == 7.0).all())
    assert calls == ["old", "new"]
    with pytest.raises(ValueError, match="ComfyUI MODEL"):
        comfy.state_dicts_from_comfy(object(), None, None)


# ---- sampler (latents in and out) --------------------------------------------------------------------

@pytest.mark.parametrize("sampler", list(SN.SAMPLERS))
@pytest.mark.parametrize("tiled", [False, True])
def test_sampler_each_sampler_tiled_and_untiled(supir, sampler, tiled):
    lat = control(1, 96, 72)  # odd latent 12x9: padded to 16x16 inside; tiles 8/4 (64/32 px)
    args = {**FAST, "sampler": sampler, "tiled": tiled}
    out = SN.Sampler().sample(supir, cond(supir), cond(supir, seed=9), lat, **args)[0]
    assert out["samples"].shape == lat["samples"].shape and torch.isfinite(out["samples"]).all()
    assert out[IO.SIZE_KEY] == (96, 72)
    again = SN.Sampler().sample(supir, cond(supir), cond(supir, seed=9), lat, **args)[0]
    assert torch.equal(out["samples"], again["samples"])  # same seed, same result


def test_sampler_batch_of_two_uses_seed_plus_index(supir):
    lat = control(2, 64, 64)
    both = SN.Sampler().sample(supir, cond(supir), cond(supir), lat, **FAST)[0]["samples"]
    lat1 = {"samples": lat["samples"][1:]}
    second = SN.Sampler().sample(supir, cond(supir), cond(supir), lat1, **{**FAST, "seed": FAST["seed"] + 1})[0]
    assert torch.allclose(both[1:], second["samples"], atol=1e-5)


def test_sampler_takes_a_core_latent_and_gives_one(supir):
    core = {"samples": torch.randn(1, 4, 8, 8)}  # e.g. from VAE Encode: unscaled, no size keys
    out = SN.Sampler().sample(supir, cond(supir), cond(supir), core, **FAST)[0]
    assert set(out) == {"samples"} and out["samples"].shape == (1, 4, 8, 8)
    assert out["samples"].abs().mean() > 1.0  # unscaled convention: ~1/0.13025 larger than SUPIR's space


def test_sampler_per_tile_prompts_need_tiling_and_the_right_count(supir):
    lat = control(1, 128, 64)
    tiles = E.tile_count(E.settings(tile_size=64, tile_stride=32), 16, 8)
    assert tiles == 3
    out = SN.Sampler().sample(supir, cond(supir, tiles), cond(supir), lat, **{**FAST, "tiled": True})[0]
    assert out["samples"].shape == lat["samples"].shape
    with pytest.raises(ValueError, match="prompts"):
        SN.Sampler().sample(supir, cond(supir, tiles), cond(supir), lat, **FAST)


def test_sampler_restore_cfg_uses_x_center(supir):
    lat = control(1, 64, 64)
    other = control(1, 64, 64, seed=7)
    args = {**FAST, "restore_cfg": 4.0, "steps": 2}
    a = SN.Sampler().sample(supir, cond(supir), cond(supir), lat, **args)[0]["samples"]
    b = SN.Sampler().sample(supir, cond(supir), cond(supir), lat, **args, x_center=other)[0]["samples"]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="differ in shape"):
        SN.Sampler().sample(supir, cond(supir), cond(supir), lat, **args, x_center=control(1, 128, 64))


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
        SN.Sampler().sample(supir, cond(supir), cond(supir), control(1, 64, 64), **{**FAST, "steps": 3})


def test_sampler_out_of_memory_becomes_advice(supir, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(E, "_run_sampler", oom)
    with pytest.raises(RuntimeError, match="tiled sampling"):
        SN.Sampler().sample(supir, cond(supir), cond(supir), control(1, 64, 64), **FAST)


# ---- VAE nodes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tiled", [False, True])
def test_first_stage_batch_of_two_odd_size(supir, tiled):
    img = image(2, 72, 100)
    stage1, lat = N.FirstStage().run(supir, img, tiled, 64, 64)
    assert stage1.shape == img.shape and stage1.min() >= 0 and stage1.max() <= 1
    assert lat["samples"].shape == (2, 4, 128 // 8, 128 // 8)  # internal size: multiples of 64
    assert lat[IO.SIZE_KEY] == (72, 100) and lat[IO.WORK_KEY] == (72, 100)
    # LATENT is unscaled: x 0.13025 gives the denoise encoder's scaled latent
    x = fit(img[:1].movedim(-1, 1), E.plan(E.settings(), 72, 100)) * 2 - 1
    with torch.inference_mode():
        z = supir.model.vae.encode_lq(x)
    assert torch.allclose(lat["samples"][:1] * SCALE_FACTOR, z, atol=1e-4)


def test_tiled_vae_matches_untiled(supir):
    img = image(1, 96, 160)
    a = N.FirstStage().run(supir, img, False, 64, 64)
    b = N.FirstStage().run(supir, img, True, 64, 64)
    # exact statistics: equal within float noise (3x headroom over the 1e-3 seen on some CPUs)
    assert torch.allclose(a[1]["samples"], b[1]["samples"], atol=3e-3)
    assert torch.allclose(a[0], b[0], atol=3e-3)


def test_encode_decode_keep_the_size(supir):
    img = image(2, 72, 100)
    lat = N.Encode().encode(supir, img, True, 64)[0]
    assert lat["samples"].shape == (2, 4, 16, 16) and lat[IO.SIZE_KEY] == (72, 100)
    out = N.Decode().decode(supir, lat, True, 64)[0]
    assert out.shape == img.shape
    core = N.Decode().decode(supir, {"samples": lat["samples"][:1, :, :5, :7]}, False, 64)[0]
    assert core.shape == (1, 40, 56, 3)


def test_decode_of_the_sampler_output(supir):
    stage1, lat = N.FirstStage().run(supir, image(1, 80, 96), True, 512, 512)
    out = SN.Sampler().sample(supir, cond(supir), cond(supir), lat, **FAST)[0]
    img = N.Decode().decode(supir, out, True, 512)[0]
    assert img.shape == (1, 80, 96, 3)


# ---- text, all in one -------------------------------------------------------------------------------

def test_conditioner_with_and_without_captions(supir):
    pos, neg = SN.Conditioner().condition([supir], ["sharp"], ["blurry"], [E.CAPTION_MODES[0]])
    assert pos["crossattn"].shape[:2] == (1, 77) and neg["crossattn"].shape[0] == 1
    pos, _ = SN.Conditioner().condition([supir], ["sharp"], ["blurry"], [E.CAPTION_MODES[1]], ["a dog", "a cat"])
    assert pos["crossattn"].shape[0] == 2 and pos["texts"] == ["a dog, sharp", "a cat, sharp"]
    pos, _ = SN.Conditioner().condition([supir], ["sharp"], ["blurry"], [E.CAPTION_MODES[0]], ["a dog\na cat\na cow"])
    assert pos["texts"] == ["a dogsharp", "a catsharp", "a cowsharp"]


@pytest.mark.parametrize("preset", ["Quality", "Fidelity", "Lightning"])
def test_restore_presets_batch_of_two_exact_output_size(supir, preset):
    img = image(2, 37, 45)
    out = SN.Restore().restore([supir], [img], [2.0], [preset], [1], [2], ["sharp"], ["blurry"], [0], ["off"],
                              [1024], [512], ["Wavelet"], [True])[0]
    assert out.shape == (2, 74, 90, 3) and out.min() >= 0 and out.max() <= 1


def test_restore_tiled_with_per_tile_captions(supir):
    img = image(1, 96, 160)
    tiles = N.Tiles().tile(img, 128, 64)[2]
    caps = [f"tile {i}" for i in range(tiles)]
    out = SN.Restore().restore([supir], [img], [1.0], ["Lightning"], [0], [2], ["sharp"], ["blurry"], [0], ["on"],
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
    provided, resolve = graph
    kwargs = build_inputs(cls, provided, resolve)
    if kwargs is None:
        pytest.skip(f"{node_id}: no loader in the pack could build one of its model inputs from tiny weights")
    before = _snapshot(kwargs)
    with torch.inference_mode():
        getattr(cls(), cls.FUNCTION)(**kwargs)
    assert _same(before, kwargs), f"{node_id} modified its inputs"


# ---- command line -------------------------------------------------------------------------------------

def test_cli_restore_a_folder(models_dir, tmp_path):
    from PIL import Image

    from photo_restoration.cli import main
    from photo_restoration.testing.images import synthetic_photo

    src = tmp_path / "in"
    src.mkdir()
    synthetic_photo(45, 37).save(src / "a.png")
    synthetic_photo(40, 40, seed=1).save(src / "b.jpg")
    ckpts = models_dir / "checkpoints"
    pick = ["--sdxl", str(ckpts / "sd_xl_base_1.0.safetensors"), "--supir", str(ckpts / "SUPIR-v0Q.ckpt")]
    code = main(["restore", str(src), "--out", str(tmp_path / "out"), "--models", str(models_dir), *pick,
                 "--steps", "2", "--min-short-side", "0", "--preset", "lightning", "--caption", "a photo", "--tiled", "--tile-size", "64",
                 "--tile-stride", "32"])
    assert code == 0
    code = main(["restore", str(src / "a.png"), "--out", str(tmp_path / "llava"), "--models", str(models_dir), *pick,
                 "--steps", "1", "--min-short-side", "0", "--caption-llava", "llava-1.5-7b-hf", "--caption-tokens", "4",
                 "--upscale", "1"])
    assert code == 0
    with Image.open(tmp_path / "llava" / "a.png") as im:
        assert im.size == (45, 37)
    with Image.open(tmp_path / "out" / "a.png") as im:
        assert im.size == (90, 74)
    with Image.open(tmp_path / "out" / "b.png") as im:
        assert im.size == (80, 80)


def test_cli_demo_writes_the_restored_photo(tmp_path):
    from PIL import Image

    from photo_restoration.cli import main

    assert main(["demo", "--out", str(tmp_path), "--size", "48", "40", "--steps", "2"]) == 0
    with Image.open(tmp_path / "restored" / "input.png") as im:
        assert im.size == (96, 80)
    comfy.set_models_dir(None)
