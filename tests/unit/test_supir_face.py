"""SUPIR face mode on tiny random weights: the face pipeline (detection, 512 alignment, parse-mask paste) with
SUPIR as its face network, the background left alone or restored by SUPIR, cancel, and the node."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from photo_restoration.codeformer.pipeline import FaceSettings, restore_faces
from photo_restoration.nodes import comfy
from photo_restoration.nodes.face_nodes import LoadFaceDetector
from photo_restoration.nodes.supir_face_nodes import NODE_CLASS_MAPPINGS, SupirFaceRestore
from photo_restoration.nodes.supir_nodes import LoadSupir
from photo_restoration.supir import face_mode as FM
from photo_restoration.supir import pipeline as E

H, W = 256, 224  # below a 512 short side: the face pipeline works on an upsized copy
# One face: box and five landmarks (eyes, nose, mouth corners) in pixels of a 256 px high picture.
FACE = np.array([[60, 60, 170, 200, 0.99, 90, 110, 140, 110, 115, 140, 95, 170, 135, 170]], np.float32)


class Cancelled(Exception):
    pass


class CancelAtOnce:
    def check_interrupt(self):
        raise Cancelled()

    def progress(self, step, total=None, preview=None):
        pass


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from photo_restoration.testing.tiny_checkpoints import write_all

    root = tmp_path_factory.mktemp("supir_face_models")
    written = write_all(root, ["supir", "retinaface_resnet50", "parsing_parsenet"])
    comfy.set_models_dir(root)
    names = [p.name for ps in written.values() for p in ps]
    sdxl = next(n for n in names if n.endswith(".safetensors") and "supir" not in n.lower())
    supir_file = next(n for n in names if "supir" in n.lower())
    with torch.inference_mode():
        handle = LoadSupir().load(sdxl, supir_file, "fp32", "fp32")[0]
    (det,) = LoadFaceDetector().load("resnet50", "parsenet")
    yield handle, det
    comfy.set_models_dir(None)


@pytest.fixture()
def fixed_face(loaded, monkeypatch):
    """The detector finds exactly FACE (the tiny random detector's own finds are not a face)."""
    _, det = loaded
    monkeypatch.setattr(det["detector"].model, "detect", lambda img, *a, **k: FACE * (img.shape[0] / H), raising=False)
    return det


def settings(**kw):
    return E.settings("Quality", steps=2, seed=3, **kw)


def picture(seed=0, h=H, w=W):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_supir_face_node_id_and_tooltips():
    (node_id,) = NODE_CLASS_MAPPINGS
    assert node_id.startswith("PhotoRestoreSupir") and "Face" in node_id
    for section in SupirFaceRestore.INPUT_TYPES().values():
        for name, (_, *opts) in section.items():
            assert opts and opts[0].get("tooltip"), name


@pytest.mark.slow
def test_supir_face_crops_are_the_helpers_512_and_the_rest_is_the_input(loaded, fixed_face):
    handle, det = loaded
    img = picture(0, 576, 512)  # a 512+ short side: no working copy, so untouched pixels are the input's own
    before = img.clone()
    net = FM.SupirFaceNet(handle.model, settings(), face_resolution=64)
    parser = comfy.load(det["parser"])
    res = restore_faces(img, net, comfy.load(det["detector"]), parser, FaceSettings(batch_size=1))
    assert torch.equal(img, before)
    assert net.received == [(3, 512, 512)] and net.count == 1
    assert res.images.shape == img.shape and res.restored_faces.shape == (1, 512, 512, 3)
    outside = res.mask[0] == 0
    assert outside.any() and (res.mask[0] > 0.5).any()
    assert (res.images[0][outside] - img[0][outside]).abs().max() < 1e-5  # float canvas: only rounding
    assert not torch.allclose(res.images[0][~outside], img[0][~outside])


@pytest.mark.slow
def test_supir_face_node_with_background_and_captions(loaded, fixed_face):
    handle, det = loaded
    img = picture(1)
    before = img.clone()
    out, faces, info = SupirFaceRestore().restore(
        [handle], [img], [det], ["Quality"], [5], [2], [64], [True], face_captions=["a smiling old man"])
    assert torch.equal(img, before)
    assert out.shape == img.shape and faces.shape == (1, 512, 512, 3) and torch.isfinite(out).all()
    assert "1 face" in info
    assert (out - img).abs().amax(-1).gt(1e-3).float().mean() > 0.5  # the background was restored too


@pytest.mark.slow
def test_supir_face_without_faces_is_the_input(loaded, monkeypatch):
    handle, det = loaded
    monkeypatch.setattr(det["detector"].model, "detect", lambda img, *a, **k: FACE[:0], raising=False)
    img = picture(2)
    out, faces, info = SupirFaceRestore().restore([handle], [img], [det], ["Quality"], [0], [2], [64], [False])
    assert torch.equal(out, img) and faces.shape == (1, 512, 512, 3)


@pytest.mark.slow
def test_supir_face_cancel_stops_inside_supir(loaded, fixed_face):
    handle, det = loaded
    net = FM.SupirFaceNet(handle.model, settings(), face_resolution=64, callbacks=CancelAtOnce())
    with pytest.raises(Cancelled):
        restore_faces(picture(), net, comfy.load(det["detector"]), None, FaceSettings(batch_size=1))
    with pytest.raises(Cancelled):  # and the face pipeline's own checks go to the same callbacks
        restore_faces(picture(), net, comfy.load(det["detector"]), None, FaceSettings(batch_size=1),
                      callbacks=FM.FacePipelineCallbacks(CancelAtOnce()))


def test_supir_face_geometry_matches_the_official_helper_on_the_parity_fixture(monkeypatch):
    """The face mode's crops and paste are the official helper's: on the facexlib align/paste fixture (upscale 1,
    square mask), SUPIR face mode with a stand-in SUPIR that inverts the face (the fixture's restored face is
    255 - crop) gives the fixture's crop and pasted picture."""
    from tests.parity.harness import load_cases

    cases = [c for c in load_cases("codeformer") if getattr(c, "name", "") == "align_paste_facexlib_up1"]
    if not cases:
        pytest.skip("parity fixture align_paste_facexlib_up1 absent")
    case = cases[0]
    bgr = case.tensor(case["inputs"]["image_bgr_u8"]).numpy()
    lms = case.tensor(case["inputs"]["landmarks"]).numpy().reshape(-1, 10)
    rows = np.concatenate([np.zeros((len(lms), 4), np.float32), np.ones((len(lms), 1), np.float32), lms], 1)
    detector = type("Fixed", (), {"detect": lambda self, img, *a, **k: rows})()
    seen = []
    monkeypatch.setattr(FM.E, "restore", lambda x, *a, **k: seen.append(x.clone()) or 1 - x)
    net = FM.SupirFaceNet(None, settings(), face_resolution=512)
    img = torch.from_numpy(bgr[:, :, ::-1].astype(np.float32) / 255.0)[None]
    res = restore_faces(img, net, detector, None, FaceSettings(helper="facexlib", use_parse=False, batch_size=1,
                                                               eye_dist_threshold=0, gray_threshold=-1))
    ref_crops = case.tensor(case["outputs"]["cropped_bgr_u8"]).numpy()[:, :, :, ::-1]
    assert len(seen) == len(lms) >= 1 and net.received == [(3, 512, 512)] * len(lms)
    got_crops = np.stack([np.round(s[0].permute(1, 2, 0).numpy() * 255) for s in seen])
    assert np.abs(got_crops - ref_crops).max() <= 1
    ref = case.tensor(case["outputs"]["pasted_bgr_u8"]).numpy()[:, :, ::-1].astype(np.int64)
    got = np.floor(res.images[0].numpy() * 255 + 1e-4).astype(np.int64)
    diff = np.abs(got - ref)
    assert diff.max() <= 2 and (diff >= 2).mean() <= 0.001, (diff.max(), (diff > 0).mean())
    assert (res.mask[0] > 0.5).float().mean() > 0.05  # a real face was pasted, not the input returned
