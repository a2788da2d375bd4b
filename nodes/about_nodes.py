"""A placeholder node that proves the pack's wiring; it goes once the real nodes exist."""
from __future__ import annotations

from .common import CATEGORY, PREFIX


class ImageInfo:
    """Reports an image batch's size as text and passes the image through unchanged."""

    DESCRIPTION = "Reports the size of an image batch as text and passes the image through unchanged."
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "info")
    OUTPUT_TOOLTIPS = ("The input image, unchanged.", "Batch size, width and height.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "Any image batch."})}}

    def run(self, image):
        b, h, w = image.shape[:3]
        return (image, f"{b} image(s), {w}x{h}")


NODE_CLASS_MAPPINGS = {f"{PREFIX}ImageInfo": ImageInfo}
NODE_DISPLAY_NAME_MAPPINGS = {f"{PREFIX}ImageInfo": "Image Info (Photo Restoration)"}
