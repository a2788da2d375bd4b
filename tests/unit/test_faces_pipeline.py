"""codeformer.pipeline.restore_faces as a specification: every face of every image goes through the
network in chunks, faces are selected/gated as asked, no face means the input comes back, odd inputs
(RGBA, gray, 1x1, 4k, batch of 3) never crash, the input is never modified.

The detector is a real RetinaFace mobilenet0.25 with rigged heads (testing.tiny_faces): it finds a
face at the top-left anchor of every picture (two on a 4:3 picture). The restorer is a stub that
inverts the crop, so these tests run in seconds; the real tiny network runs in test_face_nodes.py.
"""
import pytest
import torch

from photo_restoration.codeformer.detection import load_retinaface
from photo_restoration.codeformer.parsing import load_parser
from photo_restoration.codeformer.pipeline import FaceSettings, parse_indices, restore_faces
from photo_restoration.testing.tiny_faces import parsenet_state_dict, retinaface_state_dict


@pytest.fixture(scope="module")
def detector():
    return load_retinaface(retinaface_state_dict("mobilenet0.25", 0))


@pytest.fixture(scope="module")
def blind_detector():
    return load_retinaface(retinaface_state_dict("mobilenet0.25", 0, faces=False))


@pytest.fixture(scope="module")
def parser():
    return load_parser(parsenet_state_dict(0))


class StubCodeFormer(torch.nn.Module):
    """Inverts the face; records the batch sizes and arguments it was called with."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x, w=0.5, adain=True):
        self.calls.append((x.shape[0], w, adain))
        return -x


def photo(b=1, h=96, w=128, c=3, seed=0):
    return torch.rand(b, h, w, c, generator=torch.Generator().manual_seed(seed))


def test_all_faces_of_all_images_go_through_the_network_in_chunks(detector):
    net = StubCodeFormer()
    img = photo(b=3)
    res = restore_faces(img, net, detector, None, FaceSettings(batch_size=4, use_parse=False, w=0.7, adain=False))
    n = res.restored_faces.shape[0]
    assert n == len(res.faces) >= 3
    assert [c[0] for c in net.calls] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    assert all(c[1] == 0.7 and c[2] is False for c in net.calls)
    assert res.images.shape == img.shape and res.mask.shape == img.shape[:3]
    assert res.cropped_faces.shape == res.restored_faces.shape == (n, 512, 512, 3)
    # the stub inverts the crop: restored = 1 - original (up to rounding)
    assert torch.allclose(res.restored_faces, 1 - res.cropped_faces, atol=1 / 255 + 1e-6)
    assert 0 <= res.mask.min() and res.mask.max() > 0.99
    assert not torch.equal(res.images, img)
    assert "restored" in res.info


def test_upscale_and_parse_mask(detector, parser):
    net = StubCodeFormer()
    img = photo()
    res = restore_faces(img, net, detector, parser, FaceSettings(upscale=2, max_faces=1))
    assert res.images.shape == (1, 192, 256, 3) and res.mask.shape == (1, 192, 256)
    assert len(res.faces) == 1 and "parse mask=on" in res.info


def test_no_face_returns_the_input_unchanged(blind_detector):
    net = StubCodeFormer()
    img = photo(b=2)
    res = restore_faces(img, net, blind_detector)
    assert torch.equal(res.images, img) and not net.calls
    assert res.mask.abs().sum() == 0
    assert "no faces" in res.info
    up = restore_faces(img, net, blind_detector, upscale=3)
    assert up.images.shape == (2, 288, 384, 3)
    assert res.restored_faces.shape == (1, 512, 512, 3)  # a black placeholder crop


def test_input_is_never_modified(detector):
    img = photo()
    before = img.clone()
    restore_faces(img, StubCodeFormer(), detector, use_parse=False)
    assert torch.equal(img, before)


@pytest.mark.parametrize("shape", [(1, 64, 80, 4), (1, 64, 80, 1), (1, 1, 1, 3), (3, 40, 30, 3), (1, 2, 900, 3)])
def test_odd_inputs_do_not_crash(detector, shape):
    img = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    res = restore_faces(img, StubCodeFormer(), detector, use_parse=False, upscale=2)
    b, h, w, c = shape
    assert res.images.shape == (b, 2 * h, 2 * w, c)
    assert torch.isfinite(res.images).all() and res.images.min() >= 0 and res.images.max() <= 1
    if c == 4:  # alpha is carried (resized), never restored
        assert torch.allclose(res.images[..., 3].mean(), img[..., 3].mean(), atol=0.05)


def test_4k_input_without_faces_is_cheap_and_unchanged(blind_detector):
    img = torch.zeros(1, 2160, 3840, 3)
    img[..., 1] = 0.5
    res = restore_faces(img, StubCodeFormer(), blind_detector)
    assert torch.equal(res.images, img)


def test_grayscale_inputs_get_gray_faces(detector):
    img = photo().mean(-1, keepdim=True).expand(-1, -1, -1, 3).contiguous()
    net = StubCodeFormer()
    res = restore_faces(img, net, detector, use_parse=False)
    r = res.restored_faces
    assert torch.equal(r[..., 0], r[..., 1]) and torch.equal(r[..., 1], r[..., 2])
    assert "grayscale" in res.info


def test_selection_by_index_size_and_centre(detector):
    img = photo(b=1)
    base = restore_faces(img, StubCodeFormer(), detector, use_parse=False)
    assert len(base.faces) == 2
    one = restore_faces(img, StubCodeFormer(), detector, use_parse=False, face_index="1")
    assert len(one.faces) == 1 and one.faces[0]["box"] == base.faces[1]["box"]
    none = restore_faces(img, StubCodeFormer(), detector, use_parse=False, min_face_size=10_000)
    assert not none.faces and torch.equal(none.images, img) and "min" in none.info
    centre = restore_faces(img, StubCodeFormer(), detector, use_parse=False, only_center_face=True)
    assert len(centre.faces) == 1
    capped = restore_faces(img, StubCodeFormer(), detector, use_parse=False, max_faces=1)
    assert len(capped.faces) == 1


def test_upscalers_are_used_for_background_and_faces(detector):
    seen = {"bg": [], "face": []}

    def bg_up(x):
        seen["bg"].append(tuple(x.shape))
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")

    def face_up(x):
        seen["face"].append(tuple(x.shape))
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")

    img = photo(h=64, w=64)
    res = restore_faces(img, StubCodeFormer(), detector, None, upscale=2, use_parse=False, background_enhance=True,
                        face_upsample=True, upscaler=bg_up, face_upscaler=face_up, max_faces=1)
    assert res.images.shape == (1, 128, 128, 3)
    assert seen["bg"] and seen["face"] == [(1, 3, 512, 512)]


def test_facexlib_helper_variant_runs(detector, parser):
    res = restore_faces(photo(), StubCodeFormer(), detector, parser, helper="facexlib", conf_threshold=0.97)
    assert res.images.shape == (1, 96, 128, 3) and "helper=facexlib" in res.info


def test_parse_indices():
    assert parse_indices("") is None and parse_indices("all") is None
    assert parse_indices("0, 2,5") == [0, 2, 5]
    assert parse_indices("1-3") == [1, 2, 3]
