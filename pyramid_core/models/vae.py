"""Causal video VAE of Pyramid Flow (16 latent channels, 8x spatial and 8x causal temporal compression).

Parameter names equal the official ``causal_video_vae`` state dict, so its files load with
``load_state_dict(strict=True)``. Every convolution is causal in time (front padding only); with
``temporal_chunk=True`` a clip is processed a few frames at a time and each convolution carries the
last two frames of its input from one chunk to the next, which makes chunked and whole-clip results
equal. Group norms and attention act on single frames.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .operations import Operations, TorchOperations
from .vae_blocks import CausalConv3d, CausalDecoder, CausalEncoder
from .vae_decode import ChunkDecoder, StepCallback
from .vae_tiling import TILE_OVERLAP, chunk_ranges, stitch, tile_plan

ENCODER_BLOCK = "DownEncoderBlockCausal3D"
DECODER_BLOCK = "UpDecoderBlockCausal3D"
CONV_TYPE = "causal_vae_conv"

FrameCallback = Callable[[int, torch.Tensor], None]


# --------------------------------------------------------------------------------------------
# posterior


class DiagonalGaussian:
    """Posterior N(mean, std^2) from encoder moments [B, 2C, T, h, w] (logvar clamped to [-30, 20])."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``mean + std * randn`` with the noise drawn like diffusers' ``randn_tensor``.

        ``generator=None`` draws from the global RNG of the posterior's device; a CPU generator for a
        GPU posterior draws on the CPU and moves the noise over.
        """
        device = self.mean.device
        draw_device = device
        if generator is not None and generator.device.type != device.type:
            if generator.device.type != "cpu":
                raise ValueError(
                    f"generator is on {generator.device} but the posterior is on {device}; "
                    "pass a CPU generator or one on the posterior's device"
                )
            draw_device = torch.device("cpu")
        noise = torch.randn(self.mean.shape, generator=generator, device=draw_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(device)


# --------------------------------------------------------------------------------------------
# the model


class CausalVideoVAE(nn.Module):
    """Pyramid Flow's causal video VAE; construct with the keys of the official ``config.json``.

    ``encode`` maps pixels in [-1, 1] ([B,3,F,H,W], F = 8k+1) to a :class:`DiagonalGaussian` over
    latents [B,16,(F-1)/8+1,H/8,W/8]; ``decode`` / ``decode_to_host`` map raw (not pipeline-normalised)
    latents back to pixels. Inputs are cast to the weights' dtype and moved to their device.
    """

    def __init__(
        self,
        *,
        encoder_in_channels: int = 3,
        encoder_out_channels: int = 16,
        encoder_layers_per_block: Sequence[int] = (2, 2, 2, 2),
        encoder_down_block_types: Sequence[str] = (ENCODER_BLOCK,) * 4,
        encoder_block_out_channels: Sequence[int] = (128, 256, 512, 512),
        encoder_spatial_down_sample: Sequence[bool] = (True, True, True, False),
        encoder_temporal_down_sample: Sequence[bool] = (True, True, True, False),
        encoder_block_dropout: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        encoder_act_fn: str = "silu",
        encoder_norm_num_groups: int = 32,
        encoder_double_z: bool = True,
        encoder_type: str = CONV_TYPE,
        decoder_in_channels: int = 16,
        decoder_out_channels: int = 3,
        decoder_layers_per_block: Sequence[int] = (3, 3, 3, 3),
        decoder_up_block_types: Sequence[str] = (DECODER_BLOCK,) * 4,
        decoder_block_out_channels: Sequence[int] = (128, 256, 512, 512),
        decoder_spatial_up_sample: Sequence[bool] = (True, True, True, False),
        decoder_temporal_up_sample: Sequence[bool] = (True, True, True, False),
        decoder_block_dropout: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        decoder_act_fn: str = "silu",
        decoder_norm_num_groups: int = 32,
        decoder_type: str = CONV_TYPE,
        add_post_quant_conv: bool = True,
        downsample_scale: int = 8,
        interpolate: bool = False,
        sample_size: int = 256,
        scaling_factor: float = 0.13025,
        operations: type[Operations] = TorchOperations,
        **private: object,
    ):
        super().__init__()
        unknown = sorted(k for k in private if not k.startswith("_"))
        if unknown:
            raise TypeError(f"CausalVideoVAE got unknown config keys {unknown}; is this a Pyramid Flow VAE config?")
        _check_choice("encoder_down_block_types", encoder_down_block_types, ENCODER_BLOCK)
        _check_choice("decoder_up_block_types", decoder_up_block_types, DECODER_BLOCK)
        _check_choice("encoder_type", [encoder_type], CONV_TYPE)
        _check_choice("decoder_type", [decoder_type], CONV_TYPE)
        for name, act in (("encoder_act_fn", encoder_act_fn), ("decoder_act_fn", decoder_act_fn)):
            if act not in ("silu", "swish"):
                raise ValueError(f"{name}={act!r} is not supported; the Pyramid Flow VAE uses 'silu'")
        if interpolate:
            raise ValueError("interpolate=True has no implementation (official neither); set interpolate=False")
        if encoder_out_channels != decoder_in_channels:
            raise ValueError(
                f"encoder_out_channels ({encoder_out_channels}) must equal decoder_in_channels ({decoder_in_channels})"
            )
        # encoder_double_z / add_post_quant_conv / dropouts / sample_size / scaling_factor: the official
        # model always builds both quant convs and a doubled encoder output; the rest is unused at inference.
        self.latent_channels = encoder_out_channels
        self.downsample_scale = int(downsample_scale)
        self.temporal_ratio = 2 ** sum(bool(v) for v in decoder_temporal_up_sample)
        self.encoder_temporal_ratio = 2 ** sum(bool(v) for v in encoder_temporal_down_sample)

        self.encoder = CausalEncoder(
            encoder_in_channels, encoder_out_channels, list(encoder_block_out_channels),
            list(encoder_layers_per_block), encoder_norm_num_groups,
            list(encoder_spatial_down_sample), list(encoder_temporal_down_sample), operations=operations,
        )
        self.decoder = CausalDecoder(
            decoder_in_channels, decoder_out_channels, list(decoder_block_out_channels),
            list(decoder_layers_per_block), decoder_norm_num_groups,
            list(decoder_spatial_up_sample), list(decoder_temporal_up_sample), operations=operations,
        )
        self.quant_conv = CausalConv3d(2 * encoder_out_channels, 2 * encoder_out_channels, 1, operations=operations)
        self.post_quant_conv = CausalConv3d(encoder_out_channels, encoder_out_channels, 1, operations=operations)

    # ---------------------------------------------------------------- properties / helpers

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.conv.weight.device

    def decode_working_memory_bytes(self, workload, window: int, tile: int) -> int:
        """Device working memory of one decode step with `window` latent frames and `tile`-pixel tiles
        (a `pyramid_core.memory.Workload`; the full-resolution up block dominates)."""
        from ..memory.estimates import vae_decode_working_memory

        channels = (self.decoder.up_blocks[-1].resnets[0].conv1.conv.in_channels, self.decoder.conv_out.conv.in_channels)
        return vae_decode_working_memory(workload, window, tile, channels)

    def _prepare(self, x: torch.Tensor, channels: int, what: str) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"{what} must be [B, {channels}, frames, height, width]; got shape {tuple(x.shape)}")
        device = self.device if self.device.type != "meta" else x.device
        return x.to(device=device, dtype=self.dtype)

    def _conv_layers(self, *modules: nn.Module) -> list[CausalConv3d]:
        return [m for module in modules for m in module.modules() if isinstance(m, CausalConv3d)]

    def _take_caches(self, modules: list[CausalConv3d]) -> list[Optional[torch.Tensor]]:
        caches = [m.cache for m in modules]
        for m in modules:
            m.cache = None
        return caches

    def _restore_caches(self, modules: list[CausalConv3d], caches: list[Optional[torch.Tensor]]) -> None:
        for m, cache in zip(modules, caches):
            m.cache = cache

    def clear_caches(self) -> None:
        """Drop every convolution's chunk cache (done automatically after each encode/decode)."""
        for m in self._conv_layers(self):
            m.cache = None

    # ---------------------------------------------------------------- encode

    def _encode_clip(self, x: torch.Tensor, temporal_chunk: bool, window_size: int) -> torch.Tensor:
        if not temporal_chunk:
            return self.quant_conv(self.encoder(x))
        parts = []
        for k, (s, e) in enumerate(chunk_ranges(x.shape[2], window_size)):
            kw = dict(chunked=True, first_chunk=k == 0)
            parts.append(self.quant_conv(self.encoder(x[:, :, s:e], **kw), **kw))
        return torch.cat(parts, dim=2)

    @torch.no_grad()
    def encode(
        self,
        x: torch.Tensor,
        *,
        temporal_chunk: bool = False,
        window_size: int = 16,
        tile_sample_min_size: int = 256,
        tiling: bool = True,
    ) -> DiagonalGaussian:
        """Encode pixels [B,3,F,H,W] in [-1,1] to the latent posterior (official ``encode(...).latent_dist``).

        Tiles of ``tile_sample_min_size`` px (25 % overlap, blended in latent space) are used when
        ``tiling`` and H or W exceeds the tile size. ``temporal_chunk`` encodes ``window_size`` frames
        at a time (first chunk ``window_size + 1``); it needs F = 8k+1 and ``window_size`` % 8 == 0.
        """
        x = self._prepare(x, self.encoder.conv_in.conv.in_channels, "encode input")
        if temporal_chunk:
            ratio = self.encoder_temporal_ratio
            if (x.shape[2] - 1) % ratio:
                raise ValueError(f"chunked encode needs {ratio}k+1 frames, got {x.shape[2]}; trim the clip")
            if window_size < 1 or window_size % ratio:
                raise ValueError(f"chunked encode needs window_size a positive multiple of {ratio}, got {window_size}")
        size = tile_sample_min_size
        try:
            if tiling and (x.shape[-1] > size or x.shape[-2] > size):
                tile_latent = int(size / self.downsample_scale)
                stride = int(size * (1 - TILE_OVERLAP))
                if stride < 1 or tile_latent < 1:
                    raise ValueError(f"tile_sample_min_size={size} is too small; use at least 16")
                plan = tile_plan(x.shape[-2], x.shape[-1], size, tile_latent, stride)
                grid = [[None] * len(plan.col_starts) for _ in plan.row_starts]
                for r, c, i, j in plan.windows():
                    grid[r][c] = self._encode_clip(x[:, :, :, i:i + size, j:j + size], temporal_chunk, window_size)
                moments = stitch(grid, plan.blend, plan.keep)
            else:
                moments = self._encode_clip(x, temporal_chunk, window_size)
        finally:
            self.clear_caches()
        return DiagonalGaussian(moments)

    # ---------------------------------------------------------------- decode

    def _decode_chunk(self, z: torch.Tensor, chunked: bool, first_chunk: bool) -> torch.Tensor:
        kw = dict(chunked=chunked, first_chunk=first_chunk)
        return self.decoder(self.post_quant_conv(z, **kw), **kw)

    @torch.no_grad()
    def _decode_impl(
        self,
        z: torch.Tensor,
        temporal_chunk: bool,
        window_size: int,
        tile_sample_min_size: int,
        tiling: bool,
        out_device: Optional[torch.device],
        order: str,
        frame_callback: Optional[FrameCallback],
        return_frames: bool,
        step_callback: Optional[StepCallback] = None,
    ) -> Optional[torch.Tensor]:
        z = self._prepare(z, self.latent_channels, "decode input")
        if order not in ("tile", "chunk"):
            raise ValueError(f"order must be 'tile' or 'chunk', got {order!r}")
        plan = ChunkDecoder(self, z.shape[2], *z.shape[-2:], temporal_chunk=temporal_chunk, window_size=window_size,
                            tile_sample_min_size=tile_sample_min_size, tiling=tiling, out_device=out_device,
                            step_callback=step_callback)
        outputs: list[torch.Tensor] = []
        try:
            if order == "tile" or len(plan.chunks) == 1 or len(plan.windows) == 1:
                # official order: each tile decoded over all its chunks before the next tile starts
                grid = plan.empty_grid()
                for r, c, i, j in plan.windows:
                    parts = [plan.decode_piece(k, i, j, z[:, :, s:e]) for k, (s, e) in enumerate(plan.chunks)]
                    grid[r][c] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
                    del parts
                video = plan.finish(grid)
                del grid
                if frame_callback is not None:
                    frame_callback(0, video)
                return video if return_frames else None
            # chunk-outer: one cache set per tile, frames become final chunk by chunk
            for k, (s, e) in enumerate(plan.chunks):
                piece = plan.decode_chunk(k, z[:, :, s:e])
                if frame_callback is not None:
                    frame_callback(plan.first_frame(k), piece)
                if return_frames:
                    outputs.append(piece)
            return torch.cat(outputs, dim=2) if return_frames else None
        finally:
            plan.close()

    def decode(
        self,
        z: torch.Tensor,
        *,
        temporal_chunk: bool = True,
        window_size: int = 1,
        tile_sample_min_size: int = 256,
        tiling: bool = True,
    ) -> torch.Tensor:
        """Decode raw latents [B,16,T,h,w] to pixels [B,3,8(T-1)+1,8h,8w] (~[-1,1]) on the VAE's device.

        Same numerics as the official ``vae.decode(...).sample`` with tiling enabled: tiles of
        ``tile_sample_min_size / 8`` latents (only when h or w exceeds it), 25 % overlap, in-place
        row-major blending; ``temporal_chunk`` decodes ``window_size`` latent frames at a time (first
        chunk ``window_size + 1``), which is exact.
        """
        return self._decode_impl(z, temporal_chunk, window_size, tile_sample_min_size, tiling,
                                 out_device=None, order="tile", frame_callback=None, return_frames=True)

    def decode_to_host(
        self,
        z: torch.Tensor,
        *,
        temporal_chunk: bool = True,
        window_size: int = 1,
        tile_sample_min_size: int = 256,
        tiling: bool = True,
        host: torch.device | str = "cpu",
        order: str = "tile",
        frame_callback: Optional[FrameCallback] = None,
        return_frames: bool = True,
        step_callback: Optional[StepCallback] = None,
    ) -> Optional[torch.Tensor]:
        """Streaming :meth:`decode`: every decoded chunk is moved to ``host`` at once, and tiles are
        blended there, so the full-resolution video never sits on the compute device. Same result as
        :meth:`decode`.

        ``order="tile"`` (official order, least device memory: one tile's conv caches) finishes all
        frames at the end. ``order="chunk"`` decodes chunk by chunk across all tiles, keeping one
        conv-cache set per tile on the device, so frames become final progressively.
        ``frame_callback(first_frame_index, frames)`` receives each finished run of frames
        ([B,3,f,H,W] on ``host``) in order; with ``return_frames=False`` nothing is accumulated and
        None is returned. ``step_callback(done, total)`` counts decode steps (temporal chunks x spatial
        tiles): (0, total) first, then after each step.
        """
        return self._decode_impl(z, temporal_chunk, window_size, tile_sample_min_size, tiling,
                                 out_device=torch.device(host), order=order, frame_callback=frame_callback,
                                 return_frames=return_frames, step_callback=step_callback)


def _check_choice(name: str, values: Sequence[str], expected: str) -> None:
    bad = [v for v in values if v != expected]
    if bad:
        raise ValueError(f"{name} contains {bad}; only {expected!r} (the Pyramid Flow VAE) is supported")
