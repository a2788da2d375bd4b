"""LLaVA captions that steer SUPIR, through transformers' own LLaVA classes.

The official SUPIR pipeline (``llava/llava_agent.py: LLavaAgent``) captions the stage-1 (denoised)
image with LLaVA-v1.5 and prepends the caption to the positive prompt. Here the model is a Hugging
Face-format folder (``llava-hf/llava-1.5-7b-hf``, ``llava-hf/llava-v1.6-*-hf``) loaded fully offline
with ``AutoProcessor`` + ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``;
no remote code is ever run.

Defaults follow the official agent: the question "Describe this image and its style in a very
detailed manner.", LLaVA-1.5's official ``vicuna_v1`` conversation (the system sentence "A chat between a
curious user and an artificial intelligence assistant. ...", then ``USER: <image>\\n{question} ASSISTANT:``;
LLaVA-NeXT folders use their own chat template), sampling
with temperature 0.2 and top-p 0.7 (greedy at temperature 0), 512 new tokens, and the image resized
so its short side is 512 before the processor's own resize + centre crop. ``preprocess="pad"``
pads the picture to a square instead (LLaVA's ``expand2square``) so the whole frame is seen.

By default each picture is captioned on its own with the generator re-seeded, so a caption depends
only on the picture and the settings, never on its position in a batch; ``batch_size`` > 1 captions
several pictures per ``generate`` call (faster on a GPU; sampled captions then depend on the group).
:func:`caption_tiles` cuts every picture exactly as the tiled sampler does (``pipeline.cut_tiles``: the
picture padded to multiples of 64 px, the grid of :mod:`.tiles`, row-major) and captions each tile, so the list
lines up with the sampler's per-tile conditioning.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from .callbacks import notify

from ..weightfile import unpickling_reason, read_safetensors_header

DEFAULT_QUESTION = "Describe this image and its style in a very detailed manner."
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")
# llava/conversation.py conv_vicuna_v1 (SeparatorStyle.TWO, sep " ") with one user turn and an open assistant turn
LLAVA15_TEMPLATE = VICUNA_V1_SYSTEM + " USER: <image>\n{question} ASSISTANT:"
CAPTION_SHORT_SIDE = 512  # the official pipeline captions the stage-1 image at short side 512
FAMILIES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
QUANTIZATIONS = ("none", "8bit", "4bit")
EXAMPLE_FOLDER = "llava-1.5-7b-hf (from llava-hf/llava-1.5-7b-hf)"


@dataclass
class CaptionSettings:
    """How to ask and how to sample; the defaults are the official SUPIR agent's."""

    question: str = DEFAULT_QUESTION
    temperature: float = 0.2
    top_p: float = 0.7
    max_new_tokens: int = 512
    seed: int = 0
    preprocess: str = "crop"  # "crop": official (processor's centre crop); "pad": pad to square first
    short_side: int = CAPTION_SHORT_SIDE  # resize before the processor; 0 keeps the size
    template: str = ""  # "" = the folder's chat template if it has one, else LLaVA-1.5's; or a "{question}" string
    batch_size: int = 1  # pictures per generate call: >1 is faster on a GPU; 1 makes captions batch-independent


class Llava(torch.nn.Module):
    """A loaded LLaVA: the transformers model (a sub-module, so ``.to()`` moves it) and its processor.

    The holder is a plain ``nn.Module`` so that hosts which manage modules (ComfyUI's ModelPatcher)
    can move it and set attributes on it freely.
    """

    def __init__(self, model: torch.nn.Module, processor: Any, family: str, folder: str, quantization: str = "none"):
        super().__init__()
        self.model = model
        self.processor = processor
        self.family = family
        self.folder = folder
        self.quantization = quantization

    @property
    def compute_device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float16


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def read_family(folder: str | Path) -> str:
    """``"llava"`` or ``"llava_next"`` from the folder's config.json; a clear error otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LLaVA folder '{folder}' does not exist. Put a Hugging Face-format LLaVA "
                                f"folder there, e.g. {EXAMPLE_FOLDER}.")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"LLaVA folder '{folder}' has no config.json; it must be a complete Hugging "
                                f"Face-format folder, e.g. {EXAMPLE_FOLDER}.")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"'{cfg_path}' is not readable JSON: {exc}") from None
    model_type = cfg.get("model_type", "")
    archs = cfg.get("architectures") or []
    if "mm_vision_tower" in cfg or any(a.startswith("LlavaLlama") or a.startswith("LlavaMistral") for a in archs):
        raise ValueError(f"'{folder}' holds the original LLaVA repository format ({archs or model_type}), which "
                         f"transformers cannot load without remote code. Use the Hugging Face conversion instead, "
                         f"e.g. {EXAMPLE_FOLDER}.")
    if model_type in FAMILIES:
        return model_type
    for family, arch in FAMILIES.items():
        if arch in archs:
            return family
    raise ValueError(f"'{folder}' holds model_type '{model_type}' ({archs}); supported are LLaVA-1.5 "
                     f"('llava', LlavaForConditionalGeneration) and LLaVA-NeXT ('llava_next', "
                     f"LlavaNextForConditionalGeneration).")


def _dtype_kwarg() -> str:
    """transformers >= 4.56 takes ``dtype=``; older 4.5x releases ``torch_dtype=``."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def _quantization_config(quantization: str, dtype: torch.dtype, device: torch.device):
    if quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantization '{quantization}'; choose one of {', '.join(QUANTIZATIONS)}.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(f"{quantization} quantization needs the 'bitsandbytes' package, which is not installed "
                           f"in this Python (add it to the Python that runs ComfyUI), or choose quantization 'none'.")
    if device.type != "cuda":
        raise RuntimeError(f"{quantization} quantization (bitsandbytes) needs a CUDA GPU; the compute device is "
                           f"'{device}'. Choose quantization 'none'.")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


