"""GPU suite: full-size random-weight SUPIR restores and CodeFormer, seconds and peak VRAM per case.

    python bench/gpu_suite.py                     # one large GPU, under 8 minutes
    python bench/gpu_suite.py --cases 1024-bf16 codeformer
    python bench/gpu_suite.py --smoke             # tiny configurations on the CPU, end to end (seconds)

Cases (SUPIR: SDXL UNet + GLVControl + adapters + VAE with denoise encoder, seeded random weights
generated on the device, random text conditioning; the whole restore_tensor pipeline: first stage,
sampling with CFG, decode, colour fix):

* ``1024-bf16``, ``1024-fp8``: 1024² input, 50 EDM steps, CFG, the whole model on the GPU (bf16
  compute; fp8 = float8_e4m3fn storage, bf16 compute).
* ``1024-bf16-10gb``, ``1024-bf16-6gb``, ``1024-fp8-6gb``: the same with a VRAM budget: the weights that
  fit in the budget minus the activation estimate (``supir.memory``), the VAE and 1 GiB of reserve are
  loaded, the rest stay in pinned CPU memory and are cast per layer on every call
  (``supir.ops.load_partially``, the plain-torch equivalent of ComfyUI's lowvram loading); VAE tiled.
* ``2048-bf16-tiled``, ``2048-fp8-6gb-tiled``: 2048² input, tiled sampling (128/64 latent tiles) and
  tiled VAE (512 px / 64 latent tiles), ``--large-steps`` steps (default 20, to fit the time budget).
* ``codeformer``: CodeFormer (released configuration) at batch 1 and 8, fp32 and bf16.

Peak VRAM is ``torch.cuda.max_memory_allocated`` per case (allocator peak; the CUDA context adds
~0.5 GiB on a real card). ``--smoke`` runs every case with tiny networks at 64 px on the CPU, budgets
scaled to the tiny model, 2 steps, to check the script end to end.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import import_pack  # noqa: E402

GIB = 2 ** 30
ALL_CASES = ["1024-bf16", "1024-fp8", "1024-bf16-10gb", "1024-bf16-6gb", "1024-fp8-6gb", "2048-bf16-tiled",
             "2048-fp8-6gb-tiled", "codeformer"]


def random_source(shapes: dict, dtype: torch.dtype, device: torch.device, seed: int = 0, name: str = "random"):
    """A ``supir.loader.TensorSource`` of seeded random tensors of ``shapes``, generated on ``device`` on demand."""
    from photo_restoration.supir.loader import TensorSource

    norm_suffixes = ("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight")

    class RandomSource(TensorSource):
        def keys(self):
            return list(shapes)

        def shape(self, key):
            return shapes[key]

        def get(self, key):
            g = torch.Generator(device).manual_seed((seed * 1000003) ^ zlib.crc32(key.encode()))
            shape = shapes[key]
            t = torch.randn(shape, generator=g, device=device) * (0.02 if len(shape) > 1 else 0.1)
            return (t + 1.0 if key.endswith(norm_suffixes) else t).to(dtype)

    src = RandomSource()
    src.name = name
    return src


@contextlib.contextmanager
def _vae_staging(staging):
    """Run the engine with its tiled-VAE maps staged on ``staging`` (the engine's own default is the CPU)."""
    from photo_restoration.supir import pipeline
    from photo_restoration.supir.vae import VAETiling

    plain = pipeline.vae_tiling

    def staged(s):
        t = plain(s)
        return None if t is None else VAETiling(encoder_tile_size=t.encoder_tile_size,
                                                decoder_tile_size=t.decoder_tile_size, staging=staging)

    pipeline.vae_tiling = staged
    try:
        yield
    finally:
        pipeline.vae_tiling = plain


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")


def _reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class Suite:
    def __init__(self, smoke: bool, device: torch.device, steps: int, large_steps: int):
        from photo_restoration.supir.control import ADAPTER_CONFIG
        from photo_restoration.supir.loader import build_diffusion
        from photo_restoration.supir.unet import SDXL_CONFIG
        from photo_restoration.supir.vae import SupirVAE, VAEConfig

        self.smoke, self.device, self.steps, self.large_steps = smoke, device, steps, large_steps
        if smoke:
            from photo_restoration.testing.tiny_supir import TINY_ADAPTER, TINY_UNET

            unet, adapter = TINY_UNET, TINY_ADAPTER
            self.vae_cfg = VAEConfig(ch=32, ch_mult=(1, 2, 1, 1), num_res_blocks=1)
            self.size = {"1024": 64, "2048": 128}
            self.tile = (8, 4, 32, 4)  # sampler tile/stride (latent), VAE encoder px / decoder latent
        else:
            unet, adapter = SDXL_CONFIG, ADAPTER_CONFIG
            self.vae_cfg = VAEConfig()
            self.size = {"1024": 1024, "2048": 2048}
            self.tile = (128, 64, 512, 64)
        self.unet_cfg = unet
        self.diff_shapes = {"model." + k: tuple(v.shape) for k, v in build_diffusion(unet, adapter).state_dict().items()}
        with torch.device("meta"):
            vae = SupirVAE(self.vae_cfg)
        self.vae_shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
        self.gen_device = device

    # -- building ------------------------------------------------------------------------------------
    def supir(self, dtype: str, device: torch.device):
        from photo_restoration.supir import ops
        from photo_restoration.supir.denoiser import SupirDenoiser
        from photo_restoration.supir.loader import SupirModel, load_diffusion
        from photo_restoration.supir.vae import build_vae

        src = random_source(self.diff_shapes, torch.float16, self.gen_device, name="random SUPIR")
        diffusion, cfg = load_diffusion(src, src, dtype=dtype, device=device)
        vsrc = random_source(self.vae_shapes, torch.float32, self.gen_device, seed=1)
        vae_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        vae = ops.make_castable(build_vae({k: vsrc.get(k) for k in self.vae_shapes}, dtype=vae_dtype,
                                          device=self.device))
        return SupirModel(diffusion=diffusion, vae=vae, denoiser=SupirDenoiser(diffusion), config=cfg)

    def cond(self, batch: int = 1):
        g = torch.Generator().manual_seed(5)
        ctx, adm = self.unet_cfg["context_dim"], self.unet_cfg["adm_in_channels"]
        make = lambda: {"crossattn": torch.randn(batch, 77, ctx, generator=g).to(self.device),  # noqa: E731
                        "vector": torch.randn(batch, adm, generator=g).to(self.device)}
        return make(), make()

    # -- cases ---------------------------------------------------------------------------------------
    def restore_case(self, name: str) -> dict:
        from photo_restoration.supir import memory, ops
        from photo_restoration.supir.pipeline import RestoreSettings, restore_tensor
        from photo_restoration.supir.vae import VAETiling

        parts = name.split("-")
        size = self.size[parts[0]]
        dtype = parts[1]
        budget_gb = next((int(p[:-2]) for p in parts if p.endswith("gb")), None)
        tiled = "tiled" in parts
        steps = self.large_steps if parts[0] == "2048" else self.steps
        st, ss, vt_enc, vt_dec = self.tile
        # whole intermediate maps of the tiled VAE wait in host RAM under a budget, else on the device
        staging = "cpu" if budget_gb else self.device
        vae_tiling = (VAETiling(encoder_tile_size=vt_enc, decoder_tile_size=vt_dec, staging=staging)
                      if (tiled or budget_gb) else None)
        _reset(self.device)
        t0 = time.perf_counter()
        model = self.supir(dtype, torch.device("cpu") if budget_gb else self.device)
        load = {}
        if budget_gb:
            full_weights = sum(p.numel() * p.element_size() for p in model.diffusion.parameters())
            vae_weights = sum(p.numel() * p.element_size() for p in model.vae.parameters())
            compute = torch.bfloat16
            act = max(memory.sampling_memory(size, size, compute, tile_size=st * 8 if tiled else None),
                      memory.vae_memory(size, size, compute, tile_size=vt_enc))
            budget = budget_gb * GIB
            if self.smoke:  # the same share of the tiny model as of the full one (bf16 7.8 GB)
                budget = int(full_weights * budget_gb / 10.0)
                act = vae_weights = 0
            weights_budget = max(budget - act - vae_weights - (0 if self.smoke else GIB), 0)
            load = ops.load_partially(model.diffusion, self.device, weights_budget)
            load = {"weights_gib": round(full_weights / GIB, 2), "loaded_gib": round(load["loaded"] / GIB, 2),
                    "streamed_gib": round(load["streamed"] / GIB, 2), "cast_layers": load["cast_layers"]}
        _sync(self.device)
        load_s = time.perf_counter() - t0
        g = torch.Generator().manual_seed(0)
        x = torch.nn.functional.interpolate(torch.rand(1, 3, size // 16, size // 16, generator=g), size=(size, size),
                                            mode="bicubic", align_corners=False).clamp(0, 1).mul(2).sub(1)
        cond, uncond = self.cond()
        settings = RestoreSettings(steps=steps, cfg_scale=4.0, cfg_scale_start=1.0, tiling="on" if tiled else "off",
                                   tile_size=st * 8, tile_stride=ss * 8, tile_batch_size=1,
                                   tiled_vae=vae_tiling is not None, encoder_tile_size=vt_enc,
                                   decoder_tile_size=vt_dec * 8, seed=0)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            with _vae_staging(staging):
                out = restore_tensor(x.to(self.device), model, settings, cond=cond, uncond=uncond)
        _sync(self.device)
        seconds = time.perf_counter() - t0
        result = {"case": name, "size": size, "steps": steps, "seconds": round(seconds, 2),
                  "s_per_step": round(seconds / steps, 3), "peak_vram_gib": round(_peak(self.device), 2),
                  "load_s": round(load_s, 1), "finite": bool(torch.isfinite(out).all()), **load}
        del model, out
        return result

    def codeformer_case(self) -> list[dict]:
        from photo_restoration.codeformer.loader import build_codeformer, make_config

        if self.smoke:
            from photo_restoration.testing.tiny_codeformer import TINY_CONFIG

            cfg, batches, side = make_config(TINY_CONFIG), (1, 2), 512
        else:
            cfg, batches, side = make_config({}), (1, 8), 512
        meta = build_codeformer(cfg)
        shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        out = []
        for dtype in (torch.float32, torch.bfloat16):
            src = random_source(shapes, dtype, self.gen_device, seed=2)
            net = build_codeformer(cfg)
            net.load_state_dict({k: src.get(k).to(self.device) for k in shapes}, assign=True)
            net.eval()
            for b in batches:
                _reset(self.device)
                x = (torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(b)) * 2 - 1)
                x = x.to(self.device, dtype)
                with torch.inference_mode():
                    net(x, w=0.5, adain=True)  # warm-up
                    _sync(self.device)
                    t0 = time.perf_counter()
                    y = net(x, w=0.5, adain=True)
                    _sync(self.device)
                out.append({"case": f"codeformer-{str(dtype)[6:]}-b{b}", "batch": b,
                            "seconds": round(time.perf_counter() - t0, 3), "peak_vram_gib": round(_peak(self.device), 2),
                            "finite": bool(torch.isfinite(y.float()).all())})
            del net
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny networks on the CPU (end-to-end check)")
    ap.add_argument("--cases", nargs="+", default=ALL_CASES, choices=ALL_CASES)
    ap.add_argument("--steps", type=int, default=None, help="EDM steps at 1024 px (default 50; smoke 2)")
    ap.add_argument("--large-steps", type=int, default=None, help="EDM steps at 2048 px (default 20; smoke 2)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per result")
    args = ap.parse_args(argv)
    import_pack()
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if args.smoke:
        torch.set_num_threads(max(torch.get_num_threads(), 1))
    steps = args.steps or (2 if args.smoke else 50)
    large = args.large_steps or (2 if args.smoke else 20)
    suite = Suite(args.smoke, device, steps, large)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# gpu_suite on {name} ({'smoke, tiny networks' if args.smoke else 'full size'}), torch {torch.__version__}")
    print("| case | seconds | s/step | peak VRAM GiB | weights loaded / streamed GiB |")
    print("| --- | --- | --- | --- | --- |")
    t_all = time.perf_counter()
    results = []
    for case in args.cases:
        rows = suite.codeformer_case() if case == "codeformer" else [suite.restore_case(case)]
        for r in rows:
            results.append(r)
            ls = f"{r['loaded_gib']} / {r['streamed_gib']}" if "loaded_gib" in r else "all"
            print(f"| {r['case']} | {r['seconds']} | {r.get('s_per_step', '-')} | {r['peak_vram_gib']} | {ls} |",
                  flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
            if not r["finite"]:
                print(f"warning: {r['case']} produced non-finite values", file=sys.stderr)
    print(f"# total {time.perf_counter() - t_all:.1f} s")
    return 0 if all(r["finite"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
