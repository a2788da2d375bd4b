"""CodeFormer network and loader: the official layout, loading rules, fidelity weight, precisions, errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

from tests.parity import harness
from photo_restoration.codeformer.arch import CodeFormer, adaptive_instance_norm, calc_mean_std
from photo_restoration.codeformer.loader import build_codeformer, detect_config, load_codeformer
from photo_restoration.testing.tiny_codeformer import TINY_CONFIG, tiny_codeformer_state_dict, write_codeformer


OFFICIAL = {
    "nf": 64, "ch_mult": [1, 2, 2, 4, 4, 8], "res_blocks": 2, "attn_resolutions": [16], "img_size": 512,
    "emb_dim": 256, "codebook_size": 1024, "latent_size": 256, "dim_embd": 512, "n_head": 8, "n_layers": 9,
    "dim_mlp": 1024, "connect_list": ["32", "64", "128", "256"],
}

# A 64x64 variant (3 levels, 16x16 latent) with the same block types: fast enough to run many times.
MICRO = {"ch_mult": [1, 2, 1], "img_size": 64, "connect_list": ["32", "64"], "dim_embd": 32, "n_head": 4,
         "dim_mlp": 64, "codebook_size": 32, "emb_dim": 32}


@pytest.fixture(scope="module")
def micro_sd():
    return tiny_codeformer_state_dict(seed=1, **MICRO)


@pytest.fixture(scope="module")
def micro(micro_sd):
    return load_codeformer(micro_sd, n_head=4)


@pytest.fixture(scope="module")
def faces():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


# ---- layout -------------------------------------------------------------------------------------------------

def test_full_size_model_has_exactly_the_official_keys_and_shapes():
    manifest = json.loads(harness.manifest("codeformer", "codeformer_params_ema.json").read_text())["keys"]
    meta_sd = {k: torch.empty(v["shape"], device="meta") for k, v in manifest.items()}
    assert detect_config(meta_sd) == OFFICIAL
    model = build_codeformer(detect_config(meta_sd))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(manifest)  # same keys, same order
    assert ours == {k: v["shape"] for k, v in manifest.items()}
    assert sum(v.numel() for v in model.state_dict().values()) == 94_112_707


def test_detect_config_reads_the_tiny_writer_back():
    sd = tiny_codeformer_state_dict(seed=0)
    detected = detect_config(sd)
    assert {k: detected[k] for k in TINY_CONFIG} == TINY_CONFIG
    assert detected["img_size"] == 512 and detected["latent_size"] == 256


def test_fusion_scales_follow_the_weights(micro_sd):
    without_64 = {k: v for k, v in micro_sd.items() if not k.startswith("fuse_convs_dict.64.")}
    model = load_codeformer(without_64, n_head=4)
    assert list(model.fuse_convs_dict) == ["32"]


# ---- loading ------------------------------------------------------------------------------------------------

def test_every_container_loads_the_same_weights(tmp_path, micro_sd, micro, faces):
    torch.save({"params_ema": micro_sd, "params": {}}, tmp_path / "ema.pth")
    torch.save({"params": micro_sd}, tmp_path / "params.pt")
    torch.save(micro_sd, tmp_path / "bare.ckpt")
    save_file(micro_sd, str(tmp_path / "weights.safetensors"))
    with torch.inference_mode():
        ref = micro(faces, w=0.5)
        for name in ("ema.pth", "params.pt", "bare.ckpt", "weights.safetensors"):
            model = load_codeformer(tmp_path / name, n_head=4)
            assert not model.training and not any(p.requires_grad for p in model.parameters())
            assert torch.equal(model(faces, w=0.5), ref), name
        assert torch.equal(load_codeformer({"params_ema": micro_sd}, n_head=4)(faces, w=0.5), ref)


def test_weights_are_loaded_in_the_requested_dtype_not_the_files(tmp_path, micro_sd):
    save_file({k: v.half() for k, v in micro_sd.items()}, str(tmp_path / "half.safetensors"))
    model = load_codeformer(tmp_path / "half.safetensors", dtype=torch.float32, n_head=4)
    assert {p.dtype for p in model.state_dict().values()} == {torch.float32}
    assert not any(p.is_meta for p in model.state_dict().values())


def test_head_count_defaults_to_official_and_can_come_from_metadata_or_caller(tmp_path, micro_sd):
    assert load_codeformer(micro_sd).config.n_head == 8
    assert load_codeformer(micro_sd, n_head=2).config.n_head == 2
    save_file(micro_sd, str(tmp_path / "w.safetensors"), metadata={"n_head": "4"})
    assert load_codeformer(tmp_path / "w.safetensors").config.n_head == 4


def test_unrelated_truncated_or_incomplete_files_are_clear_errors(tmp_path, micro_sd):
    gfpgan = {"conv_body_first.weight": torch.zeros(32, 3, 1, 1), "stylegan_decoder.style_mlp.1.weight":
              torch.zeros(512, 512)}
    retinaface = {"body.conv1.0.weight": torch.zeros(8, 3, 3, 3), "ClassHead.0.conv1x1.weight":
                  torch.zeros(4, 64, 1, 1)}
    torch.save({"params_ema": gfpgan}, tmp_path / "GFPGANv1.4.pth")
    torch.save(retinaface, tmp_path / "detection_mobilenet0.25_Final.pth")
    for name in ("GFPGANv1.4.pth", "detection_mobilenet0.25_Final.pth"):
        with pytest.raises(ValueError, match=rf"{name}.*not a CodeFormer checkpoint.*missing"):
            load_codeformer(tmp_path / name)

    torch.save({"params_ema": micro_sd}, tmp_path / "codeformer.pth")
    data = (tmp_path / "codeformer.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read CodeFormer weights .*cut\.pth"):
        load_codeformer(tmp_path / "cut.pth")

    incomplete = {k: v for k, v in micro_sd.items() if k != "generator.blocks.5.q.weight"}
    torch.save(incomplete, tmp_path / "incomplete.pth")
    with pytest.raises(ValueError, match=r"incomplete\.pth.*1 missing keys \['generator\.blocks\.5\.q\.weight'\]"):
        load_codeformer(tmp_path / "incomplete.pth", n_head=4)

    extra = {**micro_sd, "ft_layers.0.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['ft_layers\.0\.extra\.weight'\]"):
        load_codeformer(extra, n_head=4)

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_codeformer(tmp_path / "nowhere.pth")


# ---- forward semantics --------------------------------------------------------------------------------------

def test_codes_and_latent_do_not_depend_on_w_or_adain(micro, faces):
    with torch.inference_mode():
        runs = [micro(faces, w=w, adain=a, return_codes=True) for w in (0.0, 1.0) for a in (False, True)]
    for r in runs[1:]:
        assert torch.equal(r.logits, runs[0].logits) and torch.equal(r.lq_feat, runs[0].lq_feat)
        assert torch.equal(r.code_idx, runs[0].logits.argmax(-1))
    assert runs[0].out.shape == faces.shape and runs[0].logits.shape == (2, 256, 32)
    assert runs[0].lq_feat.shape == (2, 32, 16, 16)


def test_w_zero_decodes_the_codes_alone_and_w_scales_the_fusion(micro, micro_sd, faces):
    no_fusion = {k: (torch.zeros_like(v) if k.startswith("fuse_convs_dict.") else v) for k, v in micro_sd.items()}
    other = load_codeformer(no_fusion, n_head=4)
    with torch.inference_mode():
        w0 = micro(faces, w=0.0)
        assert torch.equal(other(faces, w=0.0), w0)  # fusion blocks skipped entirely at w == 0
        assert torch.allclose(micro(faces, w=1e-6), w0, atol=1e-4)  # continuous at 0
        w1 = micro(faces, w=1.0)
        assert (w1 - w0).abs().mean() > 1e-2  # the encoder features pull the result at w == 1
        assert not torch.equal(micro(faces, w=0.5), w1)
        assert torch.equal(micro(faces, w=torch.tensor(0.0)), w0)
        assert torch.equal(micro(faces, w=-0.5), w0)  # like the reference's `if w > 0`


def test_per_sample_w_equals_separate_scalar_runs(micro, faces):
    with torch.inference_mode():
        batched = micro(faces, w=torch.tensor([-1.0, 0.7]))  # <= 0: no fusion for that face
        singles = [micro(faces[i:i + 1], w=w) for i, w in enumerate((0.0, 0.7))]
    assert torch.allclose(batched, torch.cat(singles), atol=1e-4, rtol=0)  # 1.06e-5 seen on some CPUs
    with pytest.raises(ValueError, match="3 values for a batch of 2"):
        micro(faces, w=torch.tensor([0.1, 0.2, 0.3]))


def test_a_cpu_batch_runs_face_by_face_with_the_same_results(micro, faces):
    """On the CPU a batch is restored one face at a time (faster per face): every output, codes included,
    equals the single-face calls exactly."""
    with torch.inference_mode():
        batched = micro(faces, w=torch.tensor([0.3, 0.9]), return_codes=True)
        singles = [micro(faces[i:i + 1], w=w, return_codes=True) for i, w in enumerate((0.3, 0.9))]
    for name, got in batched._asdict().items():
        assert torch.equal(got, torch.cat([getattr(s, name) for s in singles])), name


def test_input_size_is_checked(micro):
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        micro(torch.zeros(1, 3, 64, 48))


def test_adain_uses_unbiased_variance_with_eps_inside_the_sqrt():
    gen = torch.Generator().manual_seed(0)
    content, style = torch.randn(2, 4, 5, 5, generator=gen), torch.randn(2, 4, 5, 5, generator=gen) * 3 + 1
    mean, std = calc_mean_std(style)
    assert torch.allclose(std.flatten(), (style.flatten(2).var(2, unbiased=True) + 1e-5).sqrt().flatten())
    out = adaptive_instance_norm(content, style)
    out_mean, out_std = calc_mean_std(out)
    assert torch.allclose(out_mean, mean, atol=1e-5) and torch.allclose(out_std, std, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_run_and_stay_close_to_float32(micro, micro_sd, faces, dtype):
    low = load_codeformer(micro_sd, dtype=dtype, n_head=4)
    with torch.inference_mode():
        ref = micro(faces, w=0.5, return_codes=True)
        got = low(faces.to(dtype), w=0.5, return_codes=True)
        assert got.out.dtype == dtype
        assert (got.logits.float() - ref.logits).abs().max() < 0.1
        assert (got.code_idx == ref.code_idx).float().mean() > 0.9  # argmax near-ties may flip
        # with the same codes the decoder itself is close
        lq_feat, feats = low.encode(faces.to(dtype))
        quant = adaptive_instance_norm(low.quantize.lookup(ref.code_idx, 16), lq_feat)
        out = low.decode(quant, feats, 0.5).float()
    assert torch.isfinite(out).all()
    assert (out - ref.out).abs().mean() < 0.05 and (out - ref.out).abs().max() < 0.5


def test_tiny_writer_makes_an_official_style_file_for_512_faces(tmp_path):
    (path,) = write_codeformer(tmp_path, seed=3)
    assert path == tmp_path / "facerestore_models" / "codeformer.pth"
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert set(stored) == {"params_ema"}
    assert torch.equal(stored["params_ema"]["position_emb"], tiny_codeformer_state_dict(3)["position_emb"])
    model = load_codeformer(path)
    assert isinstance(model, CodeFormer) and model.config.img_size == 512
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, 512, 512), w=0.0)
    assert out.shape == (1, 3, 512, 512) and torch.isfinite(out).all()


@pytest.mark.parametrize("config", [
    {"nf": 32, "ch_mult": [1, 1, 2, 2, 1, 2], "dim_embd": 48, "dim_mlp": 96, "n_layers": 3, "codebook_size": 40,
     "connect_list": ["32", "64", "128"]},
    {"nf": 64, "ch_mult": [1, 1, 1], "img_size": 64, "res_blocks": 1, "attn_resolutions": [16, 32], "emb_dim": 8,
     "connect_list": ["16", "64"], "n_layers": 0},
])
def test_detect_config_recovers_other_configurations(config):
    model = build_codeformer({**TINY_CONFIG, **config})
    sd = {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}
    detected = detect_config(sd)
    assert {k: detected[k] for k in config} == config
    assert list(build_codeformer(detected).state_dict()) == list(sd)
