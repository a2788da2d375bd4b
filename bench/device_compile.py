"""Device check (bench/device_side_by_side.sh compile): our SUPIR denoiser call, bf16 on the GPU, eager vs torch.compile."""
import os
import sys
import time

sys.path.insert(0, os.environ.get("DEVBENCH", os.path.join(os.path.dirname(__file__), "..", ".devbench", "bench")))
import torch  # noqa: E402
import _common as C  # noqa: E402  (the patched ../shared/bench copy)
import _official as O  # noqa: E402
import bench as B  # noqa: E402
from checkout import import_pack  # noqa: E402

import_pack()
from photo_restoration.supir.denoiser import SupirDenoiser  # noqa: E402
from photo_restoration.supir.loader import load_diffusion  # noqa: E402
from photo_restoration.supir.compile import maybe_compile  # noqa: E402
dev = "cuda"
shapes = O.supir_shapes(O.SUPIR_DENOISER_PREFIXES)
t = time.perf_counter()
sd = C.random_state_dict(shapes, seed=0, dtype=torch.bfloat16)
print(f"state dict {time.perf_counter() - t:.1f}s", flush=True)
net, _ = load_diffusion(sd, sd, dtype=torch.bfloat16, device=dev)
den = SupirDenoiser(net)
sigma_v = B.ddpm_sigma(500)


def inputs(lat):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, lat, lat, generator=g) * (sigma_v ** 2 + 1) ** 0.5
    s = torch.full((2,), float(sigma_v))
    ctx = torch.randn(2, 77, 2048, generator=g)
    y = torch.randn(2, 2816, generator=g)
    c = torch.randn(2, 4, lat, lat, generator=g)
    return [v.to(dev, torch.bfloat16) if v.ndim > 1 else v.to(dev) for v in (x, s, ctx, y, c)]


def call(i):
    with torch.inference_mode():
        x, s, ctx, y, c = i
        out = den(x, s, {"crossattn": ctx, "vector": y}, c, 1.0)
    torch.cuda.synchronize()
    return out


def timed(i, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); out = call(i); ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2], ts[0], out


res = {}
for lat in (64, 128):
    i = inputs(lat)
    for _ in range(5):
        call(i)
    med, mn, out = timed(i, 15)
    res[lat] = out.float().clone()
    print(f"eager bf16 latent {lat}: median {med*1000:.1f} ms, min {mn*1000:.1f} ms, peak {torch.cuda.max_memory_allocated()/2**30:.2f} GiB", flush=True)
maybe_compile(net, True)
for lat in (64, 128):
    i = inputs(lat)
    t = time.perf_counter(); call(i); first = time.perf_counter() - t
    for _ in range(3):
        call(i)
    med, mn, out = timed(i, 15)
    d = (out.float() - res[lat]).abs().max().item() / res[lat].abs().max().item()
    print(f"compiled bf16 latent {lat}: first call {first:.1f}s, median {med*1000:.1f} ms, min {mn*1000:.1f} ms, max rel diff vs eager {d:.2e}", flush=True)
