"""CodeFormer face restoration nodes: load the restorer, load the detector (+ parser), restore faces."""
from __future__ import annotations

import torch

from ..codeformer.detection import DETECTOR_FILES, RELEASES as DETECTOR_RELEASES, load_retinaface
from ..codeformer.loader import load_codeformer
from ..codeformer.parsing import PARSER_FILES, RELEASES as PARSER_RELEASES, load_parser
from ..codeformer.pipeline import FaceSettings, restore_faces
from ..codeformer.upscale import model_upscaler
from ..codeformer.weights import missing_weights_error
from . import comfy
from .common import CATEGORY, PREFIX

CODEFORMER_TYPE = "PHOTORESTORE_CODEFORMER"
DETECTOR_TYPE = "PHOTORESTORE_FACE_DETECTOR"
FACE_CATEGORY = f"{CATEGORY}/faces"
DTYPE_CHOICES = ["fp32", "bf16", "fp16"]
# Activation memory of one face through the full-size network in fp32 (measured ~0.6-0.7 GB).
BYTES_PER_FACE = 700 * 1024 ** 2


class LoadCodeFormer:
    DESCRIPTION = ("Loads a CodeFormer face restoration model (codeformer.pth as published, or a safetensors "
                   "conversion) from the facerestore_models folder.")
    CATEGORY = FACE_CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (CODEFORMER_TYPE,)
    RETURN_NAMES = ("codeformer",)
    OUTPUT_TOOLTIPS = ("The CodeFormer network, under ComfyUI's memory management.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (comfy.list_files("facerestore_models"),
                           {"tooltip": "CodeFormer weights in models/facerestore_models (e.g. codeformer.pth)."}),
            "dtype": (DTYPE_CHOICES, {"default": "fp32", "tooltip": "Compute precision. fp32 is the reference; "
                                      "bf16/fp16 are faster on GPUs but may flip a few codebook choices."}),
        }}

    def load(self, model_name, dtype="fp32"):
        path = comfy.full_path("facerestore_models", model_name)
        model = load_codeformer(path, device=comfy.offload_device(), dtype=comfy.pick_dtype(dtype))
        return (comfy.manage(model, kind="codeformer", name=model_name),)


class LoadFaceDetector:
    DESCRIPTION = ("Loads the RetinaFace face detector and, optionally, the face parsing network used to shape "
                   "the paste-back mask (official facexlib files from the facedetection folder).")
    CATEGORY = FACE_CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (DETECTOR_TYPE,)
    RETURN_NAMES = ("face_detector",)
    OUTPUT_TOOLTIPS = ("Face detector (+ parser) for CodeFormer Face Restore.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "detector": (list(DETECTOR_FILES), {"default": "resnet50", "tooltip":
                         "RetinaFace backbone: resnet50 (official default, more accurate) or mobilenet0.25 "
                         "(much faster). Files: " + ", ".join(DETECTOR_FILES.values())}),
            "parser": (["parsenet", "bisenet", "none"], {"default": "parsenet", "tooltip":
                       "Face parsing network for the paste mask: parsenet (official), bisenet (cheaper) or "
                       "none (square feathered mask only). Files: " + ", ".join(PARSER_FILES.values())}),
        }}

    @staticmethod
    def _path(name: str, kind: str, files: dict, published: str) -> str:
        if name not in files:
            raise ValueError(f"Unknown {kind} '{name}'; choose one of {', '.join(files)}.")
        try:
            return comfy.full_path("facedetection", files[name])
        except FileNotFoundError:
            raise missing_weights_error(files[name], kind, [files[name]], "facedetection", published) from None

    def load(self, detector, parser="parsenet"):
        device = comfy.offload_device()
        det = load_retinaface(self._path(detector, "RetinaFace detector", DETECTOR_FILES, DETECTOR_RELEASES), device)
        out = {"detector": comfy.manage(det, kind="retinaface", name=detector), "parser": None}
        if parser != "none":
            par = load_parser(self._path(parser, "face parsing", PARSER_FILES, PARSER_RELEASES), device)
            out["parser"] = comfy.manage(par, kind="face_parser", name=parser)
        return (out,)


def _upscaler(descriptor):
    """A tiled BCHW 0..1 upscaler around a ComfyUI UPSCALE_MODEL (spandrel descriptor)."""
    if descriptor is None:
        return None
    device = comfy.torch_device()

    def run(x: torch.Tensor) -> torch.Tensor:
        descriptor.to(device)
        try:
            fn = model_upscaler(descriptor, device=device, tile=512, overlap=32, check_interrupt=comfy.check_interrupt)
            return fn(x)
        finally:
            descriptor.to(comfy.offload_device())

    return run


