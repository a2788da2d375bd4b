"""Random-weight face detection and parsing files in the official facexlib key layouts.

* ``detection_mobilenet0.25_Final.pth`` (full size, 0.4 M values, bare keys) and
  ``detection_Resnet50_Final.pth`` (full size, 27 M values, every key prefixed ``module.`` as the
  DataParallel-trained original). Their heads are rigged so that detection is deterministic: every
  head weight is zero, and only the largest anchor (512 px, stride 32) scores as a face (0.9997),
  with a frontal 5-point layout and a box ~5x the anchor, so NMS keeps one face per ~1000 px of the
  detection image (one face on most pictures, at the top-left anchor).
  ``retinaface_state_dict(..., faces=False)`` gives a detector that finds nothing.
* ``parsing_bisenet.pth`` (full size, 13 M values) and ``parsing_parsenet.pth`` as a *tiny* ParseNet
  (4 channels, 1 residual block, 1 down step) - the loader reads those sizes
  from the shapes; the full-size ParseNet costs ~4 s per face on a CPU. Its class head is rigged to
  call every pixel skin, so the parse mask is the blurred crop interior.

Norm layers keep their fresh statistics (mean 0, var 1), so every network is numerically tame.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

FOLDER = "facedetection"
# Template points relative to the crop centre, at half scale, in units of 0.1 x the 512 px anchor.
_LANDMARK_OFFSETS = [(-0.617, -0.157), (0.612, -0.155), (0.006, 0.566), (-0.536, 1.127), (0.556, 1.124)]


def retinaface_state_dict(name: str, seed: int = 0, faces: bool = True) -> dict[str, torch.Tensor]:
    """A RetinaFace ("resnet50" / "mobilenet0.25") state dict in facexlib's layout (no prefix)."""
    from facexlib.detection.retinaface import RetinaFace

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = RetinaFace("mobile0.25" if name == "mobilenet0.25" else "resnet50", device=torch.device("cpu"))
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for level in range(3):
        for head in ("ClassHead", "BboxHead", "LandmarkHead"):
            sd[f"{head}.{level}.conv1x1.weight"].zero_()
            sd[f"{head}.{level}.conv1x1.bias"].zero_()
        cls = sd[f"ClassHead.{level}.conv1x1.bias"]
        cls.copy_(torch.tensor([4.0, -4.0, 4.0, -4.0]))  # (background, face) per anchor
        if faces and level == 2:
            cls[2:4] = torch.tensor([-4.0, 4.0])  # the 512 px anchor is a face
            lm = sd[f"LandmarkHead.{level}.conv1x1.bias"]
            lm[10:20] = torch.tensor([c for p in _LANDMARK_OFFSETS for c in p])
            # boxes ~5x the anchor: neighbours overlap so much that NMS keeps one face per ~1000 px
            sd[f"BboxHead.{level}.conv1x1.bias"][6:8] = 8.0
    return sd


def _write(path: Path, sd: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def write_retinaface_mobilenet(models_dir: Path, seed: int) -> list[Path]:
    sd = retinaface_state_dict("mobilenet0.25", seed)
    return [_write(Path(models_dir) / FOLDER / "detection_mobilenet0.25_Final.pth", sd)]


def write_retinaface_resnet50(models_dir: Path, seed: int) -> list[Path]:
    sd = {f"module.{k}": v for k, v in retinaface_state_dict("resnet50", seed).items()}
    return [_write(Path(models_dir) / FOLDER / "detection_Resnet50_Final.pth", sd)]


def parsenet_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from facexlib.parsing.parsenet import ParseNet

    torch.manual_seed(seed)
    net = ParseNet(in_size=512, out_size=512, min_feat_size=256, base_ch=4, parsing_ch=19, res_depth=1, ch_range=[4, 4])
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    # every pixel is "skin" (class 1), so the parse mask is the blurred crop interior
    sd["out_mask_conv.conv2d.weight"].zero_()
    sd["out_mask_conv.conv2d.bias"].zero_()
    sd["out_mask_conv.conv2d.bias"][1] = 1.0
    return sd


def bisenet_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from facexlib.parsing.bisenet import BiSeNet

    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in BiSeNet(num_class=19).state_dict().items()}


def write_parsenet(models_dir: Path, seed: int) -> list[Path]:
    return [_write(Path(models_dir) / FOLDER / "parsing_parsenet.pth", parsenet_state_dict(seed))]


def write_bisenet(models_dir: Path, seed: int) -> list[Path]:
    return [_write(Path(models_dir) / FOLDER / "parsing_bisenet.pth", bisenet_state_dict(seed))]


WRITERS = {
    "retinaface_mobilenet0.25": write_retinaface_mobilenet,
    "retinaface_resnet50": write_retinaface_resnet50,
    "parsing_parsenet": write_parsenet,
    "parsing_bisenet": write_bisenet,
}
