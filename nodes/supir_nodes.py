"""SUPIR nodes: loaders, the step-by-step graph (first stage, encode, conditioner, sampler, decode,
colour fix, tiles) and the all-in-one Restore.

Data between the nodes: ``PHOTORESTORE_SUPIR`` (:class:`SupirHandle`), ``PHOTORESTORE_SUPIR_COND``
(text conditioning, one entry per prompt), IMAGE [B,H,W,C] in 0..1 and LATENT in ComfyUI's
convention (``samples`` unscaled, so core VAE Decode / KSampler latents plug in too).
"""
from __future__ import annotations

import torch

from . import comfy
from .common import CATEGORY, PREFIX, bchw_to_image, image_to_bchw
from . import supir_support as S

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


def _tile_inputs(default_enc: int = 512, default_dec: int = 512) -> dict:
    return {
        "tiled_vae": ("BOOLEAN", {"default": True, "tooltip": "Encode/decode in tiles with whole-image normalisation: "
                                  "same result, bounded memory. Turn off only for small images on a large GPU."}),
        "encoder_tile_size": ("INT", {"default": default_enc, "min": 64, "max": 8192, "step": 64,
                                      "tooltip": "Encoder tile size in image pixels (tiled VAE only)."}),
        "decoder_tile_size": ("INT", {"default": default_dec, "min": 64, "max": 8192, "step": 64,
                                      "tooltip": "Decoder tile size in image pixels (tiled VAE only)."}),
    }


def _vae_tiles(tiled: bool, size_px: int) -> int | None:
    return int(size_px) if tiled else None


def _unlist(value):
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
                             "bf16 where supported, else fp16 on GPU, fp32 on CPU. fp8 halves the memory of fp16 "
                             "(computed in bf16) at a small quality cost."}),
            "vae_dtype": (VAE_DTYPES, {"default": "auto", "tooltip": "VAE dtype (fp16 is not offered: the SDXL VAE "
                          "overflows in it). auto: bf16 where supported, else fp32."}),
        }, "optional": {
            "compile": ("BOOLEAN", {"default": False, "tooltip": "torch.compile the denoiser (control + UNet). The "
                        "first step of each new image/tile size waits for compilation (minutes); later steps run "
                        "faster, mostly on GPUs. Needs a C++ compiler on CPU, triton on NVIDIA GPUs."}),
        }}

    def load(self, sdxl_checkpoint, supir_checkpoint, weight_dtype, vae_dtype, compile=False):
        sdxl = comfy.full_path("checkpoints", sdxl_checkpoint)
        supir = _supir_path(supir_checkpoint)
        handle = S.load_supir_files(sdxl, supir, weight_dtype, vae_dtype, name=supir_checkpoint)
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
        sdxl = comfy.state_dicts_from_comfy(model, clip, vae)
        supir = _supir_path(supir_checkpoint)
        return (S.load_supir_files(sdxl, supir, weight_dtype, vae_dtype, name=supir_checkpoint),)


# --------------------------------------------------------------------------------------------
# First stage, encode, decode
# --------------------------------------------------------------------------------------------

class FirstStage:
    DESCRIPTION = ("SUPIR's first stage: the degradation-robust encoder cleans the photo into a latent (the control "
                   "for the sampler) and its decoded version (the stage-1 image, for captions and colour fix).")
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
                                "lanczos x2)."}),
            **_tile_inputs(),
        }}

    def run(self, supir, image, tiled_vae, encoder_tile_size, decoder_tile_size):
        x = image_to_bchw(image)
        b, _, h, w = x.shape
        p = S.plan(h, w)
        stage1, z = [], []
        with comfy.Progress(b, "SUPIR first stage") as bar:
            for i in range(b):
                bar.check_interrupt()
                xi = S.fit(x[i:i + 1], p).clamp(0, 1) * 2 - 1
                with S.oom_advice("the first stage (VAE)", *p.internal, tiled_vae):
                    zi, si = S.first_stage(supir, xi, _vae_tiles(tiled_vae, encoder_tile_size),
                                           _vae_tiles(tiled_vae, decoder_tile_size))
                stage1.append(S.unfit((si.float().cpu() + 1) / 2, p.work, (h, w)))
                z.append(zi.float().cpu())
                bar.advance()
        return bchw_to_image(torch.cat(stage1)), S.latent_dict(torch.cat(z), (h, w), p.work)


