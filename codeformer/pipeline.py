"""CodeFormer face restoration of whole pictures: detect, align, restore every face of every image in
batches, paste back with a soft mask, optionally upscale the background and the faces.

The steps and their defaults follow the official CodeFormer CLI (``inference_codeformer.py`` with
CodeFormer's own copy of the face helper); ``helper="facexlib"`` switches to facexlib's variant.
Deliberate differences from the references (all reported in the info text where they apply):

* the canvas stays float (no uint8 truncation) and pixels no face touches are the input's own values;
* small inputs that CodeFormer's helper upsizes to a 512 short side are brought back to
  ``upscale x`` the input size at the end (what the ComfyUI packs do), with INTER_AREA;
* grayscale inputs get gray restored faces (luma), without the reference's colour-transfer overflow;
* faces can be gated by size, picked by index, capped in number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch

from . import faces as F

Upscaler = Callable[[torch.Tensor], torch.Tensor]
# Small inputs are worked on at a 512 short side, but never beyond this long side (a 1x4000 strip).
MAX_WORK_SIDE = 4096


@dataclass
class FaceSettings:
    """Every knob of :func:`restore_faces` (defaults = the official CLI's)."""

    w: float = 0.5                      # fidelity: 0 = codebook only (quality), 1 = close to the input
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
    face_index: str = ""                # "0,2": keep these faces (score order, after the filters); "" = all
    background_enhance: bool = False    # upscale the background with the upscaler (else plain resize)
    face_upsample: bool = False         # upscale restored faces with the face upscaler before pasting
    batch_size: int = 4                 # faces per network call
    upsize_small: bool = True           # CodeFormer helper: work at a >= 512 short side
    gray_threshold: float = 10.0
    max_output_megapixels: float = 64.0  # lower the upscale factor beyond this output size


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


def parse_indices(text: str) -> list[int] | None:
    """"0, 2,5" -> [0, 2, 5]; "" -> None (all). Ranges like "1-3" are accepted."""
    text = (text or "").strip()
    if not text or text.lower() == "all":
        return None
    out: list[int] = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


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
    wanted = parse_indices(s.face_index)
    if wanted is not None:
        kept = [cands[i] for i in wanted if 0 <= i < len(cands)]
        notes.append(f"face index selection {wanted}: {len(kept)} of {len(cands)} kept")
        cands = kept
    if s.max_faces and len(cands) > s.max_faces:
        order = sorted(range(len(cands)), key=lambda i: -cands[i]["size"])[: s.max_faces]
        cands = [cands[i] for i in sorted(order)]
        notes.append(f"capped to the {s.max_faces} largest faces")
    return cands, notes


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


@torch.no_grad()
def run_network(codeformer: Any, crops_rgb_u8: np.ndarray, w: float, adain: bool, batch_size: int,
                callbacks: Any = None) -> np.ndarray:
    """CodeFormer on aligned RGB uint8 crops ``[N,512,512,3]`` in chunks; returns restored uint8 crops.

    Input ``(x/255 - 0.5)/0.5``; output clamped to [-1, 1], mapped back and rounded as the reference.
    Halves the chunk on out-of-memory.
    """
    cb = callbacks or _no_callbacks()
    n = len(crops_rgb_u8)
    device, dtype = _model_device_dtype(codeformer)
    out = np.empty_like(crops_rgb_u8)
    bs = max(int(batch_size), 1)
    i = 0
    total = math.ceil(n / bs)
    step = 0
    while i < n:
        cb.check_interrupt()
        chunk = crops_rgb_u8[i:i + bs]
        x = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).float().div(255.0)
        x = ((x - 0.5) / 0.5).to(device=device, dtype=dtype)
        try:
            y = codeformer(x, w=w, adain=adain)
        except Exception as exc:
            if _is_oom(exc) and bs > 1:
                bs = max(bs // 2, 1)
                total = step + math.ceil((n - i) / bs)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            raise
        if isinstance(y, (tuple, list)):
            y = y[0]
        y = y.float().clamp(-1, 1).add(1).div(2).mul(255.0).round()
        out[i:i + len(chunk)] = y.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
        i += len(chunk)
        step += 1
        cb.progress(step, total)
    return out


def _call_upscaler(fn: Upscaler, rgb01: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(rgb01, dtype=np.float32)).permute(2, 0, 1)[None]
    y = fn(x)
    return y[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _resize(img: np.ndarray, size_wh: tuple[int, int], interp: int) -> np.ndarray:
    if (img.shape[1], img.shape[0]) == tuple(size_wh):
        return img
    out = cv2.resize(img, tuple(size_wh), interpolation=interp)
    return out.reshape(out.shape[0], out.shape[1], *img.shape[2:])


def restore_faces(images: torch.Tensor, codeformer: Any, detector: Any, parser: Any = None,
                  settings: FaceSettings | None = None, callbacks: Any = None,
                  upscaler: Upscaler | None = None, face_upscaler: Upscaler | None = None,
                  **overrides: Any) -> FaceRestoreResult:
    """Restore the faces of an IMAGE batch ``[B,H,W,C]`` (float 0..1, C = 1, 3 or 4).

    ``codeformer(x, w=, adain=)`` restores RGB [-1,1] 512 crops; ``detector.detect(rgb_u8, conf, nms,
    resize, helper)`` returns RetinaFace rows; ``parser`` (optional) labels restored faces.
    ``upscaler`` / ``face_upscaler`` are :data:`Upscaler` callables on BCHW 0..1. The input tensor is
    never modified. Keyword ``overrides`` set :class:`FaceSettings` fields.
    """
    s = settings or FaceSettings()
    if overrides:
        s = FaceSettings(**{**s.__dict__, **overrides})
    if s.helper not in F.HELPERS:
        raise ValueError(f"helper must be one of {F.HELPERS}, not {s.helper!r}")
    cb = callbacks or _no_callbacks()
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected an IMAGE [B,H,W,C] with C in 1..4, got shape {tuple(images.shape)}")
    src = images.detach().float().cpu().numpy()  # a copy: the input is never touched
    b, h, w, c = src.shape
    notes: list[str] = []
    up = max(int(s.upscale), 1)
    while up > 1 and (h * up) * (w * up) / 1e6 > s.max_output_megapixels:
        up -= 1
    if up != max(int(s.upscale), 1):
        notes.append(f"upscale lowered from {s.upscale} to {up}: output would exceed {s.max_output_megapixels:g} MP")
    out_hw = (int(h * up), int(w * up))
    use_parse = bool(s.use_parse and parser is not None)
    if s.use_parse and parser is None:
        notes.append("parse mask requested but no parser given: square soft mask only")
    if s.background_enhance and upscaler is None:
        notes.append("background_enhance without an upscale model: plain resize")
    if s.face_upsample and (face_upscaler is None and upscaler is None):
        notes.append("face_upsample without an upscale model: faces pasted at 512")
    if s.face_upsample and up == 1:
        notes.append("face_upsample has no effect at upscale 1")

    # ---- per image: colour handling, working frame, detection, alignment ------------------------------
    per_image = []
    all_crops = []
    for i in range(b):
        cb.check_interrupt()
        img = src[i]
        alpha = img[:, :, 3] if c == 4 else None
        if c == 1:
            rgb01 = np.repeat(img, 3, axis=2)
        elif c == 2:  # gray + alpha
            alpha = img[:, :, 1]
            rgb01 = np.repeat(img[:, :, :1], 3, axis=2)
        else:
            rgb01 = img[:, :, :3]
        rgb01 = np.ascontiguousarray(np.clip(rgb01, 0, 1), dtype=np.float32)
        work01 = rgb01
        if s.helper == "codeformer" and s.upsize_small and min(h, w) < 512:
            f = min(512.0 / min(h, w), MAX_WORK_SIDE / max(h, w))  # guard: extreme aspect ratios
            if f > 1:
                work01 = cv2.resize(rgb01, (max(round(w * f), 1), max(round(h * f), 1)), interpolation=cv2.INTER_LINEAR)
                work01 = work01.reshape(work01.shape[0], work01.shape[1], 3)
        work_u8 = _to_u8(work01)
        gray = c in (1, 2) or F.is_gray(work_u8, s.gray_threshold)
        dets = detector.detect(work_u8, s.conf_threshold, s.nms_threshold, s.detect_resize, s.helper)
        chosen, img_notes = select_faces(dets, work_u8.shape[:2], s, px_scale=h / work_u8.shape[0])
        for face in chosen:
            face["image"] = i
            face["crop"] = F.align_face(work_u8, face["affine"], rgb=True)
            all_crops.append(face["crop"])
        per_image.append({"rgb01": rgb01, "work01": work01, "alpha": alpha, "gray": gray, "faces": chosen,
                          "n_detected": len(dets), "notes": img_notes})

    # ---- all faces of all images through the network, batched ----------------------------------------
    n = len(all_crops)
    restored = np.zeros((0, 512, 512, 3), np.uint8)
    if n:
        crops = np.stack(all_crops)
        restored = run_network(codeformer, crops, s.w, s.adain, s.batch_size, cb)
    k = 0
    for item in per_image:
        for face in item["faces"]:
            r = restored[k]
            if item["gray"]:
                r = F.to_gray_rgb(r)
                restored[k] = r
            face["restored"] = r
            k += 1
    parse_masks = [None] * n
    if n and use_parse:
        cb.check_interrupt()
        labels = parser.labels(restored, s.batch_size)
        parse_masks = [F.parse_mask_512(parser.keep_mask(lab)) for lab in labels]

    # ---- paste back ----------------------------------------------------------------------------------
    outs, masks, face_log = [], [], []
    k = 0
    for i, item in enumerate(per_image):
        cb.check_interrupt()
        wh, ww = item["work01"].shape[:2]
        canvas_wh = (int(ww * up), int(wh * up))
        bg_upsampled = False
        if s.background_enhance and upscaler is not None:
            bg01 = _call_upscaler(upscaler, item["work01"])
            bg_upsampled = True
        else:
            bg01 = item["work01"]
        if not item["faces"]:
            if up == 1 and not bg_upsampled:
                out01 = item["rgb01"]  # nothing to do: the input itself
            else:
                interp = cv2.INTER_LANCZOS4 if (bg_upsampled or s.helper == "facexlib") else cv2.INTER_LINEAR
                out01 = np.clip(_resize(bg01 if bg_upsampled else item["rgb01"], out_hw[::-1], interp), 0, 1)
            outs.append(out01)
            masks.append(np.zeros(out_hw, np.float32))
            continue
        bg = F.resize_background(bg01 * 255.0, canvas_wh, s.helper, upsampled=bg_upsampled)
        paste = []
        for face in item["faces"]:
            r = face["restored"]
            face_up = s.face_upsample and up > 1 and (face_upscaler or upscaler) is not None
            if face_up:
                big = _call_upscaler(face_upscaler or upscaler, r.astype(np.float32) / 255.0)
                big = _resize(big, (512 * up, 512 * up), cv2.INTER_LANCZOS4)
                r = _to_u8(big)
            matrix = F.paste_affine(face["affine"], up, face_upsampled=bool(face_up))
            paste.append(F.PasteFace(r, matrix, parse_masks[k] if use_parse else None))
            face_log.append((i, face))
            k += 1
        canvas, union = F.paste_faces(bg, paste, up, s.helper)
        out01 = np.clip(canvas / 255.0, 0, 1).astype(np.float32)
        if out01.shape[:2] != out_hw:  # the working frame was upsized: back to upscale x input size
            out01 = _resize(out01, out_hw[::-1], cv2.INTER_AREA)
            union = _resize(union, out_hw[::-1], cv2.INTER_AREA)
        outs.append(out01)
        masks.append(np.clip(union, 0, 1).astype(np.float32))

    # ---- channels back to the input's layout ---------------------------------------------------------
    final = []
    for i, (item, out01) in enumerate(zip(per_image, outs)):
        untouched = not item["faces"] and up == 1 and not s.background_enhance
        if untouched:
            final.append(src[i].copy())
            continue
        if c in (1, 2):
            out01 = out01.mean(axis=2, keepdims=True)
        if item["alpha"] is not None:
            a = item["alpha"]
            if a.shape != out_hw:
                a = np.clip(_resize(a, out_hw[::-1], cv2.INTER_LINEAR), 0, 1)
            out01 = np.concatenate([out01, a[:, :, None]], axis=2)
        final.append(out01.astype(np.float32))
    result_images = torch.from_numpy(np.stack(final)).contiguous()
    result_mask = torch.from_numpy(np.stack(masks)).contiguous()
    if n:
        restored_t = torch.from_numpy(restored.astype(np.float32) / 255.0)
        cropped_t = torch.from_numpy(np.stack(all_crops).astype(np.float32) / 255.0)
    else:
        restored_t = torch.zeros(1, 512, 512, 3)
        cropped_t = torch.zeros(1, 512, 512, 3)

    # ---- report ----------------------------------------------------------------------------------------
    lines = [f"CodeFormer face restore: {b} image(s) {w}x{h} -> {out_hw[1]}x{out_hw[0]} (upscale {up}), "
             f"w={s.w:g}, adain={'on' if s.adain else 'off'}, helper={s.helper}, "
             f"parse mask={'on' if use_parse else 'off'}, detection threshold {s.conf_threshold:g}"]
    lines += [f"note: {t}" for t in notes]
    faces_out = []
    for i, item in enumerate(per_image):
        fr = item["faces"]
        wh, ww = item["work01"].shape[:2]
        frame = f" (worked at {ww}x{wh})" if (wh, ww) != (h, w) else ""
        lines.append(f"image {i}{frame}: {item['n_detected']} detected, {len(fr)} restored"
                     + (", grayscale" if item["gray"] else ""))
        if not fr:
            lines.append(f"  no faces restored: image {i} returned {'unchanged' if up == 1 else 'upscaled'}")
        lines += [f"  {t}" for t in item["notes"]]
        for j, face in enumerate(fr):
            k_in = h / wh  # working frame -> input pixels
            d = face["det"] * np.float32(k_in)
            mag = up * face["size"] / F.FACE_SIZE
            lines.append(f"  face {j}: score {face['score']:.3f}, box ({d[0]:.0f},{d[1]:.0f})-({d[2]:.0f},{d[3]:.0f}), "
                         f"size {face['size']:.0f} px, paste magnification {mag:.2f}")
            faces_out.append({"image": i, "index": j, "score": face["score"], "box": d[:4].tolist(),
                              "landmarks": (face["landmarks"] * k_in).tolist(), "affine": face["affine"].tolist(),
                              "size": face["size"]})
    if n == 0:
        lines.append("no faces found: the output is the (upscaled) input")
    return FaceRestoreResult(result_images, result_mask, restored_t, cropped_t, "\n".join(lines), faces_out)
