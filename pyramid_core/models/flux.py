"""The miniFLUX Pyramid Flow DiT (`PyramidFluxTransformer` in the official checkpoints).

Input is the list of clips of one pyramid stage, oldest / lowest resolution first and the current
noisy clip last, each [B, 16, t, h, w]. Output is the velocity for the current clip only.

dtypes: the clips' dtype is the compute dtype (Linear / attention kernels). The residual streams
(image, text, joint) run in the `residual_dtype` setting (`configure_dit`; None = `residual_dtype_for(compute)`:
fp32 under fp16, otherwise the compute dtype, which is the official flow).

The forward's start and end (settings, conditioning, read-out) are `PyramidDiT`'s; the double-stream block is
`DoubleStreamBlock` plus the official fp16 clip of the text stream.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionSpec, joint_attention
from .dit import PyramidDiT
from .double_stream import DoubleStreamAttention, DoubleStreamBlock
from .operations import Operations, TorchOperations
from .layers import (
    FP16_MAX,
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    RMSNorm,
    RotaryTables,
    apply_rope_,
    project_heads,
    time_text_embedder,
)

PATCH_SIZE = 2  # the official code hard-codes 2 whatever config.json says


class FluxDoubleAttention(DoubleStreamAttention):
    """Joint attention of the double-stream blocks: separate projections for video and text."""

    def __init__(self, dim: int, heads: int, head_dim: int, operations: type[Operations] = TorchOperations):
        super().__init__(heads)
        linear = operations.Linear
        self.to_q, self.to_k, self.to_v = (linear(dim, heads * head_dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (linear(dim, heads * head_dim) for _ in range(3))
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)
        self.to_out = nn.ModuleList([linear(heads * head_dim, dim), nn.Dropout(0.0)])
        self.to_add_out = linear(heads * head_dim, dim)

    def context_norms(self) -> tuple[nn.Module, nn.Module]:
        return self.norm_added_q, self.norm_added_k


class FluxSingleAttention(nn.Module):
    """Attention of the single-stream blocks (no output projection: the block's proj_out does it)."""

    def __init__(self, dim: int, heads: int, head_dim: int, operations: type[Operations] = TorchOperations):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (operations.Linear(dim, heads * head_dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)

    def forward(
        self, *, x: torch.Tensor, rope: RotaryTables, spec: AttentionSpec, keep_last: int | None = None
    ) -> torch.Tensor:
        """Attention output [B, L, H*D] of the joint sequence x [B, L, dim] (its last `keep_last` tokens if given)."""
        tail = keep_last if keep_last is not None and spec.takes_query_tail else None  # only those queries
        q, k, v = project_heads(
            x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k, heads=self.heads, query_tail=tail
        )
        text_len = spec.local_text_len  # text positions are 0: the rotation is the identity there
        apply_rope_(q[:, text_len:] if tail is None else q, rope if tail is None else rope.last(tail))  # in place
        apply_rope_(k[:, text_len:], rope)
        out = joint_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), spec).transpose(1, 2)
        if keep_last is not None and tail is None:
            out = out[:, out.shape[1] - keep_last :]
        return out.flatten(2)


