"""Pipeline-level latent normalisation and frame conversion of Pyramid Flow.

The DiT works on normalised latents: frame 0 (an image latent) uses per-family image factors, every
later frame the shared video factors, ``(z - shift) * scale``. The VAE config's ``scaling_factor`` is
not used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from .models.vae import CausalVideoVAE


@dataclass(frozen=True)
class LatentFactors:
    """Shift/scale pairs: normalised = (raw - shift) * scale, raw = normalised / scale + shift."""

    image_shift: float
    image_scale: float
    video_shift: float
    video_scale: float


VIDEO_SHIFT = -0.2343
VIDEO_SCALE = 1 / 3.0986

LATENT_FACTORS: dict[str, LatentFactors] = {
    "flux": LatentFactors(-0.04, 1 / 1.8726, VIDEO_SHIFT, VIDEO_SCALE),
    "mmdit": LatentFactors(0.1490, 1 / 1.8415, VIDEO_SHIFT, VIDEO_SCALE),
}


def latent_factors(family: str) -> LatentFactors:
    """The factors of a DiT family (``"flux"`` = miniFLUX, ``"mmdit"`` = SD3-style MMDiT)."""
    try:
        return LATENT_FACTORS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; use one of {sorted(LATENT_FACTORS)}") from None


def _check_latents(z: torch.Tensor) -> None:
    if z.ndim != 5:
        raise ValueError(f"latents must be [B, C, frames, h, w]; got shape {tuple(z.shape)}")


def normalize_latents(z: torch.Tensor, family: str) -> torch.Tensor:
    """Raw VAE latents [B,C,T,h,w] -> DiT-space latents (new tensor; frame 0 image factors, rest video)."""
    _check_latents(z)
    f = latent_factors(family)
    first = (z[:, :, :1] - f.image_shift) * f.image_scale
    if z.shape[2] == 1:
        return first
    return torch.cat([first, (z[:, :, 1:] - f.video_shift) * f.video_scale], dim=2)


def denormalize_latents(latents: torch.Tensor, family: str) -> torch.Tensor:
    """DiT-space latents [B,C,T,h,w] -> raw VAE latents. Returns a new tensor; the input is untouched
    (the official ``decode_latent`` rescales in place)."""
    _check_latents(latents)
    f = latent_factors(family)
    first = latents[:, :, :1] / f.image_scale + f.image_shift
    if latents.shape[2] == 1:
        return first
    return torch.cat([first, latents[:, :, 1:] / f.video_scale + f.video_shift], dim=2)


def _frames_last(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"decoded video must be [B, 3, frames, H, W]; got shape {tuple(x.shape)}")
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 3, 4, 1).reshape(b * t, h, w, c)


def frames_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoded video [B,3,F,H,W] in ~[-1,1] -> uint8 frames [B*F,H,W,3], as the official pipeline does:
    ``x*127.5 + 127.5`` in the VAE output dtype, clamp to [0,255], truncating cast."""
    return _frames_last(x.mul(127.5).add(127.5).clamp(0, 255).byte())


def frames_to_float(x: torch.Tensor) -> torch.Tensor:
    """Decoded video [B,3,F,H,W] -> float32 frames [B*F,H,W,3] in [0,1] (ComfyUI IMAGE layout)."""
    return _frames_last((x.float() / 2 + 0.5).clamp(0, 1))


def decode_settings(save_memory: bool) -> tuple[int, int]:
    """Official ``decode_latent`` (window_size, tile_sample_min_size): (1, 256) or (2, 512)."""
    return (1, 256) if save_memory else (2, 512)


def decode_latents(
    vae: "CausalVideoVAE",
    latents: torch.Tensor,
    family: str,
    *,
    save_memory: bool = True,
    tiling: bool = True,
    window_size: Optional[int] = None,
    tile_sample_min_size: Optional[int] = None,
    host: torch.device | str = "cpu",
) -> torch.Tensor:
    """DiT-space latents [B,16,T,h,w] -> uint8 frames [B*F,H,W,3] on ``host`` (official ``decode_latent``).

    Decodes with temporal chunking (``save_memory``: window 1 / tile 256, else window 2 / tile 512;
    ``window_size`` / ``tile_sample_min_size`` override) through the VAE's streaming decode, so only
    one chunk of one tile is ever on the compute device; each finished run of frames is converted to
    uint8 right away. ``latents`` is not modified.
    """
    default_window, default_tile = decode_settings(save_memory)
    raw = denormalize_latents(latents, family)
    pieces: list[torch.Tensor] = []

    def collect(first_frame: int, frames: torch.Tensor) -> None:
        b, _, t, h, w = frames.shape
        pieces.append(frames_to_uint8(frames).view(b, t, h, w, 3))

    vae.decode_to_host(
        raw,
        temporal_chunk=True,
        window_size=default_window if window_size is None else window_size,
        tile_sample_min_size=default_tile if tile_sample_min_size is None else tile_sample_min_size,
        tiling=tiling,
        host=host,
        frame_callback=collect,
        return_frames=False,
    )
    video = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
    return video.reshape(-1, *video.shape[2:])