WEIGHT_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def check_weight_files(folder: Path) -> bool:
    """Validate every ``*.safetensors`` header of a model folder with the pack's reader (ValueError naming
    the file); True when the folder has safetensors weights (then only those are loaded)."""
    tensors = sorted(folder.glob("*.safetensors"))
    for path in tensors:
        read_safetensors_header(path)
    if not tensors and not any(p.suffix.lower() in WEIGHT_PICKLE_SUFFIXES for p in folder.iterdir()):
        raise ValueError(f"LLaVA folder '{folder}' has no weight files (model*.safetensors or pytorch_model*.bin); "
                         f"it must be a complete Hugging Face-format folder, e.g. {EXAMPLE_FOLDER}.")
    return bool(tensors)


def _load_error(folder: Path, family: str, exc: BaseException) -> ValueError:
    """A ValueError naming the folder, without transformers' or torch's advice to trust remote/pickled code."""
    if isinstance(exc, pickle.UnpicklingError):
        bins = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in WEIGHT_PICKLE_SUFFIXES)
        reason = unpickling_reason(exc)
        return ValueError(f"Could not load the LLaVA folder '{folder}' ({family}): its pickle weight file(s) "
                          f"{bins} cannot be read: {reason}.")
    text = str(exc).split("\n")[0][:500]
    if "weights_only" in text or "trust_remote_code" in text:
        text = type(exc).__name__
    return ValueError(f"Could not load the LLaVA folder '{folder}' ({family}): {type(exc).__name__}: {text}")


def load_llava(folder: str | Path, dtype: torch.dtype = torch.float16, quantization: str = "none",
               device: torch.device | str = "cpu") -> Llava:
    """Load a Hugging Face-format LLaVA (1.5 or NeXT) folder offline, in ``dtype``, onto ``device``.

    Unquantized weights load straight into ``dtype`` on ``device`` (normally the offload device; the
    host moves them to the GPU when captioning). 8-bit/4-bit need bitsandbytes and load onto the
    CUDA ``device`` directly, where they stay. Nothing is downloaded and no code from the folder runs
    (``local_files_only``, ``trust_remote_code=False``, safetensors preferred, pickles weights-only);
    safetensors headers are validated first, and every failure is a ValueError naming the folder.
    """
    import transformers

    folder = Path(folder)
    family = read_family(folder)
    device = torch.device(device)
    quant = _quantization_config(quantization, dtype, device)
    model_cls = getattr(transformers, FAMILIES[family])
    offline = {"local_files_only": True, "trust_remote_code": False}
    kwargs: dict[str, Any] = {**offline, "use_safetensors": check_weight_files(folder), _dtype_kwarg(): dtype}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device})
    try:
        processor = transformers.AutoProcessor.from_pretrained(folder, **offline)
        model = model_cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        raise _load_error(folder, family, exc) from None
    except RuntimeError as exc:  # safetensors' SafetensorError, torch's zip reader; out-of-memory passes through
        if "out of memory" in str(exc).lower():
            raise
        raise _load_error(folder, family, exc) from None
    except Exception as exc:  # noqa: BLE001 - e.g. safetensors_rust.SafetensorError (an Exception subclass)
        if type(exc).__name__ != "SafetensorError":
            raise
        raise _load_error(folder, family, exc) from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ValueError(f"'{folder}' has no complete LLaVA processor (tokenizer + image processor files).")
    model.eval().requires_grad_(False)
    if quant is None:
        model.to(device)
    return Llava(model, processor, family, str(folder), quantization)