class Encode:
    DESCRIPTION = ("Encodes an image with the SDXL VAE encoder into a latent (posterior mode), e.g. the stage-1 image "
                   "as the target of restoration guidance (restore_cfg) in SUPIR Sampler.")
    CATEGORY = CAT
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The latent (unscaled, ComfyUI convention; sized like the first stage's control latent).",)

    @classmethod
    def INPUT_TYPES(cls):
        tiles = _tile_inputs()
        return {"required": {
            "supir": (SUPIR, {"tooltip": "From Load SUPIR."}),
            "image": ("IMAGE", {"tooltip": "The image to encode (usually the stage-1 image)."}),
            "tiled_vae": tiles["tiled_vae"],
            "encoder_tile_size": tiles["encoder_tile_size"],
        }}

    def encode(self, supir, image, tiled_vae, encoder_tile_size):
        x = image_to_bchw(image)
        b, _, h, w = x.shape
        p = S.plan(h, w)
        z = []
        with comfy.Progress(b, "SUPIR encode") as bar:
            for i in range(b):
                bar.check_interrupt()
                xi = S.fit(x[i:i + 1], p).clamp(0, 1) * 2 - 1
                with S.oom_advice("encoding (VAE)", *p.internal, tiled_vae):
                    z.append(S.vae_encode(supir, xi, _vae_tiles(tiled_vae, encoder_tile_size)).float().cpu())
                bar.advance()
        return (S.latent_dict(torch.cat(z), (h, w), p.work),)


class Decode:
    DESCRIPTION = "Decodes a latent with the SDXL VAE back to an image, at the size the first stage remembered."
    CATEGORY = CAT
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded image (clamped to 0..1).",)

    @classmethod
    def INPUT_TYPES(cls):
        tiles = _tile_inputs()
        return {"required": {
            "supir": (SUPIR, {"tooltip": "From Load SUPIR."}),
            "latent": ("LATENT", {"tooltip": "From SUPIR Sampler (or any SDXL LATENT: unscaled ComfyUI convention)."}),
            "tiled_vae": tiles["tiled_vae"],
            "decoder_tile_size": tiles["decoder_tile_size"],
        }}

    def decode(self, supir, latent, tiled_vae, decoder_tile_size):
        z = S.scaled_latent(latent)
        size, work = S.latent_size(latent), S.latent_work(latent)
        out = []
        with comfy.Progress(z.shape[0], "SUPIR decode") as bar:
            for i in range(z.shape[0]):
                bar.check_interrupt()
                with S.oom_advice("decoding (VAE)", z.shape[-2] * 8, z.shape[-1] * 8, tiled_vae):
                    xi = S.vae_decode(supir, z[i:i + 1], _vae_tiles(tiled_vae, decoder_tile_size))
                out.append(S.unfit(((xi.float().cpu() + 1) / 2).clamp(0, 1), work, size).clamp(0, 1))
                bar.advance()
        return (bchw_to_image(torch.cat(out)),)


# --------------------------------------------------------------------------------------------
# Conditioner and sampler
# --------------------------------------------------------------------------------------------

class Conditioner:
    DESCRIPTION = ("Turns the positive/negative prompts, optionally with captions (one for all, one per image or "
                   "one per tile), into SUPIR's SDXL text conditioning.")
    CATEGORY = CAT
    FUNCTION = "condition"
    INPUT_IS_LIST = True
    RETURN_TYPES = (COND, COND)
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("Positive conditioning: one entry per caption (or one without captions).",
                       "Negative conditioning (one entry).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "supir": (SUPIR, {"tooltip": "From Load SUPIR (its SDXL text encoders are used)."}),
            "positive_prompt": ("STRING", {"multiline": True, "default": S.OFFICIAL_POSITIVE,
                                           "tooltip": "Quality words appended to every caption (official default)."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": S.OFFICIAL_NEGATIVE,
                                           "tooltip": "What to steer away from (official default)."}),
            "caption_mode": (list(S.CAPTION_MODES), {"default": S.CAPTION_MODES[0], "tooltip":
                             "official: caption + positive prompt, and the text encoders keep the first 77 tokens "
                             "(long captions push the positive prompt out). keep positive: the positive prompt is "
                             "kept whole and the caption is cut to the tokens left."}),
        }, "optional": {
            "captions": ("STRING", {"forceInput": True, "tooltip": "Captions (e.g. from LLaVA Caption): one for all "
                         "images, one per image, or one per sampler tile (a list, or one caption per line)."}),
        }}

    def condition(self, supir, positive_prompt, negative_prompt, caption_mode, captions=None):
        handle = _unlist(supir)
        positive, negative, mode = _unlist(positive_prompt), _unlist(negative_prompt), _unlist(caption_mode)
        caps = S.split_captions(captions)
        texts = [S.join_prompt(c, positive, mode) for c in caps] or [positive]
        return S.encode_prompts(handle, texts), S.encode_prompts(handle, [negative])


