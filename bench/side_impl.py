"""Plug-in: the project's own networks, for ``../shared/bench/bench.py`` side-by-side runs.

A copy of ``../shared/bench/project_impl.py`` that imports the pack from *this* checkout (``checkout.py``)
instead of the installed copy; run with this folder on ``PYTHONPATH`` and ``--impl side_impl:build_...``
(the shared folder's own ``project_impl`` would shadow a module of the same name).

    python bench.py codeformer --impl official --impl side_impl:build_codeformer
    python bench.py supir-denoiser --impl official --impl side_impl:build_supir_denoiser --latent 32
    python bench.py supir-vae --impl official --impl side_impl:build_supir_vae

Each builder loads the official-layout state dict through the project's production loader, in the
dtype given by ``spec`` (``--dtype``), and returns the task's callable (README.md). Extra knobs via env:
``PROJECT_DTYPE`` overrides the storage dtype of the project's weights only (e.g. fp8, bf16), so the
project's memory-saving modes can be set against the official fp32 run.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import import_pack  # noqa: E402

import_pack()

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(spec):
    name = os.environ.get("PROJECT_DTYPE") or spec.get("dtype", "fp32")
    return name if name == "fp8" else _DT.get(name, torch.float32)


def build_codeformer(state_dict, spec):
    from photo_restoration.codeformer.loader import load_codeformer
    model = load_codeformer(state_dict, device=spec.get("device", "cpu"), dtype=_dtype(spec))

    def run(x, w, adain):
        with torch.inference_mode():
            return model(x, w=w, adain=adain).float()
    run.module = model
    return run


def build_supir_denoiser(state_dict, spec):
    from photo_restoration.supir.denoiser import SupirDenoiser
    from photo_restoration.supir.loader import load_diffusion
    net, _ = load_diffusion(state_dict, state_dict, dtype=_dtype(spec), device=spec.get("device", "cpu"))
    den = SupirDenoiser(net)

    def run(x, sigma, context, y, control):
        with torch.inference_mode():
            cd = net.compute_dtype
            out = den(x.to(cd), sigma, {"crossattn": context.to(cd), "vector": y.to(cd)}, control.to(cd), 1.0)
            return out.float()
    run.module = net
    return run


def build_supir_vae(state_dict, spec):
    from photo_restoration.supir.loader import LazyStateDict, open_source
    from photo_restoration.supir.vae import build_vae
    src = open_source(state_dict, "bench")
    vsd = LazyStateDict([(src, "first_stage_model.", "")],
                        keep=("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "denoise_encoder."))
    vae = build_vae(vsd, dtype=_dtype(spec), device=spec.get("device", "cpu"))

    def run(x):
        with torch.inference_mode():
            return vae.decode(vae.encode_lq(x.to(vae.dtype))).float()
    run.module = vae
    return run
