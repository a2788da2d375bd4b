"""Device-memory estimates for SUPIR's stages (activations, not weights), in bytes.

What a host memory manager (ComfyUI's ``load_models_gpu(memory_required=...)``) must keep free besides
the weights while a stage runs: it evicts other models to make that room and, when SUPIR's networks
may be loaded partially, loads only as many weights as still fit. Plain arithmetic on sizes; nothing
here allocates.

Not from the official code (it has no memory manager). The factors follow ComfyUI's own estimates
for the same networks, so SUPIR asks for room on the same scale as core SDXL models:

* SDXL UNet: ``area * dtype_size * 0.01 * 0.8`` MiB with efficient attention (``area`` = batch x
  latent pixels; 0.8 is ComfyUI's ``memory_usage_factor`` for SDXL), ``area * 0.15 * 0.8`` MiB
  without. SUPIR runs GLVControl (the UNet's encoder half and middle block) and the ZeroSFT /
  cross-attention adapters on the same batch: x :data:`CONTROL_FACTOR`.
* AutoencoderKL: 1767 bytes per image pixel per dtype byte to encode, 2178 x 64 per latent pixel to
  decode (ComfyUI's ``memory_used_encode`` / ``memory_used_decode``), applied to one tile (with its
  padding) when the VAE is tiled, plus the whole-map keys/values of the mid attention that the exact
  tiled mode keeps on the device.
"""
from __future__ import annotations

import math

import torch

MIB = 1024 * 1024
SDXL_MEMORY_USAGE_FACTOR = 0.8
CONTROL_FACTOR = 1.6
VAE_ENCODE_BYTES = 1767
VAE_DECODE_BYTES = 2178 * 64
VAE_MID_CHANNELS = 512
LATENT_CHANNELS = 4
TILE_PAD = 32  # image pixels around an encoder tile (the official tiled VAE's padding)


def compute_itemsize(dtype: torch.dtype | None) -> int:
    """Bytes per activation element for a weight/compute dtype (fp8 storage computes in bf16)."""
    if dtype is None:
        return 4
    if dtype in (torch.float16, torch.bfloat16) or torch.finfo(dtype).bits <= 8:
        return 2
    return torch.finfo(dtype).bits // 8


def sampling_memory(height: int, width: int, dtype: torch.dtype | None = torch.float16, cfg: bool = True,
                    tile_size: int | None = None, tile_batch_size: int = 1,
                    efficient_attention: bool = True) -> int:
    """Bytes one SUPIR denoiser step needs at an image of ``height`` x ``width`` pixels.

    ``cfg``: the conditional and unconditional passes run as one batch of 2. ``tile_size`` (image
    pixels, None = untiled): tiled sampling runs ``tile_batch_size`` tiles at a time, plus whole-latent
    buffers (the running latent, noise, the weighted sums of tiled sampling)."""
    lat_h, lat_w = math.ceil(height / 8), math.ceil(width / 8)
    if tile_size:
        t = max(math.ceil(tile_size / 8), 1)
        area = min(t, lat_h) * min(t, lat_w) * max(int(tile_batch_size), 1)
    else:
        area = lat_h * lat_w
    area *= 2 if cfg else 1
    per_pixel = compute_itemsize(dtype) * 0.01 if efficient_attention else 0.15
    network = area * per_pixel * SDXL_MEMORY_USAGE_FACTOR * CONTROL_FACTOR * MIB
    buffers = 8 * lat_h * lat_w * LATENT_CHANNELS * 4  # float32 latents: x, noise, hint, sums, ...
    return int(network + buffers)


def vae_memory(height: int, width: int, dtype: torch.dtype | None = torch.float32, tile_size: int | None = None,
               decode: bool = True, encode: bool = True) -> int:
    """Bytes the VAE needs for an image of ``height`` x ``width`` pixels: the larger of encoding and
    decoding (both for SUPIR's first stage). ``tile_size``: the tiled VAE's encoder tile in image
    pixels (None = untiled); the decoder tile is ``tile_size / 8`` latent pixels."""
    size = compute_itemsize(dtype)
    lat = math.ceil(height / 8) * math.ceil(width / 8)
    if tile_size:
        side = tile_size + 2 * TILE_PAD
        pixels = min(side, height) * min(side, width)
        mid_kv = 2 * VAE_MID_CHANNELS * lat * size  # global attention: keys and values of the whole map
        enc = VAE_ENCODE_BYTES * pixels * size + mid_kv
        dec = VAE_DECODE_BYTES * (pixels // 64) * size + mid_kv
    else:
        enc = VAE_ENCODE_BYTES * height * width * size
        dec = VAE_DECODE_BYTES * lat * size
    io = (3 * height * width + LATENT_CHANNELS * lat) * 4 * 2  # input / output images and latents, float32
    return int(max(enc if encode else 0, dec if decode else 0) + io)


def text_memory(batch: int = 2) -> int:
    """Bytes the two SDXL text encoders need for ``batch`` prompts (77 tokens; small)."""
    return int(batch * 77 * 1280 * 4 * 64)
