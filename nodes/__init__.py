"""ComfyUI nodes for Pyramid Flow (thin: every computation is in pyramid_core).

Node keys carry the prefix `PyramidFlowCore` so they never collide with kijai's
ComfyUI-PyramidFlowWrapper (`PyramidFlowSampler`, ...). Keys are saved in workflows: never rename them.
"""
from __future__ import annotations

from .loaders import PyramidFlowCoreModelLoader, PyramidFlowCoreVAELoader
from .sampler import PyramidFlowCoreSampler
from .save import PyramidFlowCoreSaveVideo
from .text import PyramidFlowCoreTextEncode
from .vae import PyramidFlowCoreVAEDecode, PyramidFlowCoreVAEEncode

NODE_CLASS_MAPPINGS = {
    "PyramidFlowCoreModelLoader": PyramidFlowCoreModelLoader,
    "PyramidFlowCoreVAELoader": PyramidFlowCoreVAELoader,
    "PyramidFlowCoreTextEncode": PyramidFlowCoreTextEncode,
    "PyramidFlowCoreSampler": PyramidFlowCoreSampler,
    "PyramidFlowCoreVAEDecode": PyramidFlowCoreVAEDecode,
    "PyramidFlowCoreVAEEncode": PyramidFlowCoreVAEEncode,
    "PyramidFlowCoreSaveVideo": PyramidFlowCoreSaveVideo,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "PyramidFlowCoreModelLoader": "Pyramid Flow Model Loader",
    "PyramidFlowCoreVAELoader": "Pyramid Flow VAE Loader",
    "PyramidFlowCoreTextEncode": "Pyramid Flow Text Encode",
    "PyramidFlowCoreSampler": "Pyramid Flow Sampler",
    "PyramidFlowCoreVAEDecode": "Pyramid Flow VAE Decode",
    "PyramidFlowCoreVAEEncode": "Pyramid Flow VAE Encode",
    "PyramidFlowCoreSaveVideo": "Pyramid Flow Save Video",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
