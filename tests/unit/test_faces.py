"""Face geometry (codeformer.faces): alignment, paste matrices, region-of-interest paste-back equal to
the reference's full-canvas formula (up to OpenCV's sample quantisation), eye-distance formulas of both helpers, grayscale test."""
import numpy as np
import pytest

from photo_restoration.codeformer import faces as F


def similarity(scale, angle, tx, ty):
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def landmarks_for(m_img_to_crop):
    """Landmarks in the image whose exact crop transform is ``m_img_to_crop``."""
    inv = np.linalg.inv(np.vstack([m_img_to_crop, [0, 0, 1]]))[:2]
    t = F.FFHQ_TEMPLATE_512
    return (t @ inv[:, :2].T + inv[:, 2]).astype(np.float32)


def test_estimate_recovers_an_exact_similarity():
    m = similarity(3.1, 0.2, -40.0, 12.5)
    got = F.estimate_affine(landmarks_for(m))
    np.testing.assert_allclose(got, m, atol=1e-4)


def test_estimate_is_robust_to_one_outlier():
    m = similarity(2.0, -0.1, 10.0, -5.0)
    lm = landmarks_for(m)
    lm[2] += (25, -18)  # nose far off
    got = F.estimate_affine(lm)
    np.testing.assert_allclose(got, m, atol=1e-3)
    assert np.abs(F.lsq_similarity(lm, F.FFHQ_TEMPLATE_512) - m).max() > 1


def test_paste_matrix_offsets():
    m = similarity(2.5, 0.3, 7.0, -3.0)
    inv = F.inverse_affine(m, 1)
    np.testing.assert_allclose(F.paste_affine(m, 1), inv)  # no offset at upscale 1
    p2 = F.paste_affine(m, 2)
    np.testing.assert_allclose(p2[:, :2], 2 * inv[:, :2])
    np.testing.assert_allclose(p2[:, 2], 2 * inv[:, 2] + 1.0)
    up = F.paste_affine(m, 2, face_upsampled=True)  # face already 2x: linear part unscaled
    np.testing.assert_allclose(up[:, :2], inv[:, :2])
    np.testing.assert_allclose(up[:, 2], 2 * inv[:, 2])


def _scene(rng, h, w, up, with_parse):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mats = [similarity(4.0, 0.15, -60, -40), similarity(6.5, -0.4, -700, 30), similarity(3.0, 0.05, 10, -500)]
    faces = []
    for m in mats:  # the second and third faces hang over the right / bottom borders
        crop = F.align_face(image, F.estimate_affine(landmarks_for(m)))
        parse = None
        if with_parse:
            keep = np.zeros((512, 512), bool)
            keep[100:450, 120:400] = True
            parse = F.parse_mask_512(keep)
        faces.append(F.PasteFace(255 - crop, F.paste_affine(F.estimate_affine(landmarks_for(m)), up), parse))
    bg = F.resize_background(image, (w * up, h * up))
    return bg, faces


@pytest.mark.parametrize("up", [1, 2, 3])
@pytest.mark.parametrize("helper", ["codeformer", "facexlib"])
@pytest.mark.parametrize("with_parse", [False, True])
def test_roi_paste_equals_full_canvas(up, helper, with_parse):
    rng = np.random.default_rng(up)
    bg, faces = _scene(rng, 150, 170, up, with_parse)
    full, full_mask = F.paste_faces(bg, faces, up, helper, roi=False)
    roi, roi_mask = F.paste_faces(bg, faces, up, helper, roi=True)
    # Equal up to OpenCV's 1/32-pixel sample quantisation, which depends on the translation of the
    # warp matrix: a handful of warped face values land one level apart.
    a, b = F.to_uint8(full).astype(int), F.to_uint8(roi).astype(int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 5e-3
    diff = np.abs(roi - full)
    assert diff.max() <= 1.001 and (diff > 1e-2).mean() < 5e-3
    np.testing.assert_allclose(roi_mask, full_mask, atol=2e-3)
    assert full_mask.max() > 0.99 and full_mask.min() == 0


def test_paste_keeps_alpha_and_untouched_pixels():
    rng = np.random.default_rng(0)
    bg, faces = _scene(rng, 150, 170, 1, False)
    rgba = np.concatenate([bg, rng.integers(0, 256, bg.shape[:2] + (1,), dtype=np.uint8)], 2)
    out, mask = F.paste_faces(rgba, faces[:1], 1)
    assert out.shape == rgba.shape
    np.testing.assert_array_equal(out[:, :, 3], rgba[:, :, 3])
    far = mask == 0
    np.testing.assert_array_equal(out[:, :, :3][far], rgba[:, :, :3][far])


def test_parse_mask_replaces_square_in_facexlib_and_intersects_in_codeformer():
    rng = np.random.default_rng(1)
    bg, faces = _scene(rng, 150, 170, 1, True)
    _, m_cf = F.paste_faces(bg, faces[:1], 1, "codeformer")
    _, m_fx = F.paste_faces(bg, faces[:1], 1, "facexlib")
    _, m_sq = F.paste_faces(bg, [F.PasteFace(faces[0].restored, faces[0].matrix)], 1, "codeformer")
    assert np.all(m_cf <= m_sq + 1e-6) and np.all(m_cf <= m_fx + 1e-6)
    assert not np.allclose(m_fx, m_sq)


def test_eye_distance_indices_per_helper():
    det = np.zeros(15, np.float32)
    det[5:15] = [10, 20, 40, 24, 25, 35, 12, 50, 38, 52]  # le, re, nose, lm, rm
    assert F.eye_distance(det, "facexlib") == pytest.approx(np.hypot(30, 4))
    # CodeFormer's copy: (left_eye_y - right_eye_y, right_eye_x - nose_x)
    assert F.eye_distance(det, "codeformer") == pytest.approx(np.hypot(20 - 24, 40 - 25))


def test_is_gray_and_center_face():
    g = np.repeat(np.random.default_rng(0).integers(0, 256, (20, 20, 1), dtype=np.uint8), 3, 2)
    assert F.is_gray(g)
    c = g.copy()
    c[:, :, 0] = 255 - c[:, :, 0]
    assert not F.is_gray(c)
    dets = np.array([[0, 0, 10, 10], [40, 40, 60, 60], [90, 0, 100, 10]], np.float32)
    assert F.center_face_index(dets, 100, 100) == 1
