"""Parity checks for SUPIR's first stage (VAE + denoise encoder, tiled and untiled) and the SDXL
vector conditioning. Weights go through the production builder (``build_vae``)."""
from __future__ import annotations

import torch

from photo_restoration.supir.embeddings import timestep_embedding
from photo_restoration.supir.text import assemble_conditioning
from photo_restoration.supir.vae import VAETiling, build_vae

from .harness import Case, assert_close

PREFIX = "first_stage_model."


def _read(path) -> dict:
    try:
        from photo_restoration.supir.loader import read_state_dict
    except ImportError:  # the shared loader lives on another branch until merged
        from safetensors.torch import load_file as read_state_dict
    return read_state_dict(str(path))


def load_case_vae(case: Case):
    """Both weight files of the case, first-stage keys only, float16 upcast to float32."""
    sd = {}
    for rel in (case["weights"]["sdxl_base"], case["weights"]["supir"]):
        for k, v in _read(case.file(rel)).items():
            if k.startswith(PREFIX):
                sd[k[len(PREFIX):]] = v.float()
    return build_vae(sd, dtype=torch.float32)


def _compare(case: Case, got: dict) -> None:
    t = case.tensors()
    for name, spec in case["outputs"].items():
        assert_close(name, got[name], t[f"output.{name}"], spec["atol"], spec.get("rtol", 0.0))


def check_first_stage(case: Case) -> None:
    vae = load_case_vae(case)
    t = case.tensors()
    z_lq = vae.encode_lq(t["input.image"])
    x1 = vae.decode(z_lq)
    mean, logvar = vae.posterior(x1)
    draws = {d["tensor"]: t[d["tensor"]] for d in case["noise_draws"]}
    _compare(case, {
        "z_lq": z_lq,
        "x_stage1": x1,
        "stage1_posterior_mean": mean,
        "stage1_posterior_logvar": logvar,
        "z_stage1_sample": vae.encode(x1, noise=draws["draw.0"]),
    })


def check_first_stage_tiled(case: Case) -> None:
    vae = load_case_vae(case)
    t = case.tensors()
    p = case["params"]
    tiling = VAETiling(encoder_tile_size=p["encoder_tile_size"], decoder_tile_size=p["decoder_tile_size"],
                       norm="official")
    z_lq = vae.encode_lq(t["input.image"], tiling=tiling)
    _compare(case, {"z_lq": z_lq, "x_stage1": vae.decode(z_lq, tiling=tiling)})


def check_vector_conditioning(case: Case) -> None:
    t = case.tensors()
    cfg = case["config"]["conditioning"]
    got = assemble_conditioning(t["input.clip_l_hidden"], t["input.clip_g_penultimate"], t["input.clip_g_pooled"],
                                t["input.original_size_as_tuple"], t["input.crop_coords_top_left"],
                                t["input.target_size_as_tuple"], cfg["size_embed_dim"])
    for d in case["params"]["timestep_embedding_dims"]:
        got[f"timestep_embedding_{d}"] = timestep_embedding(t["input.timesteps"], d)
    _compare(case, got)


CHECKS = {
    ("supir", "first_stage"): check_first_stage,
    ("supir", "first_stage_tiled"): check_first_stage_tiled,
    ("supir", "vector_conditioning"): check_vector_conditioning,
}
