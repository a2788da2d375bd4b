"""SUPIR nodes that sample: the Conditioner, the Sampler and the all-in-one Restore.

They convert ComfyUI types (IMAGE, LATENT, STRING lists, widget values) into the engine's settings and call
``supir/pipeline.py``; image i of a batch uses seed + i (wrapped into 64 bits, so every seed works).
"""
from __future__ import annotations

import torch

from ..supir import pipeline as E
from . import comfy
from . import supir_io as IO
from .common import PREFIX, bchw_to_image, image_to_bchw
from .supir_nodes import (CAT, COND, MAX_MEGAPIXELS_INPUT, MAX_SEED, SUPIR, TILE_SIZE_INPUT, TILE_STRIDE_INPUT,
                          unlist)

SAMPLERS = {"EDM": "edm", "DPM++ 2M SDE": "dpmpp_2m_sde"}


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
            "positive_prompt": ("STRING", {"multiline": True, "default": E.DEFAULT_A_PROMPT,
                                           "tooltip": "Quality words appended to every caption (official default)."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": E.DEFAULT_N_PROMPT,
                                           "tooltip": "What to steer away from (official default)."}),
            "caption_mode": (list(E.CAPTION_MODES), {"default": E.CAPTION_MODES[0], "tooltip":
                             "official: caption + positive prompt, and the text encoders keep the first 77 tokens "
                             "(long captions push the positive prompt out). keep positive: the positive prompt is "
                             "kept whole and the caption is cut to the tokens left."}),
        }, "optional": {
            "captions": ("STRING", {"forceInput": True, "tooltip": "Captions (e.g. from LLaVA Caption): one for all "
                         "images, one per image, or one per sampler tile (a list, or one caption per line). An empty "
                         "caption keeps its place: that image or tile gets the positive prompt alone."}),
        }}

    def condition(self, supir, positive_prompt, negative_prompt, caption_mode, captions=None):
        handle = unlist(supir)
        positive, negative, mode = unlist(positive_prompt), unlist(negative_prompt), unlist(caption_mode)
        texts = [E.join_prompt(c, positive, mode) for c in IO.split_captions(captions)] or [positive]
        with comfy.Progress(1, "SUPIR text") as bar:
            cb = IO.NodeCallbacks(bar, handle)
            return E.encode_texts(handle.model, texts, cb), E.encode_texts(handle.model, [negative], cb)


def sampler_inputs() -> dict:
    """The sampling widgets of SUPIR Sampler (defaults: the official Quality preset)."""
    q = E.RestoreSettings()
    return {
        "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                         "tooltip": "Noise seed; image i of a batch uses seed + i."}),
        "sampler": (list(SAMPLERS), {"default": "EDM", "tooltip": "EDM: the official restoration sampler (50 "
                    "steps). DPM++ 2M SDE: for Lightning SDXL models (8-10 steps); unlike the official DPM++ sampler "
                    "(which ignores both), this one applies restore_cfg and the control_scale start/end schedule."}),
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
        "tile_size": TILE_SIZE_INPUT,
        "tile_stride": TILE_STRIDE_INPUT,
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
            "x_center": ("LATENT", {"tooltip": "Target of restoration guidance (used only when restore_cfg > 0). "
                         "Default, as the official: the decoded control latent encoded again (a posterior sample), "
                         "computed here; or SUPIR Encode of the stage-1 image."}),
        }}

    def sample(self, supir, positive, negative, control_latent, seed, sampler, steps, cfg_scale_start, cfg_scale_end,
               control_scale_start, control_scale_end, restore_cfg, s_churn, s_noise, eta, tiled, tile_size,
               tile_stride, tile_batch_size, x_center=None):
        s = E.settings(
            sampler=SAMPLERS[E.choice(sampler, list(SAMPLERS), "sampler")], steps=steps, seed=seed,
            cfg_scale_start=cfg_scale_start, cfg_scale=cfg_scale_end, control_scale_start=control_scale_start,
            control_scale=control_scale_end, restore_cfg=restore_cfg, s_churn=s_churn, s_noise=s_noise, eta=eta,
            tiling="on" if tiled else "off", tile_size=tile_size, tile_stride=tile_stride,
            tile_batch_size=tile_batch_size, tiled_vae=True)
        hint = IO.scaled_latent(control_latent, "control_latent")
        center = IO.scaled_latent(x_center, "x_center") if x_center is not None else None
        if center is not None and center.shape != hint.shape:
            raise ValueError(f"x_center {tuple(center.shape)} and control_latent {tuple(hint.shape)} differ in shape; "
                             "encode the stage-1 image of the same batch.")
        with comfy.Progress(max(hint.shape[0], 1) * s.steps, "SUPIR sampling") as bar:
            z = E.sample_batch(supir.model, hint, positive, negative, s, IO.NodeCallbacks(bar, supir, previews=True),
                               x_center=center)
        return ({**IO.latent_dict(z), **IO.size_keys(control_latent)},)


