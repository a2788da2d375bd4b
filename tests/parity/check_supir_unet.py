"""Parity of the SUPIR network + denoiser (kind ``unet_control_forward``) against the official code's
fixtures, with both tiny weight files loaded through the production loader (``load_supir``)."""
from __future__ import annotations

import torch

from photo_restoration.supir.loader import load_supir

from .harness import assert_close


def _head_channels(case) -> int:
    return int(case["config"]["unet"].get("num_head_channels", 64))


def check_unet_control_forward(case) -> None:
    w = case["weights"]
    model = load_supir(case.file(w["sdxl_base"]), case.file(w["supir"]), dtype=torch.float32,
                       num_head_channels=_head_channels(case), with_vae=False, with_text=False)
    t = case.tensors()
    x, sigma, hint = t["input.x"], t["input.sigma"], t["input.control"]
    cond = {"crossattn": t["input.c_crossattn"], "vector": t["input.c_vector"]}
    scale = case["params"]["control_scale"]
    if isinstance(scale, (list, tuple)):  # per-sample scales
        scale = torch.tensor(scale, dtype=torch.float32)
    outs = case["outputs"]
    den = model.denoiser
    with torch.no_grad():
        idx, sigma_q = den.quantize(sigma)
        assert torch.equal(idx.to(torch.int64), t["output.timestep"].to(torch.int64)), (idx, t["output.timestep"])
        assert_close("sigma_quantized", sigma_q, t["output.sigma_quantized"], outs["sigma_quantized"]["atol"])
        c_in = 1 / (sigma_q.reshape(-1, 1, 1, 1) ** 2 + 1.0) ** 0.5
        x_in = x * c_in
        net = model.diffusion
        feats = net.control_model(hint, idx, x_in, cond["crossattn"], cond["vector"])
        for k, f in enumerate(feats):
            name = f"control_feature_{k}"
            assert_close(name, f, t[f"output.{name}"], outs[name]["atol"])
        assert len(feats) == sum(1 for n in outs if n.startswith("control_feature_"))
        eps = net(x_in, idx, cond["crossattn"], cond["vector"], hint, scale)
        assert_close("network_output", eps, t["output.network_output"], outs["network_output"]["atol"])
        denoised = den(x, sigma, cond, hint, scale)
        assert_close("denoised", denoised, t["output.denoised"], outs["denoised"]["atol"])


CHECKS = {("supir", "unet_control_forward"): check_unet_control_forward}
