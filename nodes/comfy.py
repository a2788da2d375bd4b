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
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from . import model_names, progress
from .common import plain_tensor
from .model_names import MODEL_FOLDERS, WEIGHT_EXTENSIONS  # noqa: F401  (re-exported)

log = logging.getLogger("photo_restoration")

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
    """A user-given model name, normalised to a path inside the ``key`` folder (see
    :func:`nodes.model_names.normalise`: no absolute paths, no ``..`` out of the folder)."""
    return model_names.normalise(key, name, folder_paths_for(key))


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


def Progress(total: int, desc: str = "", preview_size: int = 512) -> "progress.Progress":
    """Progress reporting for one node run, doubling as the callbacks object the pipelines take
    (:class:`nodes.progress.Progress`): ComfyUI's ProgressBar (with previews) and its interrupt inside ComfyUI,
    a tqdm bar and no interrupt outside."""
    bar = None
    if comfy_present():
        import comfy.utils

        bar = comfy.utils.ProgressBar(max(int(total), 1))
    return progress.Progress(total, desc, preview_size, bar=bar, interrupt=check_interrupt)


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
        clip_sd = {k: plain_tensor(v) for k, v in clip_sd.items()}
    if patcher_saves:
        sd = model.state_dict_for_saving(clip_state_dict=clip_sd, vae_state_dict=vae_sd)
    else:
        sd = inner.state_dict_for_saving(clip_state_dict=clip_sd, vae_state_dict=vae_sd)
    return {k: plain_tensor(v) for k, v in sd.items()}
