"""Winograd F(4x4, 3x3) (photo_restoration.winograd): the same convolution as F.conv2d up to float32 rounding,
taken only where it is measured to be faster (large float32 CPU maps of 128+ channels)."""
import pytest
import torch
import torch.nn.functional as F

from photo_restoration import winograd
from photo_restoration.codeformer.arch import conv3x3 as codeformer_conv3x3
from photo_restoration.supir import ops
from photo_restoration.supir.conv import conv2d as supir_conv2d


def _reference(x, w, b):
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)


def _rel(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape", [(1, 8, 16, 16), (3, 5, 13, 9), (2, 7, 5, 7), (1, 4, 1, 1), (2, 6, 4, 30)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_conv3x3_equals_the_direct_convolution(shape, channels_last, bias, tile):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, shape[1], 3, 3, generator=g)
    b = torch.randn(6, generator=g) if bias else None
    before = x.clone()
    got = winograd.conv3x3(x, w, b, tile)
    assert got.shape == (shape[0], 6, shape[2], shape[3])
    assert _rel(got, _reference(x, w, b)) < 3e-5  # measured <= 9e-6 at 128-1280 channels
    assert torch.equal(x, before), "the input was modified"
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last and shape[2] * shape[3] > 1
                             else torch.contiguous_format)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("onednn", [True, False])
def test_channel_gemms_per_position_or_batched_give_the_convolution(monkeypatch, tile, onednn):
    """The channel GEMMs one oneDNN call per transform position, or one batched MKL call: the same convolution."""
    from photo_restoration import gemm

    monkeypatch.setattr(winograd, "ONEDNN_MIN_CHANNELS", 0 if onednn else 1 << 30)
    calls = []
    linear = gemm.linear
    monkeypatch.setattr(gemm, "linear", lambda *a: calls.append(1) or linear(*a))
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(2, 12, 11, 10, generator=g), torch.randn(9, 12, 3, 3, generator=g), torch.randn(9, generator=g)
    with torch.inference_mode():
        got = winograd.conv3x3(x, w, b, tile)
    assert _rel(got, _reference(x, w, b)) < 3e-5
    assert bool(calls) == (onednn and gemm.runs_on(x))


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("band_bytes, min_tiles", [(1, 0), (40_000, 0), (1, 12)])
def test_bands_cover_the_map_exactly(monkeypatch, tile, band_bytes, min_tiles):
    """Several bands of tile rows (one per band, a few with a shorter last one, or as many as the minimum of
    GEMM rows asks for), on a map whose size is no multiple of the tile."""
    monkeypatch.setattr(winograd, "BAND_BYTES", band_bytes)
    monkeypatch.setattr(winograd, "MIN_BAND_TILES", min_tiles)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 19, 10, generator=g)
    w, b = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    assert _rel(winograd.conv3x3(x, w, b, tile), _reference(x, w, b)) < 3e-5


