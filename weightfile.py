"""The one reader of weight files for every model family of the pack (SUPIR/SDXL, CodeFormer, face detection
and parsing, LLaVA folder checks).

* **safetensors** files are read lazily, tensor by tensor, with plain file reads (no mmap, no full copy):
  the SUPIR loader converts and places one tensor at a time, so its peak memory stays near the final
  weights. The header is validated before anything is read (:func:`read_safetensors_header`): length,
  JSON object, every entry's dtype, shape and byte range (inside the data section, the right length
  for its shape, not overlapping another tensor).
* **PyTorch pickles** (``.ckpt``/``.pth``/``.pt``/``.bin``) go through ``torch.load(weights_only=True,
  map_location="cpu")``, memory-mapped where the file format allows it. A pickle that asks to import or
  call anything (a hostile ``__reduce__``) is refused by torch's weights-only unpickler before any code
  runs; the error names the file and never suggests turning that protection off.

The format is recognised from the first bytes, not from the file name, so a safetensors file saved with a
``.ckpt`` name (or a pickle named ``.safetensors``) still loads, with the same safety.

Wrappers around the state dict, unwrapped in this order (:data:`WRAPPER_KEYS`), up to three levels:

* ``params_ema`` - BasicSR releases: CodeFormer's official ``codeformer.pth`` (its inference script reads
  ``['params_ema']``), GFPGAN/Real-ESRGAN files;
* ``params`` - BasicSR files without EMA weights;
* ``state_dict`` - PyTorch-Lightning ``.ckpt`` files: the SGM/LDM SDXL ``.ckpt`` releases, and the SUPIR
  loader's ``get_state_dict`` (``d.get('state_dict', d)``) accepts SUPIR-v0Q/v0F that way too;
* ``model`` - training checkpoints that keep the network beside the optimizer state.

A ``module.`` prefix (``torch.nn.DataParallel``) is removed from every key: facexlib's
``detection_Resnet50_Final.pth`` has it on every key, ``parsing_parsenet.pth`` and
``detection_mobilenet0.25_Final.pth`` are bare state dicts. Entries that are not tensors (step counters,
config strings) are dropped.

Every problem is a ``ValueError`` (a missing file: ``FileNotFoundError``) whose message names the file.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")
DATA_PARALLEL_PREFIX = "module."
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

PathLike = str | os.PathLike


# ---- sources: tensors one at a time -------------------------------------------------------------

class TensorSource:
    """Read-only access to the tensors of one file or dict, one tensor at a time."""

    name: str
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.keys()}

    def close(self) -> None:
        pass

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class DictSource(TensorSource):
    """An in-memory state dict (or a weights-only pickle once loaded).

    Loaders use its tensors as they are when they are already in the wanted dtype and device (no second copy);
    ``borrowed=True`` marks tensors that stay somebody else's live weights (a ComfyUI MODEL, which its hooks may
    patch in place): :meth:`get` then hands out copies."""

    def __init__(self, sd: Mapping[str, Any], name: str = "state dict", metadata: Mapping[str, str] | None = None,
                 borrowed: bool = False):
        self.sd, self.name, self.metadata, self.borrowed = sd, name, dict(metadata or {}), borrowed

    def keys(self) -> list[str]:
        return [k for k, v in self.sd.items() if isinstance(v, torch.Tensor)]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.sd[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self.sd[key].clone() if self.borrowed else self.sd[key]


class SafetensorsSource(TensorSource):
    """A ``.safetensors`` file read tensor by tensor with plain file reads; the header is validated first."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.name = str(self.path)
        self.metadata, self.entries, self.base = read_safetensors_header(self.path)
        self._file = open(self.path, "rb")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def get(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        dtype = SAFETENSORS_DTYPES[e["dtype"]]
        start, end = e["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            self._file.seek(self.base + start)
            got = self._file.readinto(memoryview(buf.numpy()))
            if got != end - start:
                raise ValueError(f"{self.path}: tensor {key} is truncated (the file changed while reading?)")
        return buf.view(dtype).reshape(e["shape"])

    def close(self) -> None:
        self._file.close()


# ---- safetensors header -------------------------------------------------------------------------

def _itemsize(dtype: torch.dtype) -> int:
    return getattr(dtype, "itemsize", 0) or torch.empty((), dtype=dtype).element_size()  # torch < 2.1: no itemsize


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors_header(path: PathLike) -> tuple[dict[str, str], dict[str, dict], int]:
    """(metadata, tensor entries, byte offset of the data section) of a safetensors file, validated.

    Checks: the 8-byte header length is sane and inside the file; the header is a JSON object; every entry
    but ``__metadata__`` is an object with a known ``dtype``, a ``shape`` of non-negative ints and
    ``data_offsets`` [begin, end] inside the data section with ``end - begin`` = elements x item size;
    tensors do not overlap. Any violation raises ValueError naming the file and the problem.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes: empty or cut off)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
            raise ValueError(f"{path}: not a safetensors file, or truncated (its first 8 bytes announce a "
                             f"{n}-byte header in a {size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: corrupt safetensors header (not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    metadata = {str(k): str(v) for k, v in metadata.items()}
    base = 8 + n
    data_size = size - base
    spans = []
    truncated = []
    for key, e in header.items():
        where = f"{path}: corrupt safetensors header: tensor {key!r}"
        if not isinstance(e, dict):
            raise ValueError(f"{where} is a {type(e).__name__}, not an object")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{where} has unknown or unsupported dtype {dtype!r} "
                             f"(known: {', '.join(SAFETENSORS_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ValueError(f"{where} has an invalid shape {shape!r} (a list of non-negative integers)")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{where} has invalid data_offsets {offsets!r} ([begin, end], 0 <= begin <= end)")
        numel = 1
        for d in shape:
            numel *= d
        itemsize = _itemsize(SAFETENSORS_DTYPES[dtype])
        if offsets[1] - offsets[0] != numel * itemsize:
            raise ValueError(f"{where} has {offsets[1] - offsets[0]} bytes, but shape {shape} in {dtype} needs "
                             f"{numel * itemsize}")
        if offsets[1] > data_size:
            truncated.append(key)
        spans.append((offsets[0], offsets[1], key))
    if truncated:
        need = base + max(end for _, end, _ in spans)
        raise ValueError(f"{path}: file is truncated ({size} bytes, the header needs {need}); {len(truncated)} "
                         f"tensors are incomplete, e.g. {sorted(truncated)[:5]}")
    spans.sort()
    last_end, last_key = 0, None
    for begin, end, key in spans:
        if begin < last_end and end > begin:  # empty tensors overlap nothing
            raise ValueError(f"{path}: corrupt safetensors header: tensors {last_key!r} and {key!r} share bytes "
                             f"(up to {last_end} and {begin}-{end})")
        if end > last_end:
            last_end, last_key = end, key
    return metadata, header, base


# ---- format sniffing and pickles ----------------------------------------------------------------

def file_format(path: PathLike) -> str:
    """``"safetensors"``, ``"torch-zip"`` (torch.save since 1.6), ``"torch-legacy"`` (older pickles) or
    ``"unknown"``, from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or zipfile.is_zipfile(path):
        return "torch-zip"
    if head[:1] == b"\x80":  # pickle protocol >= 2
        return "torch-legacy"
    return "unknown"


def unpickling_reason(exc: BaseException) -> str:
    """Why torch refused or failed to unpickle, without its advice to turn ``weights_only`` off."""
    text = str(exc)
    if "weights only" in text.lower() or "weightsunpickler" in text.lower():
        sentences = re.split(r"\n+|(?<=\.)\s+", text)
        detail = next((s for s in sentences if re.search(r"global|unsupported", s, re.I)
                       and not re.search(r"weights_only|safe_globals|documentation", s)), "")
        detail = detail.replace("WeightsUnpickler error:", "").strip().rstrip(".")
        return ("it asks to load something that is not plain tensor data"
                + (f" ({detail[:200]})" if detail else "")
                + "; such files can run code when opened, so it was refused. Use the official weights "
                  "or a .safetensors file")
    first = text.strip().split("\n")[0][:200]
    if not first or re.search(r"weights_only|safe_globals", first):
        first = "unreadable"
    return f"not a PyTorch weight file, or damaged/truncated ({type(exc).__name__}: {first})"


def _torch_load(path: Path, fmt: str) -> Any:
    if fmt == "torch-zip":
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
    return torch.load(path, map_location="cpu", weights_only=True)


def load_pickle(path: PathLike, what: str = "weights") -> Any:
    """``torch.load(path, weights_only=True)`` (memory-mapped where possible) with errors naming the file."""
    path = Path(path)
    fmt = file_format(path)
    try:
        return _torch_load(path, fmt)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError,
            KeyError, IndexError, struct.error, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        reason = unpickling_reason(exc)
        if path.stat().st_size == 0:
            reason = "the file is empty"
        elif fmt == "unknown" and reason.startswith("not a PyTorch"):
            with open(path, "rb") as f:
                reason = f"not a PyTorch or safetensors weight file (it begins with {f.read(16)!r})"
        raise ValueError(f"cannot read {what} {path}: {reason}") from None


# ---- state dicts --------------------------------------------------------------------------------

def unwrap_state_dict(obj: Any, name: str = "state dict") -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: wrappers (:data:`WRAPPER_KEYS`) removed, ``module.`` stripped,
    non-tensor entries dropped. ValueError naming ``name`` when there is no state dict or no tensor."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{name} does not hold a state dict (found {type(obj).__name__})")
    sd: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        if not isinstance(k, str):
            raise ValueError(f"{name}: a tensor under a key that is not text ({k!r})")
        key = k[len(DATA_PARALLEL_PREFIX):] if k.startswith(DATA_PARALLEL_PREFIX) else k
        if key in sd:
            raise ValueError(f"{name}: tensor {key!r} appears with and without the 'module.' prefix")
        sd[key] = v
    if not sd:
        raise ValueError(f"{name} holds no tensors" + (f" (keys: {list(obj)[:5]})" if len(obj) else " (empty)"))
    return sd


def open_weights(src: PathLike | Mapping | TensorSource, what: str = "checkpoint") -> TensorSource:
    """A :class:`TensorSource` for a weight file (safetensors read lazily, pickles weights-only) or a state dict.

    ``what`` names the role in messages ("SUPIR checkpoint", "CodeFormer weights").
    """
    if isinstance(src, TensorSource):
        return src
    if isinstance(src, Mapping):
        return DictSource(unwrap_state_dict(src, what), what)
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    fmt = file_format(path)
    if fmt == "safetensors" or (fmt == "unknown" and path.suffix.lower() in (".safetensors", ".sft")):
        return SafetensorsSource(path)
    return DictSource(unwrap_state_dict(load_pickle(path, what), str(path)), str(path))


def read_weights(src: PathLike | Mapping, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a weight file or state dict (unwrapped) and its safetensors metadata (``{}`` for pickles)."""
    source = open_weights(src, what)
    try:
        return {k: source.get(k) for k in source.keys()}, dict(getattr(source, "metadata", {}))
    finally:
        source.close()
