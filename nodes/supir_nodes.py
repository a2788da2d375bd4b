"""SUPIR nodes: loaders, first stage, encode, decode, colour fix and tiles (the sampler, conditioner and the
all-in-one Restore are in ``supir_sampler_nodes.py``).

Data between the nodes: ``PHOTORESTORE_SUPIR`` (:class:`SupirHandle`), ``PHOTORESTORE_SUPIR_COND`` (text
conditioning, one entry per prompt), IMAGE [B,H,W,C] in 0..1 and LATENT in ComfyUI's convention (``samples``
unscaled, so core VAE Decode / KSampler latents plug in too). Every node converts ComfyUI types and calls the
engine in ``supir/pipeline.py``. Images with NaN or infinite pixels, and empty batches, are refused with an
error naming the input (never spread over the result).
"""
from __future__ import annotations

from ..supir import pipeline as E
from ..weightfile import DictSource
from . import comfy
from .common import CATEGORY, PREFIX, bchw_to_image, image_to_bchw
from . import supir_io as IO

SUPIR = "PHOTORESTORE_SUPIR"
COND = "PHOTORESTORE_SUPIR_COND"
CAT = f"{CATEGORY}/SUPIR"

DTYPES = ["auto", "fp16", "bf16", "fp32", "fp8"]
VAE_DTYPES = ["auto", "bf16", "fp32"]
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def _supir_files() -> list[str]:
    return sorted(set(comfy.list_files("checkpoints")) | set(comfy.list_files("model_patches")))


def _supir_path(name: str) -> str:
    for key in ("checkpoints", "model_patches"):
        try:
            return comfy.full_path(key, name)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"SUPIR checkpoint '{name}' is in neither the 'checkpoints' nor the 'model_patches' folder.")


def tile_inputs(default_enc: int = 512, default_dec: int = 512) -> dict:
    """The tiled-VAE widgets (tile sizes in image pixels)."""
    return {
        "tiled_vae": ("BOOLEAN", {"default": True, "tooltip": "Encode/decode in tiles with whole-image normalisation: "
                                  "same result, bounded memory. Turn off only for small images on a large GPU."}),
        "encoder_tile_size": ("INT", {"default": default_enc, "min": 64, "max": 8192, "step": 64,
                                      "tooltip": "Encoder tile size in image pixels (tiled VAE only)."}),
        "decoder_tile_size": ("INT", {"default": default_dec, "min": 64, "max": 8192, "step": 64,
                                      "tooltip": "Decoder tile size in image pixels (tiled VAE only)."}),
    }


TILE_SIZE_INPUT = ("INT", {"default": 1024, "min": 256, "max": 4096, "step": 64,
                           "tooltip": "Sampler tile size in image pixels (official 1024)."})
TILE_STRIDE_INPUT = ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64,
                             "tooltip": "Distance between tiles in image pixels (official 512; smaller = more overlap, "
                             "fewer seams, slower). At most tile_size: a larger stride would leave gaps and is "
                             "refused."})
MAX_MEGAPIXELS_INPUT = ("FLOAT", {"default": E.MAX_MEGAPIXELS, "min": 0.0, "max": 4096.0, "step": 1.0, "tooltip":
                        "Size budget: refuse (with a clear error) any plan whose working image is above this many "
                        "megapixels instead of trying to allocate it. 0 = no limit."})


def unlist(value):
    """A single value from an INPUT_IS_LIST input (the first element of a list)."""
    return value[0] if isinstance(value, list) and value else value


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------

