"""Face restoration of whole pictures: detect, align, restore every face of every image in batches,
paste back with a soft mask, optionally upscale the background and the faces.

:func:`restore_faces` runs the phases below, each a function of its own:
:func:`prepare_image` (colour layout, working frame, grey test) -> :func:`detect_faces` (detection,
selection, alignment; or :func:`aligned_face` for inputs that are aligned crops already) ->
:func:`restore_crops` (the network, in chunks) -> :func:`finish_faces` (grey/toned colour handling,
strength blend) -> :func:`parse_masks` -> :func:`paste_image` -> :func:`to_input_layout` -> :func:`report`.

The restorer is CodeFormer or any face network with CodeFormer's call ``net(x, w=, adain=)`` on RGB
[-1, 1] 512 crops (see :mod:`.face_models` for the spandrel-loaded ones, which ignore ``w`` and ``adain``).

The steps and their defaults follow the official CodeFormer CLI (``inference_codeformer.py`` with
CodeFormer's own copy of the face helper); ``helper="facexlib"`` switches to facexlib's variant.
Official behaviours kept: grey-looking pictures get the restored face's luma AdaIN-matched to the input
face's per-channel statistics (so a toned photo keeps its tint), ``has_aligned`` restores aligned 512
crops directly (grey test threshold 5 as the CLI), ``draw_box``, and ``face_upsample`` runs at upscale 1
too (the face goes through the upscaler and back to 512 with Lanczos, as the helper's ``outscale=1``).
Deliberate differences from the references (all reported in the info text where they apply):

* the canvas stays float (no uint8 truncation) and pixels no face touches are the input's own values;
* small inputs that CodeFormer's helper upsizes to a 512 short side are brought back to
  ``upscale x`` the input size at the end (what the ComfyUI packs do), with INTER_AREA;
* the grey colour transfer is clipped to 0..255 (the reference overflows); strongly toned pictures
  (:func:`faces.is_toned`) count as grey-looking too, and the facexlib variant gets the same handling;
* faces can be gated by size, picked by index, capped in number, given their own fidelity, and blended
  with the input face (``strength``);
* faces are batched per image only, so an image's result does not depend on the other images of the batch;
* non-finite input pixels are read as 0 (NaN) or clipped (+-inf) wherever the picture is processed, and the
  report says so; an image left untouched (no face, upscale 1) comes back exactly as given.
"""
from __future__ import annotations

import math
import re
from dataclasses import InitVar, dataclass, field
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch

from . import faces as F

Upscaler = Callable[[torch.Tensor], torch.Tensor]
# Small inputs are worked on at a 512 short side, but never beyond this long side (a 1x4000 strip).
MAX_WORK_SIDE = 4096
# Longest piece of a user's text quoted back in the report or an error.
QUOTE_CHARS = 40


@dataclass
class FaceSettings:
    """Every knob of :func:`restore_faces` (defaults = the official CLI's)."""

    fidelity: float = 0.5               # CodeFormer's w: 0 = codebook only (quality), 1 = close to the input
    upscale: int = 1                    # output scale of the whole picture (int, as CodeFormer's helper)
    adain: bool = True                  # the official call uses AdaIN on the restored features
    helper: str = "codeformer"          # "codeformer" (official CLI) or "facexlib"
    conf_threshold: float = 0.8         # RetinaFace confidence (facexlib's helper itself uses 0.97)
    nms_threshold: float = 0.4
    detect_resize: int | None = 640     # detection runs on a copy with this shorter side
    eye_dist_threshold: float = 5.0     # drop side/tiny faces (helper-specific formula, see faces.eye_distance)
    only_center_face: bool = False
    use_parse: bool = True              # intersect the paste mask with the parsing mask (needs a parser)
    min_face_size: float = 0            # face crop side in input pixels; 0 = no limit
    max_face_size: float = 0
    max_faces: int = 0                  # keep the N largest faces per image; 0 = all
    face_index: str = ""                # "0,2" / "1-3": keep these faces (score order, after the filters); "" = all
    background_enhance: bool = False    # upscale the background with the upscaler (else plain resize)
    face_upsample: bool = False         # upscale restored faces with the face upscaler before pasting
    batch_size: int = 4                 # faces per network call (never mixing images)
    upsize_small: bool = True           # CodeFormer helper: work at a >= 512 short side
    gray_threshold: float = 10.0
    max_output_megapixels: float = 64.0  # lower the upscale factor beyond this output size
    has_aligned: bool = False           # inputs are aligned face crops: restore directly, no detection or paste
    aligned_gray_threshold: float = 5.0  # the CLI's grey test threshold for aligned inputs
    draw_box: bool = False              # frame every pasted face in green (official draw_box)
    face_fidelity: str = ""             # "0.5,0.7": face j of every image; "0.5,0.7; 0.9": one group per image
    strength: float = 1.0               # blend of the restored face over the input face (1 = restored only)
    w: InitVar[float | None] = None     # old name of ``fidelity`` (cli.py)

    def __post_init__(self, w: float | None) -> None:
        if w is not None:
            self.fidelity = float(w)


