"""SUPIR under ComfyUI's memory manager: partial (lowvram) loading gives the same numbers as a full load.

Runs inside a real ComfyUI tree (``COMFYUI_PATH``, else every tree in ``../shared/comfyui``) with
``--cpu``, in a subprocess. On the CPU ComfyUI never decides to load partially by itself (no VRAM
limit), so the test drives the same step ``load_models_gpu`` takes with a budget:
``LoadedModel(patcher).model_load(lowvram_model_memory)``, with 10 % of the model's size. Then:

* ComfyUI marked layers ``comfy_cast_weights`` (those it did not load) and reports a partial load;
* those layers' weights were not copied (they stay where the offload device keeps them) and each call
  cast them through ComfyUI's own ``comfy.ops.cast_bias_weight``;
* one denoiser call (UNet + GLVControl + adapters; fp32 compute from the fp16 tiny SDXL, and fp8
  storage) equals the call after a full load exactly.

A second test checks the activation estimate that the nodes hand to ``load_models_gpu`` grows with the
image size and the tile size, and reaches ComfyUI unchanged.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _trees() -> list[Path]:
    if os.environ.get("COMFYUI_PATH"):
        return [Path(os.environ["COMFYUI_PATH"])]
    root = REPO_ROOT.parent / "shared" / "comfyui"
    return sorted(p for p in root.iterdir() if (p / "main.py").is_file()) if root.is_dir() else []


TREES = _trees()
if not TREES:
    pytest.skip("no ComfyUI tree (set COMFYUI_PATH or provide ../shared/comfyui)", allow_module_level=True)

PRELUDE = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    import torch
    sys.path.insert(0, os.getcwd())
    from comfy.cli_args import args
    args.cpu = True
    import folder_paths
    import comfy.model_management as mm
    import comfy.model_patcher, comfy.ops
    base, repo, sdxl, supir = sys.argv[1:5]
    spec = importlib.util.spec_from_file_location("pack_under_test", os.path.join(repo, "__init__.py"),
                                                  submodule_search_locations=[repo])
    pack = importlib.util.module_from_spec(spec); sys.modules["pack_under_test"] = pack
    spec.loader.exec_module(pack)
    import pack_under_test.nodes.comfy as C
    import pack_under_test.supir.loader as L
    import pack_under_test.supir.memory as M
    import pack_under_test.supir.ops as ops

    class Part(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.part = m
    """
)

PARTIAL_SCRIPT = PRELUDE + textwrap.dedent(
    """
    calls = []
    def run(net, managed, budget):
        patcher = managed.patcher
        if budget is None:
            C.load(managed)  # what the nodes do; on the CPU ComfyUI loads everything
        else:
            mm.unload_all_models()
            mm.LoadedModel(patcher).model_load(budget)  # load_models_gpu's step, with a small budget
        cast = [n for n, m in net.named_modules() if isinstance(m, ops.CastWeightBiasOp) and m.comfy_cast_weights]
        caster = ops._host_caster
        def counting(layer, x):
            calls.append(1)
            return caster(layer, x)
        ops.set_host_caster(counting)
        del calls[:]
        g = torch.Generator().manual_seed(0)
        cfg = net.config
        x = torch.randn(2, cfg["in_channels"], 8, 8, generator=g)
        hint = torch.randn(2, cfg["in_channels"], 8, 8, generator=g)
        ctx = torch.randn(2, 77, cfg["context_dim"], generator=g)
        y = torch.randn(2, cfg["adm_in_channels"], generator=g)
        with torch.no_grad():
            out = net(x, torch.tensor([500, 500]), ctx, y, hint, 1.0)
        ops.set_host_caster(caster)
        info = {"cast_layers": len(cast), "caster_calls": len(calls),
                "lowvram": bool(getattr(patcher.model, "model_lowvram", False)),
                "loaded": int(patcher.model.model_loaded_weight_memory), "size": int(patcher.model_size())}
        return out, info

    result = {}
    for dtype in ("fp32", "fp8"):
        model = L.load_supir(sdxl, supir, dtype=dtype, with_vae=False, with_text=False)
        net = model.diffusion
        managed = C.manage(Part(net))
        ptrs = {n: m.weight.data_ptr() for n, m in net.named_modules() if isinstance(m, ops.CastWeightBiasOp)}
        full, full_info = run(net, managed, None)
        part, part_info = run(net, managed, int(0.1 * managed.patcher.model_size()))
        unmoved = all(m.weight.data_ptr() == ptrs[n] for n, m in net.named_modules()
                      if isinstance(m, ops.CastWeightBiasOp) and m.comfy_cast_weights)
        mm.unload_all_models()
        again, again_info = run(net, managed, None)
        result[dtype] = {
            "partial_load": managed.partial_load, "patcher": type(managed.patcher).__name__,
            "full": full_info, "part": part_info, "again": again_info, "unmoved": unmoved,
            "max_abs_partial": (full - part).abs().max().item(), "max_abs_again": (full - again).abs().max().item(),
            "finite": bool(torch.isfinite(full).all()),
            "storage": sorted({str(p.dtype) for p in net.parameters()}),
        }
    print("RESULT" + json.dumps(result))
    """
)

