"""Micro-benchmark behind ``winograd.py``: per convolution shape of SUPIR's VAE, UNet and CodeFormer, oneDNN's
direct 3x3 convolution (``F.conv2d``, channels-last and contiguous) against Winograd F(2x2, 3x3) and F(4x4, 3x3)
(inside ``winograd.workspace()``, as the networks call them), the max error of each against float64 (relative
to the output's largest value), and which variant ``winograd.tile_size`` picks (0: the direct kernel). Shows
where the thresholds ``MIN_CHANNELS``, ``F4_MIN_*`` and ``F2_MIN_*`` come from. ``--bands`` instead times the
variant the pack takes, on channels-last and contiguous maps, with bands sized by the cache budget alone
(``MIN_BAND_TILES = 0``) and with the pack's minimum of tiles per band.

    python bench/winograd.py --threads 1 [--bands]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import import_pack  # noqa: E402

import_pack()
from photo_restoration import winograd  # noqa: E402

# (batch, channels in, channels out, map side): VAE / CodeFormer levels, then SUPIR UNet levels (CFG batch 2)
SHAPES = [(1, 64, 64, 512), (1, 128, 128, 512), (1, 256, 128, 512), (1, 128, 128, 256), (1, 256, 256, 256),
          (1, 256, 256, 128), (1, 512, 512, 128), (1, 512, 512, 64), (1, 512, 512, 32), (4, 512, 512, 32),
          (4, 64, 64, 256), (1, 512, 512, 16), (1, 256, 256, 32), (2, 320, 320, 64), (2, 640, 640, 32),
          (2, 1280, 1280, 32), (2, 320, 320, 32), (2, 640, 640, 16), (2, 1280, 1280, 16), (2, 2560, 1280, 16),
          (2, 1280, 1280, 8), (2, 640, 640, 8), (2, 1920, 640, 32), (2, 960, 320, 64)]


def best_s(fn, runs: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bands", action="store_true", help="band minimum sweep instead of the variant table")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.bands:
        return bands(a.runs)
    g = torch.Generator().manual_seed(0)
    print("B, Cin, Cout, side | direct NCHW, direct channels-last, F(2x2), F(4x4) (s) | F(2x2), F(4x4) / best direct"
          " | max rel err direct, F(2x2), F(4x4) | tile_size")
    with torch.inference_mode(), winograd.workspace():
        for b, ci, co, side in SHAPES:
            x = torch.randn(b, ci, side, side, generator=g)
            xl = x.contiguous(memory_format=torch.channels_last)
            w = torch.randn(co, ci, 3, 3, generator=g) / (3 * ci ** 0.5)
            bias = torch.randn(co, generator=g)
            t_nchw, y = best_s(lambda: F.conv2d(x, w, bias, padding=1), a.runs)
            t_cl, _ = best_s(lambda: F.conv2d(xl, w, bias, padding=1), a.runs)
            t_2, y2 = best_s(lambda: winograd.conv3x3(xl, w, bias, 2), a.runs)
            t_4, y4 = best_s(lambda: winograd.conv3x3(xl, w, bias, 4), a.runs)
            ref = F.conv2d(x.double(), w.double(), bias.double(), padding=1)
            scale = ref.abs().max().item()
            err = [((o.double() - ref).abs().max().item() / scale) for o in (y, y2, y4)]
            best = min(t_nchw, t_cl)
            print(f"{b}, {ci}, {co}, {side} | {t_nchw:.4f}, {t_cl:.4f}, {t_2:.4f}, {t_4:.4f} | "
                  f"{t_2 / best:.2f}, {t_4 / best:.2f} | {err[0]:.1e}, {err[1]:.1e}, {err[2]:.1e} | "
                  f"{winograd.tile_size(x, w)}", flush=True)


def bands(runs: int) -> None:
    """Direct kernel against the pack's variant with cache-sized bands and with ``MIN_BAND_TILES``."""
    g = torch.Generator().manual_seed(0)
    keep = winograd.MIN_BAND_TILES
    print(f"B, Cin, Cout, side, tile | direct contiguous | Winograd channels-last, MIN_BAND_TILES 0 / {keep} | "
          f"Winograd contiguous, 0 / {keep} (s)")
    with torch.inference_mode(), winograd.workspace():
        for b, ci, co, side in SHAPES:
            x = torch.randn(b, ci, side, side, generator=g)
            w = torch.randn(co, ci, 3, 3, generator=g) / (3 * ci ** 0.5)
            m = winograd.tile_size(x, w)
            if not m:
                continue
            xl = x.contiguous(memory_format=torch.channels_last)
            t_direct, _ = best_s(lambda: F.conv2d(x, w, None, padding=1), runs)
            times = []
            for inp in (xl, x):
                for tiles in (0, keep):
                    winograd.MIN_BAND_TILES = tiles
                    times.append(best_s(lambda: winograd.conv3x3(inp, w, None, m), runs)[0])
            winograd.MIN_BAND_TILES = keep
            print(f"{b}, {ci}, {co}, {side}, F({m}x{m}) | {t_direct:.4f} | {times[0]:.4f} / {times[1]:.4f} | "
                  f"{times[2]:.4f} / {times[3]:.4f}", flush=True)


if __name__ == "__main__":
    main()
