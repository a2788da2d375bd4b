"""Peak RSS of one fp32 SUPIR denoiser call (full size, random weights) by the dtype of the weight file.

    flock /tmp/bigmem.lock python bench/supir_memory.py                  # fp16 file, then fp32 file
    flock /tmp/bigmem.lock python bench/supir_memory.py --file-dtype fp16

Each case runs in a fresh subprocess on the CPU: the full-size SUPIR denoiser (SDXL UNet + GLVControl +
adapters, 3.87 G parameters) is loaded through ``supir.loader.load_diffusion`` with ``dtype="fp32"``
from a source that produces seeded random tensors of the file dtype on demand (like a safetensors file
read tensor by tensor), then one denoiser call runs at CFG batch 2 (latent 32² = 256 px by default,
sigma index 500, control scale 1), as ``../shared/bench`` measures the official code (15.9 GiB).

Reported: RSS after loading (the weights) and the peak RSS during the call (VmHWM reset just before it,
so it includes the weights). The pack keeps 16-bit weights of the file as they are and casts per layer
to fp32 (``supir.ops``), so the fp16 file costs about half the weight memory of the fp32 file, with
identical outputs (fp16 -> fp32 is exact).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = "--child"
GIB = 2 ** 30


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(file_dtype: str, latent: int, seed: int = 0) -> dict:
    import torch

    from checkout import import_pack

    import_pack()
    from photo_restoration.supir.control import ADAPTER_CONFIG
    from photo_restoration.supir.denoiser import SupirDenoiser
    from photo_restoration.supir.loader import TensorSource, build_diffusion, load_diffusion
    from photo_restoration.supir.unet import SDXL_CONFIG

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if os.environ.get("BENCH_NO_CAST_REUSE"):  # A/B: a fresh tensor per layer cast (supir.ops.reused_cast_buffer off)
        from photo_restoration.supir import ops
        ops.REUSE_MIN_NUMEL = 1 << 62
    if os.environ.get("BENCH_NO_WINOGRAD"):  # A/B: every convolution through F.conv2d (photo_restoration.winograd off)
        from photo_restoration import winograd
        winograd.MIN_CHANNELS = 1 << 62
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float16}[file_dtype]
    shapes = {"model." + k: tuple(v.shape) for k, v in build_diffusion(SDXL_CONFIG, ADAPTER_CONFIG).state_dict().items()}

    class RandomSource(TensorSource):
        name = f"random {file_dtype} SUPIR"

        def keys(self):
            return list(shapes)

        def shape(self, key):
            return shapes[key]

        def get(self, key):
            g = torch.Generator().manual_seed((seed * 1000003) ^ zlib.crc32(key.encode()))
            scale = 0.02 if len(shapes[key]) > 1 else 0.1
            return (torch.randn(shapes[key], generator=g) * scale).to(dtype)

    src = RandomSource()
    t0 = time.perf_counter()
    if file_dtype == "fp8":  # an fp16 file stored as float8_e4m3fn (Load SUPIR's fp8 choice), fp32 compute
        net, _ = load_diffusion(src, src, dtype="fp8", compute_dtype=torch.float32)
    else:
        net, _ = load_diffusion(src, src, dtype="fp32")
    load_s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    storage = sorted({str(p.dtype).replace("torch.", "") for p in net.parameters()})
    den = SupirDenoiser(net)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, latent, latent, generator=g)
    hint = torch.randn(2, 4, latent, latent, generator=g)
    cond = {"crossattn": torch.randn(2, 77, 2048, generator=g), "vector": torch.randn(2, 2816, generator=g)}
    sigma = den.sigmas[500].expand(2)
    rss_loaded = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = den(x, sigma, cond, hint, 1.0)
    call_s = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"file_dtype": file_dtype, "storage": storage, "compute": str(net.compute_dtype).replace("torch.", ""),
            "weights_gib": round(weights / GIB, 2), "rss_loaded_gib": round(rss_loaded / GIB, 2),
            "peak_call_gib": round(peak / GIB, 2), "load_s": round(load_s, 1), "call_s": round(call_s, 1),
            "out_std": round(out.float().std().item(), 4), "out_sum": out.double().sum().item()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == CHILD:
        print(json.dumps(child(argv[1], int(argv[2]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file-dtype", nargs="+", default=["fp16", "fp32"], choices=["fp16", "bf16", "fp32", "fp8"],
                   help="fp8: an fp16 file stored as float8_e4m3fn, fp32 compute")
    p.add_argument("--latent", type=int, default=32)
    args = p.parse_args(argv)
    official = 15.96
    print("| weight file | storage | compute | weights GiB | RSS loaded GiB | peak during call GiB | vs official "
          "15.96 GiB | call s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for fd in args.file_dtype:
        proc = subprocess.run([sys.executable, __file__, CHILD, fd, str(args.latent)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"| {fd} | failed: {proc.stderr[-500:]} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {fd} | {'/'.join(r['storage'])} | {r['compute']} | {r['weights_gib']} | {r['rss_loaded_gib']} | "
              f"{r['peak_call_gib']} | {r['peak_call_gib'] / official:.2f}x | {r['call_s']} |", flush=True)
        print(f"<!-- {json.dumps(r)} -->", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