ESTIMATE_SCRIPT = PRELUDE + textwrap.dedent(
    """
    seen = []
    original = mm.load_models_gpu
    def spy(models, memory_required=0, **kw):
        seen.append((int(memory_required), bool(kw.get("force_full_load"))))
        return original(models, memory_required=memory_required, **kw)
    mm.load_models_gpu = spy
    model = L.load_supir(sdxl, supir, dtype="fp32", with_vae=True, with_text=False)
    diffusion, vae = C.manage(Part(model.diffusion)), C.manage(Part(model.vae))
    sampling = {}
    for size in (512, 1024, 2048):
        for tile in (None, 512, 1024):
            need = M.sampling_memory(size, size, torch.float16, cfg=True, tile_size=tile)
            C.load(diffusion, need)
            sampling[f"{size}/{tile}"] = seen[-1]
    vae_need = {}
    for size in (512, 1024, 2048):
        for tile in (None, 256, 512):
            C.load(vae, M.vae_memory(size, size, torch.float32, tile_size=tile))
            vae_need[f"{size}/{tile}"] = seen[-1]
    print("RESULT" + json.dumps({"sampling": sampling, "vae": vae_need,
                                 "partial": [diffusion.partial_load, vae.partial_load]}))
    """
)


def _run(script: str, tree: Path, tmp_path: Path) -> dict:
    from photo_restoration.testing.tiny_checkpoints import write_all

    sdxl, supir = write_all(tmp_path / "models", only=["supir"])["supir"]  # the tiny SDXL is fp16, as published
    proc = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", script, str(tmp_path),
                           str(REPO_ROOT), str(sdxl), str(supir)], cwd=tree, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, (proc.stdout + proc.stderr)[-5000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def _tree_id(tree: Path) -> str:
    return f"comfyui-{tree.name}"


@pytest.mark.parametrize("tree", TREES, ids=_tree_id)
def test_partial_load_lowvram_denoiser_equals_full_load(tree, tmp_path):
    out = _run(PARTIAL_SCRIPT, tree, tmp_path)
    for dtype, r in out.items():
        assert r["partial_load"], (dtype, r)
        full, part = r["full"], r["part"]
        assert not full["lowvram"] and full["cast_layers"] == 0 and full["caster_calls"] == 0, (dtype, r)
        assert part["lowvram"] and part["loaded"] <= 0.1 * part["size"], (dtype, r)
        assert part["cast_layers"] > 10 and part["caster_calls"] >= part["cast_layers"], (dtype, r)
        assert r["unmoved"], (dtype, r)
        assert r["finite"] and r["max_abs_partial"] == 0.0 and r["max_abs_again"] == 0.0, (dtype, r)
        assert r["again"]["cast_layers"] == 0, (dtype, r)  # a full load afterwards clears the casting
    assert "torch.float16" in out["fp32"]["storage"]  # fp32 compute kept the fp16 SDXL weights as stored
    assert any("float8" in s for s in out["fp8"]["storage"])


@pytest.mark.parametrize("tree", TREES, ids=_tree_id)
def test_lowvram_estimate_reaches_comfyui_and_grows_with_size_and_tile(tree, tmp_path):
    out = _run(ESTIMATE_SCRIPT, tree, tmp_path)
    assert out["partial"] == [True, False]  # the denoiser may load partially, the VAE loads whole
    s = {k: v[0] for k, v in out["sampling"].items()}
    assert all(not forced for _, forced in out["sampling"].values())
    assert s["512/None"] < s["1024/None"] < s["2048/None"]
    assert s["2048/512"] < s["2048/1024"] < s["2048/None"]
    assert s["1024/512"] < s["2048/512"]  # whole-latent buffers still grow with the image when tiled
    v = {k: n for k, (n, forced) in out["vae"].items()}
    assert all(forced for _, forced in out["vae"].values())
    assert v["512/None"] < v["1024/None"] < v["2048/None"]
    assert v["2048/256"] < v["2048/512"] < v["2048/None"]
