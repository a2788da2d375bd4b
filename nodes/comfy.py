"""The only module of the pack that touches ComfyUI internals.

Everything ComfyUI-specific the nodes need goes through here: model folders, device and dtype
choice, memory management (ModelPatcher + load_models_gpu), progress bars with previews and the
interrupt check. When ComfyUI is absent (plain pytest, the command line) every function falls back
to a plain-torch behaviour: a models directory from ``PHOTO_RESTORE_MODELS`` (or ``set_models_dir``),
cuda-if-available-else-cpu, a tqdm progress bar and no interrupt.

ComfyUI counts as present when its ``comfy.model_management`` module is already imported, which is
always the case inside a running ComfyUI (it is imported before custom nodes load) and never in a
plain Python process, even if a ComfyUI checkout happens to be on ``sys.path``.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

log = logging.getLogger("photo_restoration")

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

_models_dir_override: str | None = None


def comfy_present() -> bool:
    """True when running inside ComfyUI (its model management is already loaded)."""
    return "comfy.model_management" in sys.modules and "folder_paths" in sys.modules


# --------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------

def register_model_folders() -> None:
    """Merge the pack's folder keys into ComfyUI's table, keeping every path users already set.

    An existing key (from ComfyUI itself or from ``extra_model_paths.yaml``) keeps its paths and
    gains the default ``models/<name>`` folder at the end plus our extensions; a new key is created
    with an explicit extension set (an empty set would list every file). No-op without ComfyUI.
    """
    if not comfy_present():
        return
    import folder_paths

    for key, (sub, exts) in MODEL_FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, sub)
        paths, old_exts = folder_paths.folder_names_and_paths.get(key, ([], set()))
        paths = list(paths)
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[key] = (paths, set(old_exts) | set(exts))


def set_models_dir(path: str | os.PathLike | None) -> None:
    """Choose the models directory used when ComfyUI is absent (command line, tests)."""
    global _models_dir_override
    _models_dir_override = None if path is None else os.fspath(path)


def models_dir() -> str:
    """The root ``models`` directory: ComfyUI's, else the override, else $PHOTO_RESTORE_MODELS, else ./models."""
    if comfy_present():
        import folder_paths

        return folder_paths.models_dir
    return _models_dir_override or os.environ.get("PHOTO_RESTORE_MODELS") or os.path.abspath("models")


def folder_paths_for(key: str) -> list[str]:
    """Every directory searched for the folder key ``key``."""
    if comfy_present():
        import folder_paths

        try:
            return list(folder_paths.get_folder_paths(key))
        except KeyError:
            pass
    return [os.path.join(models_dir(), MODEL_FOLDERS.get(key, (key, set()))[0])]


def list_files(key: str) -> list[str]:
    """Weight files under a folder key, as relative names (sub-folders included), sorted."""
    if comfy_present():
        import folder_paths

        try:
            return list(folder_paths.get_filename_list(key))
        except KeyError:
            pass
    exts = MODEL_FOLDERS.get(key, (key, WEIGHT_EXTENSIONS))[1]
    names = set()
    for root in folder_paths_for(key):
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            for f in files:
                if os.path.splitext(f)[1].lower() in exts:
                    names.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(names)


def list_dirs(key: str) -> list[str]:
    """Immediate sub-directories of a folder key (Hugging Face model folders under ``LLM``)."""
    names = set()
    for root in folder_paths_for(key):
        if os.path.isdir(root):
            names.update(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    return sorted(names)


def model_name(key: str, name: str) -> str:
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
                         f"({', '.join(folder_paths_for(key))}) by its name there.")
    parts: list[str] = []
    for part in name.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ValueError(f"Model name '{name}' leads out of the '{key}' model folder ('..'); choose a "
                                 f"file inside it ({', '.join(folder_paths_for(key))}).")
            parts.pop()
            continue
        parts.append(part)
    if not parts:
        raise ValueError(f"Model name '{name}' names the '{key}' folder itself, not a model in it.")
    return "/".join(parts)


