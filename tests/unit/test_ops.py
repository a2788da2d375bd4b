"""The casting layers (supir/ops.py): plain torch semantics, ComfyUI's casting contract, storage dtypes."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from photo_restoration.supir import memory, ops


def _plain_and_castable(seed: int = 0):
    torch.manual_seed(seed)
    plain = nn.Sequential(nn.Conv2d(4, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.Conv2d(32, 8, 1))
    tail = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 5))
    net = nn.ModuleDict({"conv": plain, "tail": tail, "emb": nn.Embedding(10, 8)})
    castable = ops.make_castable(__import__("copy").deepcopy(net))
    return net, castable


def _run(net, x, ids):
    h = net["conv"](x).mean((2, 3))
    return net["tail"](h + net["emb"](ids))


def test_make_castable_keeps_the_numbers_and_adds_the_comfy_contract():
    net, castable = _plain_and_castable()
    x, ids = torch.randn(2, 4, 6, 6), torch.tensor([1, 7])
    assert torch.equal(_run(net, x, ids), _run(castable, x, ids))
    layers = [m for m in castable.modules() if isinstance(m, ops.CastWeightBiasOp)]
    assert len(layers) == 6
    assert all(m.comfy_cast_weights is False and m.weight_function == [] and m.bias_function == [] for m in layers)
    assert ops.partial_load_safe(castable) and not ops.partial_load_safe(net)


def test_cast_per_call_with_weight_functions_never_touches_the_stored_weights():
    lin = ops.make_castable(nn.Linear(3, 2))
    before = lin.weight.detach().clone()
    x = torch.randn(4, 3)
    lin.comfy_cast_weights = True  # what a memory manager sets on a layer it did not load
    lin.weight_function = [lambda w: w * 2]  # e.g. a LoRA patch applied at call time
    assert torch.allclose(lin(x), x @ (2 * before).T + lin.bias)
    assert torch.equal(lin.weight, before)
    assert ops.cast_layer_count(lin) == 1


def test_host_caster_is_used_only_for_layers_marked_by_the_host():
    lin = ops.make_castable(nn.Linear(3, 2))
    used = []

    @contextlib.contextmanager
    def caster(layer, x):
        used.append(layer)
        yield layer.weight.to(x.dtype), layer.bias.to(x.dtype)

    ops.set_host_caster(caster)
    try:
        x = torch.randn(1, 3)
        lin(x)
        assert used == []
        lin.comfy_cast_weights = True
        lin(x)
        assert used == [lin]
    finally:
        ops.set_host_caster(None)


def test_fp16_storage_with_fp32_compute_is_exact():
    torch.manual_seed(0)
    conv = ops.make_castable(nn.Conv2d(4, 8, 3, padding=1)).half()
    ref = nn.Conv2d(4, 8, 3, padding=1)
    ref.load_state_dict({k: v.float() for k, v in conv.state_dict().items()})
    x = torch.randn(1, 4, 5, 5)
    out = conv(x)
    assert out.dtype == torch.float32 and torch.equal(out, ref(x))


def test_storage_dtype_never_upcasts_a_16_bit_file():
    assert ops.storage_dtype(torch.float16, torch.float32) == torch.float16
    assert ops.storage_dtype(torch.bfloat16, torch.float32) == torch.bfloat16
    assert ops.storage_dtype(torch.float32, torch.float16) == torch.float16
    assert ops.storage_dtype(torch.float16, torch.bfloat16) == torch.bfloat16
    if ops.FP8_DTYPES:
        assert ops.storage_dtype(torch.float16, ops.FP8_DTYPES[0]) == ops.FP8_DTYPES[0]


def test_a_module_may_opt_out_of_partial_loading():
    net = ops.make_castable(nn.Sequential(nn.Linear(2, 2)))
    assert ops.partial_load_safe(net)
    net.partial_load = False
    assert not ops.partial_load_safe(net)
    raw = nn.Module()
    raw.p = nn.Parameter(torch.zeros(2))  # a bare parameter cannot be cast per layer
    assert not ops.partial_load_safe(raw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_memory_estimates_grow_with_image_and_tile_size(dtype):
    s = memory.sampling_memory
    assert s(512, 512, dtype) < s(1024, 1024, dtype) < s(2048, 2048, dtype)
    assert s(2048, 2048, dtype, tile_size=512) < s(2048, 2048, dtype, tile_size=1024) < s(2048, 2048, dtype)
    assert s(1024, 1024, dtype, cfg=False) < s(1024, 1024, dtype)
    assert s(1024, 1024, dtype, tile_size=512, tile_batch_size=4) > s(1024, 1024, dtype, tile_size=512)
    v = memory.vae_memory
    assert v(512, 512, dtype) < v(1024, 1024, dtype) < v(2048, 2048, dtype)
    assert v(2048, 2048, dtype, tile_size=256) < v(2048, 2048, dtype, tile_size=512) < v(2048, 2048, dtype)
    # the scale of ComfyUI's own figures: SDXL at 1024 px with CFG needs well under 4 GiB, over 256 MiB
    assert 256 * 2**20 < s(1024, 1024, torch.float16) < 4 * 2**30


def test_plain_partial_load_streams_what_does_not_fit():
    torch.manual_seed(0)
    net = ops.make_castable(nn.Sequential(nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 8), nn.LayerNorm(8)))
    x = torch.randn(3, 64)
    ref = net(x)
    info = ops.load_partially(net, "cpu", budget_bytes=4000)  # only the small layers fit
    assert info["cast_layers"] == 1 and info["streamed"] == (64 * 64 + 64) * 4
    assert ops.cast_layer_count(net) == 1 and net[0].comfy_cast_weights
    assert torch.equal(net(x), ref)


def test_manage_outside_comfyui_marks_castable_networks_partial_loadable():
    from photo_restoration.nodes import comfy

    castable = comfy.manage(ops.make_castable(nn.Sequential(nn.Linear(2, 2))))
    plain = comfy.manage(nn.Sequential(nn.Linear(2, 2)))
    assert castable.partial_load and not plain.partial_load and castable.patcher is None
    assert comfy.load(castable) is castable.model
