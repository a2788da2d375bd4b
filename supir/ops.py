"""Layers whose stored weights may differ in dtype and device from the activations, honouring the
casting contract of ComfyUI's ``comfy.ops`` (without importing ComfyUI).

Official: SUPIR (SGM) uses plain ``torch.nn`` layers. Deliberately different: every Linear, Conv2d,
GroupNorm, LayerNorm and Embedding of the pack's SUPIR networks casts its parameters at call time:

* storage dtype != compute dtype (fp8 or fp16 storage, bf16/fp32 compute): the parameters are cast
  to the input's dtype per call ("per-layer up-cast"); when storage and compute agree no copy is made;
* the contract of ``comfy.ops`` casting layers: the attributes ``comfy_cast_weights`` (False) and
  ``weight_function`` / ``bias_function`` (empty lists). A host memory manager (ComfyUI's
  ``ModelPatcher.load(lowvram_model_memory=...)``, or 0.33's ``ModelPatcherDynamic``) leaves the
  weights of modules that do not fit on the offload device, sets ``comfy_cast_weights = True`` and may
  add weight functions (LoRA patches). Such a layer then casts per call through the host's caster
  (:func:`set_host_caster`; ComfyUI's ``comfy.ops.cast_bias_weight``, which also streams dynamic-VRAM
  weights) or, without a host, through :func:`plain_cast` (``.to(device, dtype)`` + the functions).

Inside :func:`reused_cast_buffer` (one denoiser call), a CPU up-cast of a large weight that a single op consumes
is written into one reused buffer instead of a fresh tensor per layer: a fresh tensor above glibc's mmap
threshold is faulted in page by page on every call (24 ms against 2.6 ms for a 1280x10240 fp16 weight).

:class:`Conv2d` is also :class:`photo_restoration.winograd.Conv2d`: its 3x3 convolutions of large float32 CPU maps
run as Winograd convolutions on the cast weights.

:func:`make_castable` turns the plain ``torch.nn`` layers of an already built network into these
classes in place (the classes add no state), so model code written with ``torch.nn`` needs no change.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..groupnorm import group_norm as exact_group_norm
from .. import gemm
from .. import scratch as scratch_buffers
from ..layout import conv1x1 as gemm_conv1x1
from ..winograd import Conv2d as WinogradConv2d

FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)

DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
if FP8_DTYPES:
    DTYPE_NAMES.update({"fp8": FP8_DTYPES[0], "fp8_e4m3fn": FP8_DTYPES[0], "float8_e4m3fn": FP8_DTYPES[0]})


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float16`` or a name such as ``"fp16"``, ``"bf16"``, ``"fp8_e4m3fn"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_NAMES)}") from None


def default_compute_dtype(storage: torch.dtype) -> torch.dtype:
    """fp8 storage computes in bfloat16; every other dtype computes in itself."""
    return torch.bfloat16 if is_fp8(storage) else storage


def storage_dtype(file_dtype: torch.dtype, requested: torch.dtype) -> torch.dtype:
    """The dtype a weight is kept in: the requested one, except that a 16-bit float from the file is
    never up-cast to fp32/fp64 at load (the layers cast per call instead: same values, half the RAM)."""
    if (requested.is_floating_point and file_dtype in (torch.float16, torch.bfloat16)
            and torch.finfo(requested).bits > 16):
        return file_dtype
    return requested


def storage_dtype_for(name: str, tensor_dim: int, dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    """Dtype a parameter is stored in: fp8 only for matrices/kernels (ndim >= 2); vectors (biases,
    norm affines) stay in the compute dtype, which costs little and keeps the norms exact."""
    if is_fp8(dtype) and tensor_dim < 2:
        return compute_dtype
    return dtype


# ---- casting ------------------------------------------------------------------------------------

Caster = Callable[[nn.Module, torch.Tensor], Any]  # (layer, input) -> context manager -> (weight, bias)
_host_caster: Caster | None = None


def set_host_caster(caster: Caster | None) -> None:
    """Install the host's per-layer caster (None: :func:`plain_cast`). It is called as
    ``with caster(layer, x) as (weight, bias)`` for layers with ``comfy_cast_weights`` or weight
    functions, and must return the parameters on ``x``'s device in ``x``'s dtype."""
    global _host_caster
    _host_caster = caster


def _cast(p: torch.Tensor | None, x: torch.Tensor, copy: bool = False) -> torch.Tensor | None:
    if p is None or (not copy and p.dtype == x.dtype and p.device == x.device):
        return p
    if is_fp8(p.dtype) and p.device.type == "cpu" and x.device.type == "cpu" and x.dtype.is_floating_point:
        return fp8_upcast(p, x.dtype)
    return p.to(device=x.device, dtype=x.dtype, copy=copy)


REUSE_MIN_NUMEL = 1 << 20  # smaller casts come from the heap without page faults
_reuse = scratch_buffers._local  # the thread's scratch (``.buffers``), shared with the Winograd convolutions

# within: :func:`_cast_once` writes large CPU up-casts into one scratch buffer per compute dtype
# (:mod:`photo_restoration.scratch`), reused layer after layer and freed on exit (the same values as a fresh cast;
# only the allocation differs)
reused_cast_buffer = scratch_buffers.scratch


def _cast_once(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """:func:`_cast` for a weight that one op consumes before the next cast on this thread: inside
    :func:`reused_cast_buffer`, a large contiguous 16-bit or fp8 CPU weight is up-cast into the reused buffer."""
    if (not scratch_buffers.active() or p is None or p.dtype == x.dtype or p.device.type != "cpu"
            or x.device.type != "cpu" or not x.dtype.is_floating_point or not p.dtype.is_floating_point
            or p.numel() < REUSE_MIN_NUMEL or not p.is_contiguous() or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or p.requires_grad))):
        return _cast(p, x)
    n = p.numel()
    out = scratch_buffers.buffer("cast", n, x.dtype)
    if is_fp8(p.dtype):  # the table gather of :func:`fp8_upcast`, its codes and result in reused buffers
        codes = scratch_buffers.buffer("cast", n, torch.int32).copy_(p.view(torch.uint8).reshape(-1))
        return torch.index_select(_fp8_table(p.dtype, x.dtype), 0, codes, out=out).view(p.shape)
    return out.view(p.shape).copy_(p)


_FP8_TABLES: dict[tuple[torch.dtype, torch.dtype], torch.Tensor] = {}


def fp8_upcast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w.to(dtype)`` for an fp8 tensor on the CPU through a 256-entry table (bit-identical; a gather
    is 2.6x faster than ATen's element-wise fp8 conversion, the cost of every fp8 layer call)."""
    codes = w.detach().contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return _fp8_table(w.dtype, dtype).index_select(0, codes).view(w.shape)