def full_path(key: str, name: str) -> str:
    """Absolute path of the file or folder ``name`` inside folder key ``key`` (never outside it, see
    :func:`model_name`); a clear FileNotFoundError when it is not there."""
    rel = model_name(key, name)
    if comfy_present():
        import folder_paths

        try:
            found = folder_paths.get_full_path(key, rel)  # files; LLaVA folders are found below
        except KeyError:
            found = None
        if found:
            return found
    for root in folder_paths_for(key):
        candidate = os.path.join(root, *rel.split("/"))
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(
        f"'{name}' was not found in the '{key}' model folder (searched: {', '.join(folder_paths_for(key))})."
    )


# --------------------------------------------------------------------------------------------
# Devices and dtypes
# --------------------------------------------------------------------------------------------

def torch_device() -> torch.device:
    """The device models compute on: ComfyUI's choice, else cuda if available, else cpu."""
    if comfy_present():
        import comfy.model_management as mm

        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    """Where idle weights wait (ComfyUI's unet offload device, else cpu)."""
    if comfy_present():
        import comfy.model_management as mm

        return mm.unet_offload_device()
    return torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where node outputs (IMAGE, LATENT, MASK) live: ComfyUI's intermediate device, else cpu."""
    if comfy_present():
        import comfy.model_management as mm

        return mm.intermediate_device()
    return torch.device("cpu")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["fp8"] = torch.float8_e4m3fn


def pick_dtype(name: str, device: torch.device | None = None, allow: Iterable[str] = ("bf16", "fp16", "fp32")) -> torch.dtype:
    """Resolve a dtype option ("auto", "fp32", "fp16", "bf16", "fp8") for ``device``.

    "auto" picks the fastest of ``allow`` that the device runs well: bf16 where supported, then
    fp16, and fp32 on the CPU.
    """
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"Unknown dtype '{name}'; choose one of auto, {', '.join(DTYPES)}.")
        return DTYPES[name]
    device = device or torch_device()
    allow = list(allow)
    if comfy_present():
        import comfy.model_management as mm

        if "bf16" in allow and mm.should_use_bf16(device):
            return torch.bfloat16
        if "fp16" in allow and mm.should_use_fp16(device):
            return torch.float16
        return torch.float32
    if device.type == "cuda":
        if "bf16" in allow and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if "fp16" in allow:
            return torch.float16
    return torch.float32


# --------------------------------------------------------------------------------------------
# Memory management
# --------------------------------------------------------------------------------------------

@dataclass
class Managed:
    """A network under the host's memory management.

    Inside ComfyUI ``patcher`` is a ``ModelPatcher`` around ``model``; ComfyUI may move the weights
    to the offload device whenever another model needs the VRAM. Call :func:`load` before use.
    ``partial_load``: the host may load only part of the weights (the rest cast per layer from the
    offload device); otherwise it loads the whole network or nothing.
    """

    model: torch.nn.Module
    patcher: Any = None
    info: dict = field(default_factory=dict)
    partial_load: bool = False


def _comfy_caster() -> Callable:
    """ComfyUI's per-layer weight caster (``comfy.ops.cast_bias_weight``) as a context manager for
    :func:`supir.ops.set_host_caster`: honours lowvram weight patches, offload streams and (0.33 on CUDA)
    dynamic VRAM."""
    import contextlib

    import comfy.ops

    context = getattr(comfy.ops, "CastBiasWeightContext", None)
    if context is not None:  # 0.33+
        return lambda layer, x: context(layer, x, offloadable=True)
    cast, uncast = comfy.ops.cast_bias_weight, getattr(comfy.ops, "uncast_bias_weight", None)

    @contextlib.contextmanager
    def caster(layer, x):
        if uncast is None:  # older trees: the legacy two-value signature
            yield cast(layer, x)
            return
        weight, bias, stream = cast(layer, x, offloadable=True)
        try:
            yield weight, bias
        finally:
            uncast(layer, weight, bias, stream)

    return caster


