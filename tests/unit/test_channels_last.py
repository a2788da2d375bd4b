"""The exact GroupNorm (``groupnorm``) and the channels-last CPU paths (``layout``, ``subpixel``) that SUPIR's VAE
and CodeFormer's autoencoder run on float32 CPU maps: same values as the contiguous ATen path, no hidden copies."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from photo_restoration import groupnorm, layout, subpixel
from photo_restoration.codeformer import arch as cf_arch
from photo_restoration.codeformer.loader import load_codeformer
from photo_restoration.supir import vae_blocks
from photo_restoration.supir.vae import build_vae
from photo_restoration.testing.tiny_codeformer import tiny_codeformer_state_dict
from photo_restoration.testing.tiny_supir_parts import tiny_vae_state_dict

CL = torch.channels_last


def _map(shape, seed=0, mean=2.0, std=3.0, channels_last=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std + mean
    return x.contiguous(memory_format=CL) if channels_last else x


def _reference(x, groups, w, b, eps, silu):
    y = F.group_norm(x.double().contiguous(), groups, None if w is None else w.double(),
                     None if b is None else b.double(), eps)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 64, 48, 48), (2, 32, 7, 9), (1, 128, 160, 160)])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_matches_float64_in_both_layouts(shape, channels_last, silu):
    """As exact as ATen's contiguous GroupNorm (a float64 reference), also on channels-last maps where ATen's
    own kernel is off by up to 5e-4; the result keeps the input's layout; the input is not modified."""
    x = _map(shape, channels_last=channels_last)
    before = x.clone()
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    got = groupnorm.group_norm(x, 32, w, b, 1e-6, silu=silu)
    ref = _reference(x, 32, w, b, 1e-6, silu)
    aten = F.group_norm(x.contiguous(), 32, w, b, 1e-6)
    aten = F.silu(aten) if silu else aten
    aten_err = (aten.double() - ref).abs().max().item()
    assert (got.double() - ref).abs().max().item() <= max(2 * aten_err, 5e-6)
    assert got.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    assert torch.equal(x, before)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_writes_into_the_given_buffer_or_in_place(channels_last):
    shape = (1, 64, 192, 192)  # large enough for the chunked path in both layouts
    x = _map(shape, seed=1, channels_last=channels_last)
    w, b = torch.randn(64), torch.randn(64)
    expected = _reference(x, 32, w, b, 1e-6, True).float()
    buf = torch.empty_like(x)
    assert groupnorm.group_norm(x, 32, w, b, 1e-6, silu=True, out=buf) is buf
    torch.testing.assert_close(buf, expected, rtol=0, atol=1e-5)
    y = x.clone(memory_format=torch.preserve_format)
    assert groupnorm.group_norm(y, 32, w, b, 1e-6, silu=True, out=y) is y
    assert torch.equal(y, buf)
    other_layout = torch.empty_like(x, memory_format=torch.contiguous_format if channels_last else CL)
    got = groupnorm.group_norm(x, 32, w, b, 1e-6, silu=True, out=other_layout)
    assert got is not other_layout  # a buffer that does not fit is not used
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_group_norm_leaves_other_dtypes_and_no_affine_to_aten():
    x = _map((1, 32, 8, 8)).bfloat16()
    w, b = torch.randn(32).bfloat16(), torch.randn(32).bfloat16()
    assert torch.equal(groupnorm.group_norm(x, 32, w, b, 1e-6), F.group_norm(x, 32, w, b, 1e-6))
    x = _map((1, 64, 40, 40), channels_last=True)
    torch.testing.assert_close(groupnorm.group_norm(x, 32, None, None, 1e-5),
                               _reference(x, 32, None, None, 1e-5, False).float(), rtol=0, atol=2e-5)


def test_conv1x1_on_channels_last_is_one_gemm_with_the_same_result():
    x = _map((2, 48, 20, 24), channels_last=True)
    w, b = torch.randn(16, 48, 1, 1) * 0.1, torch.randn(16)
    got = layout.conv1x1(x, w, b)
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, F.conv2d(x.contiguous(), w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layout.conv1x1(x.contiguous(), w, None), F.conv2d(x.contiguous(), w), rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_interleaved_output_has_the_standard_strides_of_its_layout(channels_last):
    """A permuted view of another shape would pass ``is_contiguous(channels_last)`` with odd strides (batch 1)
    and make the next convolution copy the whole 2x map."""
    x = _map((1, 8, 5, 6), channels_last=channels_last)
    result, view = subpixel.interleaved_output(x, 4)
    fmt = CL if channels_last else torch.contiguous_format
    assert result.stride() == torch.empty((1, 4, 10, 12), memory_format=fmt).stride()
    view[:, :, 2, 1, 3, 0] = 7.0
    assert bool((result[:, :, 5, 6] == 7.0).all())


def test_codeformer_channels_last_equals_contiguous(monkeypatch):
    """On the CPU in float32 the autoencoder runs channels-last; the contiguous run gives the same codes and
    the same image within float32 rounding, and the result is returned contiguous."""
    net = load_codeformer(tiny_codeformer_state_dict(seed=2, ch_mult=[1, 2, 1], img_size=64, connect_list=["32", "64"],
                                                     dim_embd=32, n_head=4, dim_mlp=64, codebook_size=32, emb_dim=32),
                          n_head=4)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.inference_mode():
        fast = net(x, w=0.7, return_codes=True)
        monkeypatch.setattr(cf_arch, "channels_last", lambda t: t)
        plain = net(x, w=0.7, return_codes=True)
    assert fast.out.is_contiguous()
    assert torch.equal(fast.code_idx, plain.code_idx)
    torch.testing.assert_close(fast.out, plain.out, rtol=1e-4, atol=1e-4)


def test_vae_channels_last_levels_equal_contiguous(monkeypatch):
    vae = build_vae({k[len("first_stage_model."):]: v for k, v in
                     tiny_vae_state_dict(4, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1).items()})
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.inference_mode():
        z = vae.encode_lq(x)
        img = vae.decode(z)
        monkeypatch.setattr(vae_blocks, "CHANNELS_LAST_MAX", 0)
        z0 = vae.encode_lq(x)
        img0 = vae.decode(z0)
    assert img.is_contiguous()
    torch.testing.assert_close(z, z0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(img, img0, rtol=1e-4, atol=1e-4)
