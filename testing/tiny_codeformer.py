"""A tiny CodeFormer in the official layout: ``models/facerestore_models/codeformer.pth`` holding
``{"params_ema": state_dict}``, like the released file. It takes 512x512 faces like the real network
(6 levels, 16x16 latent) but is narrow (nf 32), shallow (2 layers) and has 64 codes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..codeformer.loader import build_codeformer
from .tiny_checkpoints import random_state_dict

# The parity fixtures' tiny configuration, with the head count the loader assumes for files without one (8).
TINY_CONFIG: dict[str, Any] = {
    "nf": 32, "ch_mult": [1, 2, 1, 1, 1, 1], "dim_embd": 64, "n_head": 8, "n_layers": 2, "dim_mlp": 128,
    "codebook_size": 64, "connect_list": ["32", "64", "128", "256"],
}


def tiny_codeformer_state_dict(seed: int = 0, std: float = 0.05, **config: Any) -> dict[str, torch.Tensor]:
    """Random float32 weights for ``TINY_CONFIG`` (updated with ``config``) in the official key layout.

    Convolution/linear weights and the codebook are N(0, std); norm scales are 1 + N(0, std)."""
    model = build_codeformer({**TINY_CONFIG, **config})  # meta device: shapes and module types only
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = random_state_dict(shapes, seed, std=std)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            weight = sd[f"{name}.weight"]
            if weight.mean().abs() < 0.5:  # not already centred on one by random_state_dict
                sd[f"{name}.weight"] = weight + 1.0
    return sd


def write_codeformer(models_dir: Path, seed: int) -> list[Path]:
    path = Path(models_dir) / "facerestore_models" / "codeformer.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": tiny_codeformer_state_dict(seed)}, path)
    return [path]


WRITERS = {"codeformer": write_codeformer}
