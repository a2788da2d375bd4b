"""The model folders the pack reads from and the rule for user-given model names (pure path logic; the
folders themselves are resolved by :mod:`nodes.comfy`)."""
from __future__ import annotations

import os
import re

# ComfyUI's list of weight-file extensions (folder_paths.supported_pt_extensions).
WEIGHT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

# Folder keys the pack reads from, with the default sub-folder of models/ and the extensions listed.
# `LLM` holds Hugging Face model *folders*; it gets the weight extensions too so that ComfyUI's
# filter never lists stray files, and the pack lists its sub-directories itself.
MODEL_FOLDERS: dict[str, tuple[str, set[str]]] = {
    "checkpoints": ("checkpoints", WEIGHT_EXTENSIONS),
    "model_patches": ("model_patches", WEIGHT_EXTENSIONS),
    "upscale_models": ("upscale_models", WEIGHT_EXTENSIONS),
    "facerestore_models": ("facerestore_models", WEIGHT_EXTENSIONS),
    "facedetection": ("facedetection", WEIGHT_EXTENSIONS),
    "LLM": ("LLM", WEIGHT_EXTENSIONS | {".json"}),
}


def normalise(key: str, name: str, searched: list[str]) -> str:
    """A user-given model name, normalised to a path relative to the ``key`` folder.

    Sub-folders are fine (``SUPIR/SUPIR-v0Q.ckpt``, either slash); an empty name, an absolute path, a
    drive letter or ``..`` leading out of the folder raise a ValueError naming the input. Symlinks that
    users place inside the folder are followed, as ComfyUI does.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"No model chosen for the '{key}' model folder (got {name!r}); pick a file from the list.")
    if "\x00" in name or len(name) > 4096:
        raise ValueError(f"Model name {name[:200]!r} for the '{key}' folder is not a valid file name.")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or os.path.isabs(name):
        raise ValueError(f"Model name '{name}' is an absolute path; choose a file inside the '{key}' model folder "
                         f"({', '.join(searched)}) by its name there.")
    parts: list[str] = []
    for part in name.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ValueError(f"Model name '{name}' leads out of the '{key}' model folder ('..'); choose a "
                                 f"file inside it ({', '.join(searched)}).")
            parts.pop()
            continue
        parts.append(part)
    if not parts:
        raise ValueError(f"Model name '{name}' names the '{key}' folder itself, not a model in it.")
    return "/".join(parts)
