"""Save video node: IMAGE frames -> mp4/webm/webp/gif in ComfyUI's output folder (never overwrites)."""
from __future__ import annotations

import torch

from pyramid_core.video import VIDEO_FORMATS, write_video

from . import comfy as host

CATEGORY = "PyramidFlow"


class PyramidFlowCoreSaveVideo:
    DESCRIPTION = "Writes frames as a video to the output folder and shows it; also outputs ComfyUI's VIDEO where available."
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("VIDEO",)
    RETURN_NAMES = ("video",)
    OUTPUT_TOOLTIPS = ("ComfyUI's native VIDEO (None on ComfyUI versions without it)",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE",),
                "fps": ("FLOAT", {"default": 24.0, "min": 1.0, "max": 120.0, "step": 1.0, "tooltip": "Pyramid Flow makes 24 fps"}),
                "format": (list(VIDEO_FORMATS), {"default": "mp4"}),
                "quality": ("INT", {"default": 80, "min": 0, "max": 100, "tooltip": "higher = better and larger"}),
                "filename_prefix": ("STRING", {"default": "PyramidFlow/video", "tooltip": "may contain a subfolder"}),
            },
        }

    def save(self, images: torch.Tensor, fps, format, quality, filename_prefix):
        if images.ndim != 4 or images.shape[0] < 1:
            raise ValueError(f"images must be IMAGE frames [F,H,W,3]; got shape {tuple(images.shape)}")
        frames, height, width = images.shape[:3]
        folder, stem, counter, subfolder = host.save_path(filename_prefix, width, height)
        target = folder / f"{stem}_{counter:05}_.{format}"
        # Cancel during encoding stops the write; write_video then leaves no file behind
        written = write_video(images[..., :3], target, fps=fps, format=format, quality=int(quality),
                              callback=lambda n: host.check_interrupt())
        entry = {"filename": written.name, "subfolder": subfolder, "type": "output", "format": format}
        video = host.native_video(images[..., :3].float().cpu(), float(fps))
        return {"ui": {"images": [entry], "animated": (True,)}, "result": (video,)}