def sampler_inputs() -> dict:
    """The sampling widgets shared by SUPIR Sampler (defaults: the official Quality preset)."""
    q = S.PRESETS["Quality"]
    return {
        "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                         "tooltip": "Noise seed; image i of a batch uses seed + i."}),
        "sampler": (list(S.SAMPLERS), {"default": "EDM", "tooltip": "EDM: the official restoration sampler (50 "
                    "steps). DPM++ 2M SDE: for Lightning SDXL models (8-10 steps)."}),
        "steps": ("INT", {"default": q.steps, "min": 1, "max": 500, "tooltip": "Sampling steps (official 50; "
                  "Lightning 8)."}),
        "cfg_scale_start": ("FLOAT", {"default": q.cfg_scale_start, "min": 0.0, "max": 100.0, "step": 0.05,
                                      "tooltip": "Prompt guidance at the first (noisiest) step; moves linearly to "
                                      "cfg_scale_end. Quality preset 4, Fidelity 1."}),
        "cfg_scale_end": ("FLOAT", {"default": q.cfg_scale, "min": 0.0, "max": 100.0, "step": 0.05,
                                    "tooltip": "Prompt guidance at the last step (official s_cfg: Quality 7.5, "
                                    "Fidelity 4)."}),
        "control_scale_start": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                          "tooltip": "How strongly the photo steers the first step (1 = official)."}),
        "control_scale_end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                        "tooltip": "Control strength at the last step; below 1 (e.g. 0.9) gives the "
                                        "model more freedom for detail."}),
        "restore_cfg": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 20.0, "step": 0.1,
                                  "tooltip": "Restoration guidance: pulls early steps toward x_center (higher = "
                                  "closer to the input). -1 turns it off (official default)."}),
        "s_churn": ("FLOAT", {"default": q.s_churn, "min": 0.0, "max": 40.0, "step": 0.5,
                              "tooltip": "EDM: noise re-injected per step (official 5)."}),
        "s_noise": ("FLOAT", {"default": q.s_noise, "min": 1.0, "max": 1.1, "step": 0.001,
                              "tooltip": "Scale of the re-injected noise (official 1.003)."}),
        "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                          "tooltip": "DPM++ 2M SDE: stochasticity (1 = full SDE, 0 = deterministic)."}),
        "tiled": ("BOOLEAN", {"default": False, "tooltip": "Tiled sampling: bounded memory for large images, "
                              "slower (each tile is a full model pass)."}),
        "tile_size": ("INT", {"default": 1024, "min": 256, "max": 4096, "step": 64,
                              "tooltip": "Sampler tile size in image pixels (official 1024)."}),
        "tile_stride": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64,
                                "tooltip": "Distance between tiles in image pixels (official 512; smaller = more "
                                "overlap, fewer seams, slower)."}),
        "tile_batch_size": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Tiles evaluated together: "
                                    "faster on a big GPU, 1 uses least memory."}),
    }


