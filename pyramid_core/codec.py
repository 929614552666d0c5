"""`LatentCodec`: the VAE side of Pyramid Flow, pixels <-> DiT-space latents under a memory plan.

The pipeline holds one for its own VAE; the ComfyUI VAE nodes build one directly. The codec never
places weights itself: every use of the VAE goes through `memory.use("vae")`.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Protocol

import torch
from PIL import Image
from torch import nn

from .latent_format import denormalize_latents, frames_to_float, frames_to_uint8, latent_factors, normalize_latents
from .models.vae_decode import ChunkDecoder

FRAME_TYPES = ("pt", "np", "pil", "float")
DecodeProgress = Callable[[int, int], None]
"""Called as (decode steps done, steps in total: temporal chunks x spatial tiles); the first call is (0, total)."""


class VaeMemory(Protocol):
    """What the codec needs of a `pyramid_core.memory.MemoryPolicy` (`MemoryManager`, or the nodes' adapter)."""

    device: torch.device

    def use(self, name: str) -> AbstractContextManager[nn.Module]: ...

    def vae_decode_settings(self, save_memory: bool = True) -> tuple[int, int]: ...

    def oom_guard(self, phase: str) -> AbstractContextManager[None]: ...


class LatentCodec:
    """Encode pixels to and decode frames from the DiT-space latents of one DiT family.

    memory: the plan the VAE (registered as "vae") runs under; family: "flux" or "mmdit" (picks the
    first-frame latent factors); device: where inputs go (default `memory.device`); has_vae: False when no
    VAE was loaded, so that encode/decode fail with a message that names the fix.
    """

    def __init__(self, memory: VaeMemory, family: str, device: torch.device | str | None = None, *,
                 has_vae: bool = True):
        self.memory = memory
        self.family = family
        self.device = torch.device(device) if device is not None else memory.device
        self.has_vae = has_vae

    def _require_vae(self) -> None:
        if not self.has_vae:
            raise ValueError("this pipeline has no VAE: load one (load_vae=True) or use output_type='latent'")

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[1,3,1,H,W] pixels in [-1,1] -> DiT-space image latent (posterior sample, image factors)."""
        self._require_vae()
        with self.memory.use("vae") as vae:
            vae_dtype = next(vae.parameters()).dtype
            posterior = vae.encode(pixels.to(self.device, vae_dtype))
            sample = posterior.sample(generator=generator)
        return normalize_latents(sample, self.family)

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor, sample: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """[B,3,F,H,W] pixels in [-1,1] (F = 8k+1) -> DiT-space latents (posterior mean unless `sample`)."""
        self._require_vae()
        frames = pixels.shape[2]
        if (frames - 1) % 8:
            raise ValueError(
                f"the causal VAE encodes 8k+1 frames (1, 9, 17, 25, ...); got {frames}: drop "
                f"{(frames - 1) % 8} frame(s) or add {8 - (frames - 1) % 8}"
            )
        with self.memory.use("vae") as vae:
            vae_dtype = next(vae.parameters()).dtype
            posterior = vae.encode(pixels.to(self.device, vae_dtype), temporal_chunk=frames > 17)
            raw = posterior.sample(generator=generator) if sample else posterior.mean
        return normalize_latents(raw, self.family)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pt", save_memory: bool = True, tiling: bool = True,
               progress: DecodeProgress | None = None):
        """DiT-space latents [B,16,T,h,w] -> frames, batch-major: 'pt' uint8 [F,H,W,3] (official rounding),
        'np' (the same as an array), 'pil' (a list of images), 'float' float32 [F,H,W,3] in [0,1].

        Temporal chunks and spatial tiles as the official `decode_latent` (`save_memory`: 1 latent frame /
        256 px tiles, else 2 / 512 px; the memory plan may pick smaller ones). `progress(done, total)` counts
        decode steps (temporal chunks x spatial tiles): (0, total) before the first, then after each one.
        """
        if output_type not in FRAME_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(FRAME_TYPES)}; got {output_type!r}")
        self._require_vae()
        convert = frames_to_float if output_type == "float" else frames_to_uint8
        window, tile = self.memory.vae_decode_settings(save_memory)
        with self.memory.oom_guard("decoding"), self.memory.use("vae") as vae:
            frames = self._decode_frames(vae, latents, convert, window, tile, tiling, progress)
        if output_type == "np":
            return frames.numpy()
        if output_type == "pil":
            return [Image.fromarray(frame) for frame in frames.numpy()]
        return frames

    def _decode_frames(self, vae: nn.Module, latents: torch.Tensor, convert: Callable[[torch.Tensor], torch.Tensor],
                       window: int, tile: int, tiling: bool, progress: DecodeProgress | None) -> torch.Tensor:
        """Streaming decode to the host; each finished run of frames is converted at once."""
        raw = denormalize_latents(latents.to(self.device), self.family)
        pieces: list[torch.Tensor] = []

        def collect(first_frame: int, frames: torch.Tensor) -> None:
            b, _, t, h, w = frames.shape
            pieces.append(convert(frames).view(b, t, h, w, 3))

        vae.decode_to_host(raw, temporal_chunk=True, window_size=window, tile_sample_min_size=tile, tiling=tiling,
                           host="cpu", frame_callback=collect, return_frames=False, step_callback=progress)
        video = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return video.reshape(-1, *video.shape[2:])


class StreamingDecode:
    """Decode a clip while it is generated: `feed` DiT-space latent frames in order; each call returns the
    video frames whose temporal chunk became complete (uint8 [f,H,W,3] on the host, or None), so a writer can
    append them at once. The frames equal `LatentCodec.decode` of the whole clip with the same chunking.

    num_frames: the clip's latent frames in all (the chunking depends on it); height/width: latent size.
    """

    def __init__(self, codec: LatentCodec, num_frames: int, height: int, width: int, *, save_memory: bool = True,
                 tiling: bool = True):
        codec._require_vae()
        self.codec, self.num_frames, self.height, self.width, self.tiling = codec, num_frames, height, width, tiling
        self.window, self.tile = codec.memory.vae_decode_settings(save_memory)
        self.decoder: ChunkDecoder | None = None
        self.raw: list[torch.Tensor] = []  # raw latent frames fed and not yet decoded
        self.first_pending = 0  # absolute index of raw[0]

    @torch.no_grad()
    def feed(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Add the next latent frames [1,16,n,h,w]; returns the frames of every chunk now complete."""
        fed = self.first_pending + len(self.raw)
        if fed + latents.shape[2] > self.num_frames:
            raise ValueError(f"fed {fed + latents.shape[2]} latent frames, more than the {self.num_frames} announced")
        factors = latent_factors(self.codec.family)
        for index, frame in enumerate(latents.split(1, dim=2), start=fed):
            if index == 0:
                self.raw.append(denormalize_latents(frame, self.codec.family))
            else:  # the same arithmetic as denormalize_latents applies to later frames
                self.raw.append(frame / factors.video_scale + factors.video_shift)
        pieces = []
        with self.codec.memory.oom_guard("decoding"), self.codec.memory.use("vae") as vae:
            if self.decoder is None:
                self.decoder = ChunkDecoder(vae, self.num_frames, self.height, self.width, temporal_chunk=True,
                                            window_size=self.window, tile_sample_min_size=self.tile,
                                            tiling=self.tiling, out_device=torch.device("cpu"))
            decoder = self.decoder
            while decoder.next_chunk < len(decoder.chunks):
                start, end = decoder.chunks[decoder.next_chunk]
                if end > self.first_pending + len(self.raw):
                    break
                z = torch.cat(self.raw[start - self.first_pending:end - self.first_pending], dim=2)
                z = z.to(self.codec.device, next(vae.parameters()).dtype)
                pieces.append(frames_to_uint8(decoder.decode_chunk(decoder.next_chunk, z)))
                del self.raw[:end - self.first_pending]
                self.first_pending = end
        return torch.cat(pieces) if pieces else None

    def close(self) -> None:
        """Drop the decoder's conv caches (also after a failure)."""
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None
