"""Random full-size SDXL and SUPIR checkpoint files, written from the key manifests of the published files
(``../shared/parity/supir/manifests``), for the slow full-size tests and benchmarks.

``sd_xl_base_1.0.safetensors``: every key the published SDXL base holds for SUPIR (float16, 6.9 GB), written
tensor by tensor so that writing needs almost no memory. ``SUPIR-v0Q.ckpt``: the flat dict of the published
SUPIR checkpoint as a weights-only pickle (float16 here, 2.7 GB, as the community fp16 re-saves; the published
file is float32). Values are random but tame: weights N(0, 0.5 / sqrt(fan_in)), norm weights 1, biases 0, so
full-size networks stay finite in bf16 and fp16.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Iterator

import torch

DTYPE_TAG = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
TORCH_DTYPE = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}


def read_manifest(path: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """key -> (shape, dtype) of a manifest file."""
    keys = json.loads(Path(path).read_text())["keys"]
    return {k: (tuple(v["shape"]), TORCH_DTYPE[v["dtype"]]) for k, v in keys.items()}


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A deterministic random tensor for ``key`` (independent of the order keys are written in)."""
    if dtype == torch.int64:  # position ids
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous()
    leaf = key.rsplit(".", 1)[-1]
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        gen = torch.Generator().manual_seed(seed * 1_000_003 ^ zlib.crc32(key.encode()))
        return (torch.randn(shape, generator=gen) * (0.5 / math.sqrt(fan_in))).to(dtype)
    if leaf in ("weight", "logit_scale"):  # 1-D weights are norm scales
        return torch.ones(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def _tensors(manifest: dict, seed: int, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    for key, (shape, file_dtype) in manifest.items():
        want = file_dtype if (dtype is None or not file_dtype.is_floating_point) else dtype
        yield key, random_tensor(key, shape, want, seed)


def write_safetensors_streaming(path: str | Path, manifest: dict, seed: int = 0,
                                dtype: torch.dtype | None = None) -> Path:
    """Write a safetensors file tensor by tensor (header first, then each tensor's bytes)."""
    path = Path(path)
    header, offset = {}, 0
    for key, (shape, file_dtype) in manifest.items():
        want = file_dtype if (dtype is None or not file_dtype.is_floating_point) else dtype
        n = math.prod(shape) * torch.empty((), dtype=want).element_size()
        header[key] = {"dtype": DTYPE_TAG[want], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _key, t in _tensors(manifest, seed, dtype):
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return path


def write_fullsize_sdxl(path: str | Path, manifest: str | Path, seed: int = 0) -> Path:
    """``sd_xl_base_1.0.safetensors``-like: float16, every key of the manifest."""
    return write_safetensors_streaming(path, read_manifest(manifest), seed, torch.float16)


def write_fullsize_supir(path: str | Path, manifest: str | Path, seed: int = 0,
                         dtype: torch.dtype = torch.float16) -> Path:
    """``SUPIR-v0Q.ckpt``-like: one flat dict of tensors saved with ``torch.save``."""
    sd = dict(_tensors(read_manifest(manifest), seed + 1, dtype))
    torch.save(sd, path)
    return Path(path)


def write_kohya_lora(path: str | Path, targets: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0) -> Path:
    """A random LoRA in the kohya layout: ``<name>.lora_down.weight`` [rank, in], ``.lora_up.weight``
    [out, rank] and ``.alpha`` for each target name -> (out_features, in_features)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out_f, in_f) in targets.items():
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, generator=gen) * 0.05).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn(out_f, rank, generator=gen) * 0.05).half()
        sd[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    save_file(sd, str(path))
    return Path(path)