# --------------------------------------------------------------------------------------------
# Prompt, pictures, output
# --------------------------------------------------------------------------------------------

def build_prompt(processor: Any, question: str, template: str = "", family: str | None = None) -> str:
    """The text fed with one picture: an explicit ``{question}`` template; else for LLaVA-1.5 (``family``
    "llava", or a folder without a chat template) the official ``vicuna_v1`` conversation the SUPIR agent
    uses (llava-hf's own 1.5 chat template lacks its system sentence); else the folder's chat template."""
    if template:
        template = template.replace("\\n", "\n")  # a typed backslash-n in a one-line widget
        if "<image>" not in template:
            template = "<image>\n" + template
        return template.replace("{question}", question)
    if family != "llava" and getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return LLAVA15_TEMPLATE.format(question=question)


def to_pil(image: torch.Tensor | Image.Image) -> Image.Image:
    """A [3,H,W] tensor in 0..1 (or a PIL image) as an RGB PIL image; the tensor is not modified."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected one picture as [3,H,W], got {tuple(image.shape)}")
    x = image.detach()[:3].float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), "RGB")


def prepare_image(image: Image.Image, preprocess: str = "crop", short_side: int = CAPTION_SHORT_SIDE,
                  fill: Sequence[float] = (0.5, 0.5, 0.5)) -> Image.Image:
    """Resize to ``short_side`` (bicubic; 0 keeps the size), then for ``"pad"`` centre the picture on a
    square of ``fill`` (the processor's mean colour, as LLaVA's ``expand2square``). ``"crop"`` leaves
    the square crop to the processor, as the official pipeline does."""
    if preprocess not in ("crop", "pad"):
        raise ValueError(f"preprocess must be 'crop' or 'pad', not '{preprocess}'")
    w, h = image.size
    if short_side and min(w, h) != short_side:
        scale = short_side / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    if preprocess == "pad":
        w, h = image.size
        if w != h:
            side = max(w, h)
            square = Image.new("RGB", (side, side), tuple(int(round(c * 255)) for c in fill))
            square.paste(image, ((side - w) // 2, (side - h) // 2))
            image = square
    return image


_LEADING_ROLE = re.compile(r"^\s*(assistant|ASSISTANT|Assistant)\s*:\s*")


def clean_caption(text: str, special_tokens: Sequence[str] = ()) -> str:
    """One line of caption: special tokens, a leading ``ASSISTANT:`` and newlines removed, spaces collapsed."""
    for tok in (*special_tokens, "</s>", "<s>", "<image>", "<|im_end|>", "<|eot_id|>"):
        if tok:
            text = text.replace(tok, " ")
    text = " ".join(text.split())
    while _LEADING_ROLE.match(text):
        text = _LEADING_ROLE.sub("", text, count=1)
    return text.strip()


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's generators for the block and restore the caller's RNG state afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _interrupt_criteria(callbacks: Any):
    """A stopping criterion that only runs the host's interrupt check on every new token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _CheckInterrupt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            callbacks.check_interrupt()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_CheckInterrupt()])


def caption_group(llava: Llava, images: Sequence[torch.Tensor | Image.Image], settings: CaptionSettings,
                  callbacks: Any = None) -> list[str]:
    """Caption pictures ([3,H,W] in 0..1 or PIL) in one ``generate`` call (left-padded when their
    prompts differ in length), with ``llava`` on whatever device it sits. Sampling draws for the
    whole group from one seeded generator, so a sampled caption depends on its group."""
    processor = llava.processor
    tokenizer = processor.tokenizer
    mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    pictures = [prepare_image(to_pil(im), settings.preprocess, settings.short_side, mean) for im in images]
    prompt = build_prompt(processor, settings.question, settings.template, llava.family)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    try:
        inputs = processor(images=pictures, text=[prompt] * len(pictures), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    device, dtype = llava.compute_device, llava.compute_dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()
              if isinstance(v, torch.Tensor) and k != "token_type_ids"}  # LLaVA takes no token types
    gen: dict[str, Any] = {"max_new_tokens": int(settings.max_new_tokens), "num_beams": 1, "use_cache": True}
    if settings.temperature > 0:
        gen.update(do_sample=True, temperature=float(settings.temperature), top_p=float(settings.top_p))
    else:
        gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        gen["pad_token_id"] = pad
    if callbacks is not None:
        gen["stopping_criteria"] = _interrupt_criteria(callbacks)
    with torch.inference_mode(), seeded(settings.seed, device):
        out = llava.model.generate(**inputs, **gen)
    specials = getattr(tokenizer, "all_special_tokens", ())
    texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [clean_caption(t, specials) for t in texts]


