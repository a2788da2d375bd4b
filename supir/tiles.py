"""THE tile grid of tiled sampling: the sampler, the SUPIR Tiles node and per-tile captions all use it.

Windows follow the official TiledRestoreEDMSampler: start offsets 0, stride, 2*stride, ... while the
tile still fits, plus a last window flush with the far edge when the grid does not land on it;
row-major order (rows outer, columns inner); each window is ``(h0, h1, w0, w1)`` in latent pixels.
Beyond the reference, a side smaller than the tile gets one window covering it (the tile shrinks),
so any size and aspect ratio works.

Users give tile size and stride in image pixels; :func:`sampler_tile` / :func:`sampler_stride` turn
them into the latent sizes the sampler uses (tiles a multiple of 8 latent pixels, so every tile passes
the UNet) and :func:`image_windows` gives the same grid in image pixels of the 64-padded sampling
size -- what a per-tile captioner must crop. A stride larger than the tile would leave gaps (and a 0/0
blend): it is refused with an error naming ``tile_stride``.
"""
from __future__ import annotations

LATENT_SCALE = 8  # image pixels per latent pixel (SDXL VAE)
TILE_MULTIPLE = 8  # sampler tiles are multiples of 8 latent pixels (64 image pixels)


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if (size - tile) % stride != 0:
        starts.append(size - tile)
    return starts


def check_tiles(tile: int, stride: int, unit: str = "latent pixels") -> None:
    """Refuse a grid with gaps: positive sizes, stride at most the tile."""
    if tile <= 0 or stride <= 0:
        raise ValueError(f"tile_size ({tile}) and tile_stride ({stride}) must be positive ({unit}).")
    if stride > tile:
        raise ValueError(f"tile_stride ({stride} {unit}) is larger than tile_size ({tile} {unit}): the tiles would "
                         "leave gaps. Set tile_stride to at most tile_size (official: half of it).")


def tile_windows(height: int, width: int, tile: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Tile windows ``(h0, h1, w0, w1)`` over a ``height x width`` latent, in the sampler's order."""
    check_tiles(tile, stride)
    th, tw = min(tile, height), min(tile, width)
    return [(h0, h0 + th, w0, w0 + tw) for h0 in _starts(height, tile, stride) for w0 in _starts(width, tile, stride)]


def sampler_tile(tile_px: int) -> int:
    """The sampler's tile in latent pixels for a tile size in image pixels (a multiple of 64 px, at least 64)."""
    return max(TILE_MULTIPLE, int(tile_px) // (LATENT_SCALE * TILE_MULTIPLE) * TILE_MULTIPLE)


def sampler_stride(stride_px: int) -> int:
    """The sampler's stride in latent pixels for a stride in image pixels (at least 1)."""
    return max(1, int(stride_px) // LATENT_SCALE)


def check_pixel_tiles(tile_px: int, stride_px: int) -> None:
    """:func:`check_tiles` on what the sampler will use, with the sizes as the user typed them."""
    if int(stride_px) > int(tile_px) or sampler_stride(stride_px) > sampler_tile(tile_px):
        raise ValueError(f"tile_stride ({stride_px} px) is larger than tile_size ({tile_px} px, sampled as "
                         f"{sampler_tile(tile_px) * LATENT_SCALE} px): the tiles would leave gaps. Set tile_stride "
                         "to at most tile_size (official: half of it).")


def latent_windows(lat_h: int, lat_w: int, tile_px: int, stride_px: int) -> list[tuple[int, int, int, int]]:
    """The sampler's windows (latent pixels) over a latent, for tile size / stride in image pixels."""
    check_pixel_tiles(tile_px, stride_px)
    return tile_windows(lat_h, lat_w, sampler_tile(tile_px), sampler_stride(stride_px))


def image_windows(height: int, width: int, tile_px: int, stride_px: int) -> list[tuple[int, int, int, int]]:
    """The same windows in image pixels over a sampling-size image of ``height x width`` (multiples of 8)."""
    lat = latent_windows(height // LATENT_SCALE, width // LATENT_SCALE, tile_px, stride_px)
    return [(h0 * LATENT_SCALE, h1 * LATENT_SCALE, w0 * LATENT_SCALE, w1 * LATENT_SCALE) for h0, h1, w0, w1 in lat]
