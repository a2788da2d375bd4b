"""The tile grid of tiled sampling, shared by the sampler and the per-tile captioner.

Windows follow the official TiledRestoreEDMSampler: start offsets 0, stride, 2*stride, ... while the
tile still fits, plus a last window flush with the far edge when the grid does not land on it;
row-major order (rows outer, columns inner); each window is ``(h0, h1, w0, w1)`` in latent pixels.
Beyond the reference, a side smaller than the tile gets one window covering it (the tile shrinks),
so any size and aspect ratio works.
"""
from __future__ import annotations

LATENT_SCALE = 8  # image pixels per latent pixel (SDXL VAE)


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if (size - tile) % stride != 0:
        starts.append(size - tile)
    return starts


def tile_windows(height: int, width: int, tile: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Tile windows ``(h0, h1, w0, w1)`` over a ``height x width`` latent, in the sampler's order."""
    if tile <= 0 or stride <= 0:
        raise ValueError(f"tile ({tile}) and stride ({stride}) must be positive")
    th, tw = min(tile, height), min(tile, width)
    return [(h0, h0 + th, w0, w0 + tw) for h0 in _starts(height, tile, stride) for w0 in _starts(width, tile, stride)]


def pixel_windows(height: int, width: int, tile: int, stride: int, scale: int = LATENT_SCALE) -> list[tuple[int, int, int, int]]:
    """The same windows in image pixels for an image of ``height x width`` pixels (tile/stride in pixels).

    The image is seen as a latent of ``height // scale x width // scale``; windows are scaled back.
    """
    lat = tile_windows(height // scale, width // scale, max(tile // scale, 1), max(stride // scale, 1))
    return [(h0 * scale, h1 * scale, w0 * scale, w1 * scale) for h0, h1, w0, w1 in lat]
