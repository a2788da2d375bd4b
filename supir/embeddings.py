"""Sinusoidal embeddings shared by the UNet (timesteps) and the SDXL vector conditioning (sizes)."""
from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """SGM's sinusoidal embedding: ``[cos(t*f), sin(t*f)]`` (cos half first), f_j = exp(-ln(P) j / half).

    Computed in float32 whatever the input dtype; a zero column is appended when ``dim`` is odd.
    ``t`` is [N] (ints or floats); returns [N, dim] float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.reshape(-1).to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
