"""Building blocks of the causal video VAE, up to its encoder and decoder networks.

Causal conv3d, frame-wise group norm, resnet, per-frame attention and up/down samplers. Sub-module
names equal the official ``causal_video_vae`` state-dict keys. Every block's ``forward`` takes
``chunked`` / ``first_chunk`` so a clip can be processed a few frames at a time (see
:class:`CausalConv3d`).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .operations import Operations, TorchOperations, on_device_of

NORM_SLICE_ELEMENTS = 1 << 25  # frames normalised per step: bounds the fp32 copies to ~128 MiB


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
        operations: type[Operations] = TorchOperations,
    ):
        super().__init__()
        self.time_pad = kernel_size - 1
        self.space_pad = kernel_size // 2
        self.time_stride = stride[0]
        self.conv = operations.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=bias)
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
        weight = on_device_of(self.weight, x).float() if self.weight is not None else None
        bias = on_device_of(self.bias, x).float() if self.bias is not None else None
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

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float = 1e-6, *,
                 operations: type[Operations] = TorchOperations):
        super().__init__()
        self.norm1 = CausalGroupNorm(groups, in_channels, eps=eps)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, operations=operations)
        self.norm2 = CausalGroupNorm(groups, out_channels, eps=eps)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, operations=operations)
        self.conv_shortcut = (
            CausalConv3d(in_channels, out_channels, 1, operations=operations) if in_channels != out_channels else None
        )

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

    def __init__(self, channels: int, groups: int, eps: float = 1e-6, *,
                 operations: type[Operations] = TorchOperations):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = operations.Linear(channels, channels)
        self.to_k = operations.Linear(channels, channels)
        self.to_v = operations.Linear(channels, channels)
        self.to_out = nn.ModuleList([operations.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        normed = F.group_norm(
            frames.float(), self.group_norm.num_groups, on_device_of(self.group_norm.weight, x).float(),
            on_device_of(self.group_norm.bias, x).float(), self.group_norm.eps,
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

    def __init__(self, channels: int, groups: int, *, operations: type[Operations] = TorchOperations):
        super().__init__()
        self.resnets = nn.ModuleList([CausalResnetBlock3D(channels, channels, groups, operations=operations) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups, operations=operations)])

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        x = self.resnets[0](x, chunked=chunked, first_chunk=first_chunk)
        x = self.attentions[0](x)
        return self.resnets[1](x, chunked=chunked, first_chunk=first_chunk)


class Downsample(nn.Module):
    """A strided causal conv: (1,2,2) halves height and width; (2,1,1) takes F frames to (F-1)//2 + 1."""

    def __init__(self, channels: int, stride: tuple[int, int, int], *, operations: type[Operations] = TorchOperations):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=stride, operations=operations)

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        return self.conv(x, chunked=chunked, first_chunk=first_chunk)


