"""CodeFormer face restoration nodes: load the restorer, load the detector (+ parser), restore faces."""
from __future__ import annotations

import torch

from ..codeformer.face_models import architecture_of, load_face_model
from ..codeformer.detection import DETECTOR_FILES, RELEASES as DETECTOR_RELEASES, load_retinaface
from ..codeformer.loader import load_codeformer
from ..codeformer.parsing import PARSER_FILES, RELEASES as PARSER_RELEASES, load_parser
from ..codeformer.pipeline import FaceSettings, restore_faces
from ..codeformer.upscale import model_upscaler
from ..codeformer.weights import missing_weights_error
from . import comfy
from .common import CATEGORY, PREFIX

CODEFORMER_TYPE = "PHOTORESTORE_CODEFORMER"
FACE_MODEL_TYPE = "PHOTORESTORE_FACE_MODEL"
DETECTOR_TYPE = "PHOTORESTORE_FACE_DETECTOR"
FACE_CATEGORY = f"{CATEGORY}/faces"
DTYPE_CHOICES = ["fp32", "bf16", "fp16"]
# Activation memory of one face through the full-size network in fp32 (measured ~0.6-0.7 GB).
BYTES_PER_FACE = 700 * 1024 ** 2


def _codeformer_first(names: list[str]) -> list[str]:
    """The folder's files, CodeFormer-named ones first (the list's first entry is the widget's default)."""
    return sorted(names, key=lambda n: "codeformer" not in n.lower())


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
            "model_name": (_codeformer_first(comfy.list_files("facerestore_models")),
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


# Optional inputs appended at the end of the face restore nodes (old workflows keep loading).
ALIGNED_BOX_FIDELITY_INPUTS = {
    "has_aligned": ("BOOLEAN", {"default": False, "tooltip":
                    "The images are already aligned face crops (512x512, like FFHQ): restore each one whole, "
                    "same size out, with no detection or paste-back (official --has_aligned)."}),
    "draw_box": ("BOOLEAN", {"default": False, "tooltip":
                 "Frame every restored face in green on the output (official --draw_box)."}),
    "face_fidelity": ("STRING", {"default": "", "tooltip":
                      "Per-face fidelity overriding the widget: '0.5,0.7' gives face 0 and face 1 of every image "
                      "their own value; separate images with ';' ('0.5,0.7; 0.9'). Empty = the fidelity widget."}),
}


def _face_settings(fidelity, upscale, background_enhance, face_upsample, detection_threshold, only_center_face,
                   adain, parse_mask, helper, min_face_size, max_face_size, max_faces, face_index, face_batch_size,
                   has_aligned, draw_box, face_fidelity, strength=1.0) -> FaceSettings:
    return FaceSettings(
        fidelity=float(fidelity), upscale=int(upscale), adain=bool(adain), helper=helper,
        conf_threshold=float(detection_threshold), only_center_face=bool(only_center_face),
        use_parse=bool(parse_mask), min_face_size=min_face_size, max_face_size=max_face_size,
        max_faces=int(max_faces), face_index=face_index or "", background_enhance=bool(background_enhance),
        face_upsample=bool(face_upsample), batch_size=int(face_batch_size), has_aligned=bool(has_aligned),
        draw_box=bool(draw_box), face_fidelity=face_fidelity or "", strength=float(strength),
    )


def _run_restore(image, net, face_detector, settings, background_upscale_model, face_upscale_model, desc,
                 note=""):
    """The pipeline with ComfyUI's progress bar and upscalers; returns the node outputs (``note`` heads the info)."""
    needs_detector = not settings.has_aligned
    detector = comfy.load(face_detector["detector"]) if needs_detector else None
    parser = (comfy.load(face_detector["parser"])
              if (needs_detector and settings.use_parse and face_detector.get("parser")) else None)
    progress = comfy.Progress(max(image.shape[0], 1), desc=desc)
    try:
        result = restore_faces(
            image, net, detector, parser, settings, callbacks=progress,
            upscaler=_upscaler(background_upscale_model) if settings.background_enhance else None,
            face_upscaler=(_upscaler(face_upscale_model or background_upscale_model)
                           if settings.face_upsample else None),
        )
    finally:
        progress.close()
    info = f"{note}\n{result.info}" if note else result.info
    return (result.images, result.mask, result.restored_faces, result.cropped_faces, info)


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
                **ALIGNED_BOX_FIDELITY_INPUTS,
            },
        }

    def restore(self, image, codeformer, face_detector, fidelity=0.5, upscale=1, background_enhance=False,
                face_upsample=False, background_upscale_model=None, face_upscale_model=None, detection_threshold=0.8,
                only_center_face=False, adain=True, parse_mask=True, helper="codeformer", min_face_size=0,
                max_face_size=0, max_faces=0, face_index="", face_batch_size=8, has_aligned=False, draw_box=False,
                face_fidelity=""):
        settings = _face_settings(fidelity, upscale, background_enhance, face_upsample, detection_threshold,
                                  only_center_face, adain, parse_mask, helper, min_face_size, max_face_size, max_faces,
                                  face_index, face_batch_size, has_aligned, draw_box, face_fidelity)
        net = comfy.load(codeformer, memory_required=int(face_batch_size) * BYTES_PER_FACE)
        return _run_restore(image, net, face_detector, settings, background_upscale_model, face_upscale_model,
                            "CodeFormer faces")


