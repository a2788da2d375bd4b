"""Random-weight face restoration files that spandrel detects, under their published names in
``models/facerestore_models``, each ``{"params_ema": state_dict}`` as the GFPGAN releases:

* ``GFPGANv1.4.pth`` - GFPGAN v1.3/v1.4 ("clean" architecture). Full size (spandrel reads no size from the
  keys: 512 px, 512 style channels, channel multiplier 2), ~350 MB, about a second per face on a CPU.
* ``RestoreFormer.pth`` - RestoreFormer, narrow (32 channels, one residual block per level, 64 codes); spandrel
  reads these sizes from the shapes.
* ``RestoreFormer++.ckpt`` - RestoreFormer++ as the official release, ``{"state_dict": {"vqvae.<key>": ...}}``,
  equally narrow, with the decoder's extra 32 px attention (4 heads).

Weights are the architectures' own random initialisation under a fixed seed (the global RNG is left as it was).
"""
from __future__ import annotations

from pathlib import Path

import torch

FOLDER = "facerestore_models"
GFPGAN_FILE = "GFPGANv1.4.pth"
RESTOREFORMER_FILE = "RestoreFormer.pth"
RESTOREFORMER_PP_FILE = "RestoreFormer++.ckpt"
# spandrel's GFPGAN loader builds this configuration whatever the file holds
GFPGAN_CONFIG = dict(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                     fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)
TINY_RESTOREFORMER = dict(n_embed=64, embed_dim=32, ch=32, out_ch=3, ch_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1,
                          attn_resolutions=(16,), dropout=0.0, in_channels=3, resolution=512, z_channels=32,
                          double_z=False, enable_mid=True, head_size=8)


def _seeded_state_dict(build, seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build()
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def gfpgan_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """GFPGAN v1.4's key layout and shapes (spandrel's GFPGANv1Clean), random weights."""
    from spandrel.architectures.GFPGAN import GFPGAN

    return _seeded_state_dict(lambda: GFPGAN(**GFPGAN_CONFIG), seed)


def restoreformer_state_dict(seed: int = 0, **config) -> dict[str, torch.Tensor]:
    """RestoreFormer's key layout (spandrel's RestoreFormer), narrow, random weights."""
    from spandrel.architectures.RestoreFormer import RestoreFormer

    return _seeded_state_dict(lambda: RestoreFormer(**{**TINY_RESTOREFORMER, **config}), seed)


def restoreformer_pp_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """RestoreFormer++'s released key layout (``vqvae.`` prefix), narrow, random weights."""
    from ..codeformer.face_models import RFPP_HEAD_SIZE, RestoreFormerPP

    cfg = {k: v for k, v in TINY_RESTOREFORMER.items() if k not in ("dropout", "resolution")}
    cfg.update(head_size=RFPP_HEAD_SIZE, decoder_attn_resolutions=(16, 32))
    sd = _seeded_state_dict(lambda: RestoreFormerPP(cfg), seed)
    return {f"vqvae.{k}": v for k, v in sd.items()}


def _write(path: Path, sd: dict) -> list[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": sd}, path)
    return [path]


def write_gfpgan(models_dir: Path, seed: int) -> list[Path]:
    return _write(Path(models_dir) / FOLDER / GFPGAN_FILE, gfpgan_state_dict(seed))


def write_restoreformer(models_dir: Path, seed: int) -> list[Path]:
    return _write(Path(models_dir) / FOLDER / RESTOREFORMER_FILE, restoreformer_state_dict(seed))


def write_restoreformer_pp(models_dir: Path, seed: int) -> list[Path]:
    path = Path(models_dir) / FOLDER / RESTOREFORMER_PP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": restoreformer_pp_state_dict(seed)}, path)
    return [path]


# GFPGAN is full size (spandrel fixes its configuration: ~350 MB), so it is written only by the tests that use it
# (write_gfpgan), not by every write_all.
WRITERS = {"restoreformer": write_restoreformer, "restoreformer_pp": write_restoreformer_pp}
