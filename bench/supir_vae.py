"""Benchmark SUPIR's first stage: untiled vs tiled (exact / official) encode and decode.

Random weights in the full SDXL VAE configuration (or ``--tiny``). Each mode runs in its own
subprocess so that its peak memory is its own: peak resident memory on CPU, peak allocated device
memory on CUDA.

    python bench/supir_vae.py --size 1024x768 [--device cuda] [--dtype bf16] [--modes untiled exact official]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from checkout import import_pack


def run_one(args) -> dict:
    import torch

    import_pack()
    from photo_restoration.supir.vae import SupirVAE, VAEConfig, VAETiling

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = VAEConfig(ch=32, ch_mult=(1, 2, 4, 4)) if args.tiny else VAEConfig()
    torch.manual_seed(0)
    vae = SupirVAE(cfg)
    for p in vae.parameters():  # tame random weights so activations stay finite
        torch.nn.init.normal_(p, std=0.02) if p.ndim > 1 else torch.nn.init.ones_(p)
    vae = vae.to(args.device, dtype).eval()
    h, w = (int(v) for v in args.size.lower().split("x"))
    x = torch.rand(1, 3, h, w) * 2 - 1
    tiling = None if args.mode == "untiled" else VAETiling(args.encoder_tile, args.decoder_tile, args.mode)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    z = vae.encode_lq(x, tiling=tiling)
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    out = vae.decode(z, tiling=tiling)
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    res = {"mode": args.mode, "encode_s": round(t1 - t0, 3), "decode_s": round(t2 - t1, 3),
           "out": list(out.shape), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if cuda:
        res["peak_device_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512x512", help="image HxW in pixels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--encoder-tile", type=int, default=512, help="encoder tile, image pixels")
    parser.add_argument("--decoder-tile", type=int, default=64, help="decoder tile, latent pixels")
    parser.add_argument("--modes", nargs="*", default=["untiled", "exact", "official"])
    parser.add_argument("--tiny", action="store_true", help="ch 32 instead of SDXL's 128")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_one(args)))
        return 0
    base = [a for a in sys.argv[1:]]
    for mode in args.modes:
        proc = subprocess.run([sys.executable, __file__, *base, "--mode", mode], capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        print(lines[-1] if proc.returncode == 0 and lines else f"{mode}: failed\n{proc.stderr[-2000:]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
