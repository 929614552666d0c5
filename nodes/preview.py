"""Sampling previews: a rough RGB picture of a finished latent frame (display only, no decoding)."""
from __future__ import annotations

import torch
from PIL import Image


def latent_preview(latent: torch.Tensor) -> Image.Image:
    """[B,16,1,h,w] latent -> small RGB image of its first three channels, each stretched to 0..255."""
    rgb = latent[0, :3, -1].float().cpu()
    low = rgb.amin(dim=(1, 2), keepdim=True)
    span = (rgb.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-6)
    pixels = ((rgb - low) / span * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(pixels, "RGB")