@pytest.mark.parametrize("tile", [2, 4])
def test_full_width_accuracy(tile):
    """At a full-size width the rounding stays at a few 1e-6 (direct float32 kernels: 1-2e-6)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 256, 64, 64, generator=g)
    w = torch.randn(256, 256, 3, 3, generator=g) / 48
    b = torch.randn(256, generator=g)
    assert _rel(winograd.conv3x3(x, w, b, tile), _reference(x, w, b)) < 3e-5


@pytest.fixture
def one_thread():
    """One thread, whatever runs the tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_channel_minimum_grows_with_the_threads(monkeypatch):
    x, w = torch.zeros(1, 128, 512, 512), torch.zeros(128, 128, 3, 3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert winograd.tile_size(x, w) == 4
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert winograd.tile_size(x, w) == 4  # 128 channels from 2 threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert winograd.tile_size(x, w) == 0  # 256 from 4 threads on
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert winograd.tile_size(x, torch.zeros(256, 256, 3, 3)) == 4


def test_tile_size_follows_the_map_and_the_channels(one_thread):
    def tile(b, c, side, co=None):
        return winograd.tile_size(torch.zeros(b, c, side, side), torch.zeros(co or c, c, 3, 3))

    assert tile(1, 128, 512) == 4 and tile(1, 64, 512) == 4  # VAE / CodeFormer top levels
    assert tile(2, 320, 32) == 4 and tile(1, 512, 32) == 4  # UNet at 256 px; CodeFormer, one face
    assert tile(2, 640, 16) == 2 and tile(2, 1280, 16) == 2  # too few 4x4 tiles: 2x2 ones
    assert tile(2, 1280, 8) == 2  # UNet 256 px, deepest level
    assert tile(1, 512, 16) == 0 and tile(2, 640, 8) == 0  # too little work: the direct kernel is faster
    assert tile(1, 32, 512) == 0  # too few channels
    assert tile(1, 512, 64, co=3) == 0  # e.g. conv_out to RGB


def _applies(x, w, stride=(1, 1), padding=(1, 1)):
    return winograd.applies(x, w, stride, padding)


def test_taken_only_for_float32_cpu_3x3_stride_1(one_thread):
    w = torch.zeros(128, 128, 3, 3)
    big = torch.zeros(1, 128, 64, 64)
    assert _applies(big, w)
    assert not _applies(torch.zeros(1, 128, 16, 16), w)  # too small a map
    assert not _applies(torch.zeros(1, 32, 64, 64), torch.zeros(32, 32, 3, 3))  # too few channels
    assert not _applies(big, w, stride=(2, 2))
    assert not _applies(big, w, padding=(0, 0))
    assert not _applies(big, torch.zeros(128, 128, 1, 1), padding=(0, 0))
    assert not _applies(big.bfloat16(), w.bfloat16())
    assert not _applies(big.half(), w.half())
    assert not _applies(big.requires_grad_(), w)  # autograd goes the plain way


def test_workspace_reuses_its_buffers_and_frees_them():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 12, 12, generator=g)
    w, b = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, generator=g)
    fresh = winograd.conv3x3(x, w, b, 4)
    with winograd.workspace():
        first = winograd.conv3x3(x, w, b, 4)
        held = dict(winograd._local.buffers)
        second = winograd.conv3x3(x, w, b, 4)
        assert all(winograd._local.buffers[k] is v for k, v in held.items())  # no new buffer on the second call
        assert first.data_ptr() != second.data_ptr()  # results are never a workspace buffer
    assert winograd._local.buffers is None
    assert torch.equal(first, fresh) and torch.equal(second, fresh)


def test_a_scratch_buffer_starts_at_the_largest_size_its_key_needed_before():
    """A buffer grown step by step would be faulted in anew at each step, in every call: the next scratch
    allocates the largest size at once, and later smaller and larger requests share that memory."""
    from photo_restoration import scratch

    key = ("test-largest", 1)
    assert scratch.buffer(key, 10, torch.float32) is None  # outside a scratch
    with scratch.scratch():
        scratch.buffer(key, 10, torch.float32)
        scratch.buffer(key, 4000, torch.float32)
    with scratch.scratch():
        small = scratch.buffer(key, 10, torch.float32)
        large = scratch.buffer(key, 4000, torch.float32)
        assert small.numel() == 10 and large.numel() == 4000 and small.data_ptr() == large.data_ptr()


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@pytest.mark.parametrize("make", [
    lambda: ops.Conv2d(128, 128, 3, padding=1),
    lambda: winograd.Conv2d(128, 128, 3, padding=1),
    lambda: codeformer_conv3x3(128, 128),
])
def test_layers_take_it(make, counted, one_thread):
    torch.manual_seed(0)
    layer = make().eval()
    x = torch.randn(1, 128, 64, 64)
    with torch.inference_mode():
        got = layer(x)
        ref = _reference(x, layer.weight, layer.bias)
    assert counted == [x.shape]
    assert _rel(got, ref) < 3e-5


def test_supir_unet_conv_takes_it(counted, one_thread):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 320, 32, 32, generator=g)  # the 32x32 level of a 256 px call, CFG batch 2
    w, b = torch.randn(320, 320, 3, 3, generator=g) / 54, torch.randn(320, generator=g)
    got = supir_conv2d(x, w, b, (1, 1), (1, 1))
    assert counted == [x.shape]
    assert got.is_contiguous()
    assert _rel(got, _reference(x, w, b)) < 3e-5


def test_fp16_storage_casts_before_the_transform(counted, one_thread):
    """An fp16-stored casting layer computes in the input's float32 on the up-cast weight."""
    torch.manual_seed(0)
    layer = ops.Conv2d(128, 128, 3, padding=1).half().eval()
    x = torch.randn(1, 128, 64, 64)
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == torch.float32 and counted
    assert _rel(got, _reference(x, layer.weight.float(), layer.bias.float())) < 3e-5
