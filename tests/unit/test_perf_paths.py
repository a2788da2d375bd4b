"""The speed paths of the SUPIR networks compute what the plain paths compute.

* small CPU feature maps convolve through one GEMM (``supir.unet.conv2d``): equal to ``F.conv2d``;
* cross-attention keys/values of an unchanged text context are reused across calls: outputs equal a
  fresh computation, and a new context or new weights are never served from the cache;
* on the CPU without oneDNN the transformer blocks run on channel-major tokens (``weight @ tokens``): the same eps
  as the token-major path, with an unchanged (contiguous) output layout;
* 16-bit and fp8 stored weights up-cast into one reused buffer during a call give bit for bit the eps of fresh casts,
  and the buffer is gone after the call.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from photo_restoration.supir import conv as convmod
from photo_restoration.supir import unet as unetmod
from photo_restoration.supir.control import SupirDiffusion
from photo_restoration.supir.conv import conv2d, upsample_conv3x3
from photo_restoration.supir.loader import load_diffusion
from photo_restoration.supir.unet import CrossAttention
from photo_restoration.testing.tiny_supir import TINY_UNET, tiny_state_dicts


@pytest.mark.parametrize("ci,co,k,stride,pad,size,bias", [
    (16, 24, 3, 1, 1, 8, True), (16, 24, 3, 2, 1, 8, True), (8, 12, 1, 1, 0, 6, True),
    (8, 12, 3, 1, 1, 4, False), (8, 12, 3, 1, 1, 32, True),  # the last one is above the GEMM size: F.conv2d
])
def test_conv2d_equals_torch_conv(ci, co, k, stride, pad, size, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, ci, size, size, generator=g)
    w = torch.randn(co, ci, k, k, generator=g) / (ci * k * k) ** 0.5
    b = torch.randn(co, generator=g) if bias else None
    got = conv2d(x, w, b, (stride, stride), (pad, pad))
    want = F.conv2d(x, w, b, stride, pad)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gemm_path_is_used_below_the_size_limit(monkeypatch):
    calls = []
    unfold = F.unfold
    monkeypatch.setattr(convmod.F, "unfold", lambda *a, **k: calls.append(1) or unfold(*a, **k))
    x = torch.randn(2, 4, 8, 8)
    conv2d(x, torch.randn(4, 4, 3, 3), None, (1, 1), (1, 1))
    assert calls  # 64 output pixels: GEMM
    calls.clear()
    conv2d(torch.randn(2, 4, 16, 16), torch.randn(4, 4, 3, 3), None, (1, 1), (1, 1))
    assert not calls  # 256 output pixels: F.conv2d


def test_small_maps_take_the_gemm_path_even_where_winograd_would_apply(monkeypatch):
    """At <= 64 output pixels per image im2col + one GEMM beats Winograd F(2x2) (1280 channels at 8x8)."""
    from photo_restoration import winograd

    monkeypatch.setattr(winograd, "tile_size", lambda x, weight: 2)  # Winograd would take anything
    taken = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a, **k: taken.append(1) or real(*a, **k))
    x, w = torch.randn(2, 8, 8, 8), torch.randn(8, 8, 3, 3)
    torch.testing.assert_close(conv2d(x, w, None, (1, 1), (1, 1)), F.conv2d(x, w, None, 1, 1), rtol=1e-5, atol=1e-5)
    assert not taken
    conv2d(torch.randn(2, 8, 16, 16), w, None, (1, 1), (1, 1))
    assert taken  # above the GEMM size: Winograd where it applies


@pytest.mark.parametrize("concat", [0, 32])
def test_zero_sft_at_scale_one_equals_the_official_blend(concat):
    """At control scale 1 the blend ``h * s + h_raw * (1 - s)`` is skipped: same output as a per-sample scale of 1."""
    from photo_restoration.supir.control import ZeroSFT

    torch.manual_seed(4)
    sft = ZeroSFT(8, 32, concat, hidden=16).eval()
    for p in sft.parameters():
        p.data.normal_(0, 0.2)
    c, h = torch.randn(2, 8, 6, 6), torch.randn(2, 32, 6, 6)
    h_ori = torch.randn(2, concat, 6, 6) if concat else None
    with torch.inference_mode():
        got = sft(c, h, h_ori, control_scale=1.0)
        want = sft(c, h, h_ori, control_scale=torch.ones(2))
        half = sft(c, h, h_ori, control_scale=0.5)
    assert torch.equal(got, want)
    assert not torch.allclose(half, got)


@pytest.mark.parametrize("size,dtype", [(4, torch.float32), (12, torch.float32), (9, torch.float16)])
def test_upsample_conv_equals_upsampling_then_convolving(size, dtype):
    """Four 2x2 phase convolutions of the input = the 3x3 convolution of the nearest x2 upsampled input
    (16-bit stored weights are up-cast to the float32 input, as the casting layers do)."""
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(5, 6, 3, 3, generator=g) / 7)
    conv = conv.to(dtype)
    x = torch.randn(2, 6, size, size + 3, generator=g)
    want = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight.float(), conv.bias.float(),
                    padding=1)
    got = upsample_conv3x3(conv, x)
    assert got.shape == want.shape == (2, 5, 2 * size, 2 * size + 6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_diffusion() -> SupirDiffusion:
    sdxl, supir = tiny_state_dicts(seed=5)
    return load_diffusion(sdxl, supir)[0]


def _inputs(seed: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    hint = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 77, TINY_UNET["context_dim"], generator=g)
    y = torch.randn(batch, TINY_UNET["adm_in_channels"], generator=g)
    return x, torch.tensor([500, 500]), ctx, y, hint


def _run(model, x, t, ctx, y, hint, cache: bool):
    model.cache_text_kv = cache
    try:
        with torch.inference_mode():
            return model(x, t, ctx, y, hint)
    finally:
        model.cache_text_kv = True


def test_cached_text_keys_values_give_the_uncached_output(tiny_diffusion):
    m = tiny_diffusion
    m.clear_kv_cache()
    x, t, ctx, y, hint = _inputs(0)
    plain = _run(m, x, t, ctx, y, hint, cache=False)
    first = _run(m, x, t, ctx, y, hint, cache=True)
    attn = [a for a in m.modules() if isinstance(a, CrossAttention) and a.cache_kv]
    assert attn and all(a.kv_cache_k is not None for a in attn)
    # next step: a new tensor with the same values (the samplers rebuild the CFG batch every step)
    x2 = torch.randn_like(x)
    again = _run(m, x2, t, ctx.clone(), y, hint, cache=True)
    assert torch.equal(first, plain)
    assert torch.equal(again, _run(m, x2, t, ctx, y, hint, cache=False))
    # the caller changing its context in place after a call is not seen by the cache
    ctx_mut = ctx.clone()
    _run(m, x, t, ctx_mut, y, hint, cache=True)
    ctx_mut.mul_(-1)
    assert torch.equal(_run(m, x, t, ctx_mut, y, hint, cache=True), _run(m, x, t, ctx_mut, y, hint, cache=False))


def test_new_weights_are_not_served_from_the_cache(tiny_diffusion):
    m = tiny_diffusion
    x, t, ctx, y, hint = _inputs(1)
    _run(m, x, t, ctx, y, hint, cache=True)
    layer = next(a for a in m.modules() if isinstance(a, CrossAttention) and a.cache_kv).to_k
    old = layer.weight
    try:
        layer.weight = torch.nn.Parameter(old.detach() * 2, requires_grad=False)  # a patched weight
        want = _run(m, x, t, ctx, y, hint, cache=False)
        assert torch.equal(_run(m, x, t, ctx, y, hint, cache=True), want)
        with torch.no_grad():
            layer.weight.mul_(0.5)  # in place, outside inference mode: the version counter changes
        want = _run(m, x, t, ctx, y, hint, cache=False)
        assert torch.equal(_run(m, x, t, ctx, y, hint, cache=True), want)
    finally:
        layer.weight = old
    m.clear_kv_cache()
    assert all(a.kv_cache_k is None for a in m.modules() if isinstance(a, CrossAttention))


def test_cache_is_not_in_the_state_dict(tiny_diffusion):
    x, t, ctx, y, hint = _inputs(2)
    _run(tiny_diffusion, x, t, ctx, y, hint, cache=True)
    assert not any("kv_cache" in k for k in tiny_diffusion.state_dict())


@pytest.mark.parametrize("batch", [1, 2])
def test_channel_major_tokens_give_the_token_major_eps(tiny_diffusion, monkeypatch, batch):
    from photo_restoration import gemm

    m = tiny_diffusion
    x, t, ctx, y, hint = (v[:batch] for v in _inputs(3))
    assert not unetmod.channel_major(torch.randn(batch, 8, 4, 4)) or not gemm.runs_on(torch.randn(2, 8))
    monkeypatch.setattr(gemm, "ENABLED", False)  # channel-major tokens are the path of MKL's GEMMs, without oneDNN
    monkeypatch.setattr(unetmod, "CHANNEL_MAJOR_ON_CPU", False)
    want = _run(m, x, t, ctx, y, hint, cache=False)
    monkeypatch.setattr(unetmod, "CHANNEL_MAJOR_ON_CPU", True)
    calls = []
    linear_cm = unetmod.ops.linear_cm
    monkeypatch.setattr(unetmod.ops, "linear_cm", lambda *a: calls.append(1) or linear_cm(*a))
    got = _run(m, x, t, ctx, y, hint, cache=False)
    assert calls  # the channel-major Linear path ran
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", ["float16", "bfloat16", "float8_e4m3fn"])
def test_reused_cast_buffer_gives_the_eps_of_fresh_casts(monkeypatch, storage):
    from photo_restoration.supir import ops
    if not hasattr(torch, storage):
        pytest.skip(f"this torch has no {storage}")
    sdxl, supir = tiny_state_dicts(seed=6)
    m = load_diffusion(sdxl, supir, dtype=getattr(torch, storage), compute_dtype=torch.float32)[0]
    assert getattr(torch, storage) in {p.dtype for p in m.parameters()}  # stored narrow, up-cast per layer
    x, t, ctx, y, hint = _inputs(4)
    monkeypatch.setattr(ops, "REUSE_MIN_NUMEL", 1 << 62)  # never reuse: a fresh tensor per cast
    want = _run(m, x, t, ctx, y, hint, cache=False)
    copies = []
    cast_once = ops._cast_once
    monkeypatch.setattr(ops, "REUSE_MIN_NUMEL", 0)  # every cast through the reused buffer
    monkeypatch.setattr(ops, "_cast_once", lambda p, x: copies.append(getattr(ops._reuse, "buffers", None))
                        or cast_once(p, x))
    got = _run(m, x, t, ctx, y, hint, cache=False)
    assert copies and all(b for b in copies)  # the buffer held the up-casts
    assert torch.equal(got, want)
    assert getattr(ops._reuse, "buffers", None) is None  # freed after the call


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no float8")
@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_table_upcast_is_bit_identical_to_torch(fp8, dtype):
    from photo_restoration.supir.ops import fp8_upcast
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(getattr(torch, fp8))
    w = codes[torch.randperm(256, generator=torch.Generator().manual_seed(0))].repeat(3).view(16, 48)
    got, want = fp8_upcast(w, dtype), w.to(dtype)
    assert got.shape == want.shape and got.dtype == dtype
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(bits), want.view(bits))  # NaN payloads included


@pytest.mark.parametrize("size", [8, 32])
def test_channels_last_feature_maps_give_the_contiguous_eps(tiny_diffusion, monkeypatch, size):
    """On float32 CPU inputs the UNet and control maps run channels-last (the transformers read their storage as
    tokens, the convolutions gather from it); the eps equals the contiguous-map path's and comes back contiguous."""
    m = tiny_diffusion
    g = torch.Generator().manual_seed(7)
    x, hint = torch.randn(2, 4, size, size, generator=g), torch.randn(2, 4, size, size, generator=g)
    _, t, ctx, y, _ = _inputs(7)
    layouts = []
    hooks = [mod.register_forward_pre_hook(lambda _, args: layouts.append(unetmod.is_channels_last(args[0])))
             for mod in m.modules() if isinstance(mod, (unetmod.ResBlock, unetmod.SpatialTransformer))]
    try:
        monkeypatch.setattr(unetmod, "CHANNELS_LAST_ON_CPU", False)
        want = _run(m, x, t, ctx, y, hint, cache=False)
        assert layouts and not any(layouts)
        layouts.clear()
        monkeypatch.setattr(unetmod, "CHANNELS_LAST_ON_CPU", True)
        got = _run(m, x, t, ctx, y, hint, cache=False)
        assert layouts and all(layouts)
    finally:
        for h in hooks:
            h.remove()
    assert got.is_contiguous() and x.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_channels_last_maps_only_for_float32_cpu_inference():
    x = torch.randn(1, 4, 8, 8)
    assert unetmod.channels_last_maps(x)
    assert not unetmod.channels_last_maps(x.to(torch.bfloat16))
    assert not unetmod.channels_last_maps(x.requires_grad_())
    assert unetmod.map_layout(torch.randn(1, 4, 8, 8, dtype=torch.float16)).is_contiguous()
