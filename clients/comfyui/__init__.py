"""ComfyUI entry point of the Luna Saver node: `custom_nodes/luna_saver/` (see README.md)."""

from .luna_saver_node import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# The frontend extension that loads workflows from our JPEG, EXR and WebP files (web/luna_saver.js).
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
