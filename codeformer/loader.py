"""CodeFormer weights -> detected configuration -> network.

Accepts the released ``codeformer.pth`` (a dict with the network under ``params_ema``), a dict with ``params``,
a bare state dict, or a ``.safetensors`` file, and infers every hyper-parameter from key names and shapes.
The head count is the one thing shapes cannot tell (``in_proj_weight`` is 3d x d for any head count): it defaults
to the official 8 (or a safetensors metadata entry ``n_head``) and can be overridden by the caller.
"""
from __future__ import annotations

import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Mapping

import torch

from ..weightfile import read_weights, unwrap_state_dict
from .arch import CodeFormer, CodeFormerConfig

OFFICIAL_N_HEAD = 8
SIGNATURE_KEYS = ("position_emb", "quantize.embedding.weight", "feat_emb.weight", "idx_pred_layer.1.weight",
                  "encoder.blocks.0.weight", "generator.blocks.0.weight")


def detect_config(state_dict: Mapping[str, Any], name: str = "state dict") -> dict:
    """Every hyper-parameter of :class:`CodeFormerConfig`, read from the shapes and keys of ``state_dict``.

    Works on real, meta or any tensor-like values with ``.shape``. ``n_head`` is not recoverable from shapes and
    is reported as the official 8 (or the largest of 8, 4, 2, 1 dividing ``dim_embd``).
    """
    missing = [k for k in SIGNATURE_KEYS if k not in state_dict]
    if missing:
        raise ValueError(f"{name} is not a CodeFormer checkpoint: missing {missing[:5]}"
                         f"{_sample_of(state_dict)}")

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ValueError(f"{name}: CodeFormer key {key!r} is missing (truncated or different network?)")
        return tuple(state_dict[key].shape)

    nf = shape("encoder.blocks.0.weight")[0]
    latent_size, dim_embd = shape("position_emb")
    codebook_size, emb_dim = shape("quantize.embedding.weight")
    blocks = _block_kinds(state_dict, "encoder.blocks.", name)
    # Level structure: ResBlocks (with optional attention) separated by Downsamples; then mid R, A, R, norm, conv.
    body = blocks[1:-5]
    levels: list[list[int]] = [[]]
    attn_levels: set[int] = set()
    for index, kind in body:
        if kind == "down":
            levels.append([])
        elif kind == "res":
            levels[-1].append(index)
        elif kind == "attn":
            attn_levels.add(len(levels) - 1)
    res_blocks = len(levels[0])
    if not res_blocks or any(len(level) != res_blocks for level in levels):
        raise ValueError(f"{name}: unexpected encoder layout {[k for _, k in blocks]}")
    ch_mult = []
    for level in levels:
        width = shape(f"encoder.blocks.{level[-1]}.conv2.weight")[0]
        if width % nf:
            raise ValueError(f"{name}: encoder width {width} is not a multiple of nf {nf}")
        ch_mult.append(width // nf)
    latent_hw = int(round(latent_size ** 0.5))
    img_size = latent_hw * 2 ** (len(levels) - 1)
    attn_resolutions = sorted(img_size // 2 ** level for level in attn_levels)
    n_layers = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"ft_layers\.(\d+)\.", k))),
                       default=-1)
    dim_mlp = shape("ft_layers.0.linear1.weight")[0] if n_layers else 2 * dim_embd
    connect_list = sorted({m.group(1) for k in state_dict if (m := re.match(r"fuse_convs_dict\.(\d+)\.", k))},
                          key=int)
    n_head = next(h for h in (OFFICIAL_N_HEAD, 4, 2, 1) if dim_embd % h == 0)
    return {
        "nf": nf, "ch_mult": ch_mult, "res_blocks": res_blocks, "attn_resolutions": attn_resolutions,
        "img_size": img_size, "emb_dim": emb_dim, "codebook_size": codebook_size, "latent_size": latent_size,
        "dim_embd": dim_embd, "n_head": n_head, "n_layers": n_layers, "dim_mlp": dim_mlp,
        "connect_list": connect_list,
    }


def build_codeformer(config: Mapping[str, Any] | CodeFormerConfig, device: torch.device | str = "meta") -> CodeFormer:
    """An uninitialised CodeFormer for ``config`` (on the meta device by default; materialise it by loading)."""
    cfg = config if isinstance(config, CodeFormerConfig) else make_config(config)
    with torch.device(device):
        return CodeFormer(cfg)


def make_config(config: Mapping[str, Any]) -> CodeFormerConfig:
    known = {f.name for f in fields(CodeFormerConfig)}
    unknown = set(config) - known
    if unknown:
        raise ValueError(f"unknown CodeFormer config entries {sorted(unknown)}; known: {sorted(known)}")
    values = dict(config)
    for key in ("ch_mult", "attn_resolutions"):
        if key in values:
            values[key] = tuple(int(v) for v in values[key])
    if "connect_list" in values:
        values["connect_list"] = tuple(str(v) for v in values["connect_list"])
    return CodeFormerConfig(**values)


def read_state_dict(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The network's tensors from a file (unwrapping ``params_ema`` / ``params``) and any safetensors metadata."""
    return read_weights(source, "CodeFormer weights")


def load_codeformer(source: str | Path | Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, **overrides: Any) -> CodeFormer:
    """A ready CodeFormer (eval mode, no grad) on ``device`` in ``dtype`` from a file or a state dict.

    ``overrides`` replace detected hyper-parameters, chiefly ``n_head`` (not recoverable from shapes).
    Wrong or incomplete weights raise ValueError naming the file and the missing/unexpected keys.
    """
    if isinstance(source, Mapping):
        name, metadata = "state dict", {}
        sd = unwrap_state_dict(source, name)  # the pack's one reader: ../weightfile.py
    else:
        name = str(source)
        sd, metadata = read_state_dict(source)
    config = detect_config(sd, name)
    if "n_head" in metadata and metadata["n_head"].isdigit():
        config["n_head"] = int(metadata["n_head"])
    config.update(overrides)
    model = build_codeformer(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{name} does not match the CodeFormer layout detected from it: "
                         f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:5]}")
    wrong = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{name}: tensors with unexpected shapes (key, file, expected): {wrong[:5]}")
    tensors = {k: sd[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def config_of(model: CodeFormer) -> dict:
    """The configuration a model was built with, as a plain dict (lists, not tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.config).items()}


def _block_kinds(state_dict: Mapping[str, Any], prefix: str, name: str) -> list[tuple[int, str]]:
    """(index, kind) of the numbered blocks under ``prefix``: conv | norm | res | attn | down."""
    keys: dict[int, set[str]] = {}
    for k in state_dict:
        if k.startswith(prefix):
            index, _, rest = k[len(prefix):].partition(".")
            if index.isdigit():
                keys.setdefault(int(index), set()).add(rest)
    kinds = []
    for index in sorted(keys):
        names = keys[index]
        if "conv1.weight" in names:
            kind = "res"
        elif "q.weight" in names:
            kind = "attn"
        elif "conv.weight" in names:
            kind = "down"
        elif "weight" in names and len(state_dict[f"{prefix}{index}.weight"].shape) == 1:
            kind = "norm"
        else:
            kind = "conv"
        kinds.append((index, kind))
    if [i for i, _ in kinds] != list(range(len(kinds))):
        raise ValueError(f"{name}: gaps in the numbering of {prefix}* (truncated file?)")
    return kinds


def _sample_of(state_dict: Mapping[str, Any]) -> str:
    keys = list(state_dict)[:5]
    return f"; its keys begin with {keys}" if keys else "; it is empty"
