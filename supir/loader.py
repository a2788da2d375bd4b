"""Load SUPIR from the files users have: an SDXL checkpoint (any SGM-layout finetune, or a ComfyUI
MODEL state dict) plus a SUPIR checkpoint (official fp32 ``SUPIR-v0Q/v0F.ckpt`` pickles, fp16
``.safetensors`` re-saves).

Every hyper-parameter except ``num_head_channels`` (official 64; not visible in shapes) is read from
the weight shapes. The network is built on the meta device and each tensor is read, converted to the
target dtype and placed one at a time, so the peak memory is the final weights plus one tensor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..weightfile import TensorSource, open_weights, read_weights
from . import ops
from .control import ADAPTER_CONFIG, SupirDiffusion, adapter_layout
from .denoiser import SupirDenoiser
from .unet import unet_config
from .vae import SCALE_FACTOR
IGNORED_KEYS = re.compile(r"(^|\.)(mask_LQ|denoiser\.sigmas|model_ema\.)")
UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
SUPIR_PREFIXES = ("model.", "")

# ---- reading tensors: the pack's one weight-file reader (../weightfile.py) --------------------------

def open_source(src: str | Path | Mapping | TensorSource, what: str = "checkpoint") -> TensorSource:
    """A :class:`TensorSource` for a path (safetensors read tensor by tensor, pickles weights-only) or a state dict."""
    return open_weights(src, what)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file (safetensors or ``torch.load(weights_only=True)``)."""
    return read_weights(path)[0]


# ---- detecting the configuration ----------------------------------------------------------------

def _shape(v: Any) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def _find_prefix(keys: Iterable[str], suffix: str, prefixes: Iterable[str], exclude: str = "") -> str | None:
    keys = set(keys)
    for p in prefixes:
        if p + suffix in keys and (not exclude or exclude not in p):
            return p
    return None