@dataclass
class FaceRestoreResult:
    images: torch.Tensor          # [B, H*s, W*s, C] float 0..1
    mask: torch.Tensor            # [B, H*s, W*s] union of the soft masks of the pasted faces
    restored_faces: torch.Tensor  # [N, 512, 512, 3] restored aligned crops (N >= 1; black if no face)
    cropped_faces: torch.Tensor   # [N, 512, 512, 3] aligned crops of the input
    info: str
    faces: list[dict] = field(default_factory=list)


def _no_callbacks():
    class _Nop:
        def progress(self, step, total=None, preview=None):
            pass

        def check_interrupt(self):
            pass

    return _Nop()


# ---- user text: face_index and face_fidelity ---------------------------------------------------------

def _quote(text: str) -> str:
    text = text.strip()
    return repr(text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "...")


def parse_face_index(text: str, name: str = "face_index") -> list[tuple[int, int]] | None:
    """"0, 2,5-7" -> [(0, 0), (2, 2), (5, 7)] (inclusive ranges, never expanded); "" or "all" -> None.

    Anything else raises ValueError naming the input ``name``.
    """
    text = (text or "").strip()
    if not text or text.lower() == "all":
        return None
    ranges = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if not m:
            raise ValueError(f"{name}: {_quote(part)} is not a face number or range; use face numbers from 0 "
                             f"like '0,2' or '1-3' (empty = all faces)")
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if b < a:
            raise ValueError(f"{name}: range {_quote(part)} ends before it starts; write it as '{b}-{a}'")
        ranges.append((a, b))
    return ranges or None


def parse_indices(text: str, count: int) -> list[int] | None:
    """The face numbers below ``count`` that ``text`` selects (ascending, each once); None = all.

    Ranges are intersected with ``range(count)``, never expanded, so '0-99999999999' costs nothing.
    """
    ranges = parse_face_index(text)
    if ranges is None:
        return None
    keep = np.zeros(max(count, 0), bool)
    for a, b in ranges:
        if a < count:
            keep[a:min(b, count - 1) + 1] = True
    return [int(i) for i in np.flatnonzero(keep)]


def parse_face_fidelity(text: str, name: str = "face_fidelity") -> list[list[float]]:
    """"0.5,0.7" -> [[0.5, 0.7]] (face j of every image); "0.5,0.7; 0.9" -> one group per image.

    Every value must be a number in 0..1; anything else raises ValueError naming the input ``name``.
    """
    groups = []
    for group in (text or "").split(";"):
        values = []
        for part in group.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                v = float(part)
            except ValueError:
                raise ValueError(f"{name}: {_quote(part)} is not a number; give one fidelity (0..1) per face, "
                                 f"e.g. '0.5,0.7', and separate images with ';'") from None
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}: {part} is outside 0..1; fidelity 0 = strongest restoration, "
                                 f"1 = closest to the input")
            values.append(v)
        groups.append(values)
    while groups and not groups[-1]:
        groups.pop()
    return groups


def fidelities_for(groups: list[list[float]], image: int, n_faces: int, default: float) -> list[float]:
    """Fidelity of each face of image ``image``: its group (one group = every image), else ``default``."""
    if not groups:
        return [default] * n_faces
    values = groups[0] if len(groups) == 1 else (groups[image] if image < len(groups) else [])
    return [values[j] if j < len(values) else default for j in range(n_faces)]


# ---- selection --------------------------------------------------------------------------------------

