"""Benchmark: end-to-end SUPIR restore of a generated photo (first stage, sampling, decode, colour fix).

    python bench/supir_sample.py --tiny --size 256x384 --steps 4
    python bench/supir_sample.py --tiny --size 512x512 --steps 2 --tiled --tile-size 32 --tile-stride 16 --tile-batch 4
    python bench/supir_sample.py --sdxl sd_xl_base_1.0.safetensors --supir SUPIR-v0Q.ckpt --size 1024x1024 \
        --device cuda --dtype float16 --vae-dtype bfloat16

Prints the model load time, seconds per sampler step, total wall seconds, the process's CPU seconds (useful
on a shared machine) and peak memory (CUDA allocator peak on
GPUs, process peak RSS on CPU). ``--tiny`` uses the random tiny checkpoints of ``testing/tiny_supir.py``.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from checkout import import_pack



def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


class Timer:
    """Callbacks object: records the time of every sampler step."""

    def __init__(self):
        self.marks: list[float] = []

    def check_interrupt(self) -> None:
        pass

    def progress(self, step, total, preview=None) -> None:
        self.marks.append(time.perf_counter())


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=_size, default=(256, 256), help="input image HxW in pixels")
    ap.add_argument("--upscale", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--sampler", choices=["edm", "dpmpp_2m_sde"], default="edm")
    ap.add_argument("--tiled", action="store_true", help="tiled diffusion")
    ap.add_argument("--tile-size", type=int, default=128, help="latent pixels")
    ap.add_argument("--tile-stride", type=int, default=64, help="latent pixels")
    ap.add_argument("--tile-batch", type=int, default=1, help="tiles per network call")
    ap.add_argument("--vae-tile", type=int, nargs=2, metavar=("ENC_PX", "DEC_LATENT"), default=None,
                    help="tiled VAE (encoder tile in pixels, decoder tile in latent pixels)")
    ap.add_argument("--dtype", default="float32", help="diffusion weights dtype")
    ap.add_argument("--vae-dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="random tiny checkpoints (testing/tiny_supir.py)")
    ap.add_argument("--sdxl", type=Path, help="SDXL base checkpoint")
    ap.add_argument("--supir", type=Path, help="SUPIR-v0Q/F checkpoint")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import_pack()
    from photo_restoration.supir.loader import load_supir
    from photo_restoration.supir.pipeline import RestoreSettings, plan_sizes, restore
    from photo_restoration.testing.images import synthetic_photo

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    vae_dtype = getattr(torch, args.vae_dtype)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny or not (args.sdxl and args.supir):
            from photo_restoration.testing.tiny_supir import write_tiny_supir

            sdxl, supir = write_tiny_supir(Path(tmp), seed=0)
        else:
            sdxl, supir = args.sdxl, args.supir
        model = load_supir(sdxl, supir, dtype=dtype, vae_dtype=vae_dtype, device=device)
    load_s = time.perf_counter() - t0

    h, w = args.size
    import numpy as np

    img = np.asarray(synthetic_photo(w, h, seed=0), dtype=np.float32) / 255.0
    images = torch.from_numpy(img).permute(2, 0, 1)[None].repeat(args.batch, 1, 1, 1)
    enc_px, dec_latent = args.vae_tile or (512, 64)
    settings = RestoreSettings(upscale_by=args.upscale, steps=args.steps, sampler=args.sampler,
                               tiling="on" if args.tiled else "off", tile_size=args.tile_size * 8,
                               tile_stride=args.tile_stride * 8, tile_batch_size=args.tile_batch,
                               tiled_vae=bool(args.vae_tile), encoder_tile_size=enc_px,
                               decoder_tile_size=dec_latent * 8, positive_prompt="a photo")
    plan = plan_sizes(h, w, args.upscale, settings.min_short_side, settings.size_multiple, settings.fit)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = Timer()
    c1 = time.process_time()
    t1 = time.perf_counter()
    out = restore(images.to(device), model, settings, callbacks=timer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - t1
    cpu = time.process_time() - c1
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    per_step = sum(steps) / len(steps) if steps else float("nan")
    lat = (plan.internal[0] // 8, plan.internal[1] // 8)
    print(f"device {device} threads {torch.get_num_threads()} dtype {args.dtype}/{args.vae_dtype} "
          f"{'tiny' if args.tiny or not args.sdxl else 'full'} weights; sampler {args.sampler}"
          f"{' tiled %d/%d x%d' % (args.tile_size, args.tile_stride, args.tile_batch) if args.tiled else ''}")
    print(f"input {h}x{w} x{args.batch} -> internal {plan.internal[0]}x{plan.internal[1]} (latent {lat[0]}x{lat[1]})"
          f" -> output {tuple(out.shape[-2:])}")
    print(f"load {load_s:.2f} s | {args.steps} steps | {per_step:.3f} s/step (steps 2..n) | total {total:.2f} s | "
          f"process CPU {cpu:.2f} s | peak memory {peak_memory_mb(device):.0f} MiB")


if __name__ == "__main__":
    main()