class LoadSupir:
    DESCRIPTION = ("Loads SUPIR from an SDXL checkpoint (UNet, VAE, both text encoders) and a SUPIR checkpoint "
                   "(SUPIR-v0Q for quality, v0F for fidelity). Nothing is downloaded.")
    CATEGORY = CAT
    FUNCTION = "load"
    RETURN_TYPES = (SUPIR,)
    RETURN_NAMES = ("supir",)
    OUTPUT_TOOLTIPS = ("The SUPIR model (SDXL + control adapter + denoise encoder), for every SUPIR node.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sdxl_checkpoint": (comfy.list_files("checkpoints"), {
                "tooltip": "SDXL base or any SDXL finetune (.safetensors with UNet, VAE and both CLIPs) from the "
                           "'checkpoints' folder. Lightning finetunes go with the Lightning preset."}),
            "supir_checkpoint": (_supir_files(), {
                "tooltip": "SUPIR-v0Q / SUPIR-v0F (.ckpt, or an fp16 .safetensors conversion) from 'checkpoints' "
                           "or 'model_patches'."}),
            "weight_dtype": (DTYPES, {"default": "auto", "tooltip": "Storage dtype of the diffusion weights. auto: "
                             "bf16 where supported, else fp16 on GPU, fp32 on CPU. fp32: the official numbers (an "
                             "fp16 file stays fp16 in memory and is cast per layer). bf16/fp16: half the memory, "
                             "results differ by about 0.6 % per step; much faster on GPUs, not on CPUs without "
                             "AMX. fp8: a quarter of fp32's memory, computed in bf16 with a per-layer up-cast "
                             "(slower), at a small quality cost."}),
            "vae_dtype": (VAE_DTYPES, {"default": "auto", "tooltip": "VAE dtype (fp16 is not offered: the SDXL VAE "
                          "overflows in it). auto: bf16 where supported, else fp32."}),
        }, "optional": {
            "compile": ("BOOLEAN", {"default": False, "tooltip": "torch.compile the denoiser (control + UNet). The "
                        "first step of each new image/tile size waits for compilation (about 3 minutes on an H200); "
                        "later steps ran about as fast as without it there (bf16, 512 px), so leave it off unless it "
                        "measurably helps on your machine. Needs a C++ compiler on CPU, triton on NVIDIA GPUs."}),
        }}

    def load(self, sdxl_checkpoint, supir_checkpoint, weight_dtype, vae_dtype, compile=False):
        sdxl = comfy.full_path("checkpoints", sdxl_checkpoint)
        supir = _supir_path(supir_checkpoint)
        handle = IO.load_supir_files(sdxl, supir, weight_dtype, vae_dtype, name=supir_checkpoint)
        if compile:
            from ..supir.compile import maybe_compile
            maybe_compile(handle.model.diffusion, True)
        return (handle,)


class LoadSupirFromModel:
    DESCRIPTION = ("Builds SUPIR from an SDXL MODEL, CLIP and VAE already loaded in ComfyUI (LoRAs and merges "
                   "included, baked in) plus a SUPIR checkpoint.")
    CATEGORY = CAT
    FUNCTION = "load"
    RETURN_TYPES = (SUPIR,)
    RETURN_NAMES = ("supir",)
    OUTPUT_TOOLTIPS = ("The SUPIR model built on your SDXL model, for every SUPIR node.",)

    @classmethod
    def INPUT_TYPES(cls):
        spec = LoadSupir.INPUT_TYPES()["required"]
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SDXL MODEL (e.g. from Load Checkpoint, after LoRAs)."}),
            "clip": ("CLIP", {"tooltip": "The SDXL CLIP (CLIP-L + OpenCLIP bigG) of that model."}),
            "vae": ("VAE", {"tooltip": "The SDXL VAE."}),
            "supir_checkpoint": spec["supir_checkpoint"],
            "weight_dtype": spec["weight_dtype"],
            "vae_dtype": spec["vae_dtype"],
        }}

    def load(self, model, clip, vae, supir_checkpoint, weight_dtype, vae_dtype):
        # ComfyUI keeps these tensors as its model's live weights (hooks patch them in place): the loaders copy
        sdxl = DictSource(comfy.state_dicts_from_comfy(model, clip, vae), "SDXL (ComfyUI MODEL/CLIP/VAE)",
                          borrowed=True)
        supir = _supir_path(supir_checkpoint)
        return (IO.load_supir_files(sdxl, supir, weight_dtype, vae_dtype, name=supir_checkpoint),)


# --------------------------------------------------------------------------------------------
# First stage, encode, decode
# --------------------------------------------------------------------------------------------

def _vae_settings(tiled_vae: bool, encoder_tile_size: int = 512, decoder_tile_size: int = 512,
                  max_megapixels: float = 0.0, **more) -> E.RestoreSettings:
    return E.settings(tiled_vae=bool(tiled_vae), encoder_tile_size=int(encoder_tile_size),
                      decoder_tile_size=int(decoder_tile_size), max_megapixels=float(max_megapixels), **more)