def _face_size(affine: np.ndarray, face_size: int = F.FACE_SIZE) -> float:
    """Side of the aligned crop measured in input pixels."""
    scale = math.sqrt(abs(np.linalg.det(affine[:, :2])))
    return face_size / max(scale, 1e-12)


def select_faces(dets: np.ndarray, image_hw: tuple[int, int], s: FaceSettings,
                 px_scale: float = 1.0) -> tuple[list[dict], list[str]]:
    """Detections -> the faces to restore (with affine and size), plus notes on what was dropped.

    ``px_scale`` converts detection pixels to input pixels (sizes are gated and reported in input pixels).
    """
    notes = []
    cands = []
    for i, d in enumerate(dets):
        ed = F.eye_distance(d, s.helper)
        if s.eye_dist_threshold and ed < s.eye_dist_threshold:
            notes.append(f"detection {i} dropped: eye distance {ed:.1f} px < {s.eye_dist_threshold}")
            continue
        lm = d[5:15].reshape(5, 2)
        affine = F.estimate_affine(lm)
        size = _face_size(affine) * px_scale
        if s.min_face_size and size < s.min_face_size:
            notes.append(f"detection {i} dropped: face size {size:.0f} px < min {s.min_face_size:g}")
            continue
        if s.max_face_size and size > s.max_face_size:
            notes.append(f"detection {i} dropped: face size {size:.0f} px > max {s.max_face_size:g}")
            continue
        cands.append({"det": d, "landmarks": lm, "affine": affine, "size": size, "score": float(d[4])})
    if cands and s.only_center_face:
        k = F.center_face_index(np.stack([c["det"] for c in cands]), *image_hw)
        cands = [cands[k]]
        notes.append("only the centre face kept")
    wanted = parse_indices(s.face_index, len(cands))
    if wanted is not None:
        notes.append(f"face index {_quote(s.face_index)}: {len(wanted)} of {len(cands)} kept")
        cands = [cands[i] for i in wanted]
    if s.max_faces and len(cands) > s.max_faces:
        order = sorted(range(len(cands)), key=lambda i: -cands[i]["size"])[: s.max_faces]
        cands = [cands[i] for i in sorted(order)]
        notes.append(f"capped to the {s.max_faces} largest faces")
    return cands, notes


# ---- small helpers -----------------------------------------------------------------------------------

