"""Face parsing for the paste-back mask: facexlib's ParseNet / BiSeNet with weights read from a file.

The parser labels each pixel of a restored 512 face with one of 19 classes; the classes of the
face proper and hair are kept, background, hat, neck, necklace and cloth are dropped (the
references' ``MASK_COLORMAP``). The two networks number the classes differently.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .weights import load_state_dict

PARSER_FILES = {"parsenet": "parsing_parsenet.pth", "bisenet": "parsing_bisenet.pth"}
RELEASES = "https://github.com/xinntao/facexlib/releases (parsenet v0.2.2, bisenet v0.2.0)"

# ParseNet: 0 background, 1 skin, 2 nose, 3 eye_g, 4 l_eye, 5 r_eye, 6 l_brow, 7 r_brow, 8 l_ear,
# 9 r_ear, 10 mouth, 11 u_lip, 12 l_lip, 13 hair, 14 hat, 15 ear_r, 16 neck_l, 17 neck, 18 cloth.
PARSENET_KEEP = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15)
# BiSeNet (CelebAMask-HQ order): 0 background, 1 skin, 2 l_brow, 3 r_brow, 4 l_eye, 5 r_eye,
# 6 eye_g, 7 l_ear, 8 r_ear, 9 ear_r, 10 nose, 11 mouth, 12 u_lip, 13 l_lip, 14 neck, 15 neck_l,
# 16 cloth, 17 hair, 18 hat.
BISENET_KEEP = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _indices(sd: dict, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)})


def parsenet_config(sd: dict) -> dict:
    """ParseNet constructor arguments read from the state dict's shapes (official file: 512/512, base 64,
    channels 32..256, 10 residual blocks, 19 classes)."""
    down = len(_indices(sd, "encoder.")) - 1
    up = len(_indices(sd, "decoder."))
    min_feat = 512 >> down
    return {
        "in_size": 512,
        "out_size": min_feat << up,
        "min_feat_size": min_feat,
        "base_ch": int(sd["encoder.0.conv2d.weight"].shape[0]),
        "parsing_ch": int(sd["out_mask_conv.conv2d.weight"].shape[0]),
        "res_depth": len(_indices(sd, "body.")),
        "ch_range": [int(sd["out_img_conv.conv2d.weight"].shape[1]), int(sd["body.0.conv1.conv2d.weight"].shape[0])],
    }


def parser_kind(sd: dict) -> str:
    if "encoder.0.conv2d.weight" in sd and "out_mask_conv.conv2d.weight" in sd:
        return "parsenet"
    if any(k.startswith("cp.resnet.") for k in sd):
        return "bisenet"
    raise ValueError("not a face parsing state dict: neither ParseNet ('encoder.0.conv2d.weight', "
                     "'out_mask_conv.*') nor BiSeNet ('cp.resnet.*') keys were found")


class FaceParser(torch.nn.Module):
    """A parsing network and the input convention of its kind."""

    def __init__(self, net: torch.nn.Module, kind: str):
        super().__init__()
        self.net = net
        self.kind = kind

    @property
    def keep_classes(self) -> tuple[int, ...]:
        return PARSENET_KEEP if self.kind == "parsenet" else BISENET_KEEP

    @torch.no_grad()
    def labels(self, faces_rgb_u8: np.ndarray, batch_size: int = 4) -> np.ndarray:
        """Per-pixel class (``int64 [N, 512, 512]``) of RGB uint8 faces ``[N, 512, 512, 3]``."""
        p = next(self.net.parameters())
        out = []
        for i in range(0, len(faces_rgb_u8), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(faces_rgb_u8[i:i + batch_size])).permute(0, 3, 1, 2).float() / 255.0
            if self.kind == "parsenet":
                x = (x - 0.5) / 0.5
            else:
                x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            logits = self.net(x.to(p.device, p.dtype))[0]
            out.append(logits.float().argmax(1).cpu().numpy())
        return np.concatenate(out, 0) if out else np.zeros((0, 512, 512), np.int64)

    def keep_mask(self, labels: np.ndarray) -> np.ndarray:
        """Boolean map of the kept classes."""
        return np.isin(labels, self.keep_classes)


def load_parser(source: str | os.PathLike | dict, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> FaceParser:
    """ParseNet or BiSeNet from a file or state dict (kind and ParseNet sizes read from the keys and shapes)."""
    from facexlib.parsing.bisenet import BiSeNet
    from facexlib.parsing.parsenet import ParseNet

    sd, label = load_state_dict(source, kind="face parsing", files=PARSER_FILES.values(), folder="facedetection",
                                published=RELEASES)
    kind = parser_kind(sd)
    try:
        with torch.random.fork_rng(devices=[]):  # random init: keep the caller's global RNG state as it was
            net = (ParseNet(**parsenet_config(sd)) if kind == "parsenet"
                   else BiSeNet(num_class=int(sd["conv_out.conv_out.weight"].shape[0])))
    except (KeyError, IndexError) as exc:
        raise ValueError(f"{label}: incomplete {kind} state dict (missing {exc})") from None
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in sd if k in expected and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{label}: not a {kind} state dict: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} with wrong shapes "
                         f"(e.g. {wrong[:3]})")
    net.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}, strict=True)
    net.eval().requires_grad_(False)
    return FaceParser(net.to(device=device, dtype=dtype), kind)
