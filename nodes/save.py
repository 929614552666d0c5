"""Save video node: IMAGE frames -> mp4/webm/webp/gif in ComfyUI's output folder (never overwrites).

Like ComfyUI's own SaveVideo, mp4 and webm files carry the prompt and the workflow as container tags (unless
ComfyUI runs with --disable-metadata), so dropping a saved video onto the canvas gives its workflow back.
"""
from __future__ import annotations

from typing import Any

import torch

from pyramid_core.video import VIDEO_FORMATS, write_video

from . import comfy as host

CATEGORY = "PyramidFlow"


class PyramidFlowCoreSaveVideo:
    DESCRIPTION = (
        "Writes frames as a video to the output folder and shows it; mp4/webm carry the prompt and workflow "
        "(drop the file onto the canvas to get the workflow back). Also outputs ComfyUI's VIDEO where available."
    )
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
                "images": ("IMAGE", {"tooltip": "the frames, e.g. from Pyramid Flow VAE Decode"}),
                "fps": ("FLOAT", {"default": 24.0, "min": 1.0, "max": 120.0, "step": 1.0, "tooltip": "Pyramid Flow makes 24 fps"}),
                "format": (list(VIDEO_FORMATS), {"default": "mp4", "tooltip": (
                    "mp4 (H.264) plays everywhere; webm (VP9) is smaller; webp and gif are animated images. mp4 "
                    "and webm carry the prompt and workflow")}),
                "quality": ("INT", {"default": 80, "min": 0, "max": 100, "tooltip": "higher = better and larger"}),
                "filename_prefix": ("STRING", {"default": "PyramidFlow/video", "tooltip": "may contain a subfolder"}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, images: torch.Tensor, fps, format, quality, filename_prefix, prompt=None, extra_pnginfo=None):
        if images.ndim != 4 or images.shape[0] < 1:
            raise ValueError(f"images must be IMAGE frames [F,H,W,3]; got shape {tuple(images.shape)}")
        frames, height, width = images.shape[:3]
        folder, stem, counter, subfolder = host.save_path(filename_prefix, width, height)
        target = folder / f"{stem}_{counter:05}_.{format}"
        # Cancel during encoding stops the write; write_video then leaves no file behind
        written = write_video(images[..., :3], target, fps=fps, format=format, quality=int(quality),
                              callback=lambda n: host.check_interrupt(), metadata=_metadata(prompt, extra_pnginfo))
        entry = {"filename": written.name, "subfolder": subfolder, "type": "output", "format": format}
        video = host.native_video(images[..., :3].float().cpu(), float(fps))
        return {"ui": {"images": [entry], "animated": (True,)}, "result": (video,)}


def _metadata(prompt: Any, extra_pnginfo: Any) -> dict[str, Any] | None:
    """The tags ComfyUI's SaveVideo writes: each extra_pnginfo entry (the workflow) and the prompt, as JSON;
    none under --disable-metadata."""
    if not host.metadata_enabled():
        return None
    tags = dict(extra_pnginfo) if isinstance(extra_pnginfo, dict) else {}
    if prompt is not None:
        tags["prompt"] = prompt
    return tags or None
