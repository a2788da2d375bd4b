"""Any face model through the pack's detection / alignment / parse-mask paste-back: random-weight files in
each model's published key layout (built from spandrel's own architectures, detected by spandrel's
ModelLoader) load with Load Face Model and restore with Face Restore; CodeFormer loads with the pack's own
loader; spandrel is optional (imported only when a non-CodeFormer file is loaded)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from photo_restoration.codeformer import face_models
from photo_restoration.nodes.face_nodes import (NODE_CLASS_MAPPINGS, CodeFormerFaceRestore, FaceRestore,
                                                LoadCodeFormer, LoadFaceDetector, LoadFaceModel)
from photo_restoration.testing import tiny_face_models

from .test_face_nodes import models  # noqa: F401 (the fixture: tiny CodeFormer, detector and parser files)

spandrel = pytest.importorskip("spandrel")


@pytest.fixture(scope="module")
def rf_models(models):  # noqa: F811
    """The models folder of test_face_nodes, plus RestoreFormer.pth."""
    tiny_face_models.write_restoreformer(models, 0)
    return models


@pytest.fixture(scope="module")
def detector(rf_models):
    return LoadFaceDetector().load("mobilenet0.25", "parsenet")[0]


def photo(h=96, w=96, seed=0):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_node_ids_and_the_new_node_inputs():
    assert {"PhotoRestoreLoadFaceModel", "PhotoRestoreFaceRestore"} <= set(NODE_CLASS_MAPPINGS)
    spec = FaceRestore.INPUT_TYPES()
    assert list(spec["required"])[:4] == ["image", "face_model", "face_detector", "strength"]
    assert spec["required"]["strength"][1]["default"] == 1.0
    assert list(spec["optional"]) == list(CodeFormerFaceRestore.INPUT_TYPES()["optional"])


def test_restoreformer_random_weights_are_detected_by_spandrel():
    sd = tiny_face_models.restoreformer_state_dict(0)
    descriptor = spandrel.ModelLoader().load_from_state_dict({"params_ema": sd})
    assert descriptor.architecture.id == "RestoreFormer" and descriptor.purpose == "FaceSR"


def test_gfpgan_random_weights_are_detected_by_spandrel():
    state = torch.random.get_rng_state()
    sd = tiny_face_models.gfpgan_state_dict(0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the writer keeps the global RNG
    assert "stylegan_decoder.style_mlp.1.weight" in sd and "toRGB.0.weight" in sd
    model = face_models.load_face_model({"params_ema": sd})
    assert face_models.architecture_of(model) == "GFPGAN"


def test_restoreformer_load_restore_paste(rf_models, detector):
    (fm,) = LoadFaceModel().load("RestoreFormer.pth", "fp32")
    assert fm.info["arch"] == "RestoreFormer"
    img = photo()
    before = img.clone()
    out, mask, restored, original, info = FaceRestore().restore(img, fm, detector, strength=1.0, upscale=2)
    assert torch.equal(img, before)
    assert out.shape == (1, 192, 192, 3) and mask.shape == (1, 192, 192) and mask.max() > 0.5
    assert restored.shape == original.shape == (1, 512, 512, 3) and torch.isfinite(out).all()
    assert not torch.allclose(restored, original, atol=0.05)  # the network did something
    assert "RestoreFormer" in info and "1 restored" in info and "parse mask=on" in info


def test_restoreformer_strength_zero_pastes_the_original_face(rf_models, detector):
    (fm,) = LoadFaceModel().load("RestoreFormer.pth", "fp32")
    out, mask, restored, original, info = FaceRestore().restore(photo(), fm, detector, strength=0.0)
    assert torch.equal(restored, original)


def test_restoreformer_has_aligned_batch(rf_models):
    (fm,) = LoadFaceModel().load("RestoreFormer.pth", "fp32")
    faces = torch.rand(2, 512, 512, 3, generator=torch.Generator().manual_seed(1))
    out, mask, restored, original, info = FaceRestore().restore(faces, fm, None, has_aligned=True)
    assert out.shape == faces.shape and torch.equal(out, restored)


def test_restoreformer_pp_config_is_read_from_the_released_layout():
    sd = tiny_face_models.restoreformer_pp_state_dict(0)
    assert all(k.startswith("vqvae.") for k in sd)
    cfg = face_models.restoreformer_pp_config({k[6:]: v for k, v in sd.items()})
    assert cfg["attn_resolutions"] == (16,) and cfg["decoder_attn_resolutions"] == (16, 32)
    assert cfg["head_size"] == 4 and cfg["ch"] == 32 and len(cfg["ch_mult"]) == 6
    plain = tiny_face_models.restoreformer_state_dict(0)
    assert face_models.restoreformer_pp_config(plain)["head_size"] == 8  # the original RestoreFormer


def test_restoreformer_pp_decoder_attends_to_the_encoder_level_features():
    """The 32 px decoder attention takes the encoder's level-4 output as queries (official fallback key)."""
    sd = tiny_face_models.restoreformer_pp_state_dict(0)
    net = face_models.load_restoreformer_pp(sd, "test")
    seen = {}
    block = net.decoder.up[4].attn[0]
    block.register_forward_hook(lambda m, args, out: seen.setdefault("y", args[1]))
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    with torch.no_grad():
        y = net(x)[0]
        hs = net.encoder(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.equal(seen["y"], hs["block_4"])


def test_restoreformer_pp_load_restore_paste(rf_models, detector):
    tiny_face_models.write_restoreformer_pp(rf_models, 0)
    (fm,) = LoadFaceModel().load("RestoreFormer++.ckpt", "fp32")
    assert fm.info["arch"] == "RestoreFormer++"
    out, mask, restored, original, info = FaceRestore().restore(photo(seed=6), fm, detector, upscale=1)
    assert out.shape == (1, 96, 96, 3) and mask.max() > 0.5 and torch.isfinite(out).all()
    assert not torch.allclose(restored, original, atol=0.05)
    assert "RestoreFormer++" in info


@pytest.mark.slow
def test_gfpgan_load_restore_paste(rf_models, detector):
    tiny_face_models.write_gfpgan(rf_models, 0)
    try:
        (fm,) = LoadFaceModel().load("GFPGANv1.4.pth", "fp32")
        assert fm.info["arch"] == "GFPGAN"
        img = photo(seed=3)
        out, mask, restored, original, info = FaceRestore().restore(img, fm, detector, strength=0.7)
        assert out.shape == img.shape and mask.max() > 0.5 and torch.isfinite(out).all()
        assert not torch.allclose(restored, original, atol=0.05)
        again = FaceRestore().restore(img, fm, detector, strength=0.7)
        assert torch.equal(again[0], out)  # constant StyleGAN noise: the same result on every run
        assert "GFPGAN" in info and "CodeFormer only" in info
        with pytest.raises(ValueError, match="dtype"):
            LoadFaceModel().load("GFPGANv1.4.pth", "fp16")
    finally:
        (rf_models / "facerestore_models" / "GFPGANv1.4.pth").unlink()


def test_codeformer_through_load_face_model_equals_the_codeformer_node(rf_models, detector):
    (fm,) = LoadFaceModel().load("codeformer.pth", "fp32")
    (cf,) = LoadCodeFormer().load("codeformer.pth", "fp32")
    assert fm.info["arch"] == "CodeFormer"
    img = photo(seed=4)
    a = FaceRestore().restore(img, fm, detector, fidelity=0.7)
    b = CodeFormerFaceRestore().restore(img, cf, detector, fidelity=0.7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


def test_files_that_are_not_face_models_get_clear_errors(rf_models, tmp_path):
    from spandrel.architectures.Compact import Compact

    upscaler = tmp_path / "4x_compact.pth"
    torch.save(Compact(num_feat=8, num_conv=2, upscale=4).state_dict(), upscaler)
    with pytest.raises(ValueError, match="not a face restoration model"):
        face_models.load_face_model(upscaler)
    rfpp = dict(tiny_face_models.restoreformer_pp_state_dict(0))
    del rfpp["vqvae.decoder.up.4.attn.0.q.weight"]
    with pytest.raises(ValueError, match=r"RestoreFormer\+\+"):
        face_models.load_face_model({"state_dict": rfpp})
    junk = tmp_path / "junk.pth"
    torch.save({"foo.weight": torch.zeros(2)}, junk)
    with pytest.raises(ValueError, match="junk.pth"):
        face_models.load_face_model(junk)


def test_missing_spandrel_is_a_clear_error_naming_it(rf_models, monkeypatch):
    monkeypatch.setattr(face_models, "_spandrel", lambda: None)
    with pytest.raises(ImportError, match="spandrel"):
        LoadFaceModel().load("RestoreFormer.pth", "fp32")
    (cf,) = LoadFaceModel().load("codeformer.pth", "fp32")  # CodeFormer never needs it
    assert cf.info["arch"] == "CodeFormer"


def test_the_pack_imports_without_spandrel():
    root = Path(__file__).resolve().parents[2]
    code = ("import sys; sys.modules['spandrel'] = None; sys.path.insert(0, 'bench'); "
            "from checkout import import_pack; import_pack(); "
            "import photo_restoration.nodes.face_nodes as f; import photo_restoration.codeformer.face_models; "
            "assert 'PhotoRestoreLoadFaceModel' in f.NODE_CLASS_MAPPINGS; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
