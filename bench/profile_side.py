"""Operator-by-operator profile of CodeFormer or the SUPIR VAE: the official network against ours, one process.

    SUPIR_REF=... CODEFORMER_REF=... python bench/profile_side.py codeformer --batch 1 --threads 1
    python bench/profile_side.py supir-vae --size 512

Same seeded random state dict and inputs as ``../shared/bench/bench.py`` (its builders are imported);
ours comes from this checkout (``bench/side_impl.py``). Timings alternate official / ours and report minima.
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
SHARED_BENCH = Path(os.environ.get("SHARED_BENCH", Path(__file__).resolve().parents[2] / "shared" / "bench"))
sys.path.insert(1, str(SHARED_BENCH))

import side_impl  # noqa: E402  (imports the pack from this checkout)


def main() -> None:
    import _common as C
    import _official as O

    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=["codeformer", "supir-vae"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-profile", action="store_true")
    a = ap.parse_args()
    C.env_threads(a.threads)
    spec = {"task": a.task.replace("-", "_"), "dtype": a.dtype, "device": "cpu"}
    if a.task == "codeformer":
        sd = C.random_state_dict(O.codeformer_shapes(), seed=0)
        g = torch.Generator().manual_seed(1)
        x = torch.rand(a.batch, 3, 512, 512, generator=g) * 2 - 1
        off = O.build_codeformer(sd, spec)
        ours = side_impl.build_codeformer(sd, spec)
        sides = {"official": lambda: off(x, 0.5, True), "ours": lambda: ours(x, 0.5, True)}
    else:
        sd = C.random_state_dict(O.supir_shapes(O.SUPIR_VAE_PREFIXES), seed=0)
        g = torch.Generator().manual_seed(3)
        x = torch.rand(1, 3, a.size, a.size, generator=g) * 2 - 1
        off = O.build_supir_vae(sd, spec)
        ours = side_impl.build_supir_vae(sd, spec)
        sides = {"official": lambda: off(x), "ours": lambda: ours(x)}
    times = {k: [] for k in sides}
    outs = {}
    with torch.inference_mode():
        for k, fn in sides.items():
            outs[k] = fn()
        for _ in range(a.runs):
            for k, fn in sides.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    for k, ts in times.items():
        print(f"{k}: min {min(ts):.3f}s  runs {', '.join(f'{t:.3f}' for t in ts)}")
    print(f"ratio ours/official (min): {min(times['ours']) / min(times['official']):.3f}; "
          + C.compare(outs["official"], outs["ours"]))
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
