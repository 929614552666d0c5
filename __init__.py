"""ComfyUI entry point of ComfyUI-PyramidFlow (ComfyUI imports this folder as a custom node pack).

Imports without ComfyUI too. `pyramid_core` is found installed, or else next to this file.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("pyramid_core") is None:
    # appended, not prepended: this folder's other top-level names must not shadow anything
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:  # loaded as a plain module, not as the pack (e.g. a test runner collecting this folder): register nothing
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