class LoadFaceModel:
    DESCRIPTION = ("Loads any face restoration model from the facerestore_models folder: CodeFormer (codeformer.pth), "
                   "GFPGAN v1.3/v1.4 (GFPGANv1.4.pth), RestoreFormer (RestoreFormer.pth) or RestoreFormer++ "
                   "(RestoreFormer++.ckpt); non-CodeFormer models need spandrel, which ships with ComfyUI.")
    CATEGORY = FACE_CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (FACE_MODEL_TYPE,)
    RETURN_NAMES = ("face_model",)
    OUTPUT_TOOLTIPS = ("The face restoration network, under ComfyUI's memory management.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_codeformer_first(comfy.list_files("facerestore_models")), {"tooltip":
                           "Weights in models/facerestore_models: codeformer.pth, GFPGANv1.4.pth, GFPGANv1.3.pth, "
                           "RestoreFormer.pth, RestoreFormer++.ckpt (detected from the file's contents)."}),
            "dtype": (DTYPE_CHOICES, {"default": "fp32", "tooltip": "Compute precision. fp32 is the reference; "
                                      "GFPGAN and RestoreFormer(++) do not run in fp16."}),
        }}

    def load(self, model_name, dtype="fp32"):
        path = comfy.full_path("facerestore_models", model_name)
        model = load_face_model(path, device=comfy.offload_device(), dtype=comfy.pick_dtype(dtype))
        arch = architecture_of(model)
        return (comfy.manage(model, kind=f"face_model:{arch}", name=model_name, arch=arch),)


class FaceRestore:
    DESCRIPTION = ("Finds every face, restores it with the chosen face model (CodeFormer, GFPGAN, RestoreFormer++) "
                   "and blends it back with a feathered, face-shaped mask; strength mixes the restored face with the "
                   "original one.")
    CATEGORY = FACE_CATEGORY
    FUNCTION = "restore"
    RETURN_TYPES = CodeFormerFaceRestore.RETURN_TYPES
    RETURN_NAMES = CodeFormerFaceRestore.RETURN_NAMES
    OUTPUT_TOOLTIPS = CodeFormerFaceRestore.OUTPUT_TOOLTIPS

    @classmethod
    def INPUT_TYPES(cls):
        base = CodeFormerFaceRestore.INPUT_TYPES()
        required = {}
        for name, spec in base["required"].items():
            if name == "codeformer":
                required["face_model"] = (FACE_MODEL_TYPE, {"tooltip": "From Load Face Model."})
                continue
            if name == "fidelity":
                spec = ("FLOAT", {**spec[1], "tooltip": "CodeFormer only (other models ignore it): "
                                  + spec[1]["tooltip"]})
            required[name] = spec
            if name == "face_detector":
                required["strength"] = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                        "How much of the restored face to use: 1 = restored only, 0 = the original "
                                        "face, 0.5 = half and half (mixed before pasting)."})
        optional = dict(base["optional"])
        optional["adain"] = ("BOOLEAN", {**optional["adain"][1], "tooltip": "CodeFormer only: "
                             + optional["adain"][1]["tooltip"]})
        return {"required": required, "optional": optional}

    def restore(self, image, face_model, face_detector, strength=1.0, fidelity=0.5, upscale=1,
                background_enhance=False, face_upsample=False, background_upscale_model=None, face_upscale_model=None,
                detection_threshold=0.8, only_center_face=False, adain=True, parse_mask=True, helper="codeformer",
                min_face_size=0, max_face_size=0, max_faces=0, face_index="", face_batch_size=8, has_aligned=False,
                draw_box=False, face_fidelity=""):
        settings = _face_settings(fidelity, upscale, background_enhance, face_upsample, detection_threshold,
                                  only_center_face, adain, parse_mask, helper, min_face_size, max_face_size, max_faces,
                                  face_index, face_batch_size, has_aligned, draw_box, face_fidelity, strength)
        net = comfy.load(face_model, memory_required=int(face_batch_size) * BYTES_PER_FACE)
        arch = face_model.info.get("arch", "face model")
        note = f"model: {arch} ({face_model.info.get('name', '')})"
        if arch != "CodeFormer":
            note += "; fidelity, face_fidelity and adain apply to CodeFormer only"
        return _run_restore(image, net, face_detector, settings, background_upscale_model, face_upscale_model,
                            f"{arch} faces", note)


NODE_CLASS_MAPPINGS = {
    f"{PREFIX}LoadCodeFormer": LoadCodeFormer,
    f"{PREFIX}LoadFaceDetector": LoadFaceDetector,
    f"{PREFIX}CodeFormerRestore": CodeFormerFaceRestore,
    f"{PREFIX}LoadFaceModel": LoadFaceModel,
    f"{PREFIX}FaceRestore": FaceRestore,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    f"{PREFIX}LoadCodeFormer": "Load CodeFormer",
    f"{PREFIX}LoadFaceDetector": "Load Face Detector",
    f"{PREFIX}CodeFormerRestore": "CodeFormer Face Restore",
    f"{PREFIX}LoadFaceModel": "Load Face Model (CodeFormer, GFPGAN, RestoreFormer++)",
    f"{PREFIX}FaceRestore": "Face Restore (any face model)",
}
