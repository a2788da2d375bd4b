"""How often CodeFormer's predicted codebook indices differ between float32 and bfloat16 compute.

    python bench/codeformer_codes.py --threads 1      (the official shapes, seeded random weights and the
                                                       inputs of ../shared/bench/bench.py codeformer, batch 4)

Prints the fraction of the 256 latent tokens per face whose code (argmax of the logits) changes, and the
relative difference of the restored images. Random weights give flat logits (many near-ties), so this is
an upper bound of what trained weights do.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, os.environ.get("SHARED_BENCH", str(Path(__file__).resolve().parents[2] / "shared" / "bench")))

from checkout import import_pack  # noqa: E402

import_pack()


def main() -> None:
    import _common as C
    import _official as O
    from photo_restoration.codeformer.loader import load_codeformer

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    C.env_threads(a.threads)
    sd = C.random_state_dict(O.codeformer_shapes(), seed=a.seed)
    g = torch.Generator().manual_seed(a.seed + 1)  # bench.py's codeformer inputs
    x = torch.rand(a.batch, 3, 512, 512, generator=g) * 2 - 1
    res = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        net = load_codeformer(sd, device="cpu", dtype=dt)
        with torch.inference_mode():
            res[name] = net(x.to(dt), w=0.5, adain=True, return_codes=True)
        del net
    c32, c16 = res["fp32"].code_idx, res["bf16"].code_idx
    diff = (c32 != c16).float()
    o32, o16 = res["fp32"].out.float(), res["bf16"].out.float()
    top2 = res["fp32"].logits.float().topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1])
    print(f"codes differing fp32 vs bf16: {int(diff.sum())}/{diff.numel()} = {diff.mean().item():.1%} "
          f"(per face {', '.join(f'{v:.1%}' for v in diff.mean(dim=1).tolist())}); "
          f"median top-1/top-2 logit margin {margin.median().item():.3g} (logit std {res['fp32'].logits.std().item():.3g}); "
          f"image max|diff| {(o32 - o16).abs().max().item():.3g}, mean {(o32 - o16).abs().mean().item():.3g}")


if __name__ == "__main__":
    main()
