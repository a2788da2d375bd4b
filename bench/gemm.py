"""Micro-benchmark behind ``gemm.py``: the SDXL transformer's linear layers through ATen (MKL's sgemm) against
oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``), per GEMM shape; then one SDXL transformer block (the
GEGLU feed-forward and residual sums fused into the GEMMs) with ``gemm.ENABLED`` off and on, alternating, and
the largest difference between the two relative to the output's largest value.

    python bench/gemm.py --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import import_pack  # noqa: E402

import_pack()
from photo_restoration import gemm, scratch  # noqa: E402
from photo_restoration.supir import unet  # noqa: E402

# (rows, in, out): 256 px (128 rows at 1280 channels) and 512 px (512 rows at 1280, 2048 rows at 640), CFG batch 2
SHAPES = [(128, 1280, 1280), (128, 1280, 5120), (128, 5120, 1280), (512, 1280, 1280), (512, 1280, 5120),
          (512, 5120, 1280), (2048, 640, 640), (2048, 640, 2560), (2048, 2560, 640)]
BLOCKS = [(1280, 64), (1280, 256), (640, 1024)]  # (channels, tokens per image), batch 2


def best_s(fn, runs: int) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {a.threads} thread(s), oneDNN available: {gemm._AVAILABLE}")
    with torch.inference_mode():
        print("rows x in x out: GFLOP/s  MKL (F.linear) | oneDNN (gemm.linear)")
        for m, k, n in SHAPES:
            x, w, b = torch.randn(m, k), torch.randn(n, k) / k ** 0.5, torch.randn(n)
            flop = 2 * m * k * n / 1e9
            gemm.ENABLED = False
            mkl = best_s(lambda: gemm.linear(x, w, b), a.runs)
            gemm.ENABLED = True
            dnn = best_s(lambda: gemm.linear(x, w, b), a.runs)
            print(f"{m:5d} x {k:5d} x {n:5d}: {flop / mkl:6.1f} | {flop / dnn:6.1f}")
        print("transformer block, batch 2: ms  plain | fused (min of alternating runs), max rel diff")
        for c, tokens in BLOCKS:
            block = unet.BasicTransformerBlock(c, c // 64, 64, 2048).eval()
            for p in block.parameters():
                p.data.normal_(0, c ** -0.5)
            x = torch.randn(2, tokens, c)
            ctx = unet.constant_context(torch.randn(2, 77, 2048))
            times: dict[bool, float] = {False: float("inf"), True: float("inf")}
            with scratch.scratch():
                for enabled in (False, True, False, True):
                    gemm.ENABLED = enabled
                    times[enabled] = min(times[enabled], best_s(lambda: block(x, ctx), a.runs))
                gemm.ENABLED = False
                want = block(x, ctx)
                gemm.ENABLED = True
                got = block(x, ctx)
            diff = ((got - want).abs().max() / want.abs().max()).item()
            print(f"{c} channels, {tokens} tokens: {times[False] * 1e3:7.1f} | {times[True] * 1e3:7.1f}   {diff:.1e}")


if __name__ == "__main__":
    main()
