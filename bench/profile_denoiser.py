"""Operator-by-operator profile of one SUPIR denoiser call: the official network against ours.

Both are built from the same seeded random state dict at SDXL widths, with fewer transformer blocks
(``--depth``, default 1 at the 1280-channel level instead of 10) so both fit in one process; every op
keeps its full-size shape, so per-op costs compare as at full size.

    SUPIR_REF=.../ref/Fanghua-Yu+SUPIR python bench/profile_denoiser.py --latent 32 --threads 1
    (the official SUPIR is imported through ../shared/bench, see its README)

Prints alternating timings (official, ours, official, ours...) and the top operators of each side.
"""
from __future__ import annotations

import argparse
import copy
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


def official_model(depth: int, seed: int):
    import _common as C
    import _official as O
    import configs

    O._supir_env()
    cfg = copy.deepcopy(configs.FULL)
    cfg["unet"]["transformer_depth"] = [1, 2, depth]
    with O.meta_params(), O.quiet():
        model = configs.build_model(cfg, official_network=True)
    model = model.eval()
    shapes = O.param_shapes(model, under=O.SUPIR_DENOISER_PREFIXES)
    sd = C.random_state_dict(shapes, seed=seed)
    O.attach(model, sd)
    return model, sd


def inputs(lat: int, seed: int = 0, b: int = 2):
    from bench import ddpm_sigma

    sigma = ddpm_sigma(500)
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(b, 4, lat, lat, generator=g) * (sigma ** 2 + 1) ** 0.5
    s = torch.full((b,), sigma)
    ctx = torch.randn(b, 77, 2048, generator=g)
    y = torch.randn(b, 2816, generator=g)
    ctrl = torch.randn(b, 4, lat, lat, generator=g)
    return x, s, ctx, y, ctrl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--depth", type=int, default=1, help="transformer blocks at the deepest level (full: 10)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--only", choices=["official", "ours"], default=None)
    ap.add_argument("--winograd-ab", action="store_true",
                    help="add a side 'ours-direct': ours with every convolution through F.conv2d (no Winograd)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)

    from photo_restoration.supir.denoiser import SupirDenoiser
    from photo_restoration.supir.loader import load_diffusion

    model, sd = official_model(a.depth, 0)
    wrapper, denoiser = model.model, model.denoiser
    net, _ = load_diffusion(sd, sd, dtype=torch.float32)
    den = SupirDenoiser(net)
    inp = inputs(a.latent)

    def official():
        x, s, ctx, y, ctrl = inp
        return denoiser(wrapper, x, s, {"crossattn": ctx, "vector": y, "control": ctrl}, 1.0)

    def ours():
        x, s, ctx, y, ctrl = inp
        return den(x, s, {"crossattn": ctx, "vector": y}, ctrl, 1.0)

    def ours_direct():
        from photo_restoration import winograd

        keep = winograd.MIN_CHANNELS
        winograd.MIN_CHANNELS = 1 << 30
        try:
            return ours()
        finally:
            winograd.MIN_CHANNELS = keep

    sides = {"official": official, "ours": ours}
    if a.only:
        sides = {a.only: sides[a.only]}
    if a.winograd_ab:
        sides["ours-direct"] = ours_direct
    times = {k: [] for k in sides}
    outs = {}
    with torch.inference_mode():
        for k, fn in sides.items():
            outs[k] = fn()  # warm-up
        for _ in range(a.runs):
            for k, fn in sides.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    for k, ts in times.items():
        print(f"{k}: min {min(ts):.3f}s  runs {', '.join(f'{t:.3f}' for t in ts)}")
    for k in [k for k in outs if k != "official" and "official" in outs]:
        d = (outs["official"] - outs[k]).abs().max().item()
        print(f"ratio {k}/official (min): {min(times[k]) / min(times['official']):.3f}; "
              f"max|diff| {d:.3e} rel {d / outs['official'].abs().max().item():.3e}")
    if a.no_profile:
        return
    from torch.profiler import ProfilerActivity, profile

    for k, fn in sides.items():
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        print(f"\n===== {k}: top ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=40))
        print(f"\n===== {k}: top (op, shapes) by self CPU time")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=a.top,
                                                                  max_name_column_width=30,
                                                                  max_shapes_column_width=90))


if __name__ == "__main__":
    main()
