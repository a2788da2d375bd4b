"""SUPIR first stage (VAE, denoise encoder, tiled VAE) and SDXL text conditioning: the specification."""
import json

import pytest
import torch

from tests.parity import harness
from photo_restoration.supir import text as T
from photo_restoration.testing import comfy_layouts as L
from photo_restoration.supir.vae import SupirVAE, VAEConfig, VAETiling, build_vae, detect_vae_config
from photo_restoration.supir.vae_tiled import fit_tile, official_tiles, tiled_forward
from photo_restoration.testing.tiny_supir_parts import tiny_text_state_dict, tiny_vae_state_dict


def manifest_shapes(prefix: str) -> dict:
    keys = json.loads(harness.manifest("supir", "supir_model_union.json").read_text())["keys"]
    return {k[len(prefix):]: tuple(v["shape"]) for k, v in keys.items() if k.startswith(prefix)}


def relative(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return build_vae(relative(tiny_vae_state_dict(3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1), "first_stage_model."))


@pytest.fixture(scope="module")
def tiny_text():
    return build_text(tiny_text_state_dict(5))


def build_text(sd):
    return T.build_text_conditioner(relative(sd, "conditioner.embedders."), size_embed_dim=16)


# ---- VAE --------------------------------------------------------------------------------------------

def test_full_size_vae_has_exactly_the_official_first_stage_keys():
    expected = manifest_shapes("first_stage_model.")
    with torch.device("meta"):
        vae = SupirVAE(VAEConfig())
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == expected
    cfg = detect_vae_config({k: torch.empty(s, device="meta") for k, s in expected.items()})
    assert cfg == VAEConfig()


def test_config_is_read_from_shapes_and_denoise_encoder_is_optional():
    sd = relative(tiny_vae_state_dict(0, ch=32, ch_mult=(1, 2), num_res_blocks=2, denoise_encoder=False),
                  "first_stage_model.")
    cfg = detect_vae_config(sd)
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.has_denoise_encoder) == (32, (1, 2), 2, False)
    vae = build_vae(sd)
    assert vae.denoise_encoder is None
    with pytest.raises(ValueError, match="denoise_encoder"):
        vae.encode_lq(torch.zeros(1, 3, 16, 16))


