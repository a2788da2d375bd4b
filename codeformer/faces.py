"""Face geometry: 5-point alignment to the FFHQ-512 template, crops, inverse affine and paste-back.

Two helper variants exist in the wild and both are reproduced:

* ``"codeformer"`` - CodeFormer's own copy of the helper (``facelib``; used by the official CLI and by
  the facerestore_cf ComfyUI pack): bilinear background resize, the square soft mask is always built
  and intersected (elementwise min) with the parsing mask when parsing is on.
* ``"facexlib"`` - facexlib 0.3.0's helper: Lanczos background resize; with parsing on, the parsing
  mask *replaces* the square mask and the face is not multiplied by the eroded square.

All images here are numpy ``(H, W, C)`` arrays; OpenCV does the warps, erosions and blurs with the
same calls and dtypes as the references, so results match them bit for bit on the full canvas.
:func:`paste_faces` works on each face's region of interest only (a padded box around the warped
face square), which gives the full-canvas result while touching a small part of the picture.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

HELPERS = ("codeformer", "facexlib")

# FFHQ 512x512 template: left eye, right eye, nose tip, left and right mouth corners (image x, y).
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
     [201.26117, 371.41043], [313.08905, 371.15118]],
    dtype=np.float64,
)
FACE_SIZE = 512
# Border fill of the aligned crop: a gray, (135, 133, 132) in B,G,R order.
CROP_BORDER_BGR = (135, 133, 132)
CROP_BORDER_RGB = CROP_BORDER_BGR[::-1]


def face_template(face_size: int = FACE_SIZE) -> np.ndarray:
    """The 5-point template for a square ``face_size`` crop."""
    return FFHQ_TEMPLATE_512 * (face_size / 512.0)


def lsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Plain least-squares 4-DOF similarity (rotation, one scale, translation) mapping src -> dst."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    n = src.shape[0]
    a = np.zeros((2 * n, 4))
    a[0::2] = np.stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)], 1)
    a[1::2] = np.stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)], 1)
    p, *_ = np.linalg.lstsq(a, dst.reshape(-1), rcond=None)
    s, r, tx, ty = p
    return np.array([[s, -r, tx], [r, s, ty]])


def estimate_affine(landmarks: np.ndarray, face_size: int = FACE_SIZE) -> np.ndarray:
    """Image -> crop similarity (2x3 float64) from 5 landmarks, OpenCV's LMEDS estimate as the references.

    The landmarks go in as float32 (what detectors hand over). A degenerate set for which the robust
    estimate fails falls back to the least-squares similarity.
    """
    lm = np.asarray(landmarks, np.float32).reshape(5, 2)
    template = face_template(face_size)
    affine = cv2.estimateAffinePartial2D(lm, template, method=cv2.LMEDS)[0]
    if affine is None or not np.all(np.isfinite(affine)):
        affine = lsq_similarity(lm, template)
    return affine.astype(np.float64)


def align_face(image: np.ndarray, affine: np.ndarray, face_size: int = FACE_SIZE, rgb: bool = True) -> np.ndarray:
    """The aligned ``face_size`` crop (bilinear, constant gray border as the references)."""
    border = CROP_BORDER_RGB if rgb else CROP_BORDER_BGR
    return cv2.warpAffine(image, affine, (face_size, face_size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=border)


def inverse_affine(affine: np.ndarray, upscale: float) -> np.ndarray:
    """``invertAffineTransform(affine) * upscale`` (crop -> output canvas, before the paste offset)."""
    return cv2.invertAffineTransform(np.asarray(affine, np.float64)) * upscale


def paste_affine(affine: np.ndarray, upscale: float, face_upsampled: bool = False) -> np.ndarray:
    """The matrix that warps the restored face onto the output canvas.

    Normal path: the inverse affine with ``+0.5*upscale`` on the translation when ``upscale > 1``.
    When the restored face was itself upsampled by ``upscale`` (CodeFormer's ``face_upsample``), the
    linear part stays unscaled and only the translation is scaled, with no half-pixel offset
    (the reference's inconsistency is kept).
    """
    inv = inverse_affine(affine, upscale)
    if face_upsampled:
        inv = inv / upscale
        inv[:, 2] *= upscale
    elif upscale > 1:
        inv[:, 2] += 0.5 * upscale
    return inv


def resize_background(image: np.ndarray, size_wh: tuple[int, int], helper: str = "codeformer",
                      upsampled: bool = False) -> np.ndarray:
    """Background at the output size: facexlib Lanczos, CodeFormer bilinear; an upsampler result Lanczos."""
    if (image.shape[1], image.shape[0]) == tuple(size_wh):
        return image.copy()
    interp = cv2.INTER_LANCZOS4 if (helper == "facexlib" or upsampled) else cv2.INTER_LINEAR
    out = cv2.resize(image, tuple(size_wh), interpolation=interp)
    return out.reshape(out.shape[0], out.shape[1], *image.shape[2:])


# ---- parsing mask ------------------------------------------------------------------------------

def parse_mask_512(keep: np.ndarray) -> np.ndarray:
    """Soft face mask (float64, 0..1) in crop space from a boolean per-pixel "keep" map.

    255 where kept, two 101x101 Gaussian blurs of sigma 11, a 10-pixel zero frame, then /255.
    """
    mask = keep.astype(np.float64) * 255.0
    mask = cv2.GaussianBlur(mask, (101, 101), 11)
    mask = cv2.GaussianBlur(mask, (101, 101), 11)
    t = 10
    mask[:t, :] = 0
    mask[-t:, :] = 0
    mask[:, :t] = 0
    mask[:, -t:] = 0
    return mask / 255.0


# ---- paste-back ----------------------------------------------------------------------------------

@dataclass
class PasteFace:
    """One face to paste: the restored crop (uint8 HxWxC, same channel order as the canvas), the
    crop -> canvas matrix (:func:`paste_affine`) and an optional parse mask (float, crop size 512)."""

    restored: np.ndarray
    matrix: np.ndarray
    parse_mask: np.ndarray | None = None


def _roi(face: PasteFace, canvas_hw: tuple[int, int], upscale: float) -> tuple[int, int, int, int]:
    """A box (x0, y0, x1, y1) of the canvas outside which every mask of this face is exactly zero."""
    fs_h, fs_w = face.restored.shape[:2]
    corners = np.array([[0, 0, 1], [fs_w, 0, 1], [0, fs_h, 1], [fs_w, fs_h, 1]], np.float64)
    pts = corners @ face.matrix.T
    bw = pts[:, 0].max() - pts[:, 0].min()
    bh = pts[:, 1].max() - pts[:, 1].min()
    w_edge = int(math.sqrt(max(bw * bh, 0.0))) // 20 + 1
    pad = 2 * w_edge + int(2 * upscale) + 4
    h, w = canvas_hw
    x0 = max(int(math.floor(pts[:, 0].min())) - pad, 0)
    y0 = max(int(math.floor(pts[:, 1].min())) - pad, 0)
    x1 = min(int(math.ceil(pts[:, 0].max())) + pad + 1, w)
    y1 = min(int(math.ceil(pts[:, 1].max())) + pad + 1, h)
    return x0, y0, x1, y1


def _shifted(matrix: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    m = matrix.copy()
    m[0, 2] -= offset[0]
    m[1, 2] -= offset[1]
    return m


def _eroded_square(face_hw: tuple[int, int], m: np.ndarray, size_wh: tuple[int, int], upscale: float) -> np.ndarray:
    """The face square warped onto the canvas window and eroded by ``int(2 * upscale)`` (the references')."""
    inv_mask = cv2.warpAffine(np.ones(face_hw, np.float32), m, size_wh)
    k = int(2 * upscale)
    return cv2.erode(inv_mask, np.ones((k, k), np.uint8))


def box_border(face: PasteFace, size_wh: tuple[int, int], upscale: float,
               offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The official ``draw_box`` frame ``[H, W, 1]``: a ``int(1400 / sqrt(face area))`` px border of the face
    square (area = the eroded square's sum on the canvas), warped onto the canvas window at ``offset``."""
    m = _shifted(face.matrix, offset)
    fs_h, fs_w = face.restored.shape[:2]
    area = float(np.sum(_eroded_square((fs_h, fs_w), m, size_wh, upscale)))
    border = int(1400 / math.sqrt(area)) if area > 0 else 0
    frame = np.ones((fs_h, fs_w), np.float32)
    frame[border:fs_h - border, border:fs_w - border] = 0
    return cv2.warpAffine(frame, m, size_wh)[:, :, None]


def face_blend(face: PasteFace, size_wh: tuple[int, int], upscale: float, helper: str = "codeformer",
               offset: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """(face image to blend, blend mask [H,W,1]) on a canvas window of ``size_wh`` at ``offset``.

    The window is the full canvas for offset (0, 0) and the canvas size; a smaller window gives the
    same values as long as it contains the face's support (see :func:`_roi`).
    """
    m = _shifted(face.matrix, offset)
    restored = face.restored
    inv_restored = cv2.warpAffine(restored, m, size_wh)
    if inv_restored.ndim == 2:
        inv_restored = inv_restored[:, :, None]
    use_square = face.parse_mask is None or helper == "codeformer"
    soft = None
    pasted = inv_restored
    if use_square:
        inv_mask_e = _eroded_square(restored.shape[:2], m, size_wh, upscale)
        pasted = inv_mask_e[:, :, None] * inv_restored
        area = float(np.sum(inv_mask_e))
        w_edge = int(area ** 0.5) // 20
        center = cv2.erode(inv_mask_e, np.ones((w_edge * 2, w_edge * 2), np.uint8))
        soft = cv2.GaussianBlur(center, (w_edge * 2 + 1, w_edge * 2 + 1), 0)[:, :, None]
    if face.parse_mask is not None:
        fs_h, fs_w = restored.shape[:2]
        pm = face.parse_mask
        if pm.shape[:2] != (fs_h, fs_w):
            pm = cv2.resize(pm, (fs_w, fs_h))
        pm = cv2.warpAffine(pm, m, size_wh, flags=3)[:, :, None]
        soft = pm if soft is None else np.minimum(pm, soft)
    return pasted, soft


def paste_faces(background: np.ndarray, faces: list[PasteFace], upscale: float, helper: str = "codeformer",
                roi: bool = True, draw_box: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Blend restored faces onto ``background`` (already at the output size), later faces over earlier.

    Returns (canvas as float, union of the blend masks float32 [H,W]). Convert the canvas with
    :func:`to_uint8`. ``roi=False`` runs the reference's full-canvas formula (slow, for checks).
    An alpha channel (4th) is carried through untouched. ``draw_box`` then frames every face in green
    (:func:`box_border`, the official ``draw_box``; the canvas is RGB 0..255).
    """
    h, w = background.shape[:2]
    alpha = None
    canvas = background
    if canvas.ndim == 2:
        canvas = canvas[:, :, None]
    if canvas.shape[2] == 4:
        alpha = canvas[:, :, 3:]
        canvas = canvas[:, :, :3]
    union = np.zeros((h, w), np.float32)
    if not roi:
        for face in faces:
            pasted, soft = face_blend(face, (w, h), upscale, helper)
            canvas = soft * pasted + (1 - soft) * canvas
            union = np.maximum(union, soft[:, :, 0].astype(np.float32))
    else:
        canvas = canvas.astype(np.result_type(canvas.dtype, np.float32))
        for face in faces:
            x0, y0, x1, y1 = _roi(face, (h, w), upscale)
            if x1 <= x0 or y1 <= y0:
                continue
            pasted, soft = face_blend(face, (x1 - x0, y1 - y0), upscale, helper, offset=(x0, y0))
            window = canvas[y0:y1, x0:x1]
            blended = soft * pasted + (1 - soft) * window
            if blended.dtype != canvas.dtype:
                canvas = canvas.astype(np.result_type(canvas.dtype, blended.dtype))
            canvas[y0:y1, x0:x1] = blended
            union[y0:y1, x0:x1] = np.maximum(union[y0:y1, x0:x1], soft[:, :, 0].astype(np.float32))
    if draw_box and canvas.shape[2] == 3:
        canvas = canvas.astype(np.result_type(canvas.dtype, np.float32))
        green = np.array([0.0, 255.0, 0.0], canvas.dtype)
        for face in faces:
            x0, y0, x1, y1 = _roi(face, (h, w), upscale) if roi else (0, 0, w, h)
            if x1 <= x0 or y1 <= y0:
                continue
            b = box_border(face, (x1 - x0, y1 - y0), upscale, offset=(x0, y0))
            canvas[y0:y1, x0:x1] = b * green + (1 - b) * canvas[y0:y1, x0:x1]
    if alpha is not None:
        canvas = np.concatenate([canvas, alpha.astype(canvas.dtype)], axis=2)
    if background.ndim == 2:
        canvas = canvas[:, :, 0]
    return canvas, union


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    """The references' final cast: truncation (no rounding); uint16 when the maximum exceeds 256."""
    if canvas.dtype == np.uint8:
        return canvas
    if canvas.size and np.max(canvas) > 256:
        return canvas.astype(np.uint16)
    return canvas.astype(np.uint8)


# ---- detection helpers -----------------------------------------------------------------------------

def eye_distance(det: np.ndarray, helper: str = "codeformer") -> float:
    """Eye distance of a detection row ``[x1,y1,x2,y2,score, 5 x (x,y)]``.

    ``"facexlib"`` measures it between the two eyes (entries 5..8). CodeFormer's copy reads entries
    6..9, i.e. ``(left_eye_y - right_eye_y, right_eye_x - nose_x)``; that is reproduced for its
    variant because it decides which faces are kept.
    """
    if helper == "facexlib":
        return float(np.hypot(det[5] - det[7], det[6] - det[8]))
    return float(np.hypot(det[6] - det[8], det[7] - det[9]))


def center_face_index(dets: np.ndarray, h: int, w: int) -> int:
    """Index of the detection whose box centre is nearest the image centre (first on ties)."""
    cx = (dets[:, 0] + dets[:, 2]) / 2 - w / 2
    cy = (dets[:, 1] + dets[:, 3]) / 2 - h / 2
    return int(np.argmin(np.hypot(cx, cy)))


def is_gray(image: np.ndarray, threshold: float = 10) -> bool:
    """The references' grayscale test: mean variance of the pairwise channel differences <= threshold."""
    if image.ndim == 2 or image.shape[2] == 1:
        return True
    img = image[:, :, :3].astype(np.float64)
    r, g, b = img[:, :, 0], img[:, :, 1], img[:, :, 2]
    return float(((r - g).var() + (r - b).var() + (g - b).var()) / 3.0) <= threshold


def is_toned(image: np.ndarray, threshold: float = 10) -> bool:
    """A monochrome picture in any tone (sepia, cyanotype, a tinted scan): every channel is, up to a
    residual variance <= ``threshold``, an affine function of the channel mean. Gray pictures pass too.

    Not in the references (their :func:`is_gray` misses strongly toned pictures, whose channel
    differences grow with brightness); used with :func:`is_gray` to decide on :func:`match_input_colour`.
    """
    if image.ndim == 2 or image.shape[2] == 1:
        return True
    img = image[:, :, :3].reshape(-1, 3).astype(np.float64)
    if len(img) > 1 << 20:  # a regular subsample is plenty for a statistic
        img = img[:: len(img) // (1 << 20) + 1]
    m = img.mean(axis=1)
    mc = m - m.mean()
    var_m = float((mc * mc).mean())
    residual = 0.0
    for c in range(3):
        xc = img[:, c] - img[:, c].mean()
        slope = float((xc * mc).mean()) / var_m if var_m > 0 else 0.0
        residual += float(((xc - slope * mc) ** 2).mean())
    return residual / 3.0 <= threshold


def luma(face: np.ndarray) -> np.ndarray:
    """0.2989 R + 0.5870 G + 0.1140 B of an RGB face as float64 ``[H, W]``."""
    f = face.astype(np.float64)
    return 0.2989 * f[:, :, 0] + 0.5870 * f[:, :, 1] + 0.1140 * f[:, :, 2]


def match_input_colour(restored: np.ndarray, input_face: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """The official colour handling of grey-looking pictures: the restored face's luma, repeated on
    three channels, then AdaIN to the input face's per-channel statistics (population variance + eps),
    so a sepia or toned face keeps its tint. Both are RGB ``[512, 512, 3]`` (uint8 or 0..255 floats).

    Deliberately different: the result is clipped to 0..255 and rounded to uint8 (the reference keeps
    floats that can exceed 255, which its paste-back then misreads as a 16-bit picture).
    """
    y = luma(restored)
    y_mean, y_std = y.mean(), np.sqrt(y.var() + eps)
    ref = input_face.reshape(-1, input_face.shape[-1])[:, :3].astype(np.float64)
    mean, std = ref.mean(axis=0), np.sqrt(ref.var(axis=0) + eps)
    out = (y[:, :, None] - y_mean) / y_std * std + mean
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def to_gray_rgb(face: np.ndarray) -> np.ndarray:
    """Luma (0.2989 R + 0.5870 G + 0.1140 B) of an RGB uint8 face, repeated on three channels."""
    y = np.clip(np.round(luma(face)), 0, 255).astype(np.uint8)
    return np.repeat(y[:, :, None], 3, axis=2)
