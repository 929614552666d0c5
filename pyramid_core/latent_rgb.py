"""Latent -> RGB preview maps, fitted from the VAE actually loaded (no factor tables).

A preview shows a latent frame without decoding it: every latent pixel's 16 channels go to RGB through one
affine map (a 16x3 matrix and a bias). The map is measured, not copied: `fit_latent_rgb` decodes a few small,
smooth random latents through the codec (which undoes the family's latent normalisation exactly as the
pipeline's decode does), pools the decoded RGB down to latent resolution and solves the least-squares fit.
The fit is kept in raw VAE-latent space, so one map serves both normalisations: frame 0 (the family's image
factors) and every later frame (the video factors), see `LatentRGB.dit_space`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .latent_format import denormalize_latents, latent_factors

if TYPE_CHECKING:
    from .codec import LatentCodec

__all__ = ["LatentRGB", "channel_stretch", "fit_latent_rgb", "pooled_decode", "smooth_latents"]

VAE_SCALE = 8  # pixels per latent pixel (the causal VAE's spatial factor)
# DiT-space amplitudes of the fitting samples: about 1 (frame 0 and well-behaved frames) up to the ratio of the
# image and video scales (~1.65), so the raw range of later frames (video factors) is covered too
AMPLITUDES = (0.8, 1.2, 1.7)


@dataclass(frozen=True)
class LatentRGB:
    """An affine map raw VAE latent [16] -> RGB in [0, 1]: rgb = raw @ weight + bias.

    `fit_rms`: root-mean-square error of the map on its fitting data, in 0..1 RGB units.
    """

    weight: torch.Tensor  # [C, 3], float32
    bias: torch.Tensor  # [3], float32
    fit_rms: float = float("nan")

    def dit_space(self, family: str, first_frame: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [C,3], bias [3]) applying to DiT-space latents of one frame kind: frame 0 uses the
        family's image factors, later frames the video factors (raw = z / scale + shift)."""
        f = latent_factors(family)
        shift, scale = (f.image_shift, f.image_scale) if first_frame else (f.video_shift, f.video_scale)
        return self.weight / scale, self.bias + shift * self.weight.sum(dim=0)

    def to_rgb(self, frame: torch.Tensor, family: str, first_frame: bool) -> torch.Tensor:
        """One DiT-space latent frame [C,h,w] -> float RGB [h,w,3] in [0,1] (one small matmul, on the host)."""
        if frame.ndim != 3 or frame.shape[0] != self.weight.shape[0]:
            raise ValueError(f"expected one latent frame [{self.weight.shape[0]},h,w]; got shape {tuple(frame.shape)}")
        weight, bias = self.dit_space(family, first_frame)
        z = frame.detach().to("cpu", torch.float32)
        return (torch.einsum("chw,cr->hwr", z, weight) + bias).clamp(0, 1)


def smooth_latents(count: int, channels: int = 16, size: int = 16, *, generator: torch.Generator | None = None,
                   amplitudes: tuple[float, ...] = AMPLITUDES) -> torch.Tensor:
    """`count` smooth random DiT-space latent frames [count, C, 1, size, size]: coarse Gaussian noise (a quarter of
    the size, at least 2) upsampled bicubically, scaled to the standard deviations in `amplitudes` (cycled)."""
    coarse = max(2, size // 4)
    noise = torch.randn(count, channels, coarse, coarse, generator=generator, dtype=torch.float64)
    smooth = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    smooth = smooth / smooth.std(dim=(1, 2, 3), keepdim=True)
    scale = torch.tensor([amplitudes[i % len(amplitudes)] for i in range(count)], dtype=torch.float64)
    return (smooth * scale.view(-1, 1, 1, 1)).float().unsqueeze(2)


def pooled_decode(codec: LatentCodec, latents: torch.Tensor) -> torch.Tensor:
    """Decode DiT-space latent frames [N,C,1,h,w] one at a time (as the pipeline would, through `codec`) and
    average the RGB over each latent pixel's 8x8 block: float [N,h,w,3] in [0,1]."""
    pooled = []
    for sample in latents.split(1):
        frames = codec.decode(sample, "float")  # [1, 8h, 8w, 3]
        pooled.append(F.avg_pool2d(frames.permute(0, 3, 1, 2).float(), VAE_SCALE).permute(0, 2, 3, 1))
    return torch.cat(pooled)


def fit_latent_rgb(codec: LatentCodec, *, samples: int = 3, size: int = 16, channels: int = 16,
                   seed: int = 0) -> LatentRGB:
    """Fit a `LatentRGB` map to the codec's VAE: `samples` decodes of smooth random latents of `size` x `size`
    latent pixels (one latent frame each), pooled to latent resolution, solved by least squares in float64.
    Costs `samples` decodes of a (8*size)^2-pixel image; deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    latents = smooth_latents(samples, channels, size, generator=generator)
    target = pooled_decode(codec, latents).reshape(-1, 3).double()
    raw = denormalize_latents(latents, codec.family)  # one frame each: the image factors, as the decode used
    inputs = raw[:, :, 0].permute(0, 2, 3, 1).reshape(-1, channels).double()
    design = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, target).solution  # [C+1, 3]
    rms = float((design @ solution - target).square().mean().sqrt())
    return LatentRGB(solution[:channels].float().contiguous(), solution[channels].float().contiguous(), rms)


def channel_stretch(frame: torch.Tensor) -> torch.Tensor:
    """The fallback preview without a fitted map: the first three channels of a latent frame [C,h,w], each
    stretched to [0,1] -> float [h,w,3]."""
    rgb = frame[:3].detach().to("cpu", torch.float32)
    low = rgb.amin(dim=(1, 2), keepdim=True)
    span = (rgb.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-6)
    return ((rgb - low) / span).permute(1, 2, 0)