def test_bad_weights_give_clear_errors():
    sd = relative(tiny_vae_state_dict(0, ch=32, ch_mult=(1, 2)), "first_stage_model.")
    missing = dict(sd)
    missing.pop("decoder.conv_out.bias")
    with pytest.raises(ValueError, match="missing"):
        build_vae(missing)
    with pytest.raises(ValueError, match="unexpected"):
        build_vae({**sd, "decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        build_vae({**sd, "post_quant_conv.bias": torch.zeros(5)})


def test_float16_vae_is_upgraded_to_float32_and_bfloat16_is_kept():
    sd = relative(tiny_vae_state_dict(0, ch=32, ch_mult=(1, 2)), "first_stage_model.")
    assert build_vae(sd, dtype=torch.float16).dtype == torch.float32
    assert build_vae(sd, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_latent_conventions(tiny_vae):
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    mean, logvar = tiny_vae.posterior(x)
    assert mean.shape == (2, 4, 8, 6) and mean.dtype == torch.float32
    assert torch.allclose(tiny_vae.encode(x, sample=False), mean * 0.13025)
    noise = torch.randn(2, 4, 8, 6)
    expected = (mean + torch.exp(0.5 * logvar) * noise) * 0.13025
    assert torch.allclose(tiny_vae.encode(x, noise=noise), expected)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(tiny_vae.encode(x, generator=g1), tiny_vae.encode(x, generator=g2))
    z = tiny_vae.encode_lq(x)
    out = tiny_vae.decode(z)
    assert out.shape == (2, 3, 32, 24) and out.dtype == torch.float32


# ---- tiled VAE --------------------------------------------------------------------------------------

def test_exact_tiling_equals_the_untiled_network_on_a_non_square_image(tiny_vae):
    x = torch.rand(1, 3, 72, 56) * 2 - 1
    for net in (tiny_vae.denoise_encoder, tiny_vae.encoder):
        ref = net(x)
        got = tiled_forward(net, x, 24, decoder=False, norm="exact")
        assert got.shape == ref.shape
        assert (got - ref).abs().max() < 1e-4 * (1 + ref.abs().max())
    z = torch.randn(2, 4, 9, 7)
    ref = tiny_vae.decoder(z)
    got = tiled_forward(tiny_vae.decoder, z, 4, decoder=True, norm="exact")
    assert (got - ref).abs().max() < 1e-4 * (1 + ref.abs().max())


def test_official_tiling_is_an_approximation(tiny_vae):
    x = torch.rand(1, 3, 96, 72) * 2 - 1
    ref = tiny_vae.encode_lq(x)
    official = tiny_vae.encode_lq(x, tiling=VAETiling(encoder_tile_size=24, norm="official"))
    exact = tiny_vae.encode_lq(x, tiling=VAETiling(encoder_tile_size=24, norm="exact"))
    assert official.shape == ref.shape
    assert (exact - ref).abs().max() < 1e-5
    assert (official - ref).abs().max() > 1e-4


def test_official_tile_grid():
    assert [fit_tile(t, 96) for t in (80, 64, 97)] == [96, 64, 97]
    assert fit_tile(70, 80) == 80  # 96 would exceed the limit: the next multiple of 16
    ins, outs = official_tiles(224, 216, 96, 32, decoder=False)  # boxes are [x1, x2, y1, y2]
    assert len(ins) == 4  # 2 x 2 tiles: ceil(160 / 96) x ceil(152 / 96), sides rounded up to 96
    assert ins[0] == [0, 160, 0, 160] and outs[0] == [0, 16, 0, 16]
    assert ins[-1] == [96, 216, 96, 224] and outs[-1] == [16, 27, 16, 28]


def test_small_inputs_run_untiled(tiny_vae):
    x = torch.rand(1, 3, 16, 16)
    for norm in ("exact", "official"):
        got = tiled_forward(tiny_vae.encoder, x, 64, decoder=False, norm=norm)
        assert torch.allclose(got, tiny_vae.encoder(x))


class Recorder:
    def __init__(self, stop_after=None):
        self.calls, self.stop_after = [], stop_after

    def progress(self, step, total, preview=None):
        self.calls.append((step, total))

    def check_interrupt(self):
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise InterruptedError


@pytest.mark.parametrize("norm", ["exact", "official"])
def test_tiled_vae_reports_progress_and_can_be_interrupted(tiny_vae, norm):
    z = torch.randn(1, 4, 28, 10)
    rec = Recorder()
    tiny_vae.decode(z, tiling=VAETiling(decoder_tile_size=4, norm=norm), callbacks=rec)
    steps = [s for s, _ in rec.calls]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == rec.calls[-1][1]
    with pytest.raises(InterruptedError):
        tiny_vae.decode(z, tiling=VAETiling(decoder_tile_size=4, norm=norm), callbacks=Recorder(stop_after=3))


# ---- tokenizer and prompts --------------------------------------------------------------------------

def test_tokenizer_padding_and_truncation():
    ids_l, ids_g = T.tokenize_clip_l("a photo"), T.tokenize_clip_g("a photo")
    n = T.count_tokens("a photo") + 2
    assert ids_l.shape == ids_g.shape == (1, 77)
    assert ids_l[0, 0] == ids_g[0, 0] == T.SOT_TOKEN
    assert ids_l[0, n - 1] == ids_g[0, n - 1] == T.EOT_TOKEN
    assert (ids_l[0, n:] == T.EOT_TOKEN).all() and (ids_g[0, n:] == 0).all()
    long = "word " * 100
    ids = T.tokenize_clip_g([long, "x"])
    assert ids.shape == (2, 77)
    assert ids[0, -1] == T.EOT_TOKEN and (ids[0] == T.EOT_TOKEN).sum() == 1
    assert ids[0, 1:76].tolist() == T.encode_text(long)[:75]


def test_prompt_assembly():
    assert T.assemble_prompt("A cat.", "Sharp.") == "A cat.Sharp."  # official: no separator
    positive = "cinematic, high contrast, highly detailed, hyper sharpness"
    caption = "a very long caption about a painting " * 20
    kept = T.assemble_prompt(caption, positive, "keep_positive", separator=" ")
    assert kept.endswith(positive) and T.count_tokens(kept) <= 75
    assert T.count_tokens(kept + " more words here") > 75 or len(kept) > len(positive)
    assert T.assemble_prompt("short caption.", positive, "keep_positive") == "short caption." + positive
    with pytest.raises(ValueError):
        T.assemble_prompt("a", "b", "nope")


# ---- text encoders ----------------------------------------------------------------------------------

def test_full_size_text_encoders_have_exactly_the_official_conditioner_keys():
    expected = manifest_shapes("conditioner.")
    expected = {k: s for k, s in expected.items() if not k.endswith("position_ids")}
    with torch.device("meta"):
        cond = T.SDXLTextConditioner(T.ClipL(49408, 768, 12, 3072), T.OpenClipText(49408, 1280, 32, 5120, 1280))
    got = {k: tuple(v.shape) for k, v in cond.state_dict().items() if not k.endswith("position_ids")}
    assert got == expected
    assert cond.clip_l.hf_model().config.num_attention_heads == 12
    assert cond.clip_g.transformer.resblocks[0].attn.heads == 20


def test_conditioning_shapes_and_vector_layout(tiny_text):
    out = tiny_text.encode(["a photo of a cat", "an old photograph"], original_size=(512, 768))
    assert out["crossattn"].shape == (2, 77, 64) and out["vector"].shape == (2, 128)
    _, _, pooled = tiny_text.embed(["a photo of a cat", "an old photograph"])
    assert torch.equal(out["vector"][:, :32], pooled)
    e = T.timestep_embedding(torch.tensor([512.0, 768.0]), 16).reshape(1, 32)
    assert torch.allclose(out["vector"][:, 32:64], e.expand(2, 32))
    assert torch.allclose(out["vector"][:, 64:96], T.timestep_embedding(torch.zeros(2), 16).reshape(1, 32).expand(2, 32))


def test_bigg_matches_open_clip_text_tower(tiny_text):
    from open_clip import tokenize
    from open_clip.transformer import TextTransformer

    texts = ["a photo of a dog", "Colourised OLD photograph &amp; sharp", "word " * 90]
    assert torch.equal(T.tokenize_clip_g(texts), tokenize(texts))

    g = tiny_text.clip_g
    ref = TextTransformer(width=40, heads=1, layers=2, output_dim=32)
    sd = {k: v for k, v in g.state_dict().items() if k != "logit_scale"}
    ref.load_state_dict(sd, strict=False)
    ref.eval()
    ids = T.tokenize_clip_g(["a photo of a dog", "colourised old photograph, sharp"])
    _, pooled = g(ids)
    assert torch.allclose(pooled, ref(ids), atol=1e-5)


def test_clip_l_context_is_the_penultimate_layer(tiny_text):
    ids = T.tokenize_clip_l(["a photo"])
    hf = tiny_text.clip_l.hf_model()
    hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hidden) == 3  # embeddings + 2 layers
    assert torch.equal(tiny_text.clip_l(ids), hidden[1])


def test_comfyui_clip_layout_round_trip(tiny_text):
    ours = {k[len("embedders."):]: v for k, v in tiny_text.state_dict().items()}
    comfy = L.sgm_to_comfy_clip(ours)
    assert "clip_g.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight" in comfy
    assert comfy["clip_g.transformer.text_projection.weight"].shape == (32, 40)
    comfy["clip_l.transformer.text_projection.weight"] = torch.zeros(24, 24)  # ComfyUI extras we drop
    comfy["clip_l.logit_scale"] = torch.tensor(4.6)
    back = L.comfy_clip_to_sgm(comfy)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    rebuilt = T.build_text_conditioner(back, size_embed_dim=16)
    a, b = tiny_text.encode("a photo"), rebuilt.encode("a photo")
    assert torch.equal(a["crossattn"], b["crossattn"]) and torch.equal(a["vector"], b["vector"])


def test_size_embedding_width():
    sd = relative(tiny_text_state_dict(0), "conditioner.embedders.")
    assert T.build_text_conditioner(sd).size_embed_dim == 16  # tiny default: pooled 32 // 2
    cond = T.build_text_conditioner(sd, adm_in_channels=32 + 6 * 8)
    assert cond.encode("x")["vector"].shape == (1, 80)
    with pytest.raises(ValueError):
        cond.match_adm(33)
    assert T.default_size_embed_dim(1280) == 256


def test_text_conditioner_absent_or_broken():
    assert T.build_text_conditioner({}) is None
    sd = relative(tiny_text_state_dict(0), "conditioner.embedders.")
    sd.pop("1.model.ln_final.weight")
    with pytest.raises(ValueError, match="missing"):
        T.build_text_conditioner(sd)
