"""Building blocks shared by the two Pyramid Flow DiTs (miniFLUX and MMDiT).

Parameter names follow the official checkpoints, so state dicts load with no renaming.
Numerics follow the official bf16 autocast path: LayerNorm runs in fp32 and the modulated
activations stay fp32 until the next Linear; RMSNorm reduces in fp32; RoPE is applied in fp32.

Small ops are fused where that keeps the official numbers: the q/k RMSNorm is one
`torch.nn.functional.rms_norm` call (torch >= 2.4; one kernel on CUDA) with the official dtype rules,
and RoPE rotates q and k in place with tables laid out per head channel (no pair split, stack or copy).

Mixed precision: every Linear here accepts activations wider than its weights (fp32 activations,
fp16 weights). The product then runs in the weight dtype and the result comes back in the
activation dtype. That is how the DiTs run fp16 without overflow: the residual streams stay fp32
(`residual_dtype_for`) while every matmul and attention kernel still runs in fp16.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .operations import Linear, Operations, TorchOperations, mixed_precision_linear, on_device_of, pow2_scale

try:  # diffusers' embedding module carries the official parameter names
    from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
except ImportError as exc:  # pragma: no cover - diffusers is a hard dependency
    raise ImportError("pyramid_core needs diffusers>=0.30: pip install diffusers") from exc

__all__ = [
    "AdaLayerNormContinuous",
    "AdaLayerNormZero",
    "CombinedTimestepTextProjEmbeddings",
    "FeedForward",
    "Linear",
    "Modulation",
    "RMSNorm",
    "RotaryTables",
    "apply_rope_",
    "clip_positions",
    "frame_token_counts",
    "host_to_device",
    "layer_norm_fp32",
    "mixed_precision_linear",
    "pow2_scale",
    "project_heads",
    "residual_dtype_for",
    "rms_norm",
    "rope_cos_sin",
    "rope_tables",
    "time_text_embedder",
]

FP16_MAX = 65504.0
_HALF = (torch.float16, torch.bfloat16)
_FUSED_RMS_NORM = hasattr(F, "rms_norm")  # torch >= 2.4; the project floor (2.1) takes the reference formula


def residual_dtype_for(compute_dtype: torch.dtype) -> torch.dtype:
    """Default dtype of the residual streams for a compute dtype: fp32 under fp16, else unchanged.

    fp16 residual streams overflow (FACTS 8.1: NaN / black video); bf16 and fp32 keep the official flow.
    """
    return torch.float32 if compute_dtype == torch.float16 else compute_dtype


def time_text_embedder(dim: int, pooled_dim: int, operations: type[Operations] = TorchOperations) -> nn.Module:
    """diffusers' `CombinedTimestepTextProjEmbeddings` (the official parameter names and numerics) with its Linear
    layers built from `operations`, like every other layer of the DiTs."""
    module = CombinedTimestepTextProjEmbeddings(embedding_dim=dim, pooled_projection_dim=pooled_dim)
    for name, child in list(module.named_modules()):
        if type(child) is nn.Linear:
            parent, _, attr = name.rpartition(".")
            layer = operations.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                      device=child.weight.device, dtype=child.weight.dtype)
            setattr(module.get_submodule(parent) if parent else module, attr, layer)
    return module


class GELUProjection(nn.Module):
    """Linear + tanh-approximate GELU (the first layer of the official FeedForward, `net.0.proj`)."""

    def __init__(self, dim_in: int, dim_out: int, operations: type[Operations] = TorchOperations):
        super().__init__()
        self.proj = operations.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """dim -> 4*dim -> GELU(tanh) -> dim_out, with diffusers' parameter names (`net.0.proj`, `net.2`)."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, operations: type[Operations] = TorchOperations):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([
            GELUProjection(dim, inner, operations), nn.Dropout(0.0), operations.Linear(inner, dim_out or dim)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned weight (the per-head q/k norm); see `rms_norm`.

    `cast_to_input`: MMDiT casts the result back to the input dtype; miniFLUX leaves it in the
    weight's dtype for half weights (identical for fp32).
    """

    def __init__(self, dim: int, eps: float, cast_to_input: bool = False):
        super().__init__()
        self.eps = eps
        self.cast_to_input = cast_to_input
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, on_device_of(self.weight, x), self.eps, self.cast_to_input)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, cast_to_input: bool = False) -> torch.Tensor:
    """The official (diffusers) RMSNorm of x over its last dim, in one fused call where torch has one.

    dtypes as official: x is normalised in fp32; half weights take the result rounded to their dtype
    and the product stays in it; other weights (fp32, fp8 storage) multiply in fp32. `cast_to_input`
    casts the result to x's dtype. Without `torch.nn.functional.rms_norm` (torch < 2.4), or for float64
    input, the official op-by-op formula runs instead.
    """
    if not _FUSED_RMS_NORM or x.dtype not in (torch.float32, *_HALF):
        return _rms_norm_reference(x, weight, eps, cast_to_input)
    shape = (x.shape[-1],)
    if weight.dtype in _HALF:
        # rms_norm of a half tensor normalises in fp32 and rounds once: the official cast when the dtypes agree
        source = x if x.dtype in (torch.float32, weight.dtype) else x.float()
        out = F.rms_norm(source, shape, eps=eps).to(weight.dtype) * weight
    else:
        out = F.rms_norm(x.float(), shape, weight.float(), eps=eps)
    return out.to(x.dtype) if cast_to_input else out


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, cast_to_input: bool) -> torch.Tensor:
    """The official formula op by op (diffusers' RMSNorm with its fp8-storage rule)."""
    input_dtype = x.dtype
    variance = x.float().pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight.dtype in _HALF:
        x = x.to(weight.dtype)
    elif weight.dtype != x.dtype:  # low-precision storage (fp8): compute in the activation dtype
        weight = weight.to(x.dtype)
    x = x * weight
    return x.to(input_dtype) if cast_to_input else x


def project_heads(
    x: torch.Tensor,
    to_q: nn.Module,
    to_k: nn.Module,
    to_v: nn.Module,
    norm_q: nn.Module,
    norm_k: nn.Module,
    *,
    heads: int,
    query_tail: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values [B, L, H, D] of tokens x [B, L, dim], q and k normalised per head.

    Token-major, as the projections write them (no copy); `.transpose(1, 2)` gives the [B, H, L, D] view the
    attention takes. q and k are fresh tensors (the norms' outputs), so RoPE may rotate them in place.
    `query_tail`: queries of the last `query_tail` tokens only ([B, query_tail, H, D]).
    """
    if query_tail is not None:
        x_q = x[:, x.shape[1] - query_tail :]
        q = norm_q(to_q(x_q).unflatten(-1, (heads, -1)))
        k = norm_k(to_k(x).unflatten(-1, (heads, -1)))
        return q, k, to_v(x).unflatten(-1, (heads, -1))
    q = norm_q(to_q(x).unflatten(-1, (heads, -1)))  # views; unlike view(B, L, H, -1) also for L = 0 tokens
    k = norm_k(to_k(x).unflatten(-1, (heads, -1)))
    v = to_v(x).unflatten(-1, (heads, -1))
    return q, k, v


def layer_norm_fp32(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Affine-free LayerNorm computed in fp32 (what autocast does); returns fp32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


class Modulation(NamedTuple):
    """One adaLN-Zero modulation, vectors [B, 1, D]: shift and scale the normalised input, gate the branch output."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor

    def modulate(self, x: torch.Tensor) -> torch.Tensor:
        """Affine-free LayerNorm of x (fp32), scaled and shifted; returns fp32."""
        return layer_norm_fp32(x) * (1 + self.scale) + self.shift


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero modulations of a block from temb: (attention, MLP), or one shared when not `double`.

    Double-stream blocks take two (`norm1.linear`: 6 * dim outputs); single-stream blocks one for their
    parallel attention and MLP branches (`norm.linear`: 3 * dim).
    """

    def __init__(self, dim: int, double: bool = True, operations: type[Operations] = TorchOperations):
        super().__init__()
        self.double = double
        self.linear = operations.Linear(dim, (6 if double else 3) * dim)

    def forward(self, temb: torch.Tensor) -> tuple[Modulation, Modulation | None]:
        """(attention, MLP) modulations in temb's dtype; the second is None when not `double`."""
        chunks = self.linear(F.silu(temb))[:, None].chunk(6 if self.double else 3, dim=-1)
        return Modulation(*chunks[:3]), (Modulation(*chunks[3:]) if self.double else None)


class AdaLayerNormContinuous(nn.Module):
    """Final / context-only norm: (scale, shift) - scale first, the diffusers convention."""

    def __init__(self, dim: int, cond_dim: int, operations: type[Operations] = TorchOperations):
        super().__init__()
        self.linear = operations.Linear(cond_dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        emb = self.linear(F.silu(temb).to(x.dtype)).to(x.dtype)[:, None]
        scale, shift = emb.chunk(2, dim=-1)
        return layer_norm_fp32(x) * (1 + scale) + shift


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`; from the host the copy is asynchronous (pinned first when `device` is CUDA).

    A tensor already on `device` is returned as is. Pinning only for CUDA: `pin_memory()` raises on
    CPU-only builds, and other backends stage host copies themselves.
    """
    device = torch.device(device)
    if tensor.device.type != "cpu" or device.type == "cpu":
        return tensor.to(device)
    if device.type == "cuda":
        tensor = tensor.pin_memory()  # from pageable memory the "asynchronous" copy would block the host
    return tensor.to(device, non_blocking=True)


def rope_cos_sin(positions: torch.Tensor, axes_dims: list[int], theta: float = 10000.0):
    """Rotary tables for token positions, computed on the host.

    positions: [L, n_axes] float positions (one column per axis); axes_dims: head-dim channels per
    axis (sum = head dim). Angles are computed in float64 on the CPU as official (MPS has no float64,
    so it never reaches the execution device); returns (cos, sin) fp32 CPU tensors of shape
    [L, head_dim // 2], pair k rotating channels (2k, 2k+1).
    """
    positions = positions.cpu()
    tables = []
    for axis, dim in enumerate(axes_dims):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)
        tables.append(positions[:, axis].to(torch.float64)[:, None] * omega[None])
    angles = torch.cat(tables, dim=-1)
    return torch.cos(angles).float(), torch.sin(angles).float()


def rope_tables(
    clips: Sequence[torch.Tensor | Sequence[int]], patch: int, axes: str, axes_dims: list[int]
) -> torch.Tensor:
    """RoPE tables of the video tokens on the host: fp32 [2, L, head_dim], cos then sin, per head channel.

    Built from the clip shapes alone (`clip_positions`, `rope_cos_sin`); each angle is repeated for the two
    channels (2k, 2k+1) of its pair, the layout `apply_rope_` reads. One tensor, so one copy to the device.
    """
    positions, _ = clip_positions(clips, patch, axes)
    cos, sin = rope_cos_sin(positions, axes_dims)
    return torch.stack([cos, sin]).repeat_interleave(2, dim=-1)


class RotaryTables(NamedTuple):
    """RoPE tables on the execution device, fp32 [L, 1, D] each (broadcast over heads), as `rope_tables` lays out."""

    cos: torch.Tensor
    sin: torch.Tensor

    def last(self, count: int) -> RotaryTables:
        """The tables of the last `count` tokens (views)."""
        return RotaryTables(self.cos[self.cos.shape[0] - count :], self.sin[self.sin.shape[0] - count :])

    @classmethod
    def from_host(cls, tables: torch.Tensor, device: torch.device | str) -> RotaryTables:
        """The [2, L, D] host tables of `rope_tables` on `device`, in one asynchronous copy."""
        cos, sin = host_to_device(tables, device)[:, :, None].unbind(0)
        return cls(cos, sin)


def apply_rope_(x: torch.Tensor, rope: RotaryTables) -> torch.Tensor:
    """Rotate the channel pairs (2k, 2k+1) of x [B, L, H, D] in place by the tables; returns x.

    The official rotation (a, b) -> (a cos - b sin, a sin + b cos), computed in fp32 with the same roundings
    (each product rounded, then one sum); a half x is rotated into fp32 products and written back rounded once.
    x may be a view (the video part of a joint sequence): only its elements change.
    """
    work = x if x.dtype in (torch.float32, *_HALF) else x.float()  # half x widens exactly inside the products
    swapped = work * rope.sin  # fp32 (a sin, b sin), before `work` changes
    work = work.mul_(rope.cos) if work.dtype == torch.float32 else work * rope.cos  # fp32 (a cos, b cos)
    work[..., 0::2].sub_(swapped[..., 1::2])
    work[..., 1::2].add_(swapped[..., 0::2])
    if work is not x:
        x.copy_(work)
    return x


def _clip_grid(clip: torch.Tensor | Sequence[int], patch: int) -> tuple[int, int, int]:
    """(frames, token rows, token columns) of a clip, from a [..., t, h, w] tensor or its shape."""
    t, h, w = tuple(getattr(clip, "shape", clip))[-3:]
    return int(t), int(h) // patch, int(w) // patch


def frame_token_counts(clips: Sequence[torch.Tensor | Sequence[int]], patch: int) -> tuple[int, ...]:
    """Video tokens of each latent frame, in sequence order (clips oldest first; shapes only)."""
    counts: list[int] = []
    for clip in clips:
        t, h, w = _clip_grid(clip, patch)
        counts += [h * w] * t
    return tuple(counts)


def clip_positions(
    clips: Sequence[torch.Tensor | Sequence[int]], patch: int, axes: str = "thw"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions of the video sequence and each token's frame index, on the host.

    `clips`: the stage's clips (oldest first) or their shapes ([..., t, h, w]); only shapes are read.
    Frames are numbered cumulatively through the clip list. Spatial positions use the current
    clip's token grid; a smaller history clip gets linearly interpolated (fractional) positions.
    Returns CPU tensors (positions [N, len(axes)] float32, frame_ids [N] int64).
    """
    _, grid_h, grid_w = _clip_grid(clips[-1], patch)
    positions, frames, start = [], [], 0
    for clip in clips:
        t, h, w = _clip_grid(clip, patch)
        ts = torch.arange(start, start + t, dtype=torch.float32, device="cpu")
        tt, yy, xx = torch.meshgrid(ts, _grid_positions(grid_h, h), _grid_positions(grid_w, w), indexing="ij")
        columns = {"t": tt, "h": yy, "w": xx}
        positions.append(torch.stack([columns[a].reshape(-1) for a in axes], dim=-1))
        frames.append(tt.reshape(-1).long())
        start += t
    return torch.cat(positions), torch.cat(frames)


def _grid_positions(reference: int, size: int) -> torch.Tensor:
    base = torch.arange(reference, dtype=torch.float32, device="cpu")
    if size == reference:
        return base
    return F.interpolate(base[None, None], size=size, mode="linear", align_corners=False)[0, 0]