def _pictures(images: torch.Tensor | Image.Image | Sequence[Image.Image]) -> list:
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4:
            raise ValueError(f"expected pictures as [B,3,H,W], got {tuple(images.shape)}")
        return list(images.unbind(0))
    return list(images)


def _caption_all(llava: Llava, pictures: list, settings: CaptionSettings, callbacks: Any) -> list[str]:
    captions: list[str] = []
    step = max(1, int(settings.batch_size))
    for i in range(0, len(pictures), step):
        notify(callbacks, "check_interrupt")
        group = pictures[i:i + step]
        captions += caption_group(llava, group, settings, callbacks)
        notify(callbacks, "progress", len(captions), len(pictures), group[-1])  # the picture or tile just described
    return captions


def caption_images(llava: Llava, images: torch.Tensor | Sequence[Image.Image], settings: CaptionSettings | None = None,
                   callbacks: Any = None) -> list[str]:
    """One caption per picture of ``images`` ([B,3,H,W] in 0..1, or PIL images), in order."""
    return _caption_all(llava, _pictures(images), settings or CaptionSettings(), callbacks)


def tile_pictures(images: torch.Tensor, tile: int, stride: int, max_megapixels: float = 0.0) -> torch.Tensor:
    """The tiles of every picture of ``images`` ([B,3,H,W] in 0..1) exactly as the tiled sampler cuts them
    (picture-major, tiles row by row; ``tile``/``stride`` in image pixels of the pictures given)."""
    from .pipeline import cut_tiles, settings

    s = settings(tile_size=int(tile), tile_stride=int(stride), tiling="on", max_megapixels=max_megapixels)
    return cut_tiles(images if images.ndim == 4 else images.unsqueeze(0), s)[0]


def tiles_per_picture(height: int, width: int, tile: int, stride: int, max_megapixels: float = 0.0) -> int:
    """How many tiles :func:`tile_pictures` cuts from one picture of ``height x width`` (errors for a stride
    larger than the tile, a too small picture or one over the size budget come here, before any work)."""
    from .pipeline import plan, settings
    from .tiles import image_windows

    s = settings(tile_size=int(tile), tile_stride=int(stride), tiling="on", max_megapixels=max_megapixels)
    return len(image_windows(*plan(s, height, width).internal, int(tile), int(stride)))


def caption_tiles(llava: Llava, images: torch.Tensor, tile: int, stride: int, settings: CaptionSettings | None = None,
                  callbacks: Any = None, max_megapixels: float = 0.0) -> list[str]:
    """One caption per tile per picture: picture-major, tiles in the sampler's row-major order.

    ``tile``/``stride`` are in image pixels of the pictures given, which must be the size the SUPIR
    tiled sampler works at for the captions to line up with its tiles.
    """
    crops = tile_pictures(images, tile, stride, max_megapixels)
    return _caption_all(llava, _pictures(crops), settings or CaptionSettings(), callbacks)


def generation_memory(llava: Llava, settings: CaptionSettings, prompt_tokens: int | None = None) -> int:
    """A generous estimate (bytes) of what one ``generate`` call needs beyond the weights: the KV
    cache of every picture of a group for the image + prompt + new tokens (LLaVA-1.5: 576 image
    tokens; NeXT: up to ~2900), plus half again and 512 MiB for the vision tower and the logits."""
    if prompt_tokens is None:
        prompt_tokens = 700 if llava.family == "llava" else 3000
    text_cfg = getattr(llava.model.config, "text_config", llava.model.config)
    hidden = getattr(text_cfg, "hidden_size", 4096)
    layers = getattr(text_cfg, "num_hidden_layers", 32)
    heads = getattr(text_cfg, "num_attention_heads", 32) or 32
    kv_dim = hidden * (getattr(text_cfg, "num_key_value_heads", None) or heads) // heads
    itemsize = torch.finfo(llava.compute_dtype).bits // 8 if llava.compute_dtype.is_floating_point else 2
    seq = prompt_tokens + int(settings.max_new_tokens)
    kv = 2 * layers * seq * kv_dim * itemsize * max(1, int(settings.batch_size))
    return int(kv * 1.5) + 512 * 1024 * 1024
