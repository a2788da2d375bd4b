"""Load LLaVA and LLaVA Caption: captions of the (denoised) picture, per image or per tile, that
steer SUPIR's positive prompt — or any other text input."""
from __future__ import annotations

from ..supir.caption import (
    CAPTION_SHORT_SIDE,
    DEFAULT_QUESTION,
    QUANTIZATIONS,
    CaptionSettings,
    caption_images,
    caption_tiles,
    generation_memory,
    load_llava,
    tiles_per_picture,
)
from ..supir.pipeline import MAX_MEGAPIXELS, check_images
from .comfy import (
    Managed,
    Progress,
    folder_paths_for,
    full_path,
    list_dirs,
    load,
    manage,
    offload_device,
    pick_dtype,
    torch_device,
    unload,
)
from .common import CATEGORY, PREFIX, image_to_bchw

LLAVA_TYPE = "PHOTORESTORE_LLAVA"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def llava_folder(name: str) -> str:
    """The folder of ``name`` under ``models/LLM``; a FileNotFoundError saying where to put it otherwise."""
    try:
        return full_path("LLM", name)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"LLaVA folder '{name}' was not found in the LLM model folder "
            f"(searched: {', '.join(folder_paths_for('LLM'))}). Put a Hugging Face-format LLaVA folder at "
            f"models/LLM/<name>, e.g. models/LLM/llava-1.5-7b-hf downloaded from llava-hf/llava-1.5-7b-hf."
        ) from None


class LoadLlava:
    """Loads a Hugging Face-format LLaVA-1.5 or LLaVA-NeXT folder from models/LLM."""

    DESCRIPTION = ("Loads a LLaVA vision-language model (Hugging Face format, from models/LLM) that describes "
                   "pictures in words; ComfyUI moves it to the GPU only while captioning.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (LLAVA_TYPE,)
    RETURN_NAMES = ("llava",)
    OUTPUT_TOOLTIPS = ("The LLaVA model and its processor, for LLaVA Caption.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (list_dirs("LLM"), {"tooltip": "A LLaVA folder in models/LLM, e.g. llava-1.5-7b-hf "
                                                        "(llava-hf/llava-1.5-7b-hf) or a llava-v1.6 '-hf' folder."}),
                "dtype": (["auto", "fp16", "bf16", "fp32"], {
                    "default": "auto",
                    "tooltip": "Weight precision. auto: bf16 or fp16 on a GPU, fp32 on the CPU. The official "
                               "pipeline uses fp16."}),
                "quantization": (list(QUANTIZATIONS), {
                    "default": "none",
                    "tooltip": "8bit/4bit need the bitsandbytes package and a CUDA GPU (about 8 GB for the 7B "
                               "model in 8bit); quantized weights stay on the GPU."}),
            }
        }

    def load(self, model: str, dtype: str, quantization: str):
        folder = llava_folder(model)
        device = torch_device()
        weight_dtype = pick_dtype(dtype, device, allow=("bf16", "fp16", "fp32"))
        if quantization == "none":
            return (manage(load_llava(folder, weight_dtype, "none", offload_device()), folder=folder),)
        # bitsandbytes weights cannot be moved between devices: they load onto the GPU and stay there.
        return (Managed(load_llava(folder, weight_dtype, quantization, device), None, {"folder": folder}),)


