"""RetinaFace face detection: the network (facexlib's classes, weights loaded from a file here),
prior boxes, box/landmark decoding, confidence threshold and NMS.

Detections are ``float32 [N, 15]`` rows ``[x1, y1, x2, y2, score, 5 x (x, y)]`` (left eye, right eye,
nose, left and right mouth corners) in score order, in pixels of the image given.
"""
from __future__ import annotations

import math
import os
from typing import Any

import cv2
import numpy as np
import torch

from .weights import load_state_dict

MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
BGR_MEAN = (104.0, 117.0, 123.0)
MAX_DETECT_SIDE = 4096

DETECTOR_FILES = {
    "resnet50": "detection_Resnet50_Final.pth",
    "mobilenet0.25": "detection_mobilenet0.25_Final.pth",
}
RELEASES = "https://github.com/xinntao/facexlib/releases (v0.1.0)"


# ---- post-processing (no network) -----------------------------------------------------------------

def prior_boxes(image_hw: tuple[int, int], min_sizes=MIN_SIZES, steps=STEPS) -> torch.Tensor:
    """Anchors ``(P, 4)`` = (cx, cy, w, h) normalised by W/H, ordered level, row, column, anchor size."""
    h, w = int(image_hw[0]), int(image_hw[1])
    out = []
    for sizes, step in zip(min_sizes, steps):
        rows, cols = math.ceil(h / step), math.ceil(w / step)
        cy = (np.arange(rows, dtype=np.float64) + 0.5) * step / h
        cx = (np.arange(cols, dtype=np.float64) + 0.5) * step / w
        gy, gx = np.meshgrid(cy, cx, indexing="ij")
        n = len(sizes)
        level = np.empty((rows, cols, n, 4), np.float64)
        level[..., 0] = gx[:, :, None]
        level[..., 1] = gy[:, :, None]
        level[..., 2] = np.array(sizes, np.float64) / w
        level[..., 3] = np.array(sizes, np.float64) / h
        out.append(level.reshape(-1, 4))
    return torch.from_numpy(np.concatenate(out, 0).astype(np.float32))


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variance=VARIANCE) -> torch.Tensor:
    """Box regressions ``(P, 4)`` -> normalised (x1, y1, x2, y2)."""
    c = priors[:, :2] + loc[:, :2] * variance[0] * priors[:, 2:]
    s = priors[:, 2:] * torch.exp(loc[:, 2:] * variance[1])
    x1y1 = c - s / 2
    return torch.cat([x1y1, x1y1 + s], 1)


def decode_landmarks(landm: torch.Tensor, priors: torch.Tensor, variance=VARIANCE) -> torch.Tensor:
    """Landmark regressions ``(P, 10)`` -> normalised 5 x (x, y)."""
    pts = landm.reshape(-1, 5, 2)
    out = priors[:, None, :2] + pts * variance[0] * priors[:, None, 2:]
    return out.reshape(-1, 10)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS on score-sorted input: drop a box whose IoU with a kept one exceeds ``threshold``."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        xx1 = np.maximum(x1[i], x1[rest])
        yy1 = np.maximum(y1[i], y1[rest])
        xx2 = np.minimum(x2[i], x2[rest])
        yy2 = np.minimum(y2[i], y2[rest])
        inter = np.maximum(0.0, xx2 - xx1) * np.maximum(0.0, yy2 - yy1)
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= threshold]
    return keep


def decode_detections(loc: torch.Tensor, scores: torch.Tensor, landm: torch.Tensor, image_hw: tuple[int, int],
                      conf_threshold: float = 0.8, nms_threshold: float = 0.4,
                      priors: torch.Tensor | None = None, variance=VARIANCE) -> dict[str, Any]:
    """Head outputs of one image (``loc (P,4)``, face ``scores (P,)``, ``landm (P,10)``) -> detections.

    Returns ``priors``, pixel ``boxes`` and ``landmarks`` for every prior and the kept ``detections``
    (``float32 [N, 15]``, score order).
    """
    h, w = image_hw
    if priors is None:
        priors = prior_boxes(image_hw)
    loc, landm, scores = loc.float().cpu(), landm.float().cpu(), scores.float().cpu()
    priors = priors.to(loc.device)
    boxes = decode_boxes(loc, priors, variance) * torch.tensor([w, h, w, h], dtype=torch.float32)
    lms = decode_landmarks(landm, priors, variance) * torch.tensor([w, h] * 5, dtype=torch.float32)
    s = scores.numpy()
    idx = np.where(s > conf_threshold)[0]
    idx = idx[np.argsort(-s[idx], kind="stable")]
    b, l, sc = boxes.numpy()[idx], lms.numpy()[idx], s[idx]
    keep = nms(b, sc, nms_threshold) if len(idx) else []
    dets = np.concatenate([b[keep], sc[keep, None], l[keep]], 1).astype(np.float32) if keep else np.zeros((0, 15), np.float32)
    return {"priors": priors, "boxes": boxes, "landmarks": lms, "scores": scores, "detections": dets}


