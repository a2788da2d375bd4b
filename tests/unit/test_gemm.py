"""The fused oneDNN linear layers (``gemm.py``) compute what the plain ATen ops compute.

* ``linear``, ``linear_gelu``, ``linear_mul`` and ``linear_add`` equal ``F.linear`` followed by the GELU, product or
  sum, and never modify their operands;
* outside their domain (autograd, 16-bit inputs, mismatched shapes) they fall back to the plain ops;
* the SDXL transformer block (GEGLU feed-forward and residual sums fused into the GEMMs) and the casting layers give
  the outputs of the plain layer sequence, for float32 and 16-bit stored weights.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from photo_restoration import gemm
from photo_restoration.supir import ops, unet

TOL = dict(rtol=2e-5, atol=2e-5)  # float32 GEMMs of another blocking: measured <= 2.5e-6 relative


def _operands(seed=0, rows=(3, 37), k=48, n=40):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g)
    other = torch.randn(*rows, n, generator=g)
    return x, w, b, other


@pytest.fixture(params=[True, False], ids=["onednn", "plain"])
def enabled(request, monkeypatch):
    monkeypatch.setattr(gemm, "ENABLED", request.param)
    return request.param


@pytest.mark.parametrize("bias", [True, False])
def test_fused_linears_equal_the_plain_ops(enabled, bias):
    x, w, b, other = _operands()
    b = b if bias else None
    x0, other0 = x.clone(), other.clone()
    with torch.inference_mode():
        torch.testing.assert_close(gemm.linear(x, w, b), F.linear(x, w, b), **TOL)
        torch.testing.assert_close(gemm.linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)), **TOL)
        torch.testing.assert_close(gemm.linear_mul(x, other, w, b), F.linear(x, w, b) * other, **TOL)
        torch.testing.assert_close(gemm.linear_add(x, other, w, b), F.linear(x, w, b) + other, **TOL)
    assert torch.equal(x, x0) and torch.equal(other, other0)


def test_onednn_runs_on_float32_cpu_tensors_only(monkeypatch):
    x, w, b, other = _operands()
    monkeypatch.setattr(gemm, "ENABLED", True)
    if not gemm._AVAILABLE:
        pytest.skip("this torch has no oneDNN")
    with torch.inference_mode():
        assert gemm.applies(x, w, b, other)
        assert not gemm.applies(x.half(), w.half())
        assert not gemm.applies(x, w.half())
    assert not gemm.applies(x.requires_grad_(), w)  # autograd: the plain ops, which have a backward
    monkeypatch.setattr(gemm, "ENABLED", False)
    assert not gemm.runs_on(x.detach())


def test_autograd_falls_back_to_the_differentiable_ops(enabled):
    x, w, b, other = _operands()
    w = w.clone().requires_grad_()
    gemm.linear_add(x, other, w, b).sum().backward()
    torch.testing.assert_close(w.grad, (torch.ones(3, 37, 40)[..., None] * x[..., None, :]).sum((0, 1)), **TOL)


def test_a_broadcast_operand_takes_the_plain_sum(enabled):
    x, w, b, _ = _operands()
    row = torch.randn(40)
    with torch.inference_mode():
        torch.testing.assert_close(gemm.linear_add(x, row, w, b), F.linear(x, w, b) + row, **TOL)


@pytest.mark.parametrize("stored", [torch.float32, torch.float16])
def test_transformer_block_equals_the_plain_layer_sequence(monkeypatch, stored):
    """GEGLU feed-forward in two fused GEMMs and residual sums inside the output GEMMs = the official block."""
    torch.manual_seed(5)
    block = unet.BasicTransformerBlock(64, 2, 32, 24).eval()
    for p in block.parameters():
        p.data.normal_(0, 0.15)
    block = block.to(stored)
    x, ctx = torch.randn(2, 20, 64), torch.randn(2, 7, 24)
    with torch.inference_mode():
        monkeypatch.setattr(gemm, "ENABLED", False)
        want = block(x, ctx)
        monkeypatch.setattr(gemm, "ENABLED", True)
        got = block(x, ctx)
        ff = block.ff(x, residual=x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL)
    monkeypatch.setattr(gemm, "ENABLED", False)
    with torch.inference_mode():
        torch.testing.assert_close(ff, block.ff.net(x) + x, **TOL)


def test_geglu_of_a_host_patched_layer_uses_the_patched_weight():
    """A memory manager's weight function (a LoRA patch) applies to both halves of the GEGLU projection."""
    torch.manual_seed(6)
    layer = ops.Linear(16, 2 * 12)
    layer.weight_function = [lambda w: w * 2]
    x = torch.randn(5, 16)
    with torch.inference_mode():
        a, gate = F.linear(x, layer.weight * 2, layer.bias).chunk(2, -1)
        torch.testing.assert_close(ops.geglu(layer, x), a * F.gelu(gate), **TOL)
