"""Stand-ins for the stock ComfyUI nodes our example workflows use (ComfyUI's `nodes.py`), same
inputs and outputs; `STOCK_NODE_CLASS_MAPPINGS` is merged with the pack's for workflow tests."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

import folder_paths


class LoadImage:
    @classmethod
    def INPUT_TYPES(cls):
        files = sorted(f for f in os.listdir(folder_paths.get_input_directory())
                       if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
        return {"required": {"image": (files, {"image_upload": True})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    def load_image(self, image):
        pil = Image.open(folder_paths.get_annotated_filepath(image)).convert("RGB")
        pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None]
        return (pixels, torch.zeros(1, pil.height, pil.width))


class ImageScaleBy:
    upscale_methods = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "upscale_method": (cls.upscale_methods,),
                             "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    def upscale(self, image, upscale_method, scale_by):
        samples = image.movedim(-1, 1)
        size = (round(samples.shape[2] * scale_by), round(samples.shape[3] * scale_by))
        mode = {"nearest-exact": "nearest-exact", "lanczos": "bicubic"}.get(upscale_method, upscale_method)
        scaled = torch.nn.functional.interpolate(samples, size=size, mode=mode)
        return (scaled.clamp(0, 1).movedim(1, -1),)


STOCK_NODE_CLASS_MAPPINGS = {"LoadImage": LoadImage, "ImageScaleBy": ImageScaleBy}
