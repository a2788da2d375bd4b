"""Host RAM and time of SUPIR's First Stage (denoise-encode + decode), untiled and tiled, on tiny weights.

    flock /tmp/bigmem.lock python bench/vae_memory.py                 # 1024, 2048, 4096 px; all modes
    python bench/vae_memory.py --sizes 1024 --modes untiled exact     # one size

Each case runs in a fresh subprocess on the CPU, one thread: the tiny VAE of the test suite (the full
SDXL VAE has 4x the channels: multiply the RSS by about 4), a random image of the size, and peak RSS
growth (VmHWM after resetting it, minus the RSS before the call) of ``encode_lq`` followed by
``decode``. Modes: ``untiled``; ``exact`` (tiled, whole-image GroupNorm statistics, equal to untiled);
``official`` (SUPIR's tiled VAE, pooled per-tile statistics). Tiles: 512 image px to encode, 64 latent
px to decode (the Restore node's defaults).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = "--child"


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(size: int, mode: str, enc_tile: int, dec_tile: int, ch: int = 32, seed: int = 0) -> dict:
    import gc

    import torch

    from checkout import import_pack

    import_pack()
    from photo_restoration.supir.vae import VAETiling, build_vae
    from photo_restoration.testing.tiny_supir_parts import tiny_vae_state_dict

    torch.set_num_threads(1)
    sd = {k[len("first_stage_model."):]: v for k, v in tiny_vae_state_dict(seed, ch=ch).items()}
    vae = build_vae(sd)
    del sd
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    tiling = None if mode == "untiled" else VAETiling(encoder_tile_size=enc_tile, decoder_tile_size=dec_tile,
                                                        norm=mode)
    gc.collect()
    base = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    t0 = time.perf_counter()
    with torch.inference_mode():
        z = vae.encode_lq(x, tiling=tiling)
        y = vae.decode(z, tiling=tiling)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"size": size, "mode": mode, "seconds": round(seconds, 2), "rss_growth_mib": round((peak - base) / 2**20),
            "out": list(y.shape)}


def run_case(size: int, mode: str, enc_tile: int = 512, dec_tile: int = 64, ch: int = 32,
             timeout: float = 3600) -> dict:
    """One measurement in a fresh process: ``{"size", "mode", "seconds", "rss_growth_mib", "out"}``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, CHILD, str(size), mode, str(enc_tile), str(dec_tile), str(ch)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{size} {mode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == CHILD:
        size, mode, enc, dec, ch = int(argv[1]), argv[2], int(argv[3]), int(argv[4]), int(argv[5])
        print(json.dumps(child(size, mode, enc, dec, ch)))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--modes", nargs="+", default=["untiled", "exact", "official"])
    p.add_argument("--encoder-tile", type=int, default=512)
    p.add_argument("--decoder-tile", type=int, default=64)
    p.add_argument("--channels", type=int, default=32, help="VAE base width (tiny default 32; SDXL 128)")
    args = p.parse_args(argv)
    print("| size | mode | seconds | peak RSS growth (MiB) | vs untiled |")
    print("| --- | --- | --- | --- | --- |")
    for size in args.sizes:
        untiled = None
        for mode in args.modes:
            r = run_case(size, mode, args.encoder_tile, args.decoder_tile, args.channels)
            if mode == "untiled":
                untiled = r["rss_growth_mib"]
            ratio = f"{r['rss_growth_mib'] / untiled:.2f}x" if untiled else "-"
            print(f"| {size}² | {mode} | {r['seconds']} | {r['rss_growth_mib']} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