class LlavaCaption:
    """Captions every picture (or every tile of every picture) of a batch with LLaVA."""

    DESCRIPTION = ("Describes each picture in words with LLaVA (optionally one caption per tile, in the SUPIR tiled "
                   "sampler's order) so the text can steer SUPIR's positive prompt or any other text input.")
    CATEGORY = CATEGORY
    FUNCTION = "caption"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("captions", "text")
    OUTPUT_IS_LIST = (True, False)
    OUTPUT_TOOLTIPS = (
        "One caption per picture, or per tile per picture (picture by picture, tiles row by row), as a list.",
        "The same captions as one text, one caption per line.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llava": (LLAVA_TYPE, {"tooltip": "A model from Load LLaVA."}),
                "image": ("IMAGE", {"tooltip": "The pictures to describe; for SUPIR the stage-1 (denoised) output, "
                                               "at the size the sampler works at when captioning tiles."}),
                "question": ("STRING", {"default": DEFAULT_QUESTION, "multiline": True,
                                        "tooltip": "What LLaVA is asked about each picture (the official SUPIR "
                                                   "question by default)."}),
                "temperature": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 2.0, "step": 0.05,
                                          "tooltip": "Sampling temperature; 0 always picks the likeliest word."}),
                "top_p": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.05,
                                    "tooltip": "Nucleus sampling: only the likeliest words covering this "
                                               "probability are drawn from."}),
                "max_new_tokens": ("INT", {"default": 512, "min": 1, "max": 4096,
                                           "tooltip": "Longest caption, in tokens. SDXL's text encoders only read "
                                                      "77 tokens of the whole prompt."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED,
                                 "tooltip": "Seed of the word sampling; every picture and tile uses it, so a "
                                            "caption depends only on its picture."}),
                "preprocess": (["crop", "pad"], {
                    "default": "crop",
                    "tooltip": "crop: as the official pipeline, LLaVA sees the centre square of the picture. "
                               "pad: the picture is padded to a square so LLaVA sees all of it."}),
                "tile_size": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8,
                                      "tooltip": "0: one caption per picture. Otherwise the tile size in pixels "
                                                 "(the SUPIR tiled sampler's tile size, e.g. 1024) and one caption "
                                                 "per tile."}),
                "tile_stride": ("INT", {"default": 512, "min": 8, "max": 16384, "step": 8,
                                        "tooltip": "Distance between tiles in pixels (the sampler's tile stride, "
                                                   "e.g. 512); used when tile_size is not 0."}),
                "unload_after": ("BOOLEAN", {"default": False,
                                             "tooltip": "Move LLaVA off the GPU right after captioning to leave "
                                                        "room for SUPIR."}),
            },
            "optional": {
                "short_side": ("INT", {"default": CAPTION_SHORT_SIDE, "min": 0, "max": 4096, "step": 8,
                                       "tooltip": "Each picture or tile is first resized so its short side is "
                                                  "this (512 as in the official pipeline); 0 keeps its size."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Pictures or tiles captioned together: more is faster on a GPU "
                                                  "but needs more memory, and sampled captions then also depend "
                                                  "on their neighbours. 1: each caption depends only on its "
                                                  "picture."}),
                "template": ("STRING", {"default": "", "multiline": False,
                                        "tooltip": "Prompt format with {question}, e.g. 'USER: <image>\\n{question} "
                                                   "ASSISTANT:'. Empty: for LLaVA-1.5 the official vicuna_v1 "
                                                   "conversation (system sentence, USER: / ASSISTANT:), for "
                                                   "LLaVA-NeXT the model's own chat template."}),
                "max_megapixels": ("FLOAT", {"default": MAX_MEGAPIXELS, "min": 0.0, "max": 4096.0, "step": 1.0,
                                             "tooltip": "Per-tile captions: refuse (with a clear error) pictures "
                                                        "whose padded sampling size is above this many megapixels. "
                                                        "0 = no limit."}),
            },
        }

    def caption(self, llava: Managed, image, question: str, temperature: float, top_p: float, max_new_tokens: int,
                seed: int, preprocess: str, tile_size: int, tile_stride: int, unload_after: bool,
                short_side: int = CAPTION_SHORT_SIDE, batch_size: int = 1, template: str = "",
                max_megapixels: float = MAX_MEGAPIXELS):
        settings = CaptionSettings(question=question, temperature=temperature, top_p=top_p,
                                   max_new_tokens=max_new_tokens, seed=seed, preprocess=preprocess,
                                   short_side=short_side, template=template, batch_size=batch_size)
        pictures = check_images(image_to_bchw(image))
        per_picture = tiles_per_picture(*pictures.shape[-2:], tile_size, tile_stride, max_megapixels) if tile_size \
            else 1
        managed_here = llava.patcher is not None or llava.model.quantization == "none"
        model = load(llava, generation_memory(llava.model, settings)) if managed_here else llava.model
        try:
            with Progress(len(pictures) * per_picture, "LLaVA captions") as progress:
                if tile_size:
                    captions = caption_tiles(model, pictures, tile_size, tile_stride, settings, progress,
                                             max_megapixels)
                else:
                    captions = caption_images(model, pictures, settings, progress)
        finally:
            if unload_after and managed_here:
                unload(llava)
        return (captions, "\n".join(captions))


NODE_CLASS_MAPPINGS = {f"{PREFIX}LoadLlava": LoadLlava, f"{PREFIX}LlavaCaption": LlavaCaption}
NODE_DISPLAY_NAME_MAPPINGS = {
    f"{PREFIX}LoadLlava": "Load LLaVA (Photo Restoration)",
    f"{PREFIX}LlavaCaption": "LLaVA Caption (Photo Restoration)",
}