def detect_unet_config(sd: Mapping[str, Any], num_head_channels: int = 64) -> dict:
    """UNet hyper-parameters from the shapes of an SGM-layout UNet (or GLVControl) state dict.

    ``sd`` maps keys (relative to the UNet, or with a ``model.diffusion_model.`` / ``diffusion_model.`` /
    ``model.control_model.`` prefix) to tensors (meta tensors are fine) or shapes.
    """
    keys = list(sd)
    prefix = None
    for p in (*UNET_PREFIXES[:-1], "model.control_model.", "control_model.", ""):
        if p + "input_blocks.0.0.weight" in sd:
            prefix = p
            break
    if prefix is None:
        raise ValueError("no SDXL UNet weights found (no input_blocks.0.0.weight)")
    shp = {k[len(prefix):]: _shape(sd[k]) for k in keys if k.startswith(prefix)}
    mc, in_ch = shp["input_blocks.0.0.weight"][:2]

    blocks: dict[int, set[str]] = {}
    for k in shp:
        m = re.match(r"input_blocks\.(\d+)\.(.*)", k)
        if m:
            blocks.setdefault(int(m[1]), set()).add(m[2])

    def depth(block_prefix: str) -> int:
        ids = {int(m[1]) for k in shp for m in [re.match(re.escape(block_prefix) + r"transformer_blocks\.(\d+)\.", k)] if m}
        return max(ids) + 1 if ids else 0

    channel_mult, num_res, depths = [], [], []
    level_res, level_depth, ch = 0, 0, mc
    for i in range(1, max(blocks) + 1 if blocks else 1):
        names = blocks.get(i, set())
        if "0.op.weight" in names:  # downsample: closes a level
            channel_mult.append(ch // mc)
            num_res.append(level_res)
            depths.append(level_depth)
            level_res, level_depth = 0, 0
            continue
        if "0.in_layers.2.weight" not in names:
            raise ValueError(f"unexpected UNet layout at input_blocks.{i} (keys {sorted(names)[:4]})")
        ch = shp[f"input_blocks.{i}.0.in_layers.2.weight"][0]
        level_res += 1
        if "1.proj_in.weight" in names:
            if len(shp[f"input_blocks.{i}.1.proj_in.weight"]) != 2:
                raise ValueError("convolutional proj_in in the spatial transformers: an SD1.x/SD2.x UNet, not SDXL")
            level_depth = depth(f"input_blocks.{i}.1.")
    channel_mult.append(ch // mc)
    num_res.append(level_res)
    depths.append(level_depth)

    ctx = [s[1] for k, s in shp.items() if k.endswith("attn2.to_k.weight")]
    if "label_emb.0.0.weight" not in shp:
        raise ValueError("no label_emb (ADM vector input): an SD1.x/SD2.x UNet, not SDXL")
    cfg = unet_config(
        in_channels=in_ch,
        out_channels=shp["out.2.weight"][0] if "out.2.weight" in shp else in_ch,
        model_channels=mc,
        channel_mult=channel_mult,
        num_res_blocks=num_res,
        transformer_depth=depths,
        transformer_depth_middle=depth("middle_block.1."),
        context_dim=ctx[0] if ctx else 2048,
        adm_in_channels=shp["label_emb.0.0.weight"][1],
        num_head_channels=num_head_channels,
    )
    return cfg


def detect_adapter_config(sd: Mapping[str, Any], unet_cfg: dict) -> dict:
    """ZeroSFT hidden width, project_channel_scale and ZeroCrossAttn heads from ``project_modules`` shapes."""
    prefix = next((p for p in ("model.diffusion_model.project_modules.", "diffusion_model.project_modules.",
                               "project_modules.") if p + "0.zero_conv.weight" in sd), None)
    if prefix is None:
        raise ValueError("no SUPIR adapters (project_modules.0.zero_conv.weight)")
    shp = {k[len(prefix):]: _shape(v) for k, v in sd.items() if k.startswith(prefix)}
    label, feature = shp["0.zero_conv.weight"][1], shp["0.zero_conv.weight"][0]
    cfg = {**ADAPTER_CONFIG, "sft_hidden": shp["0.mlp_shared.0.weight"][0],
           "project_channel_scale": label / (feature / 2)}
    if cfg["project_channel_scale"] == int(cfg["project_channel_scale"]):
        cfg["project_channel_scale"] = int(cfg["project_channel_scale"])
    heads = {}
    layout = adapter_layout(unet_cfg, cfg)
    for i, spec in enumerate(layout):
        if spec["type"] == "cross_attn" and f"{i}.attn.to_q.weight" in shp:
            heads[spec["k"]] = shp[f"{i}.attn.to_q.weight"][0] // cfg["cross_attn_head_dim"]
    cfg["cross_attn_heads"] = heads
    return cfg


def build_diffusion(unet_cfg: dict, adapter_cfg: dict | None = None, device: str | torch.device = "meta") -> SupirDiffusion:
    """SupirDiffusion for a config (on the meta device by default: no memory until loaded), built from
    casting layers (:mod:`.ops`) so that a host memory manager may load it partially."""
    with torch.device(device):
        return ops.make_castable(SupirDiffusion(unet_cfg, adapter_cfg))


# ---- loading ------------------------------------------------------------------------------------

def _describe_non_sdxl(keys: list[str]) -> str | None:
    text = " ".join(keys[:4000])
    if "double_blocks." in text or "single_blocks." in text:
        return "a Flux model"
    if "joint_blocks." in text:
        return "an SD3 model"
    if any(".control_model." in k or k.startswith("control_model.") for k in keys) and not any(
            "output_blocks." in k for k in keys):
        return "a SUPIR checkpoint (control weights only); pass it as the SUPIR file"
    if any("transformer_blocks" in k and k.startswith(("model.diffusion_model.", "diffusion_model.")) for k in keys):
        return None
    if any(k.startswith(("model.diffusion_model.", "diffusion_model.", "input_blocks.")) for k in keys):
        return None
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys):
        return "a VAE only"
    if any("text_model." in k or "transformer.resblocks" in k for k in keys):
        return "a text encoder only"
    return "not a diffusion checkpoint"


def sdxl_unet_view(src: TensorSource) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The UNet key prefix of an SDXL source and the UNet's shapes (keys relative to it); clear errors."""
    keys = src.keys()
    kind = _describe_non_sdxl(keys)
    if kind and any(word in kind for word in ("Flux", "SD3", "SUPIR")):
        raise ValueError(f"{src.name}: expected an SDXL checkpoint but this is {kind}")
    prefix = next((p for p in UNET_PREFIXES if p + "input_blocks.0.0.weight" in set(keys)
                   and p + "output_blocks.0.0.in_layers.0.weight" in set(keys)), None)
    if prefix is None:
        raise ValueError(f"{src.name}: expected an SDXL checkpoint (SGM layout, model.diffusion_model.*) "
                         f"but found {kind or 'no UNet weights'}; first keys: {keys[:3]}")
    shapes = {k[len(prefix):]: src.shape(k) for k in keys
              if k.startswith(prefix) and not k[len(prefix):].startswith("project_modules.")}
    ctx = [s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")]
    if "label_emb.0.0.weight" not in shapes or (ctx and ctx[0] in (768, 1024)):
        what = "SD1.x (context 768)" if ctx and ctx[0] == 768 else "SD2.x (context 1024)" if ctx and ctx[0] == 1024 \
            else "not SDXL (no label_emb)"
        raise ValueError(f"{src.name}: expected an SDXL checkpoint but this UNet is {what}; "
                         "SUPIR needs an SDXL model")
    return prefix, shapes


def supir_view(src: TensorSource) -> str:
    """The prefix under which a SUPIR source holds ``control_model.*`` / ``diffusion_model.project_modules.*``."""
    keys = set(src.keys())
    for p in SUPIR_PREFIXES:
        if p + "control_model.input_hint_block.0.weight" in keys:
            if not any(k.startswith(p + "diffusion_model.project_modules.") for k in keys):
                raise ValueError(f"{src.name}: SUPIR checkpoint without adapters "
                                 "(no model.diffusion_model.project_modules.*)")
            return p
    if any("output_blocks." in k for k in keys):
        raise ValueError(f"{src.name}: expected a SUPIR checkpoint (SUPIR-v0Q/v0F) but this is an SDXL/UNet "
                         "checkpoint; pass it as the SDXL model")
    raise ValueError(f"{src.name}: not a SUPIR checkpoint (no model.control_model.input_hint_block.0.weight); "
                     f"first keys: {sorted(keys)[:3]}")


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def materialize(model: nn.Module, sources: list[tuple[str, TensorSource, str]], dtype: torch.dtype,
                device: str | torch.device = "cpu", compute_dtype: torch.dtype | None = None) -> None:
    """Fill a meta-device ``model`` tensor by tensor. ``sources``: (model key prefix, source, source prefix);
    the first whose model prefix matches a parameter name supplies it. Raises ValueError naming the file
    for missing keys or wrong shapes.

    Storage dtype: ``dtype``, except that 16-bit float tensors of the file are never up-cast to a wider
    ``dtype`` (:func:`ops.storage_dtype`): the casting layers compute in ``compute_dtype`` per call, so
    fp32 compute from the published fp16 SDXL gives the same numbers with half the weight memory.

    A tensor of an in-memory state dict (a pickle once loaded, or a caller's dict) that is already in the storage
    dtype and on ``device`` becomes the parameter as it is, as the official builders do: no second copy of the
    weights (14.4 GiB at fp32). The model never writes into its parameters."""
    compute_dtype = compute_dtype or ops.default_compute_dtype(dtype)
    missing: dict[str, list[str]] = {}
    for name, p in list(model.named_parameters()):
        for mprefix, src, sprefix in sources:
            if name.startswith(mprefix):
                break
        else:
            raise ValueError(f"no source for parameter {name}")
        key = sprefix + name[len(mprefix):]
        try:
            shape = src.shape(key)
        except KeyError:
            missing.setdefault(src.name, []).append(key)
            continue
        if tuple(shape) != tuple(p.shape):
            raise ValueError(f"{src.name}: {key} has shape {list(shape)}, the detected architecture needs "
                             f"{list(p.shape)}")
        t = src.get(key)
        target = ops.storage_dtype_for(name, t.ndim, ops.storage_dtype(t.dtype, dtype), compute_dtype)
        if t.dtype != target or torch.device(device) != t.device:
            t = t.to(device=device, dtype=target)
        _set_param(model, name, t.detach().contiguous())
        del t
    if missing:
        msgs = [f"{f}: {len(ks)} tensors missing (file truncated or not the expected model), e.g. {ks[:5]}"
                for f, ks in missing.items()]
        raise ValueError("; ".join(msgs))


def check_unexpected(model: nn.Module, sources: list[tuple[str, TensorSource, str]],
                     exclude: tuple[str, ...] = ("project_modules.",)) -> None:
    """Keys under a source prefix that the built model has no place for mean an architecture variant
    the detection did not see: refuse rather than silently drop weights. Stray keys (``mask_LQ``,
    ``denoiser.sigmas``) are ignored, and so are keys (relative to a source prefix) starting with
    ``exclude``: those another source supplies (SUPIR's adapters inside a merged SDXL file)."""
    wanted = set()
    for name in model.state_dict():
        for mprefix, src, sprefix in sources:
            if name.startswith(mprefix):
                wanted.add((id(src), sprefix + name[len(mprefix):]))
                break
    for mprefix, src, sprefix in sources:
        extra = [k for k in src.keys() if k.startswith(sprefix) and (id(src), k) not in wanted
                 and not k[len(sprefix):].startswith(exclude) and not IGNORED_KEYS.search(k)]
        if extra:
            raise ValueError(f"{src.name}: {len(extra)} unexpected tensors under '{sprefix}' (an architecture "
                             f"variant this loader does not know), e.g. {sorted(extra)[:5]}")


@dataclass
class SupirModel:
    diffusion: SupirDiffusion
    vae: Any = None  # supir.vae.SupirVAE (None until available)
    text: Any = None  # supir.text.SDXLTextConditioner | None
    denoiser: SupirDenoiser | None = None
    config: dict = field(default_factory=dict)

    @property
    def scale_factor(self) -> float:
        return getattr(self.vae, "scale_factor", SCALE_FACTOR)


def load_diffusion(sdxl: str | Path | Mapping | TensorSource, supir: str | Path | Mapping | TensorSource,
                   dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                   num_head_channels: int = 64, compute_dtype: torch.dtype | None = None) -> tuple[SupirDiffusion, dict]:
    """SupirDiffusion (UNet + adapters + GLVControl) from an SDXL and a SUPIR source; returns it and its config."""
    dtype = ops.as_dtype(dtype)
    s_src, p_src = open_source(sdxl, "SDXL checkpoint"), open_source(supir, "SUPIR checkpoint")
    try:
        uprefix, ushapes = sdxl_unet_view(s_src)
        sprefix = supir_view(p_src)
        try:
            ucfg = detect_unet_config(ushapes, num_head_channels)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{s_src.name}: cannot read the SDXL UNet layout ({exc})") from None
        pshapes = {k[len(sprefix):]: p_src.shape(k) for k in p_src.keys() if k.startswith(sprefix)}
        try:
            ccfg = detect_unet_config({k: v for k, v in pshapes.items() if k.startswith("control_model.")},
                                      num_head_channels)
            acfg = detect_adapter_config(pshapes, ucfg)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{p_src.name}: cannot read the SUPIR layout ({exc})") from None
        mismatch = {k: (ucfg[k], ccfg[k]) for k in ucfg if k not in ("out_channels",) and ucfg[k] != ccfg[k]}
        if mismatch:
            raise ValueError(f"{p_src.name}: its GLVControl does not match the SDXL UNet of {s_src.name}: "
                             f"(unet, control) {mismatch}")
        model = build_diffusion(ucfg, acfg)
        sources = [("diffusion_model.project_modules.", p_src, sprefix + "diffusion_model.project_modules."),
                   ("diffusion_model.", s_src, uprefix),
                   ("control_model.", p_src, sprefix + "control_model.")]
        check_unexpected(model, [src for src in sources if src[2]])  # a bare UNet prefix "" holds everything
        materialize(model, sources, dtype, device, compute_dtype)
    finally:
        s_src.close()
        p_src.close()
    model.compute_dtype = compute_dtype or ops.default_compute_dtype(dtype)
    model.eval()
    return model, {"unet": ucfg, "adapter": acfg, "dtype": str(dtype).replace("torch.", ""),
                   "num_head_channels": num_head_channels}


def load_supir(sdxl: str | Path | Mapping, supir: str | Path | Mapping, dtype: torch.dtype | str = torch.float32,
               vae_dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               num_head_channels: int = 64, compute_dtype: torch.dtype | None = None,
               with_vae: bool = True, with_text: bool = True) -> SupirModel:
    """The whole SUPIR model from an SDXL checkpoint (path or SGM / ComfyUI ``diffusion_model.*`` state dict)
    and a SUPIR checkpoint (path or state dict). ``mask_LQ`` / ``denoiser.sigmas`` are ignored.
    fp8 ``dtype`` stores Linear/Conv weights in float8_e4m3fn and computes in bfloat16 (``compute_dtype``)."""
    diffusion, cfg = load_diffusion(sdxl, supir, dtype, device, num_head_channels, compute_dtype)
    vae = text = None
    if with_vae or with_text:
        vae, text = _load_vae_text(sdxl, supir, ops.as_dtype(vae_dtype), ops.as_dtype(dtype), device,
                                   with_vae, with_text, cfg["unet"]["adm_in_channels"])
    return SupirModel(diffusion=diffusion, vae=vae, text=text, denoiser=SupirDenoiser(diffusion), config=cfg)


class LazyStateDict(Mapping):
    """A read-only state-dict view of some sources under key prefixes, reading each tensor on access
    (nothing cached), so a builder that converts tensor by tensor never holds a second full copy."""

    def __init__(self, parts: list[tuple[TensorSource, str, str]], keep: tuple[str, ...] = ("",)):
        # parts: (source, source prefix, key prefix in this view); keep: view-key prefixes to keep
        self._index: dict[str, tuple[TensorSource, str]] = {}
        for src, sprefix, vprefix in parts:
            for k in src.keys():
                view_key = vprefix + k[len(sprefix):]
                if k.startswith(sprefix) and view_key.startswith(keep):
                    self._index[view_key] = (src, k)

    def __getitem__(self, key: str) -> torch.Tensor:
        src, k = self._index[key]
        return src.get(k)

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index


def _load_vae_text(sdxl, supir, vae_dtype, dtype, device, with_vae, with_text, adm_in_channels):
    """VAE (+ SUPIR's denoise encoder) and the SDXL text conditioner, built by :mod:`.vae` / :mod:`.text`."""
    from .text import build_text_conditioner
    from .vae import build_vae

    s_src, p_src = open_source(sdxl, "SDXL checkpoint"), open_source(supir, "SUPIR checkpoint")
    try:
        vae = text = None
        if with_vae:
            vsd = LazyStateDict([(s_src, "first_stage_model.", ""),
                                 (p_src, "first_stage_model.denoise_encoder.", "denoise_encoder."),
                                 (p_src, "model.first_stage_model.denoise_encoder.", "denoise_encoder.")],
                                keep=("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "denoise_encoder."))
            if vsd:
                try:
                    vae = build_vae(vsd, dtype=vae_dtype, device=device)
                except ValueError as exc:
                    raise ValueError(f"{s_src.name} / {p_src.name}: {exc}") from None
                ops.make_castable(vae)
                # whole-or-nothing for a host memory manager: the tiled VAE reads GroupNorm affines and
                # its device/dtype from the parameters directly (activations, not weights, dominate)
                vae.partial_load = False
        if with_text:
            tsd = LazyStateDict([(s_src, "conditioner.embedders.", "")])
            proj = "1.model.text_projection"
            if tsd and proj in tsd:
                pooled = s_src.shape("conditioner.embedders." + proj)[1]
                size_dim = (adm_in_channels - pooled) // 6
                compute = dtype if not ops.is_fp8(dtype) else torch.bfloat16
                try:
                    text = build_text_conditioner(tsd, dtype=compute, device=device, size_embed_dim=size_dim)
                except ValueError as exc:
                    raise ValueError(f"{s_src.name}: {exc}") from None
                if text is not None:
                    ops.make_castable(text)  # raw parameters remain (bigG): hosts load it whole
    finally:
        s_src.close()
        p_src.close()
    return vae, text