def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _call_upscaler(fn: Upscaler, rgb01: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(rgb01, dtype=np.float32)).permute(2, 0, 1)[None]
    y = fn(x)
    return y[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _resize(img: np.ndarray, size_wh: tuple[int, int], interp: int) -> np.ndarray:
    if (img.shape[1], img.shape[0]) == tuple(size_wh):
        return img
    out = cv2.resize(img, tuple(size_wh), interpolation=interp)
    return out.reshape(out.shape[0], out.shape[1], *img.shape[2:])


# ---- phase: the network ------------------------------------------------------------------------------

@torch.no_grad()
def run_network(codeformer: Any, crops_rgb_u8: np.ndarray, fidelity: float | Sequence[float], adain: bool,
                batch_size: int, callbacks: Any = None, _step: list[int] | None = None,
                _total: int | None = None) -> np.ndarray:
    """The restorer on aligned RGB uint8 crops ``[N,512,512,3]`` in chunks; returns restored uint8 crops.

    ``fidelity`` is one w for all crops or one per crop (a chunk whose crops share one value gets a plain
    float, as the official call). Input ``(x/255 - 0.5)/0.5``; output clamped to [-1, 1], mapped back and
    rounded as the reference. Halves the chunk on out-of-memory.
    """
    cb = callbacks or _no_callbacks()
    n = len(crops_rgb_u8)
    ws = np.full(n, float(fidelity)) if np.isscalar(fidelity) else np.asarray(fidelity, np.float64)
    device, dtype = _model_device_dtype(codeformer)
    out = np.empty_like(crops_rgb_u8)
    bs = max(int(batch_size), 1)
    step = _step if _step is not None else [0]
    total = _total if _total is not None else math.ceil(n / bs)
    i = 0
    while i < n:
        cb.check_interrupt()
        chunk = crops_rgb_u8[i:i + bs]
        cw = ws[i:i + len(chunk)]
        w: Any = float(cw[0]) if np.all(cw == cw[0]) else torch.from_numpy(cw.copy()).float().to(device)
        x = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).float().div(255.0)
        x = ((x - 0.5) / 0.5).to(device=device, dtype=dtype)
        try:
            y = codeformer(x, w=w, adain=adain)
        except Exception as exc:
            if _is_oom(exc) and bs > 1:
                bs = max(bs // 2, 1)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            raise
        if isinstance(y, (tuple, list)):
            y = y[0]
        y = y.float().clamp(-1, 1).add(1).div(2).mul(255.0).round()
        out[i:i + len(chunk)] = y.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
        i += len(chunk)
        step[0] += 1
        cb.progress(step[0], max(total, step[0]))
    return out


def restore_crops(net: Any, per_image: list[dict], s: FaceSettings, callbacks: Any = None) -> None:
    """Every image's crops through the network (``face["raw"]``), chunked within each image only, so an
    image's faces come out the same whatever else is in the batch. Fidelity per face from ``face["fidelity"]``."""
    bs = max(int(s.batch_size), 1)
    total = sum(math.ceil(len(item["faces"]) / bs) for item in per_image)
    step = [0]
    for item in per_image:
        fs = item["faces"]
        if not fs:
            continue
        crops = np.stack([f["crop"] for f in fs])
        out = run_network(net, crops, [f["fidelity"] for f in fs], s.adain, bs, callbacks, step, total)
        for f, r in zip(fs, out):
            f["raw"] = r


# ---- phase: per image preparation, detection, alignment ----------------------------------------------

def prepare_image(img: np.ndarray, s: FaceSettings) -> dict:
    """One image ``[H,W,C]`` float -> its RGB 0..1 copy, alpha, working frame and grey-looking flag."""
    h, w, c = img.shape
    alpha = img[:, :, 3] if c == 4 else None
    if c == 1:
        rgb01 = np.repeat(img, 3, axis=2)
    elif c == 2:  # gray + alpha
        alpha = img[:, :, 1]
        rgb01 = np.repeat(img[:, :, :1], 3, axis=2)
    else:
        rgb01 = img[:, :, :3]
    finite = bool(np.isfinite(rgb01).all())
    rgb01 = np.ascontiguousarray(np.clip(np.nan_to_num(rgb01), 0, 1), dtype=np.float32)
    work01 = rgb01
    if not s.has_aligned and s.helper == "codeformer" and s.upsize_small and min(h, w) < 512:
        f = min(512.0 / min(h, w), MAX_WORK_SIDE / max(h, w))  # guard: extreme aspect ratios
        if f > 1:
            work01 = cv2.resize(rgb01, (max(round(w * f), 1), max(round(h * f), 1)), interpolation=cv2.INTER_LINEAR)
            work01 = work01.reshape(work01.shape[0], work01.shape[1], 3)
    work_u8 = _to_u8(work01)
    if s.has_aligned and work_u8.shape[:2] != (F.FACE_SIZE, F.FACE_SIZE):
        work_u8 = cv2.resize(work_u8, (F.FACE_SIZE, F.FACE_SIZE), interpolation=cv2.INTER_LINEAR)
    threshold = s.aligned_gray_threshold if s.has_aligned else s.gray_threshold
    gray = c in (1, 2) or F.is_gray(work_u8, threshold) or F.is_toned(work_u8, threshold)
    notes = [] if finite else ["non-finite pixels: NaN read as 0, +-inf clipped to 1 / 0"]
    return {"rgb01": rgb01, "work01": work01, "work_u8": work_u8, "alpha": alpha, "gray": gray,
            "faces": [], "n_detected": 0, "notes": notes}


def detect_faces(item: dict, detector: Any, s: FaceSettings, input_h: int) -> None:
    """Detect, select and align the faces of one prepared image (``item["faces"]`` with their crops)."""
    work_u8 = item["work_u8"]
    dets = detector.detect(work_u8, s.conf_threshold, s.nms_threshold, s.detect_resize, s.helper)
    chosen, notes = select_faces(dets, work_u8.shape[:2], s, px_scale=input_h / work_u8.shape[0])
    for face in chosen:
        face["crop"] = F.align_face(work_u8, face["affine"], rgb=True)
    item.update(faces=chosen, n_detected=len(dets), notes=item["notes"] + notes)


def aligned_face(item: dict) -> None:
    """``has_aligned``: the (512x512) picture itself is the one face."""
    item.update(faces=[{"crop": item["work_u8"], "score": 1.0, "size": float(F.FACE_SIZE)}], n_detected=1)


# ---- phase: colour handling, strength, parse masks ---------------------------------------------------

def finish_faces(item: dict, s: FaceSettings) -> None:
    """``face["restored"]``: grey/toned pictures get :func:`faces.match_input_colour`, then the blend
    with the input face by ``strength``."""
    strength = float(min(max(s.strength, 0.0), 1.0))
    for face in item["faces"]:
        r = face["raw"]
        if item["gray"]:
            r = F.match_input_colour(r, face["crop"])
        if strength < 1.0:
            mix = strength * r.astype(np.float32) + (1.0 - strength) * face["crop"].astype(np.float32)
            r = np.clip(np.round(mix), 0, 255).astype(np.uint8)
        face["restored"] = r


def parse_masks(parser: Any, item: dict, batch_size: int) -> None:
    """``face["parse_mask"]`` (crop space) for every face of one image."""
    if not item["faces"]:
        return
    labels = parser.labels(np.stack([f["restored"] for f in item["faces"]]), batch_size)
    for face, lab in zip(item["faces"], labels):
        face["parse_mask"] = F.parse_mask_512(parser.keep_mask(lab))


# ---- phase: paste back -------------------------------------------------------------------------------

def paste_image(item: dict, s: FaceSettings, up: int, out_hw: tuple[int, int],
                upscaler: Upscaler | None, face_upscaler: Upscaler | None) -> tuple[np.ndarray, np.ndarray]:
    """(output RGB 0..1 at ``out_hw``, union of the blend masks) of one image."""
    if s.has_aligned:
        out01 = item["faces"][0]["restored"].astype(np.float32) / 255.0
        interp = cv2.INTER_AREA if out_hw[0] < F.FACE_SIZE else cv2.INTER_LINEAR
        return np.clip(_resize(out01, out_hw[::-1], interp), 0, 1), np.ones(out_hw, np.float32)
    wh, ww = item["work01"].shape[:2]
    canvas_wh = (int(ww * up), int(wh * up))
    bg_upsampled = bool(s.background_enhance and upscaler is not None)
    bg01 = _call_upscaler(upscaler, item["work01"]) if bg_upsampled else item["work01"]
    if not item["faces"]:
        if up == 1 and not bg_upsampled:
            return item["rgb01"], np.zeros(out_hw, np.float32)  # nothing to do: the input itself
        interp = cv2.INTER_LANCZOS4 if (bg_upsampled or s.helper == "facexlib") else cv2.INTER_LINEAR
        out01 = np.clip(_resize(bg01 if bg_upsampled else item["rgb01"], out_hw[::-1], interp), 0, 1)
        return out01, np.zeros(out_hw, np.float32)
    bg = F.resize_background(bg01 * 255.0, canvas_wh, s.helper, upsampled=bg_upsampled)
    paste = []
    face_fn = face_upscaler or upscaler
    for face in item["faces"]:
        r = face["restored"]
        face_up = bool(s.face_upsample and face_fn is not None)  # the official helper runs it at upscale 1 too
        if face_up:
            big = _call_upscaler(face_fn, r.astype(np.float32) / 255.0)
            big = _resize(big, (F.FACE_SIZE * up, F.FACE_SIZE * up), cv2.INTER_LANCZOS4)
            r = _to_u8(big)
        matrix = F.paste_affine(face["affine"], up, face_upsampled=face_up)
        paste.append(F.PasteFace(r, matrix, face.get("parse_mask")))
    canvas, union = F.paste_faces(bg, paste, up, s.helper, draw_box=s.draw_box)
    out01 = np.clip(canvas / 255.0, 0, 1).astype(np.float32)
    if out01.shape[:2] != out_hw:  # the working frame was upsized: back to upscale x input size
        out01 = _resize(out01, out_hw[::-1], cv2.INTER_AREA)
        union = _resize(union, out_hw[::-1], cv2.INTER_AREA)
    return out01, np.clip(union, 0, 1).astype(np.float32)


def to_input_layout(item: dict, out01: np.ndarray, src: np.ndarray, c: int, out_hw: tuple[int, int],
                    untouched: bool) -> np.ndarray:
    """Channels back to the input's layout (gray, gray+alpha, RGB, RGBA); untouched images are the input."""
    if untouched:
        return src.copy()
    if c in (1, 2):
        out01 = out01.mean(axis=2, keepdims=True)
    if item["alpha"] is not None:
        a = item["alpha"]
        if a.shape != out_hw:
            a = np.clip(_resize(a, out_hw[::-1], cv2.INTER_LINEAR), 0, 1)
        out01 = np.concatenate([out01, a[:, :, None]], axis=2)
    return out01.astype(np.float32)


# ---- the whole thing -----------------------------------------------------------------------------------

def _plan(s: FaceSettings, h: int, w: int, parser: Any, upscaler: Any, face_upscaler: Any) -> tuple[int, list[str]]:
    """(upscale factor actually used, notes on settings that cannot apply)."""
    notes: list[str] = []
    up = max(int(s.upscale), 1)
    if s.has_aligned:
        if up > 1:
            notes.append("has_aligned: output at the input size (upscale ignored)")
        if s.background_enhance or s.face_upsample or s.draw_box:
            notes.append("has_aligned: background_enhance, face_upsample and draw_box do not apply")
        return 1, notes
    while up > 1 and (h * up) * (w * up) / 1e6 > s.max_output_megapixels:
        up -= 1
    if up != max(int(s.upscale), 1):
        notes.append(f"upscale lowered from {s.upscale} to {up}: output would exceed {s.max_output_megapixels:g} MP")
    if s.use_parse and parser is None:
        notes.append("parse mask requested but no parser given: square soft mask only")
    if s.background_enhance and upscaler is None:
        notes.append("background_enhance without an upscale model: plain resize")
    if s.face_upsample and (face_upscaler is None and upscaler is None):
        notes.append("face_upsample without an upscale model: faces pasted at 512")
    return up, notes


def restore_faces(images: torch.Tensor, codeformer: Any, detector: Any, parser: Any = None,
                  settings: FaceSettings | None = None, callbacks: Any = None,
                  upscaler: Upscaler | None = None, face_upscaler: Upscaler | None = None,
                  **overrides: Any) -> FaceRestoreResult:
    """Restore the faces of an IMAGE batch ``[B,H,W,C]`` (float 0..1, C = 1, 3 or 4; B may be 0).

    ``codeformer(x, w=, adain=)`` restores RGB [-1,1] 512 crops; ``detector.detect(rgb_u8, conf, nms,
    resize, helper)`` returns RetinaFace rows (unused with ``has_aligned``); ``parser`` (optional) labels
    restored faces. ``upscaler`` / ``face_upscaler`` are :data:`Upscaler` callables on BCHW 0..1. The
    input tensor is never modified. Keyword ``overrides`` set :class:`FaceSettings` fields.
    """
    s = settings or FaceSettings()
    if overrides:
        s = FaceSettings(**{**s.__dict__, **overrides})
    if s.helper not in F.HELPERS:
        raise ValueError(f"helper must be one of {F.HELPERS}, not {s.helper!r}")
    if detector is None and not s.has_aligned:
        raise ValueError("a face detector is needed to find faces (or set has_aligned for aligned face crops)")
    parse_face_index(s.face_index)  # bad text fails before any work
    fid_groups = parse_face_fidelity(s.face_fidelity)
    cb = callbacks or _no_callbacks()
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected an IMAGE [B,H,W,C] with C in 1..4, got shape {tuple(images.shape)}")
    src = images.detach().float().cpu().numpy()  # a copy: the input is never touched
    b, h, w, c = src.shape
    up, notes = _plan(s, h, w, parser, upscaler, face_upscaler)
    out_hw = (int(h * up), int(w * up))
    use_parse = bool(s.use_parse and parser is not None and not s.has_aligned)

    per_image = []
    for i in range(b):
        cb.check_interrupt()
        item = prepare_image(src[i], s)
        if s.has_aligned:
            aligned_face(item)
        else:
            detect_faces(item, detector, s, h)
        for face, fid in zip(item["faces"], fidelities_for(fid_groups, i, len(item["faces"]), float(s.fidelity))):
            face["fidelity"] = fid
        per_image.append(item)

    restore_crops(codeformer, per_image, s, cb)
    for item in per_image:
        finish_faces(item, s)
        if use_parse:
            cb.check_interrupt()
            parse_masks(parser, item, s.batch_size)

    finals, masks = [], []
    for i, item in enumerate(per_image):
        cb.check_interrupt()
        out01, union = paste_image(item, s, up, out_hw, upscaler, face_upscaler)
        untouched = not item["faces"] and up == 1 and not s.background_enhance
        finals.append(to_input_layout(item, out01, src[i], c, out_hw, untouched))
        masks.append(union)

    all_faces = [f for item in per_image for f in item["faces"]]
    if all_faces:
        restored_t = torch.from_numpy(np.stack([f["restored"] for f in all_faces]).astype(np.float32) / 255.0)
        cropped_t = torch.from_numpy(np.stack([f["crop"] for f in all_faces]).astype(np.float32) / 255.0)
    else:
        restored_t = torch.zeros(1, 512, 512, 3)
        cropped_t = torch.zeros(1, 512, 512, 3)
    result_images = (torch.from_numpy(np.stack(finals)) if finals
                     else torch.zeros(0, out_hw[0], out_hw[1], c)).contiguous()
    result_mask = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, *out_hw)
    info, faces_out = report(per_image, s, (b, h, w), out_hw, up, use_parse, notes)
    return FaceRestoreResult(result_images, result_mask.contiguous(), restored_t, cropped_t, info, faces_out)


