"""SDXL's first stage (AutoencoderKL) and SUPIR's degradation-robust *denoise encoder*.

Module and parameter names follow the official SGM layout, so ``SupirVAE().state_dict()`` has exactly
the keys found under ``first_stage_model.`` in an SDXL checkpoint (``encoder.*``, ``decoder.*``,
``quant_conv.*``, ``post_quant_conv.*``) plus SUPIR's ``denoise_encoder.*`` (same architecture as
``encoder``; it shares ``quant_conv``).

Conventions of :class:`SupirVAE`: images are RGB in [-1, 1], [B, 3, H, W]; latents are *scaled* by
``scale_factor`` (0.13025); every output is float32 (the decoder output is not clamped).
The networks' blocks live in :mod:`.vae_blocks`; tiled passes in :mod:`.vae_tiled` (which imports only the blocks).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import winograd
from .vae_blocks import Decoder, Encoder, VAEConfig
from .vae_tiled import tiled_forward

log = logging.getLogger(__name__)

SCALE_FACTOR = 0.13025


@dataclass
class VAETiling:
    """How to tile the first stage. Tile sizes as in the official ``init_tile_vae``: the encoders in
    image pixels, the decoder in latent pixels.

    ``norm="exact"``: true whole-image GroupNorm statistics and exact halos, so the result equals the
    untiled network within float tolerance. ``norm="official"``: SUPIR's tiled VAE (per-tile padding,
    pooled within-tile statistics) -- reproduces the official output, which differs from the untiled one.
    ``staging``: where whole intermediate maps wait between tiles (default CPU; tiles go to the
    network's device one at a time).
    """

    encoder_tile_size: int = 512
    decoder_tile_size: int = 64
    norm: str = "exact"
    staging: Any = "cpu"

    def __post_init__(self):
        if self.norm not in ("exact", "official"):
            raise ValueError(f"tiled VAE norm must be 'exact' or 'official', not {self.norm!r}")
        if self.encoder_tile_size < 8 or self.decoder_tile_size < 1:
            raise ValueError("tiled VAE: tile sizes must be >= 8 image pixels / >= 1 latent pixel")


class SupirVAE(nn.Module):
    """AutoencoderKL + denoise encoder with SUPIR's latent conventions (see module docstring)."""

    def __init__(self, cfg: VAEConfig, scale_factor: float = SCALE_FACTOR):
        super().__init__()
        self.config = cfg
        self.scale_factor = scale_factor
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.denoise_encoder = Encoder(cfg) if cfg.has_denoise_encoder else None

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def _run(self, net: nn.Module, x: torch.Tensor, tiling: VAETiling | None, decoder: bool, callbacks) -> torch.Tensor:
        x = x.to(self.device, self.dtype)
        with winograd.workspace():  # the CPU convolutions' scratch buffers, reused within this pass
            if tiling is None:
                return net(x)
            tile = tiling.decoder_tile_size if decoder else tiling.encoder_tile_size
            out = tiled_forward(net, x, tile, decoder=decoder, norm=tiling.norm, staging=tiling.staging,
                                callbacks=callbacks)
        return out.to(self.device)  # results live where the untiled ones would

    def _moments(self, net: nn.Module, x: torch.Tensor, tiling, callbacks) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            moments = self.quant_conv(self._run(net, x, tiling, False, callbacks)).float()
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    # -- public API -------------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor, tiling: VAETiling | None = None, callbacks=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the regular encoder's posterior, unscaled, float32 (logvar clamped to [-30, 20])."""
        return self._moments(self.encoder, x, tiling, callbacks)

    def encode_lq(self, x: torch.Tensor, tiling: VAETiling | None = None, callbacks=None) -> torch.Tensor:
        """SUPIR's control latent: ``scale * mode`` of the denoise encoder's posterior."""
        if self.denoise_encoder is None:
            raise ValueError("this VAE has no SUPIR denoise_encoder weights (first_stage_model.denoise_encoder.*)")
        mean, _ = self._moments(self.denoise_encoder, x, tiling, callbacks)
        return mean * self.scale_factor

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True,
               noise: torch.Tensor | None = None, tiling: VAETiling | None = None, callbacks=None) -> torch.Tensor:
        """Regular encoder: ``scale * (mean + std * noise)`` (a posterior sample) or ``scale * mean``.

        ``noise`` is an explicit standard-normal draw shaped like the latent; otherwise one is drawn on
        the CPU from ``generator`` (the official code draws with ``torch.randn`` too).
        """
        mean, logvar = self.posterior(x, tiling, callbacks)
        if sample:
            if noise is None:
                noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
            mean = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, torch.float32)
        return mean * self.scale_factor

    def decode(self, z: torch.Tensor, tiling: VAETiling | None = None, callbacks=None) -> torch.Tensor:
        """``decoder(post_quant_conv(z / scale))`` as float32, not clamped."""
        with torch.no_grad():
            h = self.post_quant_conv(z.to(self.device, self.dtype) / self.scale_factor)
            return self._run(self.decoder, h, tiling, True, callbacks).float()


