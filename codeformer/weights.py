"""Reading the face models' weight files safely (``weights_only`` pickles or safetensors) with errors
that name the file, where it belongs and who publishes it."""
from __future__ import annotations

import os
from typing import Iterable

import torch


def missing_weights_error(path: str, kind: str, files: Iterable[str], folder: str, published: str) -> FileNotFoundError:
    names = ", ".join(files)
    return FileNotFoundError(
        f"{kind} weights not found: {path}. Put the official file ({names}) in the '{folder}' model folder "
        f"(ComfyUI/models/{folder}); it is published at {published}."
    )


def load_state_dict(source: str | os.PathLike | dict, kind: str, files: Iterable[str], folder: str,
                    published: str) -> tuple[dict, str]:
    """(state dict, label for messages) from a path or an in-memory dict.

    Accepts bare state dicts and dicts wrapping one under ``params_ema`` / ``params`` / ``state_dict``.
    A missing file raises FileNotFoundError naming the file, folder and publisher; an unreadable one
    a ValueError naming the file.
    """
    if isinstance(source, dict):
        sd, label = source, f"{kind} state dict"
    else:
        path = os.fspath(source)
        label = f"'{path}'"
        if not os.path.isfile(path):
            raise missing_weights_error(path, kind, files, folder, published)
        try:
            if path.lower().endswith((".safetensors", ".sft")):
                from safetensors.torch import load_file

                sd = load_file(path, device="cpu")
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated / not a checkpoint / unsafe pickle
            raise ValueError(f"{kind}: cannot read {label} ({type(exc).__name__}: {exc}); "
                             f"the file may be truncated or not a {kind} checkpoint") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{kind}: {label} does not hold a state dict (got {type(sd).__name__})")
    for wrapper in ("params_ema", "params", "state_dict", "model"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
            break
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"{kind}: {label} holds no tensors")
    return sd, label
