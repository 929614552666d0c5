"""Sampling previews: the newest latent frame in colour, without decoding it.

The colours come from a latent->RGB map fitted to the VAE actually loaded (`pyramid_core.latent_rgb`); it is
fitted once per loaded VAE, before sampling (never while the DiT runs), and kept on the VAE value
(`latent_rgb`; ComfyUI caches the loader's output, so an unchanged loader does not fit again). A model loaded from an official
folder carries its folder's VAE (`preview_vae`), so previews are in colour without a vae wire. Without any VAE
the preview falls back to the first three latent channels, each stretched to 0..255.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from pyramid_core.latent_rgb import LatentRGB, channel_stretch, fit_latent_rgb

from . import comfy as host

logger = logging.getLogger(__name__)

RGB_ATTR = "latent_rgb"  # on a PYRAMIDFLOW_VAE value: its fitted LatentRGB
MODEL_VAE_ATTR = "preview_vae"  # on a PYRAMIDFLOW_MODEL value: its folder's PYRAMIDFLOW_VAE


def remember(vae: Any, offload: str = "none") -> None:
    """Called by the loaders: when previews are on, fit `vae`'s map now (before anything samples). A failed fit
    only costs the colours."""
    if host.previews_enabled():
        rgb_map(vae, offload)


def attach(model: Any, vae: Any) -> None:
    """Let `model` (a PYRAMIDFLOW_MODEL) preview in colour with its folder's `vae` when no vae is wired."""
    setattr(model, MODEL_VAE_ATTR, vae)


def rgb_map(vae: Any, offload: str = "none") -> LatentRGB | None:
    """The latent->RGB map of a PYRAMIDFLOW_VAE value: cached, or fitted now through ComfyUI's model management
    (offload "model": unloaded again after the fit). None when fitting fails (logged)."""
    cached = getattr(vae, RGB_ATTR, None)
    if cached is not None:
        return cached
    from pyramid_core.codec import LatentCodec

    from .managed import ComfyMemory

    memory = ComfyMemory({"vae": vae.vae}, "model" if offload == "model" else "none")
    try:
        found = fit_latent_rgb(LatentCodec(memory, vae.family))
    except Exception as exc:  # previews are a convenience: never fail a run for them
        logger.warning("colour previews unavailable (fitting the latent->RGB map failed: %s)", exc)
        return None
    setattr(vae, RGB_ATTR, found)
    return found


def preview_map(model: Any, vae: Any = None) -> LatentRGB | None:
    """The map a sampler previews with: from its vae input, else from the model's folder VAE, else None."""
    source = vae if vae is not None else getattr(model, MODEL_VAE_ATTR, None)
    return rgb_map(source, getattr(model, "offload", "none")) if source is not None else None


def latent_preview(latent: torch.Tensor, rgb: LatentRGB | None = None, family: str = "flux",
                   first_frame: bool = False) -> Image.Image:
    """[B,16,T,h,w] latent -> RGB image (h x w) of its newest frame: through `rgb` (frame 0 of a clip uses the
    image normalisation: `first_frame`), or the first three channels stretched when there is no map."""
    frame = latent[0, :, -1]
    pixels = channel_stretch(frame) if rgb is None else rgb.to_rgb(frame, family, first_frame)
    data = (pixels * 255).round().to(torch.uint8).contiguous().numpy()
    return Image.fromarray(data, "RGB")