def report(per_image: list[dict], s: FaceSettings, bhw: tuple[int, int, int], out_hw: tuple[int, int], up: int,
           use_parse: bool, notes: list[str]) -> tuple[str, list[dict]]:
    """The info text and the per-face records (boxes and landmarks in input pixels)."""
    b, h, w = bhw
    mode = "aligned faces" if s.has_aligned else f"helper={s.helper}, parse mask={'on' if use_parse else 'off'}, " \
                                                   f"detection threshold {s.conf_threshold:g}"
    lines = [f"face restore: {b} image(s) {w}x{h} -> {out_hw[1]}x{out_hw[0]} (upscale {up}), "
             f"fidelity={s.fidelity:g}, adain={'on' if s.adain else 'off'}, {mode}"
             + (f", strength {s.strength:g}" if s.strength < 1 else "")]
    lines += [f"note: {t}" for t in notes]
    faces_out = []
    for i, item in enumerate(per_image):
        fr = item["faces"]
        wh, ww = item["work01"].shape[:2]
        frame = f" (worked at {ww}x{wh})" if (wh, ww) != (h, w) and not s.has_aligned else ""
        lines.append(f"image {i}{frame}: {item['n_detected']} detected, {len(fr)} restored"
                     + (", grayscale/toned: colour matched to the input face" if item["gray"] else ""))
        if not fr:
            lines.append(f"  no faces restored: image {i} returned {'unchanged' if up == 1 else 'upscaled'}")
        lines += [f"  {t}" for t in item["notes"]]
        if s.has_aligned:
            faces_out.append({"image": i, "index": 0, "score": 1.0, "box": [0.0, 0.0, float(w), float(h)],
                              "landmarks": [], "affine": [], "size": float(max(h, w)), "fidelity": fr[0]["fidelity"]})
            continue
        for j, face in enumerate(fr):
            k_in = h / wh  # working frame -> input pixels
            d = face["det"] * np.float32(k_in)
            mag = up * face["size"] / F.FACE_SIZE
            lines.append(f"  face {j}: score {face['score']:.3f}, box ({d[0]:.0f},{d[1]:.0f})-({d[2]:.0f},{d[3]:.0f}), "
                         f"size {face['size']:.0f} px, paste magnification {mag:.2f}, fidelity {face['fidelity']:g}")
            faces_out.append({"image": i, "index": j, "score": face["score"], "box": d[:4].tolist(),
                              "landmarks": (face["landmarks"] * k_in).tolist(), "affine": face["affine"].tolist(),
                              "size": face["size"], "fidelity": face["fidelity"]})
    if b == 0:
        lines.append("empty batch: nothing to restore")
    elif not any(item["faces"] for item in per_image):
        lines.append("no faces found: the output is the (upscaled) input")
    return "\n".join(lines), faces_out