class FluxTransformerBlock(DoubleStreamBlock):
    """Double-stream block: video and text keep their own weights and attend jointly."""

    def __init__(self, dim: int, heads: int, head_dim: int, operations: type[Operations] = TorchOperations):
        super().__init__(dim, FluxDoubleAttention(dim, heads, head_dim, operations), operations=operations)

    def forward(
        self,
        *,
        x: torch.Tensor,
        context: torch.Tensor,
        temb: torch.Tensor,
        rope: RotaryTables,
        spec: AttentionSpec,
        keep_last: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(text stream, video stream) after the block (the video stream's last `keep_last` tokens if given)."""
        context, x = super().forward(x=x, context=context, temb=temb, rope=rope, spec=spec, keep_last=keep_last)
        if context.dtype == torch.float16:  # official overflow guard (fp16 residual streams only)
            context = context.clip(-FP16_MAX, FP16_MAX)
        return context, x


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on the joint [text; video] sequence: parallel attention and MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0, operations: type[Operations] = TorchOperations):
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZero(dim, double=False, operations=operations)
        self.proj_mlp = operations.Linear(dim, mlp_dim)
        self.attn = FluxSingleAttention(dim, heads, head_dim, operations)
        self.proj_out = operations.Linear(dim + mlp_dim, dim)

    def forward(
        self,
        *,
        x: torch.Tensor,
        temb: torch.Tensor,
        rope: RotaryTables,
        spec: AttentionSpec,
        keep_last: int | None = None,
    ) -> torch.Tensor:
        """The joint sequence x [B, L, dim] after the block.

        `keep_last` (the last block): only the last `keep_last` tokens, the current clip that the DiT reads out,
        are computed and returned; they still attend to every token, so they are exactly the full block's.
        """
        modulation, _ = self.norm(temb)
        x_mod = modulation.modulate(x).to(spec.residual_dtype)
        attn = self.attn(x=x_mod, rope=rope, spec=spec, keep_last=keep_last)
        if keep_last is not None:
            x, x_mod = x[:, x.shape[1] - keep_last :], x_mod[:, x_mod.shape[1] - keep_last :]
        mlp = F.gelu(self.proj_mlp(x_mod), approximate="tanh")
        x = x + modulation.gate * self.proj_out(torch.cat([attn, mlp], dim=2))
        if x.dtype == torch.float16:
            x = x.clip(-FP16_MAX, FP16_MAX)
        return x


def patchify(clip: torch.Tensor) -> torch.Tensor:
    """[B, C, t, h, w] -> [B, t*(h/2)*(w/2), 2*2*C] (t-major, rows, columns; features (p1, p2, c))."""
    b, c, t, h, w = clip.shape
    x = clip.reshape(b, c, t, h // 2, 2, w // 2, 2)
    return x.permute(0, 2, 3, 5, 4, 6, 1).reshape(b, t * (h // 2) * (w // 2), 4 * c)


class PyramidFluxTransformer(PyramidDiT):
    """miniFLUX DiT: 8 double-stream + 16 single-stream blocks at full size (official names)."""

    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 8,
        num_single_layers: int = 16,
        attention_head_dim: int = 64,
        num_attention_heads: int = 30,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        axes_dims_rope: tuple[int, ...] = (16, 24, 24),
        use_flash_attn: bool = False,
        use_temporal_causal: bool = True,
        interp_condition_pos: bool = True,
        use_gradient_checkpointing: bool = False,
        operations: type[Operations] = TorchOperations,
    ):
        super().__init__(token_patch=PATCH_SIZE)
        if not use_temporal_causal:
            raise ValueError("PyramidFluxTransformer supports the official temporal-causal attention only")
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"axes_dims_rope {list(axes_dims_rope)} must sum to attention_head_dim {attention_head_dim}")
        dim = num_attention_heads * attention_head_dim
        self.in_channels = in_channels
        self.axes_dims_rope = list(axes_dims_rope)
        self.time_text_embed = time_text_embedder(dim, pooled_projection_dim, operations)
        self.context_embedder = operations.Linear(joint_attention_dim, dim)
        self.x_embedder = operations.Linear(in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, num_attention_heads, attention_head_dim, operations) for _ in range(num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, num_attention_heads, attention_head_dim, operations=operations)
            for _ in range(num_single_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim, operations)
        self.proj_out = operations.Linear(dim, patch_size * patch_size * in_channels)  # config patch 1: 64 = 2*2*16

    @property
    def blocks(self) -> list[nn.Module]:
        """Transformer blocks in execution order (what block swap streams)."""
        return [*self.transformer_blocks, *self.single_transformer_blocks]

    def transform(
        self, *, clips: list[torch.Tensor], context: torch.Tensor, temb: torch.Tensor, spec: AttentionSpec
    ) -> torch.Tensor:
        """Video tokens embedded and run through the blocks with the text (see `PyramidDiT.transform`)."""
        x = self.x_embedder(torch.cat([patchify(clip) for clip in clips], dim=1).to(spec.residual_dtype))
        rope = self.rotary_tables(clips, "thw", self.axes_dims_rope, spec.shard)  # video; text sits at the origin
        keep = self.kept_token_count(clips, spec)  # the last block computes only what the read-out keeps
        context, x = self.local_streams(context, x, spec)
        last = self.blocks[-1]
        for block in self.transformer_blocks:
            context, x = block(
                x=x, context=context, temb=temb, rope=rope, spec=spec, keep_last=keep if block is last else None
            )
        joint = torch.cat([context, x], dim=1)
        for block in self.single_transformer_blocks:
            joint = block(x=joint, temb=temb, rope=rope, spec=spec, keep_last=keep if block is last else None)
        return joint