class Restore:
    DESCRIPTION = ("Restores and upscales photos with SUPIR in one node: first stage, prompts (+ captions), "
                   "sampling with an official preset, decoding and colour fix, tiling large images automatically. "
                   "Images with NaN or infinite pixels are refused with an error, never spread.")
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
            "image": ("IMAGE", {"tooltip": "The photo(s) to restore. Gray is made RGB, alpha is composited over "
                                "white (as the official HWC3)."}),
            "upscale_by": ("FLOAT", {"default": 2.0, "min": 0.25, "max": 8.0, "step": 0.05,
                                     "tooltip": "Output size = round(input size x this)."}),
            "preset": (list(E.PRESETS), {"default": "Quality", "tooltip": "Quality: EDM 50 steps, cfg 4 -> 7.5. "
                       "Fidelity: EDM 50 steps, cfg 1 -> 4, closer to the input. Lightning presets (for SDXL "
                       "Lightning finetunes, either SUPIR checkpoint): DPM++ 2M SDE 8 steps with the official "
                       "Lightning demo's Quality setting, cfg 2 (Lightning), or its Fidelity setting, cfg 1.5 "
                       "(Lightning Fidelity)."}),
            "seed": spec["seed"],
            "steps": ("INT", {"default": 0, "min": 0, "max": 500, "tooltip": "0 = the preset's steps."}),
            "positive_prompt": ("STRING", {"multiline": True, "default": E.DEFAULT_A_PROMPT,
                                           "tooltip": "Quality words appended to the caption."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": E.DEFAULT_N_PROMPT,
                                           "tooltip": "What to steer away from."}),
            "min_short_side": ("INT", {"default": 1024, "min": 0, "max": 4096, "step": 64,
                                       "tooltip": "Official rule: sample with the short side at least this many "
                                       "pixels (SDXL works best near 1024), then resize to the output size. 0 = off."}),
            "tiling": (list(E.TILINGS), {"default": "auto", "tooltip": "Tiled sampling: auto tiles when the "
                       "sampled image exceeds 1.5 x 1.5 tiles."}),
            "tile_size": spec["tile_size"],
            "tile_stride": spec["tile_stride"],
            "color_fix": (list(E.COLOR_FIXES), {"default": "Wavelet", "tooltip": "Colour fix against the stage-1 "
                          "image (official Wavelet)."}),
            "tiled_vae": ("BOOLEAN", {"default": True, "tooltip": "Tiled VAE with whole-image normalisation "
                          "(same result, bounded memory)."}),
        }, "optional": {
            "captions": ("STRING", {"forceInput": True, "tooltip": "Captions: one for all, one per image or one per "
                         "sampler tile (a list, or one per line); added before the positive prompt. An empty caption "
                         "keeps its place: that image or tile gets the positive prompt alone."}),
            "max_megapixels": MAX_MEGAPIXELS_INPUT,
        }}

    def restore(self, supir, image, upscale_by, preset, seed, steps, positive_prompt, negative_prompt,
                min_short_side, tiling, tile_size, tile_stride, color_fix, tiled_vae, captions=None,
                max_megapixels=E.MAX_MEGAPIXELS):
        parts = [image_to_bchw(i) for i in image] if isinstance(image, list) else [image_to_bchw(image)]
        parts = [p for p in parts if p.shape[0]] or parts
        if len({tuple(p.shape[-2:]) for p in parts}) > 1:
            raise ValueError(f"SUPIR Restore got {len(parts)} images of different sizes "
                             f"({', '.join(f'{p.shape[-1]}x{p.shape[-2]}' for p in parts)}); one IMAGE holds one size: "
                             "restore them in separate runs or resize them to one size first.")
        images = torch.cat(parts)
        s = E.settings(unlist(preset), upscale_by=float(unlist(upscale_by)), seed=int(unlist(seed)),
                       steps=int(unlist(steps)) or None, positive_prompt=unlist(positive_prompt),
                       negative_prompt=unlist(negative_prompt), min_short_side=int(unlist(min_short_side)),
                       tiling=unlist(tiling), tile_size=int(unlist(tile_size)), tile_stride=int(unlist(tile_stride)),
                       tile_batch_size=4, color_fix=unlist(color_fix), tiled_vae=bool(unlist(tiled_vae)),
                       max_megapixels=float(unlist(max_megapixels)))
        with comfy.Progress(max(images.shape[0], 1) * s.steps, "SUPIR restore") as bar:
            out = E.restore(images, unlist(supir).model, s, IO.NodeCallbacks(bar, unlist(supir), previews=True),
                            IO.split_captions(captions))
        return (bchw_to_image(out),)


_NODES = {
    "SupirConditioner": (Conditioner, "SUPIR Conditioner"),
    "SupirSampler": (Sampler, "SUPIR Sampler"),
    "SupirRestore": (Restore, "SUPIR Restore"),
}
NODE_CLASS_MAPPINGS = {f"{PREFIX}{k}": cls for k, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {f"{PREFIX}{k}": name for k, (_, name) in _NODES.items()}