class SpatialUpsample(nn.Module):
    """Causal conv to 4c channels, then depth-to-space: (c p1 p2) -> c, (h p1), (w p2)."""

    def __init__(self, channels: int, *, operations: type[Operations] = TorchOperations):
        super().__init__()
        self.conv = CausalConv3d(channels, channels * 4, 3, operations=operations)

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        x = self.conv(x, chunked=chunked, first_chunk=first_chunk)
        b, c4, t, h, w = x.shape
        x = x.reshape(b, c4 // 4, 2, 2, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
        return x.reshape(b, c4 // 4, t, h * 2, w * 2)


class TemporalUpsample(nn.Module):
    """Causal conv to 2c channels, then (c p) t -> c (t p); the clip's first chunk drops its first frame."""

    def __init__(self, channels: int, *, operations: type[Operations] = TorchOperations):
        super().__init__()
        self.conv = CausalConv3d(channels, channels * 2, 3, operations=operations)

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        x = self.conv(x, chunked=chunked, first_chunk=first_chunk)
        b, c2, t, h, w = x.shape
        x = x.reshape(b, c2 // 2, 2, t, h, w).transpose(2, 3).reshape(b, c2 // 2, t * 2, h, w)
        # frame 0 of a clip is an image: it expands to one frame, not two
        return x[:, :, 1:] if first_chunk else x


def _resnet_stack(in_channels: int, out_channels: int, num_layers: int, groups: int,
                  operations: type[Operations]) -> nn.ModuleList:
    return nn.ModuleList(
        CausalResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, operations=operations)
        for i in range(num_layers)
    )


class DownEncoderBlock(nn.Module):
    """resnets, then optional spatial and temporal downsamplers (official ``DownEncoderBlockCausal3D``)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 spatial_down: bool, temporal_down: bool, *, operations: type[Operations] = TorchOperations):
        super().__init__()
        self.resnets = _resnet_stack(in_channels, out_channels, num_layers, groups, operations)
        self.downsamplers = (
            nn.ModuleList([Downsample(out_channels, (1, 2, 2), operations=operations)]) if spatial_down else None
        )
        self.temporal_downsamplers = (
            nn.ModuleList([Downsample(out_channels, (2, 1, 1), operations=operations)]) if temporal_down else None
        )

    def forward(self, x: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        for layer in _layers(self.resnets, self.downsamplers, self.temporal_downsamplers):
            x = layer(x, chunked=chunked, first_chunk=first_chunk)
        return x


class UpDecoderBlock(nn.Module):
    """resnets, then optional spatial and temporal upsamplers (official ``UpDecoderBlockCausal3D``)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 spatial_up: bool, temporal_up: bool, *, operations: type[Operations] = TorchOperations):
        super().__init__()
        self.resnets = _resnet_stack(in_channels, out_channels, num_layers, groups, operations)
        self.upsamplers = nn.ModuleList([SpatialUpsample(out_channels, operations=operations)]) if spatial_up else None
        self.temporal_upsamplers = (
            nn.ModuleList([TemporalUpsample(out_channels, operations=operations)]) if temporal_up else None
        )

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
                 temporal_down: Sequence[bool], *, operations: type[Operations] = TorchOperations):
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0], 3, operations=operations)
        blocks, prev = [], block_out_channels[0]
        for i, out in enumerate(block_out_channels):
            blocks.append(DownEncoderBlock(prev, out, layers_per_block[i], groups, spatial_down[i], temporal_down[i],
                                           operations=operations))
            prev = out
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = CausalMidBlock(prev, groups, operations=operations)
        self.conv_norm_out = CausalGroupNorm(groups, prev, eps=1e-6)
        self.conv_out = CausalConv3d(prev, 2 * latent_channels, 3, operations=operations)

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
                 temporal_up: Sequence[bool], *, operations: type[Operations] = TorchOperations):
        super().__init__()
        reversed_channels = list(reversed(block_out_channels))
        self.conv_in = CausalConv3d(latent_channels, reversed_channels[0], 3, operations=operations)
        self.mid_block = CausalMidBlock(reversed_channels[0], groups, operations=operations)
        blocks, prev = [], reversed_channels[0]
        for i, out in enumerate(reversed_channels):
            blocks.append(UpDecoderBlock(prev, out, layers_per_block[i], groups, spatial_up[i], temporal_up[i],
                                         operations=operations))
            prev = out
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = CausalGroupNorm(groups, block_out_channels[0], eps=1e-6)
        self.conv_out = CausalConv3d(block_out_channels[0], out_channels, 3, operations=operations)

    def forward(self, z: torch.Tensor, *, chunked: bool = False, first_chunk: bool = True) -> torch.Tensor:
        kw = dict(chunked=chunked, first_chunk=first_chunk)
        x = self.mid_block(self.conv_in(z, **kw), **kw)
        for block in self.up_blocks:
            x = block(x, **kw)
        return self.conv_out(self.conv_norm_out(x, silu=True), **kw)
