"""Photo restoration for ComfyUI: SUPIR restoration/upscaling, LLaVA captions, CodeFormer faces.

ComfyUI imports this folder under whatever name it has; everything inside uses relative imports,
and nothing here touches ``sys.path``.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.comfy import register_model_folders

__version__ = "0.1.0"

register_model_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
