"""VAE decode (LATENT -> IMAGE frames) and encode (IMAGE -> LATENT) nodes."""
from __future__ import annotations

import torch

from pyramid_core.codec import LatentCodec
from pyramid_core.validation import check_resolution

from . import comfy as host
from .managed import FAMILY_KEY, ComfyMemory, PyramidFlowVAE

CATEGORY = "PyramidFlow"
TILING = ("auto", "enabled", "disabled")
CHUNKING = ("auto", "low_memory", "fast")


def _codec(vae: PyramidFlowVAE, family: str) -> LatentCodec:
    # the VAE under ComfyUI's model management, through the same memory plan as sampling
    return LatentCodec(ComfyMemory({"vae": vae.vae}, "none"), family)


class PyramidFlowCoreVAEDecode:
    DESCRIPTION = "Decodes Pyramid Flow latents to IMAGE frames [F,H,W,3] in 0..1 (temporal chunks, spatial tiles)."
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("PYRAMIDFLOW_VAE", {"tooltip": "the model loader's vae output, or the Pyramid Flow VAE loader"}),
                "samples": ("LATENT", {"tooltip": "Pyramid Flow latents from the sampler or Pyramid Flow VAE Encode"}),
                "tiling": (list(TILING), {"default": "auto",
                           "tooltip": "spatial tiles (auto = on, as official: only frames larger than a tile are split)"}),
                "chunking": (list(CHUNKING), {"default": "auto",
                             "tooltip": "temporal chunks: low_memory = 1 latent frame / 256 px tiles (auto), fast = 2 / 512 px"}),
            }
        }

    def decode(self, vae: PyramidFlowVAE, samples: dict, tiling="auto", chunking="auto"):
        if tiling not in TILING or chunking not in CHUNKING:
            raise ValueError(f"tiling must be one of {TILING} and chunking one of {CHUNKING}")
        latents = samples["samples"]
        if latents.ndim != 5 or latents.shape[1] != 16:
            raise ValueError(
                f"samples must be Pyramid Flow latents [B,16,T,h,w] from the Pyramid Flow sampler or VAE encode; "
                f"got shape {tuple(latents.shape)}"
            )
        host.check_interrupt()
        bars: list = []  # made on the first report, which carries the total (temporal chunks x spatial tiles)

        def progress(done: int, total: int) -> None:
            if not bars:
                bars.append(host.progress_bar(total))
            bars[0].update_absolute(done, total)
            host.check_interrupt()

        frames = _codec(vae, samples.get(FAMILY_KEY, vae.family)).decode(
            latents, "float", save_memory=chunking != "fast", tiling=tiling != "disabled", progress=progress)
        return (frames.to(host.intermediate_device(), torch.float32),)


class PyramidFlowCoreVAEEncode:
    DESCRIPTION = (
        "Encodes IMAGE to a Pyramid Flow LATENT (posterior mean): one image -> one latent frame (a start frame "
        "for image-to-video), 8k+1 frames -> k+1 latent frames. Sizes must be multiples of 64."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("PYRAMIDFLOW_VAE", {"tooltip": "the model loader's vae output, or the Pyramid Flow VAE loader"}),
            "image": ("IMAGE", {"tooltip": "one image (a start frame) or 8k+1 video frames; sides multiples of 64"}),
        }}

    def encode(self, vae: PyramidFlowVAE, image: torch.Tensor):
        if image.ndim != 4 or image.shape[-1] not in (3, 4):
            raise ValueError(f"image must be an IMAGE batch [F,H,W,3]; got shape {tuple(image.shape)}")
        frames, height, width = image.shape[:3]
        if frames % 8 != 1:
            raise ValueError(f"encode 1 image or 8k+1 video frames (9, 17, 25, ...); got {frames} frames")
        check_resolution(width, height)
        host.check_interrupt()
        pixels = image[..., :3].float().permute(3, 0, 1, 2)[None] * 2 - 1  # [1,3,F,H,W] in [-1,1]
        latents = _codec(vae, vae.family).encode_video(pixels)
        return ({"samples": latents.to(host.intermediate_device()), FAMILY_KEY: vae.family},)