class Sampler:
    DESCRIPTION = ("SUPIR's restoration sampler: generates a clean latent from noise, steered by the control "
                   "latent of the photo and the text conditioning.")
    CATEGORY = CAT
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The restored latent (unscaled, ComfyUI convention): SUPIR Decode or core VAE Decode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "supir": (SUPIR, {"tooltip": "From Load SUPIR."}),
            "positive": (COND, {"tooltip": "From SUPIR Conditioner."}),
            "negative": (COND, {"tooltip": "From SUPIR Conditioner."}),
            "control_latent": ("LATENT", {"tooltip": "From SUPIR First Stage (a core VAE Encode latent works too)."}),
            **sampler_inputs(),
        }, "optional": {
            "x_center": ("LATENT", {"tooltip": "Target of restoration guidance (SUPIR Encode of the stage-1 image); "
                         "default: the control latent. Used only when restore_cfg > 0."}),
        }}

    def sample(self, supir, positive, negative, control_latent, seed, sampler, steps, cfg_scale_start, cfg_scale_end,
               control_scale_start, control_scale_end, restore_cfg, s_churn, s_noise, eta, tiled, tile_size,
               tile_stride, tile_batch_size, x_center=None):
        settings = S.SamplerSettings(
            sampler=S.SAMPLERS[sampler], steps=steps, seed=seed, cfg_scale_start=cfg_scale_start,
            cfg_scale=cfg_scale_end, control_scale_start=control_scale_start, control_scale=control_scale_end,
            restore_cfg=restore_cfg, s_churn=s_churn, s_noise=s_noise, eta=eta, tiled=tiled, tile_size=tile_size,
            tile_stride=tile_stride, tile_batch_size=tile_batch_size)
        hint = S.scaled_latent(control_latent)
        center = S.scaled_latent(x_center) if x_center is not None else None
        if center is not None and center.shape != hint.shape:
            raise ValueError(f"x_center {tuple(center.shape)} and control_latent {tuple(hint.shape)} differ in shape; "
                             "encode the stage-1 image of the same batch.")
        z = S.sample_batch(supir, hint, center, positive, negative, settings)
        return ({**S.latent_dict(z), **S.size_keys(control_latent)},)


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
            "method": (list(S.COLOR_FIXES), {"default": "Wavelet", "tooltip": "Wavelet (official default), AdaIN, or "
                       "None (pass through)."}),
        }}

    def fix(self, image, reference, method):
        return (S.color_fix_images(image, reference, method),)


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
        spec = sampler_inputs()
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image SUPIR will restore (e.g. the stage-1 image)."}),
            "tile_size": spec["tile_size"],
            "tile_stride": spec["tile_stride"],
        }, "optional": {
            "upscale_by": ("FLOAT", {"default": 1.0, "min": 0.25, "max": 8.0, "step": 0.05, "tooltip":
                           "1 when the image is already at its final size (step-by-step graph); SUPIR Restore's "
                           "upscale_by when captioning for SUPIR Restore."}),
            "min_short_side": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64, "tooltip":
                               "0 for the step-by-step graph; SUPIR Restore's min_short_side when captioning for it."}),
        }}

    def tile(self, image, tile_size, tile_stride, upscale_by=1.0, min_short_side=0):
        tiles, layout, rows, cols = S.cut_tiles(image_to_bchw(image), tile_size, tile_stride, upscale_by,
                                                min_short_side)
        return bchw_to_image(tiles), layout, rows * cols, rows, cols


# --------------------------------------------------------------------------------------------
# All in one
# --------------------------------------------------------------------------------------------

