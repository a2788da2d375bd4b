"""How fast can our fp32 networks be on this CPU, at most, against the official ones?

Counts the FLOPs of one call of the official network and of ours (``torch.utils.flop_counter`` on meta tensors:
convolutions, matrix products, attention; 2 FLOP per multiply-add) and measures this core's float32 GEMM and
convolution peak. A call can run no faster than its FLOPs at that peak, so

    lowest reachable ratio = (our FLOPs / peak) / official seconds

is the best ours/official time any implementation of the same math can reach against a given official run
(``--official-seconds``, e.g. from ``../shared/bench/bench.py``); with the official's own rate it is
``(our FLOPs / official FLOPs) x (official GFLOP/s / peak GFLOP/s)``.

    SUPIR_REF=.../ref/Fanghua-Yu+SUPIR python bench/flop_bound.py --threads 1 \
        --official-seconds denoiser64=63.0 vae512=37.7
    (the official SUPIR is imported through ../shared/bench, see its README)

Our denoiser is counted as on its second call with the same text context (the sampler's steady state and the
harness's timed runs): the text cross-attention keys/values are reused.

The bound holds for direct convolutions (9 multiply-adds per output value and channel pair for a 3x3 kernel),
which is what the meta-tensor count sees. Since round 5 (bench/side_by_side.md) the pack runs its large float32
CPU 3x3 convolutions as Winograd convolutions (2.25 or 4 multiply-adds, ``winograd.py``), so on the CPU ours
does fewer FLOPs than counted here and can go below this floor.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SHARED_BENCH = Path(os.environ.get("SHARED_BENCH", HERE.parents[1] / "shared" / "bench"))
sys.path.insert(1, str(SHARED_BENCH))

from checkout import import_pack  # noqa: E402

import_pack()


def count(fn) -> tuple[float, dict[str, float]]:
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with torch.inference_mode(), fc:
        fn()
    per_op: dict[str, float] = {}
    for op, v in fc.get_flop_counts().get("Global", {}).items():
        name = str(op).replace("aten.", "").split(".")[0]
        per_op[name] = per_op.get(name, 0) + v
    return fc.get_total_flops(), per_op


def meta_inputs(lat: int, b: int = 2):
    from bench import ddpm_sigma

    m = dict(device="meta")
    return (torch.empty(b, 4, lat, lat, **m), torch.full((b,), ddpm_sigma(500), **m),
            torch.empty(b, 77, 2048, **m), torch.empty(b, 2816, **m), torch.empty(b, 4, lat, lat, **m))


def denoiser_flops(latents: list[int]) -> dict[str, tuple[float, float, dict, dict]]:
    import _official as O
    from bench import ddpm_sigma

    from photo_restoration.supir.denoiser import SupirDenoiser
    from photo_restoration.supir.loader import load_diffusion
    from photo_restoration.supir.unet import constant_context

    model = O.supir_meta().to("meta")
    wrapper, denoiser = model.model, model.denoiser
    shapes = O.param_shapes(model, under=O.SUPIR_DENOISER_PREFIXES)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    net, _ = load_diffusion(sd, sd, dtype=torch.float32, device="meta")
    den = SupirDenoiser(net)
    out = {}
    for lat in latents:
        x, s, ctx, y, ctrl = meta_inputs(lat)
        f_off, ops_off = count(lambda: denoiser(wrapper, x, s, {"crossattn": ctx, "vector": y, "control": ctrl}, 1.0))
        # meta tensors have no values to compare: hand the network the held context directly
        net.cache_text_kv = False
        cond = {"crossattn": constant_context(ctx), "vector": y}
        s_cpu = torch.full((x.shape[0],), ddpm_sigma(500))  # ours reads the sigma values (quantisation)
        first, _ = count(lambda: den(x, s_cpu, cond, ctrl, 1.0))
        f_ours, ops_ours = count(lambda: den(x, s_cpu, cond, ctrl, 1.0))  # text K/V reused
        out[f"denoiser{lat}"] = (f_off, f_ours, ops_off, ops_ours)
        print(f"denoiser latent {lat} ({lat * 8} px), CFG batch 2: official {f_off / 1e12:.3f} TFLOP, "
              f"ours {f_ours / 1e12:.3f} (first call of a run {first / 1e12:.3f}); ours/official {f_ours / f_off:.3f}")
    return out


def vae_flops(sizes: list[int]) -> dict[str, tuple[float, float, dict, dict]]:
    import _official as O

    from photo_restoration.supir.vae import build_vae

    model = O.supir_meta().to("meta")
    shapes = O.param_shapes(model, under=O.SUPIR_VAE_PREFIXES)
    sd = {k[len("first_stage_model."):]: torch.empty(s, device="meta") for k, s in shapes.items()}
    vae = build_vae(sd, device="meta")
    out = {}
    for size in sizes:
        x = torch.empty(1, 3, size, size, device="meta")
        f_off, ops_off = count(lambda: model.decode_first_stage(model.encode_first_stage_with_denoise(x, use_sample=False)))
        f_ours, ops_ours = count(lambda: vae.decode(vae.encode_lq(x)))
        out[f"vae{size}"] = (f_off, f_ours, ops_off, ops_ours)
        print(f"VAE denoise-encode + decode {size}x{size}: official {f_off / 1e12:.3f} TFLOP, ours "
              f"{f_ours / 1e12:.3f}; ours/official {f_ours / f_off:.3f}")
    return out


def _best(fn, flops: float, runs: int = 4) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def peak_gflops() -> tuple[float, float]:
    """Best float32 rate of this core on the shapes that dominate the calls: the transformer GEMMs at 256 and
    512 px (128-2048 rows) and 3x3 convolutions of 128-1280 channels (oneDNN; contiguous and channels-last)."""
    gemm = 0.0
    for m, k, n in [(512, 1280, 10240), (512, 5120, 1280), (2048, 640, 5120), (128, 1280, 10240)]:
        a, w = torch.randn(m, k), torch.randn(n, k)
        gemm = max(gemm, _best(lambda: a @ w.t(), 2 * m * k * n))
    conv = 0.0
    for b, c, size in [(1, 128, 256), (1, 256, 128), (1, 512, 64), (2, 320, 64), (2, 640, 32), (2, 1280, 16)]:
        x, wc = torch.randn(b, c, size, size), torch.randn(c, c, 3, 3)
        fl = 2 * b * c * c * 9 * size * size
        for xs in (x, x.to(memory_format=torch.channels_last)):
            conv = max(conv, _best(lambda: torch.nn.functional.conv2d(xs, wc, padding=1), fl, runs=3))
    return gemm, conv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, nargs="*", default=[32, 64])
    ap.add_argument("--size", type=int, nargs="*", default=[512])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--official-seconds", nargs="*", default=[],
                    help="case=seconds of an official run (cases: denoiser32, denoiser64, vae512, ...)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cases = {**denoiser_flops(a.latent), **vae_flops(a.size)}
    for name, (f_off, f_ours, ops_off, ops_ours) in cases.items():
        top = sorted(set(ops_off) | set(ops_ours), key=lambda k: -ops_off.get(k, 0))
        print(f"  {name}: " + ", ".join(f"{k} {ops_off.get(k, 0) / 1e12:.3f} -> {ops_ours.get(k, 0) / 1e12:.3f}T"
                                        for k in top))
    gemm, conv = peak_gflops()
    peak = max(gemm, conv)
    print(f"this core ({a.threads} thread{'s' * (a.threads > 1)}): float32 GEMM {gemm:.1f} GFLOP/s, "
          f"3x3 conv {conv:.1f} GFLOP/s; peak used below {peak:.1f}")
    for item in a.official_seconds:
        name, secs = item.split("=")
        f_off, f_ours = cases[name][:2]
        t = float(secs)
        floor = f_ours / (peak * 1e9)
        print(f"{name}: official {t:.2f} s = {f_off / t / 1e9:.1f} GFLOP/s ({f_off / t / 1e9 / peak:.0%} of peak); "
              f"ours can take no less than {floor:.2f} s = {floor / t:.2f}x that run; 0.8x needs "
              f"{f_ours / (0.8 * t) / 1e9:.1f} GFLOP/s ({f_ours / (0.8 * t) / 1e9 / peak:.0%} of peak)")


if __name__ == "__main__":
    main()