def _fp8_table(fp8: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """The 256 values of the fp8 format ``fp8`` in ``dtype``, indexed by their bit pattern."""
    table = _FP8_TABLES.get((fp8, dtype))
    if table is None:
        table = _FP8_TABLES[(fp8, dtype)] = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8).to(dtype)
    return table


@contextlib.contextmanager
def plain_cast(layer: nn.Module, x: torch.Tensor) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Weight and bias of ``layer`` on ``x``'s device and dtype, with ``weight_function`` /
    ``bias_function`` applied (to a copy: the stored parameters are never modified)."""
    wf, bf = layer.weight_function, layer.bias_function
    weight = _cast(layer.weight, x, copy=bool(wf))
    bias = _cast(layer.bias, x, copy=bool(bf))
    for f in wf:
        weight = f(weight)
    if bias is not None:
        for f in bf:
            bias = f(bias)
    yield weight, bias


def cast_weights(layer: nn.Module, x: torch.Tensor):
    """``with cast_weights(layer, x) as (weight, bias)``: the host's caster inside a memory manager,
    else :func:`plain_cast`."""
    if _host_caster is not None and layer.weight is not None:
        return _host_caster(layer, x)
    return plain_cast(layer, x)


class CastWeightBiasOp:
    """The attributes ComfyUI's memory manager looks for (``comfy.ops.CastWeightBiasOp``)."""

    comfy_cast_weights = False
    weight_function: list = []
    bias_function: list = []

    def _host_managed(self) -> bool:
        return self.comfy_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0