class Restore:
    DESCRIPTION = ("Restores and upscales photos with SUPIR in one node: first stage, prompts (+ captions), "
                   "sampling with an official preset, decoding and colour fix, tiling large images automatically.")
    CATEGORY = CAT
    FUNCTION = "restore"
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The restored image(s), exactly round(input size x upscale_by).",)

    @classmethod
    def INPUT_TYPES(cls):
        spec = sampler_inputs()
        return {"required": {
            "supir": (SUPIR, {"tooltip": "From Load SUPIR."}),
            "image": ("IMAGE", {"tooltip": "The photo(s) to restore."}),
            "upscale_by": ("FLOAT", {"default": 2.0, "min": 0.25, "max": 8.0, "step": 0.05,
                                     "tooltip": "Output size = round(input size x this)."}),
            "preset": (list(S.PRESETS), {"default": "Quality", "tooltip": "Quality: EDM 50 steps, cfg 4 -> 7.5. "
                       "Fidelity: EDM 50 steps, cfg 1 -> 4, closer to the input. Lightning (for SDXL Lightning "
                       "finetunes): DPM++ 2M SDE 8 steps, cfg 2 (official with SUPIR-v0Q); Lightning Fidelity: cfg "
                       "1.5 (official with v0F)."}),
            "seed": spec["seed"],
            "steps": ("INT", {"default": 0, "min": 0, "max": 500, "tooltip": "0 = the preset's steps."}),
            "positive_prompt": ("STRING", {"multiline": True, "default": S.OFFICIAL_POSITIVE,
                                           "tooltip": "Quality words appended to the caption."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": S.OFFICIAL_NEGATIVE,
                                           "tooltip": "What to steer away from."}),
            "min_short_side": ("INT", {"default": 1024, "min": 0, "max": 4096, "step": 64,
                                       "tooltip": "Official rule: sample with the short side at least this many "
                                       "pixels (SDXL works best near 1024), then resize to the output size. 0 = off."}),
            "tiling": (["auto", "on", "off"], {"default": "auto", "tooltip": "Tiled sampling: auto tiles when the "
                       "sampled image exceeds 1.5 x 1.5 tiles."}),
            "tile_size": spec["tile_size"],
            "tile_stride": spec["tile_stride"],
            "color_fix": (list(S.COLOR_FIXES), {"default": "Wavelet", "tooltip": "Colour fix against the stage-1 "
                          "image (official Wavelet)."}),
            "tiled_vae": ("BOOLEAN", {"default": True, "tooltip": "Tiled VAE with whole-image normalisation "
                          "(same result, bounded memory)."}),
        }, "optional": {
            "captions": ("STRING", {"forceInput": True, "tooltip": "Captions: one for all, one per image or one per "
                         "sampler tile (a list, or one per line); added before the positive prompt."}),
        }}

    def restore(self, supir, image, upscale_by, preset, seed, steps, positive_prompt, negative_prompt,
                min_short_side, tiling, tile_size, tile_stride, color_fix, tiled_vae, captions=None):
        one = {k: _unlist(v) for k, v in dict(
            upscale_by=upscale_by, preset=preset, seed=seed, steps=steps, positive_prompt=positive_prompt,
            negative_prompt=negative_prompt, min_short_side=min_short_side, tiling=tiling, tile_size=tile_size,
            tile_stride=tile_stride, color_fix=color_fix, tiled_vae=tiled_vae).items()}
        parts = [image_to_bchw(i) for i in image] if isinstance(image, list) else [image_to_bchw(image)]
        if len({tuple(p.shape[-2:]) for p in parts}) > 1:
            raise ValueError(f"SUPIR Restore got {len(parts)} images of different sizes "
                             f"({', '.join(f'{p.shape[-1]}x{p.shape[-2]}' for p in parts)}); one IMAGE holds one size: "
                             "restore them in separate runs or resize them to one size first.")
        images = torch.cat(parts)
        options = S.RestoreOptions(
            upscale=one["upscale_by"], min_short_side=one["min_short_side"], tiling=one["tiling"],
            color_fix=one["color_fix"], tiled_vae=one["tiled_vae"], positive=one["positive_prompt"],
            negative=one["negative_prompt"],
            settings=S.with_settings(S.PRESETS[one["preset"]], seed=one["seed"], steps=one["steps"] or None,
                                     tile_size=one["tile_size"], tile_stride=one["tile_stride"]))
        return (bchw_to_image(S.restore(_unlist(supir), images, options, S.split_captions(captions))),)


_NODES = {
    "SupirLoader": (LoadSupir, "Load SUPIR"),
    "SupirLoaderFromModel": (LoadSupirFromModel, "Load SUPIR (from MODEL/CLIP/VAE)"),
    "SupirFirstStage": (FirstStage, "SUPIR First Stage"),
    "SupirEncode": (Encode, "SUPIR Encode"),
    "SupirDecode": (Decode, "SUPIR Decode"),
    "SupirConditioner": (Conditioner, "SUPIR Conditioner"),
    "SupirSampler": (Sampler, "SUPIR Sampler"),
    "SupirColorFix": (ColorFix, "SUPIR Colour Fix"),
    "SupirTiles": (Tiles, "SUPIR Tiles"),
    "SupirRestore": (Restore, "SUPIR Restore"),
}
NODE_CLASS_MAPPINGS = {f"{PREFIX}{k}": cls for k, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {f"{PREFIX}{k}": name for k, (_, name) in _NODES.items()}