class CodeFormerFaceRestore:
    DESCRIPTION = ("Finds every face, restores it with CodeFormer (fidelity w: low = cleaner, high = closer to the "
                   "original) and blends it back with a feathered, face-shaped mask; can also upscale the picture.")
    CATEGORY = FACE_CATEGORY
    FUNCTION = "restore"
    RETURN_TYPES = ("IMAGE", "MASK", "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("image", "face_mask", "restored_faces", "original_faces", "info")
    OUTPUT_TOOLTIPS = (
        "The picture with restored faces (upscale x the input size).",
        "Soft mask of where restored faces were blended in (output size).",
        "Every restored face as an aligned 512x512 crop (all images, detection order).",
        "The same crops before restoration.",
        "What was detected, kept, dropped and why.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Pictures with faces (any size; RGB, RGBA or gray)."}),
                "codeformer": (CODEFORMER_TYPE, {"tooltip": "From Load CodeFormer."}),
                "face_detector": (DETECTOR_TYPE, {"tooltip": "From Load Face Detector."}),
                "fidelity": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                             "CodeFormer's w: 0 = strongest restoration (may change identity), 1 = closest "
                             "to the input face. 0.5 is the official default; 0.7 is often better for photos."}),
                "upscale": ("INT", {"default": 1, "min": 1, "max": 4, "tooltip":
                            "Output scale of the whole picture (faces are pasted at this scale)."}),
                "background_enhance": ("BOOLEAN", {"default": False, "tooltip":
                                       "Upscale the background with background_upscale_model (without one: "
                                       "plain resize)."}),
                "face_upsample": ("BOOLEAN", {"default": False, "tooltip":
                                  "Upscale restored faces with face_upscale_model (or the background model) "
                                  "before pasting, so big faces stay sharp at upscale > 1."}),
            },
            "optional": {
                "background_upscale_model": ("UPSCALE_MODEL", {"tooltip": "e.g. RealESRGAN_x2plus (Load Upscale Model)."}),
                "face_upscale_model": ("UPSCALE_MODEL", {"tooltip": "Upscaler for the restored faces."}),
                "detection_threshold": ("FLOAT", {"default": 0.8, "min": 0.05, "max": 1.0, "step": 0.01, "tooltip":
                                        "RetinaFace confidence to accept a face (official 0.8; facexlib's helper 0.97)."}),
                "only_center_face": ("BOOLEAN", {"default": False, "tooltip": "Restore only the face nearest the centre."}),
                "adain": ("BOOLEAN", {"default": True, "tooltip":
                          "Match the restored features' colour statistics to the input's (official: on)."}),
                "parse_mask": ("BOOLEAN", {"default": True, "tooltip":
                               "Shape the paste mask with the face parser (needs a parser in Load Face Detector)."}),
                "helper": (["codeformer", "facexlib"], {"default": "codeformer", "tooltip":
                           "Geometry variant: CodeFormer's own helper (official CLI) or facexlib's."}),
                "min_face_size": ("INT", {"default": 0, "min": 0, "max": 8192, "tooltip":
                                  "Skip faces whose aligned crop is smaller than this many input pixels (0 = off)."}),
                "max_face_size": ("INT", {"default": 0, "min": 0, "max": 8192, "tooltip":
                                  "Skip faces larger than this many input pixels (0 = off)."}),
                "max_faces": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip":
                              "Restore at most this many faces per image, the largest ones (0 = all)."}),
                "face_index": ("STRING", {"default": "", "tooltip":
                               "Restore only these faces, e.g. '0,2' or '1-3' (score order per image); empty = all."}),
                "face_batch_size": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip":
                                    "Faces per network call (halved automatically when memory runs out)."}),
            },
        }

    def restore(self, image, codeformer, face_detector, fidelity=0.5, upscale=1, background_enhance=False,
                face_upsample=False, background_upscale_model=None, face_upscale_model=None, detection_threshold=0.8,
                only_center_face=False, adain=True, parse_mask=True, helper="codeformer", min_face_size=0,
                max_face_size=0, max_faces=0, face_index="", face_batch_size=8):
        settings = FaceSettings(
            w=float(fidelity), upscale=int(upscale), adain=bool(adain), helper=helper,
            conf_threshold=float(detection_threshold), only_center_face=bool(only_center_face),
            use_parse=bool(parse_mask), min_face_size=min_face_size, max_face_size=max_face_size,
            max_faces=int(max_faces), face_index=face_index or "", background_enhance=bool(background_enhance),
            face_upsample=bool(face_upsample), batch_size=int(face_batch_size),
        )
        detector = comfy.load(face_detector["detector"])
        parser = comfy.load(face_detector["parser"]) if (parse_mask and face_detector.get("parser")) else None
        net = comfy.load(codeformer, memory_required=int(face_batch_size) * BYTES_PER_FACE)
        progress = comfy.Progress(max(image.shape[0], 1), desc="CodeFormer faces")
        try:
            result = restore_faces(
                image, net, detector, parser, settings, callbacks=progress,
                upscaler=_upscaler(background_upscale_model) if background_enhance else None,
                face_upscaler=_upscaler(face_upscale_model or background_upscale_model) if face_upsample else None,
            )
        finally:
            progress.close()
        return (result.images, result.mask, result.restored_faces, result.cropped_faces, result.info)


NODE_CLASS_MAPPINGS = {
    f"{PREFIX}LoadCodeFormer": LoadCodeFormer,
    f"{PREFIX}LoadFaceDetector": LoadFaceDetector,
    f"{PREFIX}CodeFormerRestore": CodeFormerFaceRestore,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    f"{PREFIX}LoadCodeFormer": "Load CodeFormer",
    f"{PREFIX}LoadFaceDetector": "Load Face Detector",
    f"{PREFIX}CodeFormerRestore": "CodeFormer Face Restore",
}
