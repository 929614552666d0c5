"""Causal video VAE of Pyramid Flow (16 latent channels, 8x spatial and 8x causal temporal compression).

Parameter names equal the official ``causal_video_vae`` state dict, so its files load with
``load_state_dict(strict=True)``. Every convolution is causal in time (front padding only); with
``temporal_chunk=True`` a clip is processed a few frames at a time and each convolution carries the
last two frames of its input from one chunk to the next, which makes chunked and whole-clip results
equal. Group norms and attention act on single frames.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_BLOCK = "DownEncoderBlockCausal3D"
DECODER_BLOCK = "UpDecoderBlockCausal3D"
CONV_TYPE = "causal_vae_conv"
TILE_OVERLAP = 0.25  # official overlap of neighbouring tiles (encode and decode)
NORM_SLICE_ELEMENTS = 1 << 25  # frames normalised per step: bounds the fp32 copies to ~128 MiB

FrameCallback = Callable[[int, torch.Tensor], None]


# --------------------------------------------------------------------------------------------
# building blocks


class CausalConv3d(nn.Module):
    """3-D convolution, zero-padded in time at the front only; keeps a per-instance chunk cache.

    The weight lives in ``self.conv`` (official key ``<name>.conv.weight``). ``chunked=True`` makes the
    layer remember the last two (padded) input frames so the next chunk (``first_chunk=False``)
    continues the clip exactly where this one stopped.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: tuple[int, int, int] = (1, 1, 1),
        bias: bool = True,
    ):
        super().__init__()
        self.time_pad = kernel_size - 1
        self.space_pad = kernel_size // 2
        self.time_stride = stride[0]
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=bias)
        self.cache: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        p = self.space_pad
        if not chunked or first_chunk:
            x = F.pad(x, (p, p, p, p, self.time_pad, 0))
        else:
            x = F.pad(x, (p, p, p, p, 0, 0))
            if self.time_pad:
                if self.cache is None:
                    raise RuntimeError("chunked call with first_chunk=False before any first chunk")
                # a stride-2 conv already consumed the older cached frame in the previous chunk
                context = self.cache if self.time_stride == 1 else self.cache[:, :, -1:]
                x = torch.cat([context, x], dim=2)
        if chunked and self.time_pad:
            self.cache = x[:, :, -2:].detach().clone()
        else:
            self.cache = None
        return self.conv(x)