# ---- state dict -> config -> model --------------------------------------------------------------

def _shape(sd: dict, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"VAE weights: missing key '{key}'")
    return tuple(sd[key].shape)


def detect_vae_config(sd: dict) -> VAEConfig:
    """Hyper-parameters from the shapes of a ``first_stage_model.``-relative state dict."""
    ch = _shape(sd, "encoder.conv_in.weight")[0]
    in_channels = _shape(sd, "encoder.conv_in.weight")[1]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise ValueError("VAE weights: encoder.down.N.* levels are missing or not contiguous")
    ch_mult = tuple(_shape(sd, f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels)
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    z2 = _shape(sd, "encoder.conv_out.weight")[0]
    embed2 = _shape(sd, "quant_conv.weight")[0]
    out_ch = _shape(sd, "decoder.conv_out.weight")[0]
    attn = [k for k in sd if re.match(r"(encoder|decoder)\.(down|up)\.\d+\.attn\.", k)]
    if attn:
        raise ValueError(f"VAE weights: per-level attention ({attn[0]}...) is not an SDXL-type VAE")
    has_denoise = any(k.startswith("denoise_encoder.") for k in sd)
    return VAEConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=len(blocks), z_channels=z2 // 2,
                     embed_dim=embed2 // 2, in_channels=in_channels, out_ch=out_ch,
                     has_denoise_encoder=has_denoise)


def vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """The VAE runs in float32 or bfloat16 only: float16 overflows (NaNs in the official code)."""
    if dtype == torch.float16:
        log.warning("SUPIR VAE: float16 gives NaNs in this VAE; using float32 instead")
        return torch.float32
    if dtype not in (torch.float32, torch.bfloat16, torch.float64):
        log.warning("SUPIR VAE: dtype %s is not supported; using float32", dtype)
        return torch.float32
    return dtype


def build_vae(sd: dict, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              scale_factor: float = SCALE_FACTOR) -> SupirVAE:
    """Build :class:`SupirVAE` from a ``first_stage_model.``-relative state dict.

    Built on the meta device and materialised straight in ``dtype`` on ``device``; every expected key
    must be present (``denoise_encoder.*`` may be absent as a whole -> ``vae.denoise_encoder is None``).
    """
    dtype = vae_dtype(dtype)
    cfg = detect_vae_config(sd)
    with torch.device("meta"):
        vae = SupirVAE(cfg, scale_factor)
    expected = vae.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"VAE weights: {len(missing)} missing keys, e.g. {missing[:3]}")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise ValueError(f"VAE weights: {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"VAE weights: '{k}' has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    vae.load_state_dict({k: sd[k].to(device=device, dtype=dtype) for k in expected}, assign=True)
    return vae.eval().requires_grad_(False)
