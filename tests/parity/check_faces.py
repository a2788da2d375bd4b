"""Parity checks for the CodeFormer face geometry and RetinaFace post-processing.

* ``face_align_paste``: 5-point estimate, aligned crop, inverse/paste affine and paste-back (square
  soft mask) of both helper variants, through :mod:`photo_restoration.codeformer.faces` - the same
  functions the pipeline calls (region-of-interest paste included).
* ``face_affine_estimate``: the LMEDS similarity on exact / noisy / outlier landmarks.
* ``retinaface_decode``: priors, decoding, threshold and NMS of
  :mod:`photo_restoration.codeformer.detection` on given head outputs.
"""
from __future__ import annotations

import numpy as np
import torch

from photo_restoration.codeformer import detection, faces

from .harness import assert_close


def _u8_check(name: str, got: np.ndarray, ref: np.ndarray, tol: dict) -> None:
    got = np.asarray(got)
    ref = np.asarray(ref)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    diff = np.abs(got.astype(np.int64) - ref.astype(np.int64))
    strict_ok = diff.max(initial=0) <= tol["max_abs"] and (diff > 0).mean() <= tol["max_fraction_differing"]
    if strict_ok:
        return
    alt = tol.get("semantic_alternative")
    if alt is not None and diff.max() <= alt["max_abs"] and (diff >= 2).mean() <= alt["max_fraction_abs_ge_2"]:
        return
    raise AssertionError(f"{name}: max |diff| {diff.max()}, {(diff > 0).mean():.4%} of values differ "
                         f"({(diff >= 2).mean():.4%} by >= 2); tolerance {tol}")


def _affine_tol(case, key):
    t = case["tolerance"][key]
    return t["atol"], t.get("rtol", 0.0)


def check_align_paste(case) -> None:
    cfg = case["config"]
    ins, outs = case["inputs"], case["outputs"]
    helper = "facexlib" if case.get("helper") == "facexlib" else "codeformer"
    image = case.tensor(ins["image_bgr_u8"]).numpy()
    landmarks = case.tensor(ins["landmarks"]).numpy()
    up = cfg["upscale_factor"]
    if helper == "codeformer":
        up = int(up)  # CodeFormer's copy casts the factor to int
    size = cfg.get("face_size", 512)
    template = np.asarray(cfg["face_template"], np.float64)
    np.testing.assert_allclose(faces.face_template(size), template, atol=1e-9)

    affines = np.stack([faces.estimate_affine(lm, size) for lm in landmarks])
    atol, rtol = _affine_tol(case, "affine")
    assert_close("affine", affines, case.tensor(outs["affine"]), atol, rtol)

    crops = np.stack([faces.align_face(image, a, size, rgb=False) for a in affines])
    _u8_check("cropped_bgr_u8", crops, case.tensor(outs["cropped_bgr_u8"]).numpy(), case["tolerance"]["cropped_bgr_u8"])

    inv = np.stack([faces.inverse_affine(a, up) for a in affines])
    atol, rtol = _affine_tol(case, "inverse_affine")
    assert_close("inverse_affine", inv, case.tensor(outs["inverse_affine"]), atol, rtol)
    mats = np.stack([faces.paste_affine(a, up) for a in affines])
    atol, rtol = _affine_tol(case, "paste_affine")
    assert_close("paste_affine", mats, case.tensor(outs["paste_affine"]), atol, rtol)

    # restored stand-in: the inverted crop of the *reference* (the crop check above covers ours)
    ref_crops = case.tensor(outs["cropped_bgr_u8"]).numpy()
    pasted_faces = [faces.PasteFace(255 - c, m) for c, m in zip(ref_crops, mats)]
    h, w = image.shape[:2]
    bg = faces.resize_background(image, (int(w * up), int(h * up)), helper)
    ref = case.tensor(outs["pasted_bgr_u8"]).numpy()
    tol = case["tolerance"]["pasted_bgr_u8"]
    for roi in (False, True):
        canvas, _ = faces.paste_faces(bg, pasted_faces, up, helper, roi=roi)
        _u8_check(f"pasted_bgr_u8 (roi={roi})", faces.to_uint8(canvas), ref, tol)


def check_affine_estimate(case) -> None:
    lms = case.tensor(case["inputs"]["landmarks"]).numpy()
    got = np.stack([faces.estimate_affine(lm) for lm in lms])
    atol, rtol = _affine_tol(case, "affine")
    assert_close("affine", got, case.tensor(case["outputs"]["affine"]), atol, rtol)


def check_retinaface_decode(case) -> None:
    cfg = case["config"]
    ins, outs, tol = case["inputs"], case["outputs"], case["tolerance"]
    hw = tuple(cfg["image_hw"])
    priors = detection.prior_boxes(hw, [tuple(m) for m in cfg["min_sizes"]], cfg["steps"])
    assert_close("priors", priors, case.tensor(outs["priors"]), tol["priors"]["atol"], tol["priors"].get("rtol", 0))
    loc = case.tensor(ins["loc"])
    logits = case.tensor(ins["conf_logits"])
    landm = case.tensor(ins["landm"])
    batch = loc.shape[0]
    ref_dets = case.tensor(outs["detections"])
    for b in range(batch):
        scores = torch.softmax(logits[b].float(), -1)[:, 1]
        res = detection.decode_detections(loc[b], scores, landm[b], hw, cfg["conf_threshold"], cfg["nms_threshold"],
                                          priors=priors, variance=tuple(cfg.get("variance", detection.VARIANCE)))
        for key, got in (("scores", res["scores"]), ("boxes_px", res["boxes"]), ("landmarks_px", res["landmarks"])):
            ref = case.tensor(outs[key])
            if ref.ndim == got.ndim + 1:  # one row of references per image of the batch
                ref = ref[b]
            assert_close(key, got, ref, tol[key]["atol"], tol[key].get("rtol", 0))
        ref = ref_dets[b] if ref_dets.ndim == 3 else ref_dets
        got = torch.from_numpy(res["detections"])
        assert got.shape == ref.shape, f"detections: {tuple(got.shape)} rows vs expected {tuple(ref.shape)}"
        assert_close("detections", got, ref, tol["detections"]["atol"], tol["detections"].get("rtol", 0))


CHECKS = {
    ("codeformer", "face_align_paste"): check_align_paste,
    ("codeformer", "face_affine_estimate"): check_affine_estimate,
    ("codeformer", "retinaface_decode"): check_retinaface_decode,
}