class CausalGroupNorm(nn.GroupNorm):
    """GroupNorm applied to every frame separately, computed in fp32 (as CUDA autocast does).

    ``silu=True`` fuses the following SiLU in fp32 before the cast back to the input dtype, which is
    what the official bf16 autocast run feeds to the next convolution (bit-identical on CPU with the
    official code under an emulation of the CUDA autocast cast policy).
    """

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:  # type: ignore[override]
        b, c, t, h, w = x.shape
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        # frames are independent, so slicing only bounds the fp32 temporaries
        step = max(1, NORM_SLICE_ELEMENTS // max(1, b * c * h * w))
        for t0 in range(0, t, step):
            part = x[:, :, t0:t0 + step]
            frames = part.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
            y = F.group_norm(frames.view(-1, c, h, w), self.num_groups, weight, bias, self.eps)
            if silu:
                y = F.silu(y, inplace=True)
            out[:, :, t0:t0 + step] = y.view(b, -1, c, h, w).transpose(1, 2)
        return out


class CausalResnetBlock3D(nn.Module):
    """GN -> SiLU -> conv -> GN -> SiLU -> conv, plus a (1x1x1-projected when needed) skip connection."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = CausalGroupNorm(groups, in_channels, eps=eps)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = CausalGroupNorm(groups, out_channels, eps=eps)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        h = self.conv1(self.norm1(x, silu=True), chunked=chunked, first_chunk=first_chunk)
        h = self.conv2(self.norm2(h, silu=True), chunked=chunked, first_chunk=first_chunk)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x, chunked=chunked, first_chunk=first_chunk)
        return x + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the h*w positions of each frame, with a pre-GroupNorm and residual.

    Sub-module names follow diffusers' ``Attention`` (``group_norm``, ``to_q``, ``to_k``, ``to_v``,
    ``to_out.0``).
    """

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        normed = F.group_norm(
            frames.float(), self.group_norm.num_groups, self.group_norm.weight.float(),
            self.group_norm.bias.float(), self.group_norm.eps,
        ).to(x.dtype)
        tokens = normed.flatten(2).transpose(1, 2)  # (b t) (h w) c
        q = self.to_q(tokens).unsqueeze(1)
        k = self.to_k(tokens).unsqueeze(1)
        v = self.to_v(tokens).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[0](out)
        out = out.transpose(1, 2).reshape(b * t, c, h, w) + frames
        return out.reshape(b, t, c, h, w).transpose(1, 2).contiguous()


class CausalMidBlock(nn.Module):
    """resnet -> per-frame spatial attention -> resnet."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([CausalResnetBlock3D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)])

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        x = self.resnets[0](x, chunked=chunked, first_chunk=first_chunk)
        x = self.attentions[0](x)
        return self.resnets[1](x, chunked=chunked, first_chunk=first_chunk)


class SpatialDownsample(nn.Module):
    """Stride-(1,2,2) causal conv: halves height and width."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=(1, 2, 2))

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        return self.conv(x, chunked=chunked, first_chunk=first_chunk)


class TemporalDownsample(nn.Module):
    """Stride-(2,1,1) causal conv: F frames -> (F-1)//2 + 1 frames."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        return self.conv(x, chunked=chunked, first_chunk=first_chunk)


class SpatialUpsample(nn.Module):
    """Causal conv to 4c channels, then depth-to-space: (c p1 p2) -> c, (h p1), (w p2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels * 4, 3)

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        x = self.conv(x, chunked=chunked, first_chunk=first_chunk)
        b, c4, t, h, w = x.shape
        x = x.reshape(b, c4 // 4, 2, 2, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
        return x.reshape(b, c4 // 4, t, h * 2, w * 2)


class TemporalUpsample(nn.Module):
    """Causal conv to 2c channels, then (c p) t -> c (t p); the clip's first chunk drops its first frame."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels * 2, 3)

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        x = self.conv(x, chunked=chunked, first_chunk=first_chunk)
        b, c2, t, h, w = x.shape
        x = x.reshape(b, c2 // 2, 2, t, h, w).transpose(2, 3).reshape(b, c2 // 2, t * 2, h, w)
        # frame 0 of a clip is an image: it expands to one frame, not two
        return x[:, :, 1:] if first_chunk else x


class DownEncoderBlock(nn.Module):
    """resnets, then optional spatial and temporal downsamplers (official ``DownEncoderBlockCausal3D``)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 spatial_down: bool, temporal_down: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [CausalResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups)
             for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([SpatialDownsample(out_channels)]) if spatial_down else None
        self.temporal_downsamplers = nn.ModuleList([TemporalDownsample(out_channels)]) if temporal_down else None

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        for layer in _layers(self.resnets, self.downsamplers, self.temporal_downsamplers):
            x = layer(x, chunked=chunked, first_chunk=first_chunk)
        return x


class UpDecoderBlock(nn.Module):
    """resnets, then optional spatial and temporal upsamplers (official ``UpDecoderBlockCausal3D``)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 spatial_up: bool, temporal_up: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [CausalResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups)
             for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([SpatialUpsample(out_channels)]) if spatial_up else None
        self.temporal_upsamplers = nn.ModuleList([TemporalUpsample(out_channels)]) if temporal_up else None

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        for layer in _layers(self.resnets, self.upsamplers, self.temporal_upsamplers):
            x = layer(x, chunked=chunked, first_chunk=first_chunk)
        return x


def _layers(*groups: Optional[nn.ModuleList]) -> Iterator[nn.Module]:
    for group in groups:
        if group is not None:
            yield from group


class CausalEncoder(nn.Module):
    """pixels [B,3,F,H,W] -> moments [B,2*C,T,H/8,W/8] (before ``quant_conv``)."""

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: Sequence[int], groups: int, spatial_down: Sequence[bool],
                 temporal_down: Sequence[bool]):
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0], 3)
        blocks, prev = [], block_out_channels[0]
        for i, out in enumerate(block_out_channels):
            blocks.append(DownEncoderBlock(prev, out, layers_per_block[i], groups, spatial_down[i], temporal_down[i]))
            prev = out
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = CausalMidBlock(prev, groups)
        self.conv_norm_out = CausalGroupNorm(groups, prev, eps=1e-6)
        self.conv_out = CausalConv3d(prev, 2 * latent_channels, 3)

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        kw = dict(chunked=chunked, first_chunk=first_chunk)
        x = self.conv_in(x, **kw)
        for block in self.down_blocks:
            x = block(x, **kw)
        x = self.mid_block(x, **kw)
        return self.conv_out(self.conv_norm_out(x, silu=True), **kw)


class CausalDecoder(nn.Module):
    """latents [B,C,T,h,w] (after ``post_quant_conv``) -> pixels [B,3,8(T-1)+1,8h,8w]."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: Sequence[int], groups: int, spatial_up: Sequence[bool],
                 temporal_up: Sequence[bool]):
        super().__init__()
        reversed_channels = list(reversed(block_out_channels))
        self.conv_in = CausalConv3d(latent_channels, reversed_channels[0], 3)
        self.mid_block = CausalMidBlock(reversed_channels[0], groups)
        blocks, prev = [], reversed_channels[0]
        for i, out in enumerate(reversed_channels):
            blocks.append(UpDecoderBlock(prev, out, layers_per_block[i], groups, spatial_up[i], temporal_up[i]))
            prev = out
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = CausalGroupNorm(groups, block_out_channels[0], eps=1e-6)
        self.conv_out = CausalConv3d(block_out_channels[0], out_channels, 3)

    def forward(self, z: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        kw = dict(chunked=chunked, first_chunk=first_chunk)
        x = self.mid_block(self.conv_in(z, **kw), **kw)
        for block in self.up_blocks:
            x = block(x, **kw)
        return self.conv_out(self.conv_norm_out(x, silu=True), **kw)


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
# tiling / chunking plans


@dataclass(frozen=True)
class _TilePlan:
    """Where tiles start (input units), their size (input units) and the output blend / keep extents."""

    row_starts: list[int]
    col_starts: list[int]
    size: int
    blend: int
    keep: int

    def windows(self) -> Iterator[tuple[int, int, int, int]]:
        for r, i in enumerate(self.row_starts):
            for c, j in enumerate(self.col_starts):
                yield r, c, i, j


def _tile_plan(height: int, width: int, tile: int, out_tile: int, stride: int) -> _TilePlan:
    blend = int(out_tile * TILE_OVERLAP)
    return _TilePlan(list(range(0, height, stride)), list(range(0, width, stride)), tile, blend, out_tile - blend)


def _chunk_ranges(num_frames: int, window_size: int) -> list[tuple[int, int]]:
    """Official chunking: the first chunk has window_size + 1 frames, every later one window_size."""
    ranges, start, end = [], 0, min(window_size + 1, num_frames)
    while start < num_frames:
        ranges.append((start, end))
        start, end = end, min(end + window_size, num_frames)
    return ranges


def _blend_rows(above: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    extent = min(above.shape[3], tile.shape[3], extent)
    for y in range(extent):
        tile[:, :, :, y, :] = above[:, :, :, -extent + y, :] * (1 - y / extent) + tile[:, :, :, y, :] * (y / extent)


def _blend_cols(left: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    extent = min(left.shape[4], tile.shape[4], extent)
    for x in range(extent):
        tile[:, :, :, :, x] = left[:, :, :, :, -extent + x] * (1 - x / extent) + tile[:, :, :, :, x] * (x / extent)


def _stitch(grid: list[list[torch.Tensor]], blend: int, keep: int) -> torch.Tensor:
    """Official tile stitching: linear blends with the (already blended) tile above and to the left,
    in place and row-major, then each tile cropped to ``keep`` rows/columns."""
    rows = []
    for r, row in enumerate(grid):
        for c, tile in enumerate(row):
            if r > 0:
                _blend_rows(grid[r - 1][c], tile, blend)
            if c > 0:
                _blend_cols(row[c - 1], tile, blend)
        rows.append(torch.cat([tile[:, :, :, :keep, :keep] for tile in row], dim=4))
    return torch.cat(rows, dim=3)


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
            list(encoder_spatial_down_sample), list(encoder_temporal_down_sample),
        )
        self.decoder = CausalDecoder(
            decoder_in_channels, decoder_out_channels, list(decoder_block_out_channels),
            list(decoder_layers_per_block), decoder_norm_num_groups,
            list(decoder_spatial_up_sample), list(decoder_temporal_up_sample),
        )
        self.quant_conv = CausalConv3d(2 * encoder_out_channels, 2 * encoder_out_channels, 1)
        self.post_quant_conv = CausalConv3d(encoder_out_channels, encoder_out_channels, 1)

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
        for k, (s, e) in enumerate(_chunk_ranges(x.shape[2], window_size)):
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
                plan = _tile_plan(x.shape[-2], x.shape[-1], size, tile_latent, stride)
                grid = [[None] * len(plan.col_starts) for _ in plan.row_starts]
                for r, c, i, j in plan.windows():
                    grid[r][c] = self._encode_clip(x[:, :, :, i:i + size, j:j + size], temporal_chunk, window_size)
                moments = _stitch(grid, plan.blend, plan.keep)
            else:
                moments = self._encode_clip(x, temporal_chunk, window_size)
        finally:
            self.clear_caches()
        return DiagonalGaussian(moments)

    # ---------------------------------------------------------------- decode

    def _decode_chunk(self, z: torch.Tensor, chunked: bool, first_chunk: bool) -> torch.Tensor:
        kw = dict(chunked=chunked, first_chunk=first_chunk)
        return self.decoder(self.post_quant_conv(z, **kw), **kw)

    def _frame_start(self, latent_start: int) -> int:
        return 0 if latent_start == 0 else self.temporal_ratio * (latent_start - 1) + 1

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
    ) -> Optional[torch.Tensor]:
        z = self._prepare(z, self.latent_channels, "decode input")
        if temporal_chunk and window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        if order not in ("tile", "chunk"):
            raise ValueError(f"order must be 'tile' or 'chunk', got {order!r}")
        height, width = z.shape[-2:]
        tile_latent = int(tile_sample_min_size / self.downsample_scale)
        if tiling and (height > tile_latent or width > tile_latent):
            stride = int(tile_latent * (1 - TILE_OVERLAP))
            if stride < 1:
                raise ValueError(f"tile_sample_min_size={tile_sample_min_size} is too small; use at least 16")
            plan = _tile_plan(height, width, tile_latent, tile_sample_min_size, stride)
        else:
            plan = None
        chunks = _chunk_ranges(z.shape[2], window_size) if temporal_chunk else [(0, z.shape[2])]
        convs = self._conv_layers(self.post_quant_conv, self.decoder)
        windows = list(plan.windows()) if plan else [(0, 0, 0, 0)]
        size = plan.size if plan else max(height, width)
        move = (lambda t: t.to(out_device)) if out_device is not None else (lambda t: t)

        def decode_piece(i: int, j: int, k: int) -> torch.Tensor:
            s, e = chunks[k]
            piece = z[:, :, s:e, i:i + size, j:j + size]
            return move(self._decode_chunk(piece, temporal_chunk, first_chunk=k == 0))

        def finish(grid: list[list[torch.Tensor]]) -> torch.Tensor:
            return _stitch(grid, plan.blend, plan.keep) if plan else grid[0][0]

        def empty_grid() -> list[list[Optional[torch.Tensor]]]:
            return [[None] * len(plan.col_starts) for _ in plan.row_starts] if plan else [[None]]

        outputs: list[torch.Tensor] = []
        try:
            if order == "tile" or len(chunks) == 1 or len(windows) == 1:
                # official order: each tile decoded over all its chunks before the next tile starts
                grid = empty_grid()
                for r, c, i, j in windows:
                    parts = [decode_piece(i, j, k) for k in range(len(chunks))]
                    grid[r][c] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
                    del parts
                video = finish(grid)
                del grid
                if frame_callback is not None:
                    frame_callback(0, video)
                return video if return_frames else None
            # chunk-outer: one cache set per tile, frames become final chunk by chunk
            tile_caches: dict[tuple[int, int], list[Optional[torch.Tensor]]] = {}
            for k in range(len(chunks)):
                grid = empty_grid()
                for r, c, i, j in windows:
                    if k > 0:
                        self._restore_caches(convs, tile_caches.pop((r, c)))
                    grid[r][c] = decode_piece(i, j, k)
                    tile_caches[(r, c)] = self._take_caches(convs)
                piece = finish(grid)
                del grid
                if frame_callback is not None:
                    frame_callback(self._frame_start(chunks[k][0]), piece)
                if return_frames:
                    outputs.append(piece)
            tile_caches.clear()
            return torch.cat(outputs, dim=2) if return_frames else None
        finally:
            self.clear_caches()

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
    ) -> Optional[torch.Tensor]:
        """Streaming :meth:`decode`: every decoded chunk is moved to ``host`` at once, and tiles are
        blended there, so the full-resolution video never sits on the compute device. Same result as
        :meth:`decode`.

        ``order="tile"`` (official order, least device memory: one tile's conv caches) finishes all
        frames at the end. ``order="chunk"`` decodes chunk by chunk across all tiles, keeping one
        conv-cache set per tile on the device, so frames become final progressively.
        ``frame_callback(first_frame_index, frames)`` receives each finished run of frames
        ([B,3,f,H,W] on ``host``) in order; with ``return_frames=False`` nothing is accumulated and
        None is returned.
        """
        return self._decode_impl(z, temporal_chunk, window_size, tile_sample_min_size, tiling,
                                 out_device=torch.device(host), order=order, frame_callback=frame_callback,
                                 return_frames=return_frames)


def _check_choice(name: str, values: Sequence[str], expected: str) -> None:
    bad = [v for v in values if v != expected]
    if bad:
        raise ValueError(f"{name} contains {bad}; only {expected!r} (the Pyramid Flow VAE) is supported")
