"""Parity of the CodeFormer network (kind ``codeformer_forward``): weights through the production loader,
the case's preprocessing, ``forward(x, w, adain)``, every listed output within its tolerance."""
from __future__ import annotations

import torch

from photo_restoration.codeformer.loader import load_codeformer

from .harness import assert_close


def preprocess(face_bgr_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) BGR -> float32 (N, 3, H, W) RGB in [-1, 1], contiguous."""
    rgb = face_bgr_u8.flip(-1).to(torch.float32) / 255
    return ((rgb - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


def check_codeformer_forward(case) -> None:
    cfg = case["config"]
    # n_head is the one hyper-parameter shapes cannot tell: the case states it; everything else is detected
    overrides = {"n_head": int(cfg["n_head"])} if "n_head" in cfg else {}
    model = load_codeformer(case.file(case["weights"]["file"]), device="cpu", dtype=torch.float32, **overrides)
    for key, value in cfg.items():  # the detected configuration is the one the reference was built with
        if hasattr(model.config, key):
            got = getattr(model.config, key)
            if key in ("connect_list", "attn_resolutions"):  # sets of resolutions
                got, value = sorted(int(v) for v in got), sorted(int(v) for v in value)
            elif isinstance(got, tuple):
                got, value = list(got), list(value)
            assert got == value, f"detected {key} {got} != case config {value}"

    x = preprocess(case.tensor(case["inputs"]["face_bgr_u8"]))
    call = case["call"]
    with torch.inference_mode():
        got = model(x, w=float(call["w"]), adain=bool(call["adain"]), return_codes=True)._asdict()

    tolerance = case["tolerance"]
    for name, spec in case["outputs"].items():
        ref = case.tensor(spec)
        tol = tolerance[name]
        if tol.get("exact"):
            assert got[name].shape == ref.shape, f"{name}: shape {tuple(got[name].shape)} != {tuple(ref.shape)}"
            assert torch.equal(got[name].to(ref.dtype), ref), (
                f"{name}: {int((got[name] != ref).sum())} of {ref.numel()} values differ")
        else:
            assert_close(name, got[name], ref, atol=tol["atol"], rtol=tol.get("rtol", 0.0))


CHECKS = {("codeformer", "codeformer_forward"): check_codeformer_forward}