# ---- the network -------------------------------------------------------------------------------

def network_name(state_dict: dict) -> str:
    """"resnet50" or "mobilenet0.25" from the keys of a RetinaFace state dict (``module.`` stripped)."""
    if any(k.startswith("body.layer1.") for k in state_dict):
        return "resnet50"
    if any(k.startswith("body.stage1.") for k in state_dict):
        return "mobilenet0.25"
    raise ValueError("not a RetinaFace state dict: neither 'body.layer1.*' (resnet50) nor 'body.stage1.*' "
                     "(mobilenet0.25) keys were found")


def build_retinaface(name: str) -> torch.nn.Module:
    """facexlib's RetinaFace network (random init, global RNG untouched) for "resnet50" or "mobilenet0.25",
    returning raw logits."""
    import warnings

    from facexlib.detection.retinaface import RetinaFace

    # the constructors initialise weights at random: keep the caller's global RNG state as it was
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated" (it is False)
        net = RetinaFace(network_name="mobile0.25" if name == "mobilenet0.25" else "resnet50",
                         half=False, phase="train", device=torch.device("cpu"))
    return net


class FaceDetector(torch.nn.Module):
    """RetinaFace with the references' pre- and post-processing (plus an optional face parser).

    ``detect(image_rgb_u8, ...)`` returns detections in the pixels of the image given.
    """

    def __init__(self, net: torch.nn.Module, name: str):
        super().__init__()
        self.net = net
        self.name = name

    @torch.no_grad()
    def raw(self, image_rgb_u8: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head outputs (loc, face scores, landm) of one RGB image at its own size."""
        bgr = np.ascontiguousarray(image_rgb_u8[:, :, ::-1]).astype(np.float32)
        x = torch.from_numpy(bgr).permute(2, 0, 1)[None]
        x = x - torch.tensor(BGR_MEAN).view(1, 3, 1, 1)
        p = next(self.net.parameters())
        loc, conf, landm = self.net(x.to(p.device, p.dtype))
        scores = torch.softmax(conf[0].float(), -1)[:, 1]
        return loc[0].float(), scores, landm[0].float()

    def detect(self, image_rgb_u8: np.ndarray, conf_threshold: float = 0.8, nms_threshold: float = 0.4,
               resize: int | None = 640, helper: str = "codeformer") -> np.ndarray:
        """Detections ``[N, 15]`` on an RGB uint8 image, detecting on a copy whose shorter side is ``resize``.

        CodeFormer's helper resizes by ``resize / min(h, w)`` (INTER_AREA shrinking, INTER_LINEAR
        enlarging), facexlib's by ``min(h, w) / resize`` with Lanczos; boxes are scaled back.
        """
        h, w = image_rgb_u8.shape[:2]
        img = image_rgb_u8
        if resize:
            if helper == "facexlib":
                scale = min(h, w) / resize
                nh, nw = int(h / scale), int(w / scale)
                factor = 1.0 / scale
                interp = cv2.INTER_LANCZOS4
            else:
                factor = resize / min(h, w)
                nh, nw = int(h * factor), int(w * factor)
                interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
            if max(nh, nw) > MAX_DETECT_SIDE:  # guard for extreme aspect ratios (not in the references)
                factor = factor * MAX_DETECT_SIDE / max(nh, nw)
                nh, nw = max(int(h * factor), 1), max(int(w * factor), 1)
                if helper != "facexlib":
                    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
            if (nh, nw) != (h, w) and nh > 0 and nw > 0:
                img = cv2.resize(image_rgb_u8, (nw, nh), interpolation=interp)
            else:
                factor = 1.0
        else:
            factor = 1.0
        if min(img.shape[:2]) < 1:
            return np.zeros((0, 15), np.float32)
        loc, scores, landm = self.raw(img)
        dets = decode_detections(loc, scores, landm, img.shape[:2], conf_threshold, nms_threshold)["detections"]
        if factor != 1.0 and len(dets):
            dets = dets.copy()
            dets[:, :4] /= factor
            dets[:, 5:] /= factor
        return dets


def load_retinaface(source: str | os.PathLike | dict, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> FaceDetector:
    """A RetinaFace detector from a file or state dict (resnet50 / mobilenet0.25 detected from the keys).

    A leading ``module.`` (DataParallel) is stripped from every key that has one; the load is strict.
    """
    sd, label = load_state_dict(source, kind="RetinaFace detector", files=DETECTOR_FILES.values(),
                                folder="facedetection", published=RELEASES)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    name = network_name(sd)
    net = build_retinaface(name)
    expected = net.state_dict()
    sd = {k: v for k, v in sd.items() if not (k.endswith("num_batches_tracked") and k not in expected)}
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in sd if k in expected and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{label}: not a RetinaFace {name} state dict: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} with wrong shapes (e.g. {wrong[:3]})"
        )
    net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    net.eval().requires_grad_(False)
    return FaceDetector(net.to(device=device, dtype=dtype), name)
