"""Micro-benchmark behind ``groupnorm.py`` and ``layout.py``: per map shape of SUPIR's VAE and CodeFormer,
ATen's GroupNorm+SiLU into a new map against the pack's into a reused buffer (both layouts), and oneDNN's 3x3
convolution on contiguous against channels-last maps; max error of each norm against float64.

    python bench/channels_last.py --threads 1
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
from photo_restoration import groupnorm  # noqa: E402

SHAPES = [(64, 512), (128, 512), (128, 256), (256, 256), (512, 128), (512, 64)]


def best_ms(fn, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one small shape (a smoke run)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print("| channels @ size | GN+SiLU ATen (new map) | ours into buffer, NCHW | ours, channels-last "
          "| err ATen / ours vs fp64 | conv3x3 NCHW | conv3x3 channels-last |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for c, s in [(64, 64)] if a.quick else SHAPES:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, c, s, s, generator=g) * 3 + 2
            xl = x.contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
            buf, bufl = torch.empty_like(x), torch.empty_like(xl)
            ref = F.silu(F.group_norm(x.double(), 32, w.double(), b.double(), 1e-6))
            aten = best_ms(lambda: F.silu(F.group_norm(x, 32, w, b, 1e-6), inplace=True), a.runs)
            ours = best_ms(lambda: groupnorm.group_norm(x, 32, w, b, 1e-6, silu=True, out=buf), a.runs)
            ours_l = best_ms(lambda: groupnorm.group_norm(xl, 32, w, b, 1e-6, silu=True, out=bufl), a.runs)
            e_aten = (F.silu(F.group_norm(x, 32, w, b, 1e-6)).double() - ref).abs().max().item()
            e_ours = (groupnorm.group_norm(xl, 32, w, b, 1e-6, silu=True).double() - ref).abs().max().item()
            k = torch.randn(c, c, 3, 3, generator=g) * 0.02
            conv = best_ms(lambda: F.conv2d(x, k, b, padding=1), max(1, a.runs - 1))
            conv_l = best_ms(lambda: F.conv2d(xl, k, b, padding=1), max(1, a.runs - 1))
            print(f"| {c} @ {s}² | {aten:.1f} ms | {ours:.1f} ms | {ours_l:.1f} ms | {e_aten:.1e} / {e_ours:.1e} "
                  f"| {conv:.0f} ms | {conv_l:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