class Linear(nn.Linear, CastWeightBiasOp):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._host_managed():
            with cast_weights(self, x) as (w, b):
                return gemm.linear(x, w, b)
        return gemm.linear(x, _cast_once(self.weight, x), _cast(self.bias, x))


class Conv2d(WinogradConv2d, CastWeightBiasOp):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._host_managed():
            with cast_weights(self, x) as (w, b):
                return self._conv_forward(x, w, b)
        return self._conv_forward(x, _cast_once(self.weight, x), _cast(self.bias, x))


class GroupNorm(nn.GroupNorm, CastWeightBiasOp):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(self, x)


def layer_weights(layer: nn.Module, x: torch.Tensor):
    """``with layer_weights(layer, x) as (weight, bias)``: the parameters of a plain or casting layer as its
    own ``forward`` would use them (the host's or plain casting when host-managed, else :func:`_cast_once`: use
    the weight in one op, before the next cast)."""
    if getattr(layer, "_host_managed", None) is not None and layer._host_managed():
        return cast_weights(layer, x)
    return contextlib.nullcontext((_cast_once(layer.weight, x), _cast(layer.bias, x)))


def linear_add(layer: nn.Module, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``layer(x) + other`` for a plain or casting Linear, the sum fused into the GEMM where
    :func:`photo_restoration.gemm.linear_add` can (``other`` unchanged)."""
    with layer_weights(layer, x) as (w, b):
        return gemm.linear_add(x, other, w, b)


def geglu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``a * gelu(gate)`` with ``a, gate = layer(x).chunk(2, -1)`` (SGM's GEGLU) for a plain or casting Linear:
    two GEMMs over the weight's halves, the GELU and the product fused into them where
    :mod:`photo_restoration.gemm` can (the ``2 x`` wide projection is never built)."""
    with layer_weights(layer, x) as (w, b):
        n = w.shape[0] // 2
        gate = gemm.linear_gelu(x, w[n:], None if b is None else b[n:])
        return gemm.linear_mul(x, gate, w[:n], None if b is None else b[:n])


def conv1x1(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a plain or casting 1x1 convolution, as one GEMM on a channels-last map
    (:func:`photo_restoration.layout.conv1x1`)."""
    with layer_weights(layer, x) as (w, b):
        return gemm_conv1x1(x, w, b)


def group_norm(layer: nn.GroupNorm, x: torch.Tensor, silu: bool = False,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``layer(x)`` (then SiLU when ``silu``) for a plain or casting GroupNorm, through the pack's exact
    GroupNorm (:func:`photo_restoration.groupnorm.group_norm`: float32 CPU maps in either memory layout,
    written into ``out`` when it fits; ``out`` may be ``x``, for an in-place norm of a fresh intermediate)."""
    with layer_weights(layer, x) as (w, b):
        return exact_group_norm(x, layer.num_groups, w, b, layer.eps, silu=silu, out=out)


class LayerNorm(nn.LayerNorm, CastWeightBiasOp):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._host_managed():
            with cast_weights(self, x) as (w, b):
                return F.layer_norm(x, self.normalized_shape, w, b, self.eps)
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)


class Embedding(nn.Embedding, CastWeightBiasOp):
    """Looks up in the stored dtype (ids carry no dtype), on the ids' device."""

    bias = None  # the casting contract reads ``layer.bias``

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self._host_managed() or weight.device != ids.device:
            like = torch.empty((), device=ids.device, dtype=weight.dtype)
            with cast_weights(self, like) as (weight, _):
                pass
        return F.embedding(ids, weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


def linear_cm(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for channel-major tokens: ``x`` is ``[in, ...]``, the result ``[out, ...]``, computed as
    ``weight @ x`` (the weight as the GEMM's left operand; on the CPU 15-20 % faster than ``x @ weight.T``
    at 128 token rows). The weights come through the layer's casting."""
    if layer._host_managed():
        with cast_weights(layer, x) as (w, b):
            return _linear_cm(x, w, b)
    return _linear_cm(x, _cast_once(layer.weight, x), _cast(layer.bias, x))


def _linear_cm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(x.shape[0], -1)
    out = torch.mm(w, x2) if b is None else torch.addmm(b[:, None], w, x2)
    return out.view(w.shape[0], *x.shape[1:])


def layer_norm_cm(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` of a LayerNorm over the first dimension of channel-major tokens ``[C, ...]``; the
    result is a channel-major view of token-major storage (the norm needs its channels innermost)."""
    perm = list(range(1, x.dim())) + [0]
    inv = [x.dim() - 1] + list(range(x.dim() - 1))
    return layer(x.permute(perm)).permute(inv)


CASTABLE: dict[type, type] = {nn.Linear: Linear, nn.Conv2d: Conv2d, nn.GroupNorm: GroupNorm,
                              nn.LayerNorm: LayerNorm, nn.Embedding: Embedding}


def make_castable(model: nn.Module) -> nn.Module:
    """Turn every plain ``torch.nn`` Linear / Conv2d / GroupNorm / LayerNorm / Embedding of ``model``
    into the casting layer of this module, in place (exact class match only: subclasses with their own
    forward are left alone). Returns ``model``."""
    for m in model.modules():
        new = CASTABLE.get(type(m))
        if new is not None:
            m.__class__ = new
    return model


def partial_load_safe(model: nn.Module) -> bool:
    """True when a memory manager may leave any layer's weights on the offload device: every parameter
    belongs to a casting layer, and no module opted out with ``partial_load = False``."""
    for m in model.modules():
        if getattr(m, "partial_load", True) is False:
            return False
        own = list(m.parameters(recurse=False))
        if own and not isinstance(m, CastWeightBiasOp):
            return False
    return True


def cast_layer_count(model: nn.Module) -> int:
    """How many layers currently cast per call (``comfy_cast_weights`` set by a memory manager)."""
    return sum(1 for m in model.modules() if isinstance(m, CastWeightBiasOp) and m.comfy_cast_weights)


def load_partially(model: nn.Module, device: torch.device | str, budget_bytes: int) -> dict:
    """A plain-torch partial load (what ComfyUI's lowvram mode does, for use without ComfyUI): move the
    largest casting layers to ``device`` while their weights fit in ``budget_bytes``; every other casting
    layer keeps its weights where they are (CPU, pinned when possible) with ``comfy_cast_weights`` set,
    so each call casts them to the device. Parameters outside casting layers and buffers always move.
    Returns ``{"loaded": bytes, "streamed": bytes, "cast_layers": n}``."""
    device = torch.device(device)
    layers = [m for m in model.modules() if isinstance(m, CastWeightBiasOp)]
    size = {id(m): sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)) for m in layers}
    used = streamed = 0
    cast = 0
    for m in sorted(layers, key=lambda m: -size[id(m)]):
        if used + size[id(m)] <= budget_bytes:
            m.to(device)
            used += size[id(m)]
            m.comfy_cast_weights = False
        else:
            if device.type == "cuda":
                for name, p in list(m.named_parameters(recurse=False)):
                    if p.device.type == "cpu" and not p.is_pinned():
                        m._parameters[name] = nn.Parameter(p.data.pin_memory(), requires_grad=False)
            m.comfy_cast_weights = True
            streamed += size[id(m)]
            cast += 1
    for m in model.modules():
        if not isinstance(m, CastWeightBiasOp):
            for name, p in list(m.named_parameters(recurse=False)):
                m._parameters[name] = nn.Parameter(p.data.to(device), requires_grad=False)
                used += p.numel() * p.element_size()
            for name, b in list(m.named_buffers(recurse=False)):
                m._buffers[name] = b.to(device)
    return {"loaded": used, "streamed": streamed, "cast_layers": cast}