class FirstStage:
    DESCRIPTION = ("SUPIR's first stage: the degradation-robust encoder cleans the photo into a latent (the control "
                   "for the sampler) and its decoded version (the stage-1 image, for captions and colour fix). "
                   "Images with NaN or infinite pixels are refused with an error, never spread.")
    CATEGORY = CAT
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("stage1_image", "control_latent")
    OUTPUT_TOOLTIPS = ("The cleaned (still blurry) image at the input size: caption it, or use it as colour reference.",
                       "The control latent for SUPIR Sampler (unscaled, ComfyUI convention; internally sized to "
                       "multiples of 64 px, the true size is remembered).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "supir": (SUPIR, {"tooltip": "From Load SUPIR."}),
            "image": ("IMAGE", {"tooltip": "The photo at the final size (upscale it first, e.g. Upscale Image By "
                                "lanczos x2). Gray is made RGB, alpha is composited over white."}),
            **tile_inputs(),
        }, "optional": {"max_megapixels": MAX_MEGAPIXELS_INPUT}}

    def run(self, supir, image, tiled_vae, encoder_tile_size, decoder_tile_size, max_megapixels=E.MAX_MEGAPIXELS):
        x = image_to_bchw(image)
        s = _vae_settings(tiled_vae, encoder_tile_size, decoder_tile_size, max_megapixels)
        with comfy.Progress(max(x.shape[0], 1), "SUPIR first stage") as bar:
            z, stage1, p = E.first_stage(x, supir.model, s, IO.NodeCallbacks(bar, supir))
        return bchw_to_image(stage1), IO.latent_dict(z, x.shape[-2:], p.work)


class Encode:
    DESCRIPTION = ("Encodes an image with the SDXL VAE encoder into a latent -- by default a posterior sample, as the "
                   "official pipeline encodes the stage-1 image for restoration guidance (restore_cfg).")
    CATEGORY = CAT
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The latent (unscaled, ComfyUI convention; sized like the first stage's control latent).",)

    @classmethod
    def INPUT_TYPES(cls):
        tiles = tile_inputs()
        return {"required": {
            "supir": (SUPIR, {"tooltip": "From Load SUPIR."}),
            "image": ("IMAGE", {"tooltip": "The image to encode (usually the stage-1 image)."}),
            "tiled_vae": tiles["tiled_vae"],
            "encoder_tile_size": tiles["encoder_tile_size"],
        }, "optional": {
            "posterior": (["sample", "mode"], {"default": "sample", "tooltip": "sample: a draw from the encoder's "
                          "posterior, as the official pipeline's guidance target E(stage-1). mode: its mean "
                          "(deterministic)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "tooltip": "Seed of the posterior draw; image "
                             "i of a batch uses seed + i."}),
        }}

    def encode(self, supir, image, tiled_vae, encoder_tile_size, posterior="sample", seed=0):
        x = image_to_bchw(image)
        s = _vae_settings(tiled_vae, encoder_tile_size, seed=int(seed))
        E.choice(posterior, ("sample", "mode"), "posterior")
        with comfy.Progress(max(x.shape[0], 1), "SUPIR encode") as bar:
            z, p = E.encode(x, supir.model, s, IO.NodeCallbacks(bar, supir), sample=posterior == "sample")
        return (IO.latent_dict(z, x.shape[-2:], p.work),)


class Decode:
    DESCRIPTION = ("Decodes a latent with the SDXL VAE back to an image, at the size the first stage remembered "
                   "(8x the latent once a core node has changed its size).")
    CATEGORY = CAT
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded image (clamped to 0..1).",)

    @classmethod
    def INPUT_TYPES(cls):
        tiles = tile_inputs()
        return {"required": {
            "supir": (SUPIR, {"tooltip": "From Load SUPIR."}),
            "latent": ("LATENT", {"tooltip": "From SUPIR Sampler (or any SDXL LATENT: unscaled ComfyUI convention)."}),
            "tiled_vae": tiles["tiled_vae"],
            "decoder_tile_size": tiles["decoder_tile_size"],
        }}

    def decode(self, supir, latent, tiled_vae, decoder_tile_size):
        z = IO.scaled_latent(latent)
        s = _vae_settings(tiled_vae, decoder_tile_size=decoder_tile_size)
        with comfy.Progress(max(z.shape[0], 1), "SUPIR decode") as bar:
            x = E.decode(z, supir.model, s, IO.NodeCallbacks(bar, supir), IO.latent_work(latent),
                         IO.latent_size(latent))
        return (bchw_to_image(x),)


# --------------------------------------------------------------------------------------------
# Colour fix, tiles
# --------------------------------------------------------------------------------------------

class ColorFix:
    DESCRIPTION = ("Gives the restored image the colours of a reference (the stage-1 image, or any image): Wavelet "
                   "keeps the restored detail on the reference's low frequencies, AdaIN matches channel statistics.")
    CATEGORY = CAT
    FUNCTION = "fix"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The colour-corrected image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The restored image."}),
            "reference": ("IMAGE", {"tooltip": "Colour reference (official: the stage-1 image); resized to the image "
                          "if needed; one for all or one per image."}),
            "method": (list(E.COLOR_FIXES), {"default": "Wavelet", "tooltip": "Wavelet (official default), AdaIN, or "
                       "None (pass through)."}),
        }}

    def fix(self, image, reference, method):
        out = E.color_fix_images(image_to_bchw(image), image_to_bchw(reference, "reference"), method)
        return (bchw_to_image(out),)


