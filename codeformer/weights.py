"""Reading the face models' weight files safely (``weights_only`` pickles or safetensors) with errors
that name the file, where it belongs and who publishes it."""
from __future__ import annotations

import os
from typing import Iterable

from ..weightfile import read_weights, unwrap_state_dict


def missing_weights_error(path: str, kind: str, files: Iterable[str], folder: str, published: str) -> FileNotFoundError:
    names = ", ".join(files)
    return FileNotFoundError(
        f"{kind} weights not found: {path}. Put the official file ({names}) in the '{folder}' model folder "
        f"(ComfyUI/models/{folder}); it is published at {published}."
    )


def load_state_dict(source: str | os.PathLike | dict, kind: str, files: Iterable[str], folder: str,
                    published: str) -> tuple[dict, str]:
    """(state dict, label for messages) from a path or an in-memory dict, through the pack's one reader
    (``../weightfile.py``: safetensors or weights-only pickles, wrappers such as ``params_ema`` /
    ``params`` / ``state_dict`` / ``model`` and a ``module.`` prefix removed).

    A missing file raises FileNotFoundError naming the file, folder and publisher; an unreadable one
    a ValueError naming the file.
    """
    if isinstance(source, dict):
        label = f"{kind} state dict"
        return unwrap_state_dict(source, label), label
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise missing_weights_error(path, kind, files, folder, published)
    return read_weights(path, kind)[0], f"'{path}'"
