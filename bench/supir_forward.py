"""One SUPIR network evaluation (GLVControl + adapted SDXL UNet) on a CFG batch: seconds and peak memory.

    python bench/supir_forward.py --tiny --latent 64x96
    python bench/supir_forward.py --full --latent 32 --dtype fp8 --threads 2
    python bench/supir_forward.py --full --latent 128 --dtype fp16 --device cuda

``--full`` builds the official size (SDXL UNet 2.6 B + SUPIR control/adapters 1.3 B parameters) on the
meta device and materialises random weights straight into the storage dtype (fp32 needs ~15.5 GB,
bf16/fp16 ~7.8 GB, fp8 ~3.9 GB). ``--tiny`` uses the tiny test configuration. Latent sides must be
multiples of 4 (image pixels / 8).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
from checkout import import_pack

import_pack()

from photo_restoration.supir import ops  # noqa: E402
from photo_restoration.supir.control import SupirDiffusion  # noqa: E402
from photo_restoration.supir.loader import build_diffusion  # noqa: E402
from photo_restoration.supir.unet import SDXL_CONFIG  # noqa: E402
from photo_restoration.testing.tiny_supir import TINY_ADAPTER, TINY_UNET  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_model(full: bool, dtype: torch.dtype, device: str, seed: int = 0) -> SupirDiffusion:
    """Official-size (or tiny) SupirDiffusion with N(0, 0.02) weights, built on meta and materialised
    tensor by tensor in the storage dtype (fp8: matrices only, vectors in the compute dtype)."""
    cfg, adapter = (SDXL_CONFIG, None) if full else (TINY_UNET, TINY_ADAPTER)
    model = build_diffusion(cfg, adapter)
    compute = ops.default_compute_dtype(dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in list(model.named_parameters()):
        target = ops.storage_dtype_for(name, p.ndim, dtype, compute)
        make = compute if ops.is_fp8(target) else target
        t = torch.randn(p.shape, generator=gen, dtype=torch.float32 if make == torch.float32 else make) * 0.02
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "in_layers.0.weight",
                          "out_layers.0.weight", "out.0.weight")):
            t = t + 1
        mod_name, _, leaf = name.rpartition(".")
        model.get_submodule(mod_name)._parameters[leaf] = torch.nn.Parameter(
            t.to(device=device, dtype=target), requires_grad=False)
        del t
    model.compute_dtype = compute
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny test configuration (default)")
    size.add_argument("--full", action="store_true", help="official SDXL + SUPIR size, random weights")
    ap.add_argument("--latent", default="32", help="latent size HxW or S (image pixels / 8), default 32")
    ap.add_argument("--batch", type=int, default=2, help="batch (2 = one CFG pair)")
    ap.add_argument("--dtype", default="fp32", help="weight storage dtype: fp32, fp16, bf16, fp8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2, help="timed forwards after one warm-up")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    h, _, w = args.latent.partition("x")
    h, w = int(h), int(w or h)
    dtype = ops.as_dtype(args.dtype)

    base = rss_mb()
    t0 = time.perf_counter()
    model = random_model(args.full, dtype, args.device)
    build_s = time.perf_counter() - t0
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, h, w, generator=g).to(args.device)
    hint = torch.randn(args.batch, 4, h, w, generator=g).to(args.device)
    ctx = torch.randn(args.batch, 77, cfg["context_dim"], generator=g).to(args.device)
    y = torch.randn(args.batch, cfg["adm_in_channels"], generator=g).to(args.device)
    t = torch.full((args.batch,), 500, device=args.device)
    cuda = args.device.startswith("cuda")
    times = []
    with torch.inference_mode():
        for i in range(args.repeat + 1):
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            out = model(x, t, ctx, y, hint, 1.0)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t1)
    assert torch.isfinite(out).all(), "non-finite output"
    print(f"model: {'full' if args.full else 'tiny'} ({n_params / 1e9:.3f} B params), weights {args.dtype} "
          f"{weights_mb:.0f} MiB, compute {str(model.compute_dtype).replace('torch.', '')}, device {args.device}, "
          f"threads {torch.get_num_threads()}")
    print(f"input: batch {args.batch} latent {h}x{w} (image {8 * h}x{8 * w})")
    print(f"build+materialise: {build_s:.2f} s")
    print(f"forward: first {times[0]:.3f} s, then " + ", ".join(f"{s:.3f}" for s in times[1:]) + " s")
    print(f"memory: process peak RSS {peak_rss_mb():.0f} MiB (start {base:.0f} MiB, "
          f"peak - start {peak_rss_mb() - base:.0f} MiB)")
    if cuda:
        print(f"cuda peak allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