class Tiles:
    DESCRIPTION = ("Cuts an image into the SUPIR sampler's tile grid (same sizes and order as tiled sampling), e.g. "
                   "to caption every tile.")
    CATEGORY = CAT
    FUNCTION = "tile"
    RETURN_TYPES = ("IMAGE", "STRING", "INT", "INT", "INT")
    RETURN_NAMES = ("tiles", "layout", "tile_count", "rows", "columns")
    OUTPUT_TOOLTIPS = ("Every tile of every image as one batch (image by image, rows then columns).",
                       "The grid in words and each tile's box (top, bottom, left, right) in pixels.",
                       "Tiles per image.", "Tile rows.", "Tile columns.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image SUPIR will restore (e.g. the stage-1 image)."}),
            "tile_size": TILE_SIZE_INPUT,
            "tile_stride": TILE_STRIDE_INPUT,
        }, "optional": {
            "upscale_by": ("FLOAT", {"default": 1.0, "min": 0.25, "max": 8.0, "step": 0.05, "tooltip":
                           "1 when the image is already at its final size (step-by-step graph); SUPIR Restore's "
                           "upscale_by when captioning for SUPIR Restore."}),
            "min_short_side": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64, "tooltip":
                               "0 for the step-by-step graph; SUPIR Restore's min_short_side when captioning for it."}),
        }}

    def tile(self, image, tile_size, tile_stride, upscale_by=1.0, min_short_side=0):
        s = E.settings(tile_size=int(tile_size), tile_stride=int(tile_stride), tiling="on", upscale_by=upscale_by,
                       min_short_side=int(min_short_side))
        tiles, windows, p = E.cut_tiles(image_to_bchw(image), s)
        rows = len({win[0] for win in windows})
        cols = len(windows) // rows
        th, tw = windows[0][1] - windows[0][0], windows[0][3] - windows[0][2]
        boxes = " ".join(f"({h0},{h1},{w0},{w1})" for h0, h1, w0, w1 in windows)
        layout = (f"{rows} rows x {cols} columns = {len(windows)} tiles of {tw}x{th} px per image, stride "
                  f"{tile_stride} px, on the {p.internal[1]}x{p.internal[0]} px sampling grid; boxes "
                  f"(top,bottom,left,right): {boxes}")
        return bchw_to_image(tiles), layout, len(windows), rows, cols


_NODES = {
    "SupirLoader": (LoadSupir, "Load SUPIR"),
    "SupirLoaderFromModel": (LoadSupirFromModel, "Load SUPIR (from MODEL/CLIP/VAE)"),
    "SupirFirstStage": (FirstStage, "SUPIR First Stage"),
    "SupirEncode": (Encode, "SUPIR Encode"),
    "SupirDecode": (Decode, "SUPIR Decode"),
    "SupirColorFix": (ColorFix, "SUPIR Colour Fix"),
    "SupirTiles": (Tiles, "SUPIR Tiles"),
}
NODE_CLASS_MAPPINGS = {f"{PREFIX}{k}": cls for k, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {f"{PREFIX}{k}": name for k, (_, name) in _NODES.items()}
