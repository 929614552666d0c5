"""Existing clips to continue: video frames made ready for the causal VAE (8k+1 frames, sides multiples of 64),
and the clip a file holds (a video, or a latents file from `--save-latents` / a kept generation)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .settings import SIZE_MULTIPLE

__all__ = ["Clip", "frames_to_pixels", "latent_frames_for", "read_clip"]

LATENTS_SUFFIX = ".safetensors"


def latent_frames_for(frames: int) -> int:
    """Latent frames of the longest 8k+1 prefix of `frames` video frames."""
    return (frames - 1) // 8 + 1


def frames_to_pixels(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (or float in [0,1]) frames [F,H,W,3] -> [1,3,F',H',W'] in [-1,1] for `encode_video`.

    The causal VAE encodes 8k+1 frames: extra frames at the end are dropped; sides that are not multiples of
    64 are centre-cropped down to one. Each change is warned about once.
    """
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise ValueError(f"frames must be [F,H,W,3]; got shape {tuple(frames.shape)}")
    count, height, width = frames.shape[:3]
    keep = 8 * (latent_frames_for(count) - 1) + 1
    if keep != count:
        warnings.warn(f"the clip has {count} frames; the causal VAE takes 8k+1, so the last {count - keep} are dropped",
                      stacklevel=2)
    new_h, new_w = height // SIZE_MULTIPLE * SIZE_MULTIPLE, width // SIZE_MULTIPLE * SIZE_MULTIPLE
    if min(new_h, new_w) < SIZE_MULTIPLE:
        raise ValueError(f"the clip is {width}x{height}; continuing needs at least 64x64")
    if (new_h, new_w) != (height, width):
        warnings.warn(f"the clip is {width}x{height}; centre-cropped to {new_w}x{new_h} (multiples of 64)", stacklevel=2)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    pixels = frames[:keep, top:top + new_h, left:left + new_w, :3]
    pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float().clamp(0, 1)
    return (pixels * 2 - 1).permute(3, 0, 1, 2)[None]


@dataclass
class Clip:
    """A clip to continue: its latents (from a latents file) or its pixels (from a video, to be encoded)."""

    path: Path
    latent_frames: int
    width: int
    height: int
    fps: float | None = None
    latents: torch.Tensor | None = None  # DiT-space [1,16,k,h,w]
    pixels: torch.Tensor | None = None  # [1,3,F,H,W] in [-1,1]
    metadata: dict = field(default_factory=dict)


def read_clip(path: str | Path) -> Clip:
    """The clip in `path`: a `.safetensors` latents file, or a video file (mp4, webm, webp, gif)."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"clip to extend not found: {source}")
    if source.suffix.lower() == LATENTS_SUFFIX:
        from .latents_file import load_latents

        latents, metadata = load_latents(source)
        if latents.ndim != 5 or latents.shape[:2] != (1, 16):
            raise ValueError(f"{source} holds latents of shape {tuple(latents.shape)}, not a Pyramid Flow clip [1,16,k,h,w]")
        return Clip(source, latents.shape[2], latents.shape[4] * 8, latents.shape[3] * 8,
                    fps=metadata.get("fps"), latents=latents, metadata=metadata)
    from .video import read_video

    frames, fps = read_video(source)
    pixels = frames_to_pixels(frames)
    return Clip(source, latent_frames_for(pixels.shape[2]), pixels.shape[4], pixels.shape[3], fps=fps, pixels=pixels)
