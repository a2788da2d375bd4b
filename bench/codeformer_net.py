"""Seconds per face and peak memory of the CodeFormer network alone (no detection / paste-back).

    python -m photo_restoration.bench.codeformer_net --full --device cpu --dtype fp32 --batch 4
    python bench/codeformer_net.py --tiny --batch 2 --w 0

Weights are random (timing does not depend on them), loaded through the production loader. Prints one line per batch
size (1 and --batch): median wall seconds per call and per face after a warm-up, the process CPU seconds per face
(all threads; robust on a shared machine), and the peak memory: CUDA max allocated
on a GPU, the process's peak resident set (ru_maxrss, includes the weights) on the CPU.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from checkout import import_pack

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="official size (nf 64, d 512, 9 layers; default)")
    size.add_argument("--tiny", action="store_true", help="the tiny test configuration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=4, help="the larger batch size (1 is always measured)")
    parser.add_argument("--w", type=float, default=0.5, help="fidelity weight (0 skips the fusion blocks)")
    parser.add_argument("--no-adain", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    import_pack()
    from photo_restoration.codeformer.loader import build_codeformer, load_codeformer
    from photo_restoration.testing.tiny_checkpoints import random_state_dict
    from photo_restoration.testing.tiny_codeformer import TINY_CONFIG as tiny_config

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = dict(tiny_config) if args.tiny else {}
    shapes = {k: tuple(v.shape) for k, v in build_codeformer(config).state_dict().items()}
    sd = random_state_dict(shapes, seed=0, std=0.02)
    t0 = time.perf_counter()
    model = load_codeformer(sd, device=device, dtype=dtype, n_head=config.get("n_head", 8))
    load_s = time.perf_counter() - t0
    del sd
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    n_params = sum(p.numel() for p in model.parameters())
    side = model.config.img_size
    print(f"CodeFormer {'tiny' if args.tiny else 'full'} ({n_params / 1e6:.2f} M params) on {device} {args.dtype}, "
          f"threads {torch.get_num_threads()}, w {args.w}, adain {not args.no_adain}; load {load_s:.2f} s, "
          f"memory after load {peak_memory_mb(device):.0f} MB")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for batch in sorted({1, args.batch}):
        x = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        x = x.to(device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, cpu_times = [], []
        with torch.inference_mode():
            for i in range(args.repeats + 1):
                sync()
                t, c = time.perf_counter(), time.process_time()
                model(x, w=args.w, adain=not args.no_adain)
                sync()
                if i:  # the first call is the warm-up
                    times.append(time.perf_counter() - t)
                    cpu_times.append(time.process_time() - c)
        med = statistics.median(times)
        print(f"batch {batch}: {med:.3f} s per call, {med / batch:.3f} s per face "
              f"(min {min(times):.3f}, max {max(times):.3f} over {len(times)}; process CPU "
              f"{statistics.median(cpu_times) / batch:.3f} s per face), "
              f"peak {'allocated' if device.type == 'cuda' else 'RSS'} {peak_memory_mb(device):.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