def manage(model: torch.nn.Module, partial_load: bool | None = None, **info: Any) -> Managed:
    """Put ``model`` (already on the offload device) under memory management.

    ``partial_load`` (default: whether every parameter lives in a casting layer of ``supir.ops``, see
    :func:`supir.ops.partial_load_safe`) lets ComfyUI load only what fits and stream the rest per layer;
    such models get ComfyUI's core patcher (0.33 on CUDA: dynamic VRAM). Other networks load whole.
    """
    from ..supir import ops as supir_ops

    partial = supir_ops.partial_load_safe(model) if partial_load is None else bool(partial_load)
    if comfy_present():
        import comfy.model_management as mm
        import comfy.model_patcher

        supir_ops.set_host_caster(_comfy_caster())
        cls = comfy.model_patcher.ModelPatcher
        if partial:
            cls = getattr(comfy.model_patcher, "CoreModelPatcher", cls)
        patcher = cls(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
        return Managed(model, patcher, info, partial)
    return Managed(model, None, info, partial)


def load(managed: Managed, memory_required: int = 0) -> torch.nn.Module:
    """Bring a managed model onto the compute device (evicting others in ComfyUI) and return it.

    ``memory_required``: bytes the coming computation needs besides the weights (see
    :mod:`supir.memory`); ComfyUI frees that much and, for partial-load models, loads as many weights
    as still fit, casting the rest per layer from the offload device."""
    if managed.patcher is not None:
        import comfy.model_management as mm

        mm.load_models_gpu([managed.patcher], memory_required=int(memory_required),
                           force_full_load=not managed.partial_load)
        return managed.patcher.model
    device = torch_device()
    return managed.model.to(device)


def unload(managed: Managed) -> None:
    """Send one managed model back to the offload device now (ComfyUI: unload just that model)."""
    if managed.patcher is not None:
        import comfy.model_management as mm

        for i in reversed(range(len(mm.current_loaded_models))):
            if mm.current_loaded_models[i].model is managed.patcher:
                mm.current_loaded_models.pop(i).model_unload()
        mm.soft_empty_cache()
        return
    managed.model.to(offload_device())


# --------------------------------------------------------------------------------------------
# Progress and interrupt
# --------------------------------------------------------------------------------------------

def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (no-op outside ComfyUI)."""
    if comfy_present():
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()


class Progress:
    """Progress reporting for one node run; doubles as the callbacks object the pipelines take.

    ``progress(step, total, preview)`` updates ComfyUI's ProgressBar (with an optional preview,
    a PIL image or a [H,W,3] tensor in 0..1) or a tqdm bar; ``check_interrupt()`` raises when the
    user cancels.
    """

    def __init__(self, total: int, desc: str = "", preview_size: int = 512):
        self.total = max(int(total), 1)
        self.preview_size = preview_size
        self._bar = None
        self._tqdm = None
        if comfy_present():
            import comfy.utils

            self._bar = comfy.utils.ProgressBar(self.total)
        else:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=self.total, desc=desc or "photo_restoration", leave=False, disable=None)
        self._n = 0

    def progress(self, step: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None and total != self.total:
            self.total = max(int(total), 1)
            if self._tqdm is not None:
                self._tqdm.total = self.total
        step = min(int(step), self.total)
        if self._bar is not None:
            self._bar.update_absolute(step, self.total, _preview_tuple(preview, self.preview_size))
        elif self._tqdm is not None:
            self._tqdm.update(step - self._n)
        self._n = step

    def advance(self, n: int = 1, preview: Any = None) -> None:
        self.progress(self._n + n, None, preview)

    def check_interrupt(self) -> None:
        check_interrupt()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _preview_tuple(preview: Any, max_size: int):
    if preview is None:
        return None
    from PIL import Image

    if isinstance(preview, torch.Tensor):
        t = preview.detach().float().clamp(0, 1).cpu()
        if t.ndim == 4:
            t = t[0]
        if t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.movedim(0, -1)
        preview = Image.fromarray((t.numpy() * 255).round().astype("uint8").squeeze())
    return ("JPEG", preview, max_size)


def latent_preview_fn() -> Callable[[torch.Tensor], Any] | None:
    """A function turning a scaled SDXL latent [B,4,h,w] into a preview image, or None.

    Uses ComfyUI's previewer (Latent2RGB or TAESD) when available; the caller passes the result to
    :meth:`Progress.progress` as ``preview``.
    """
    if not comfy_present():
        return None
    try:
        import comfy.latent_formats
        import latent_preview

        previewer = latent_preview.get_previewer(torch_device(), comfy.latent_formats.SDXL())
    except Exception:  # previews are a nicety, never a failure
        return None
    if previewer is None:
        return None

    def to_image(x0: torch.Tensor):
        return previewer.decode_latent_to_preview(x0[:1])

    return to_image


# --------------------------------------------------------------------------------------------
# ComfyUI models as plain state dicts
# --------------------------------------------------------------------------------------------

def state_dicts_from_comfy(model: Any, clip: Any = None, vae: Any = None) -> dict[str, torch.Tensor]:
    """One SGM-layout (checkpoint-layout) state dict from ComfyUI's MODEL, CLIP and VAE.

    Keys as in an SDXL checkpoint file: ``model.diffusion_model.*``, ``first_stage_model.*``,
    ``conditioner.embedders.0.transformer.*`` (CLIP-L), ``conditioner.embedders.1.model.*`` (bigG).
    Patches (LoRAs, merges) are baked in exactly as ComfyUI's own checkpoint saving does on the running
    version: ComfyUI >= 0.33 builds the patched UNet dict in ``ModelPatcher.state_dict_for_saving``
    (also for the dynamic-VRAM patcher; weights come back lazily patched and are materialised here);
    older versions patch the loaded weights (``force_patch_weights``) and read ``BaseModel``'s dict.
    Tensors may live on the compute device; the caller copies what it needs.
    """
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "state_dict_for_saving"):
        raise ValueError("Load SUPIR (from MODEL/CLIP/VAE) needs a ComfyUI MODEL (e.g. from Load Checkpoint); "
                         f"got {type(model).__name__}.")
    patcher_saves = hasattr(model, "state_dict_for_saving")  # ComfyUI >= 0.33
    patchers = [model]
    clip_sd = vae_sd = None
    if clip is not None:
        patchers.append(clip.load_model())
    if vae is not None:
        vae_sd = vae.get_sd()
    if comfy_present():
        import comfy.model_management as mm

        if patcher_saves:
            mm.load_models_gpu(patchers)
        else:
            mm.load_models_gpu(patchers, force_patch_weights=True)
    if clip is not None:
        clip_sd = clip.state_dict_for_saving() if patcher_saves and hasattr(clip, "state_dict_for_saving") \
            else clip.get_sd()
        # materialised before ComfyUI converts the layout (bigG's q/k/v are concatenated there)
        clip_sd = {k: _plain_tensor(v) for k, v in clip_sd.items()}
    if patcher_saves:
        sd = model.state_dict_for_saving(clip_state_dict=clip_sd, vae_state_dict=vae_sd)
    else:
        sd = inner.state_dict_for_saving(clip_state_dict=clip_sd, vae_state_dict=vae_sd)
    return {k: _plain_tensor(v) for k, v in sd.items()}


def _plain_tensor(v: Any) -> Any:
    """A plain tensor for a state-dict value. ComfyUI 0.33's saving dicts hold lazily patched parameters
    (``LazyCastingParam``: a Parameter subclass whose ``.to()`` computes the patched weight); their own
    data is the *unpatched* weight, so they are materialised through ``.to`` before anything reads them."""
    if isinstance(v, torch.nn.Parameter) and type(v) is not torch.nn.Parameter:
        v = v.to("cpu")
    return v.detach() if isinstance(v, torch.Tensor) else v
