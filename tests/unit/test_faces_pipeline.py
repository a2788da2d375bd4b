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


def test_all_faces_of_all_images_go_through_the_network_in_chunks_of_one_image(detector):
    net = StubCodeFormer()
    img = photo(b=3)
    res = restore_faces(img, net, detector, None, FaceSettings(batch_size=4, use_parse=False, fidelity=0.7,
                                                                adain=False))
    n = res.restored_faces.shape[0]
    assert n == len(res.faces) >= 3
    per_image = [sum(f["image"] == i for f in res.faces) for i in range(3)]
    expected = [m for k in per_image for m in [4] * (k // 4) + ([k % 4] if k % 4 else [])]
    assert [c[0] for c in net.calls] == expected  # a chunk never mixes images
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
    # luma AdaIN-matched to the input face's channels: gray up to the tint of the crop's border fill (135,133,132)
    assert torch.allclose(r.mean((1, 2)), res.cropped_faces.mean((1, 2)), atol=1 / 255)
    assert (r[..., 0] - r[..., 1]).abs().max() <= 6 / 255 and (r[..., 0] - r[..., 2]).abs().max() <= 6 / 255
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
    assert parse_indices("", 9) is None and parse_indices("all", 9) is None
    assert parse_indices("0, 2,5", 9) == [0, 2, 5]
    assert parse_indices("1-3", 9) == [1, 2, 3]
    assert parse_indices("5,1-3,2", 4) == [1, 2, 3]  # ascending, once each, below the face count
    assert parse_indices("0-99999999999", 3) == [0, 1, 2]  # ranges are intersected, never expanded


@pytest.mark.parametrize("text", ["abc", "1-", "-1", "3-1", "0.5", "1--2"])
def test_bad_face_index_is_a_value_error_naming_the_input(detector, text):
    with pytest.raises(ValueError, match="face_index"):
        restore_faces(photo(), StubCodeFormer(), detector, use_parse=False, face_index=text)


def test_huge_face_index_ranges_are_cheap_and_the_report_stays_short(detector):
    for text in ("0-99999999999", "0-2000000"):
        res = restore_faces(photo(), StubCodeFormer(), detector, use_parse=False, face_index=text)
        assert len(res.faces) == 2 and len(res.info) < 2000


def test_empty_batch_gives_an_empty_result(detector):
    res = restore_faces(torch.zeros(0, 64, 80, 3), StubCodeFormer(), detector, upscale=2)
    assert res.images.shape == (0, 128, 160, 3) and res.mask.shape == (0, 128, 160)
    assert "empty batch" in res.info


def sepia(rgb):
    """A sepia-toned picture: every channel a multiple of the luma (strong tone, not 'gray' by the official test)."""
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return torch.stack([y * 1.0, y * 0.78, y * 0.52], -1).clamp(0, 1)


def test_toned_aligned_face_keeps_its_tint(detector):
    face = sepia(photo(h=512, w=512))
    net = StubCodeFormer()
    res = restore_faces(face, net, detector, has_aligned=True)
    assert res.images.shape == face.shape
    got, want = res.images[0].mean((0, 1)), face[0].mean((0, 1))
    assert torch.allclose(got, want, atol=2 / 255), (got, want)
    assert "toned" in res.info


def test_toned_picture_keeps_its_tint_through_detection_and_paste(detector):
    img = sepia(photo(h=96, w=128))
    res = restore_faces(img, StubCodeFormer(), detector, use_parse=False)
    crops, restored = res.cropped_faces, res.restored_faces
    assert torch.allclose(restored.mean((1, 2)), crops.mean((1, 2)), atol=2 / 255)
    assert torch.allclose(restored.std((1, 2)), crops.std((1, 2)), atol=2 / 255)


def test_colour_pictures_keep_the_network_colours(detector):
    res = restore_faces(photo(), StubCodeFormer(), detector, use_parse=False)
    assert torch.allclose(res.restored_faces, 1 - res.cropped_faces, atol=1 / 255 + 1e-6)
    assert "toned" not in res.info


def test_has_aligned_restores_a_batch_directly(detector):
    small = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    faces = torch.nn.functional.interpolate(small, size=(256, 256), mode="bilinear").permute(0, 2, 3, 1)
    net = StubCodeFormer()
    res = restore_faces(faces, net, detector, has_aligned=True, fidelity=0.3, upscale=2)
    assert res.images.shape == faces.shape and res.mask.shape == (3, 256, 256) and bool((res.mask == 1).all())
    assert res.restored_faces.shape == res.cropped_faces.shape == (3, 512, 512, 3)
    assert [c[0] for c in net.calls] == [1, 1, 1] and all(c[1] == 0.3 for c in net.calls)
    # the stub inverts: the output is the inverted face, resized back to 256
    assert torch.allclose(res.images, 1 - faces, atol=3 / 255)
    assert "aligned" in res.info and "upscale ignored" in res.info


def test_per_face_fidelity(detector):
    net = StubCodeFormer()
    res = restore_faces(photo(b=2), net, detector, use_parse=False, fidelity=0.5, face_fidelity="0.1, 0.9")
    assert [f["fidelity"] for f in res.faces] == [0.1, 0.9, 0.1, 0.9]
    res = restore_faces(photo(b=2), net, detector, use_parse=False, fidelity=0.5, face_fidelity="0.2; 0.3,0.4")
    assert [f["fidelity"] for f in res.faces] == [0.2, 0.5, 0.3, 0.4]
    for bad in ("x", "0.5,2", "0.1;nan?"):
        with pytest.raises(ValueError, match="face_fidelity"):
            restore_faces(photo(), net, detector, face_fidelity=bad)


def test_per_face_fidelity_reaches_the_network_as_one_value_per_face(detector):
    seen = []

    class Recorder(StubCodeFormer):
        def forward(self, x, w=0.5, adain=True):
            seen.append(w.tolist() if torch.is_tensor(w) else w)
            return -x

    restore_faces(photo(), Recorder(), detector, use_parse=False, face_fidelity="0.25,0.75")
    assert seen == [[0.25, 0.75]]


def test_draw_box_frames_faces_in_green(detector):
    img = torch.full((1, 96, 128, 3), 0.5)
    plain = restore_faces(img, StubCodeFormer(), detector, use_parse=False, max_faces=1)
    boxed = restore_faces(img, StubCodeFormer(), detector, use_parse=False, max_faces=1, draw_box=True)
    changed = (boxed.images - plain.images).abs().sum(-1) > 1e-3
    assert changed.any()
    px = boxed.images[changed]
    assert bool((px[:, 1] >= px[:, 0]).all() and (px[:, 1] >= px[:, 2]).all())


def test_face_upsample_runs_at_upscale_one_as_the_official_helper(detector):
    seen = []

    def face_up(x):
        seen.append(tuple(x.shape))
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")

    res = restore_faces(photo(h=64, w=64), StubCodeFormer(), detector, None, upscale=1, use_parse=False,
                        face_upsample=True, face_upscaler=face_up, max_faces=1)
    assert seen == [(1, 3, 512, 512)] and res.images.shape == (1, 64, 64, 3)


def test_strength_blends_the_restored_face_with_the_input_face(detector):
    res = restore_faces(photo(), StubCodeFormer(), detector, use_parse=False, strength=0.0)
    assert torch.allclose(res.restored_faces, res.cropped_faces)
    half = restore_faces(photo(), StubCodeFormer(), detector, use_parse=False, strength=0.5)
    assert torch.allclose(half.restored_faces, torch.full_like(half.restored_faces, 0.5), atol=1 / 255 + 1e-6)


def test_no_network_call_mixes_images(detector):
    """A restorer whose output depends on the whole chunk: each image still comes out as when alone."""

    class ChunkSensitive(StubCodeFormer):
        def forward(self, x, w=0.5, adain=True):
            return (-x + x.mean(0, keepdim=True)).clamp(-1, 1)

    batch = photo(b=3, seed=4)
    together = restore_faces(batch, ChunkSensitive(), detector, use_parse=False, batch_size=16)
    for i in range(3):
        alone = restore_faces(batch[i:i + 1], ChunkSensitive(), detector, use_parse=False, batch_size=16)
        assert torch.equal(alone.images[0], together.images[i]), i


@pytest.mark.slow
def test_each_image_gives_the_same_result_alone_or_in_a_batch(detector, parser):
    """Issue 16: no result depends on its batch neighbours (chunks never mix images)."""
    from photo_restoration.codeformer.arch import CodeFormer
    from photo_restoration.codeformer.loader import load_codeformer
    from photo_restoration.testing.tiny_codeformer import tiny_codeformer_state_dict

    net = load_codeformer({"params_ema": tiny_codeformer_state_dict(0)})
    assert isinstance(net, CodeFormer)
    batch = photo(b=2, h=96, w=96, seed=5)  # one face each: a batch of 2 would mix them in one network call
    together = restore_faces(batch, net, detector, parser, batch_size=8)
    assert len(together.faces) == 2
    for i in range(2):
        alone = restore_faces(batch[i:i + 1], net, detector, parser, batch_size=8)
        assert torch.equal(alone.images[0], together.images[i]), i
        assert torch.equal(alone.mask[0], together.mask[i]), i


def test_non_finite_pixels_are_read_by_a_documented_rule(detector):
    img = photo()
    img[0, :10, :10, 0] = float("nan")
    img[0, 20:30, :10, 1] = float("inf")
    res = restore_faces(img, StubCodeFormer(), detector, use_parse=False, upscale=2)
    assert torch.isfinite(res.images).all() and "non-finite" in res.info
