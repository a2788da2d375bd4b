"""SUPIR Face Restore: the official SUPIR face mode (``gradio_demo_face.py``) as one node.

The face pipeline (``codeformer/pipeline.py``: detection, alignment, parse masks, paste-back) runs with SUPIR
as its face network (``supir/face_mode.py``); the background is restored by SUPIR or left as it is.
"""
from __future__ import annotations

import torch

from ..codeformer.pipeline import FaceSettings, restore_faces
from ..supir import face_mode as FM
from ..supir import pipeline as E
from . import comfy
from . import supir_io as IO
from .face_nodes import DETECTOR_TYPE
from .supir_nodes import CAT, SUPIR, unlist
from .supir_sampler_nodes import sampler_inputs
from .common import PREFIX


class SupirFaceRestore:
    DESCRIPTION = ("SUPIR's face mode: finds every face, restores each aligned face with SUPIR at face_resolution "
                   "(with its own caption if given) and pastes it back with a face-shaped mask; the rest of the "
                   "picture is left as it is or restored by SUPIR too.")
    CATEGORY = CAT
    FUNCTION = "restore"
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("image", "restored_faces", "info")
    OUTPUT_TOOLTIPS = ("The picture with its faces restored, at the input size.",
                       "The SUPIR-restored aligned faces (512x512), one per face (a black one if none).",
                       "What was found and done (faces per image, skipped faces, notes).")

    @classmethod
    def INPUT_TYPES(cls):
        spec = sampler_inputs()
        return {"required": {
            "supir": (SUPIR, {"tooltip": "From Load SUPIR."}),
            "image": ("IMAGE", {"tooltip": "The photo(s) whose faces to restore."}),
            "face_detector": (DETECTOR_TYPE, {"tooltip": "From Load Face Detector (RetinaFace + parser)."}),
            "preset": (list(E.PRESETS), {"default": "Quality", "tooltip": "SUPIR settings for faces and "
                       "background (as SUPIR Restore): Quality, Fidelity or the Lightning presets."}),
            "seed": spec["seed"],
            "steps": ("INT", {"default": 0, "min": 0, "max": 500, "tooltip": "0 = the preset's steps."}),
            "face_resolution": ("INT", {"default": 1024, "min": 64, "max": 2048, "step": 64, "tooltip":
                                "Each aligned face is sampled by SUPIR at this size, then brought back to 512 "
                                "(official default 1024; smaller is faster)."}),
            "restore_background": ("BOOLEAN", {"default": False, "tooltip": "Also restore the rest of the "
                                   "picture with SUPIR (at upscale 1) before the faces are pasted; off = the "
                                   "background stays exactly the input."}),
        }, "optional": {
            "face_captions": ("STRING", {"forceInput": True, "tooltip": "Captions for the faces: one for all, or "
                              "one per face in detection order (a list, or one per line)."}),
            "background_caption": ("STRING", {"forceInput": True, "tooltip": "Caption for the background "
                                   "(used when restore_background is on)."}),
            "detection_threshold": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01,
                                              "tooltip": "RetinaFace confidence needed to count a face."}),
            "max_faces": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip": "Restore only the N largest "
                          "faces of each image; 0 = all."}),
            "face_index": ("STRING", {"default": "", "tooltip": "Restore only these faces, e.g. '0,2' or '1-3' "
                           "(after the other filters); empty = all."}),
            "tiling": (list(E.TILINGS), {"default": "auto", "tooltip": "Tiled sampling: auto tiles when a face "
                       "or the background exceeds 1.5 x 1.5 tiles."}),
        }}

    def restore(self, supir, image, face_detector, preset, seed, steps, face_resolution, restore_background,
                face_captions=None, background_caption=None, detection_threshold=0.8, max_faces=0, face_index="",
                tiling="auto"):
        handle, det = unlist(supir), unlist(face_detector)
        parts = image if isinstance(image, list) else [image]
        parts = [p for p in parts if p.shape[0]] or parts
        if len({tuple(p.shape[1:]) for p in parts}) > 1:
            raise ValueError("SUPIR Face Restore got images of different sizes; restore them in separate runs.")
        images = torch.cat(parts)
        s = E.settings(unlist(preset), seed=int(unlist(seed)), steps=int(unlist(steps)) or None,
                       tiling=unlist(tiling), tile_batch_size=4, tiled_vae=True)
        bg_on = bool(unlist(restore_background))
        bg_caption = "\n".join(IO.split_captions(background_caption))
        face_settings = FaceSettings(upscale=1, batch_size=1, conf_threshold=float(unlist(detection_threshold)),
                                     max_faces=int(unlist(max_faces)), face_index=unlist(face_index) or "",
                                     background_enhance=bg_on)
        detector = comfy.load(det["detector"])
        parser = comfy.load(det["parser"]) if det.get("parser") else None
        with comfy.Progress(max(images.shape[0], 1) * s.steps, "SUPIR face restore") as bar:
            cb = IO.NodeCallbacks(bar, handle, previews=True)
            net = FM.SupirFaceNet(handle.model, s, int(unlist(face_resolution)), cb,
                                  IO.split_captions(face_captions))
            result = restore_faces(images, net, detector, parser, face_settings,
                                   callbacks=FM.FacePipelineCallbacks(cb),
                                   upscaler=FM.supir_background(handle.model, s, cb, bg_caption) if bg_on else None)
        info = f"SUPIR face mode: {net.count} face(s) at {int(unlist(face_resolution))} px\n{result.info}"
        return (result.images, result.restored_faces, info)


NODE_CLASS_MAPPINGS = {f"{PREFIX}SupirFaceRestore": SupirFaceRestore}
NODE_DISPLAY_NAME_MAPPINGS = {f"{PREFIX}SupirFaceRestore": "SUPIR Face Restore"}
