"""The miniFLUX Pyramid Flow DiT (`PyramidFluxTransformer` in the official checkpoints).

Input is the list of clips of one pyramid stage, oldest / lowest resolution first and the current
noisy clip last, each [B, 16, t, h, w]. Output is the velocity for the current clip only.

dtypes: the clips' dtype is the compute dtype (Linear / attention kernels). The residual streams
(image, text, joint) run in `residual_dtype` (None = `residual_dtype_for(compute)`: fp32 under fp16,
otherwise the compute dtype, which is the official flow).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionFn, HostTextMask, TokenLayout, joint_attention, sdpa
from .layers import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    CombinedTimestepTextProjEmbeddings,
    FeedForward,
    Linear,
    RMSNorm,
    apply_rope,
    residual_dtype_for,
    rope_on_device,
)

PATCH_SIZE = 2  # the official code hard-codes 2 whatever config.json says


class FluxDoubleAttention(nn.Module):
    """Joint attention of the double-stream blocks: separate projections for video and text."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (Linear(dim, heads * head_dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (Linear(dim, heads * head_dim) for _ in range(3))
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)
        self.to_out = nn.ModuleList([Linear(heads * head_dim, dim), nn.Dropout(0.0)])
        self.to_add_out = Linear(heads * head_dim, dim)

    def forward(self, x, context, rope, layout, mode, attend, attention_dtype=None):
        q, k, v = _heads(self, x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        cq, ck, cv = _heads(
            self, context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
        )
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # video only: text positions are 0 (identity)
        out = joint_attention(
            torch.cat([cq, q], 2), torch.cat([ck, k], 2), torch.cat([cv, v], 2), layout, mode, attend, attention_dtype
        )
        out = out.transpose(1, 2).flatten(2)
        text_len = context.shape[1]
        return self.to_out[0](out[:, text_len:]), self.to_add_out(out[:, :text_len])


class FluxSingleAttention(nn.Module):
    """Attention of the single-stream blocks (no output projection: the block's proj_out does it)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (Linear(dim, heads * head_dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)

    def forward(self, s, rope, layout, mode, attend, attention_dtype=None):
        q, k, v = _heads(self, s, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        text_len = layout.text_len  # text positions are 0: the rotation is the identity there
        q = torch.cat([q[:, :, :text_len], apply_rope(q[:, :, text_len:], *rope)], dim=2)
        k = torch.cat([k[:, :, :text_len], apply_rope(k[:, :, text_len:], *rope)], dim=2)
        return joint_attention(q, k, v, layout, mode, attend, attention_dtype).transpose(1, 2).flatten(2)


def _heads(attn, x, to_q, to_k, to_v, norm_q, norm_k):
    """Project to [B, H, L, D] queries/keys/values with per-head RMSNorm on q and k."""
    shape = (x.shape[0], x.shape[1], attn.heads, -1)
    q = norm_q(to_q(x).view(shape))
    k = norm_k(to_k(x).view(shape))
    v = to_v(x).view(shape)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class FluxTransformerBlock(nn.Module):
    """Double-stream block: video and text keep their own weights and attend jointly."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxDoubleAttention(dim, heads, head_dim)
        self.ff = FeedForward(dim, dim)
        self.ff_context = FeedForward(dim, dim)

    def forward(
        self, x, context, temb, rope, layout, mode="segmented", attend: AttentionFn = sdpa, attention_dtype=None
    ):
        """`attention_dtype`: attention kernel dtype (None = the residual dtype x carries)."""
        dtype = x.dtype  # residual dtype: the Linears take it (fp32 under fp16 compute: see layers.Linear)
        x_mod, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        c_mod, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, temb)
        attn_out, context_attn_out = self.attn(
            x_mod.to(dtype), c_mod.to(dtype), rope, layout, mode, attend, attention_dtype
        )

        x = x + gate_msa * attn_out
        x_mod = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6) * (1 + scale_mlp) + shift_mlp
        x = x + gate_mlp * self.ff(x_mod.to(dtype))

        context = context + c_gate_msa * context_attn_out
        c_mod = F.layer_norm(context.float(), (context.shape[-1],), eps=1e-6) * (1 + c_scale_mlp) + c_shift_mlp
        context = context + c_gate_mlp * self.ff_context(c_mod.to(dtype))
        if context.dtype == torch.float16:  # official overflow guard (fp16 residual streams only)
            context = context.clip(-65504, 65504)
        return context, x


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on the joint [text; video] sequence: parallel attention and MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = Linear(dim, mlp_dim)
        self.attn = FluxSingleAttention(dim, heads, head_dim)
        self.proj_out = Linear(dim + mlp_dim, dim)

    def forward(self, s, temb, rope, layout, mode="segmented", attend: AttentionFn = sdpa, attention_dtype=None):
        s_mod, gate = self.norm(s, temb)
        s_mod = s_mod.to(s.dtype)
        mlp = F.gelu(self.proj_mlp(s_mod), approximate="tanh")
        attn = self.attn(s_mod, rope, layout, mode, attend, attention_dtype)
        s = s + gate * self.proj_out(torch.cat([attn, mlp], dim=2))
        if s.dtype == torch.float16:
            s = s.clip(-65504, 65504)
        return s


def patchify(clip: torch.Tensor) -> torch.Tensor:
    """[B, C, t, h, w] -> [B, t*(h/2)*(w/2), 2*2*C] (t-major, rows, columns; features (p1, p2, c))."""
    b, c, t, h, w = clip.shape
    x = clip.reshape(b, c, t, h // 2, 2, w // 2, 2)
    return x.permute(0, 2, 3, 5, 4, 6, 1).reshape(b, t * (h // 2) * (w // 2), 4 * c)


def unpatchify(tokens: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `patchify` for the current clip: [B, t*(h/2)*(w/2), 4*C] -> [B, C, t, h, w]."""
    b = tokens.shape[0]
    x = tokens.reshape(b, t, h // 2, w // 2, 2, 2, -1)
    return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, -1, t, h, w)


class PyramidFluxTransformer(nn.Module):
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
        **unused,
    ):
        super().__init__()
        if not use_temporal_causal:
            raise ValueError("PyramidFluxTransformer supports the official temporal-causal attention only")
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"axes_dims_rope {list(axes_dims_rope)} must sum to attention_head_dim {attention_head_dim}")
        dim = num_attention_heads * attention_head_dim
        self.in_channels = in_channels
        self.axes_dims_rope = list(axes_dims_rope)
        self.attention_mode = "segmented"
        self.attention_fn: AttentionFn = sdpa
        self.residual_dtype: torch.dtype | None = None  # None: residual_dtype_for(compute dtype)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(embedding_dim=dim, pooled_projection_dim=pooled_projection_dim)
        self.context_embedder = Linear(joint_attention_dim, dim)
        self.x_embedder = Linear(in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_single_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim)
        self.proj_out = Linear(dim, patch_size * patch_size * in_channels)  # config patch 1: 64 = 2*2*16

    @property
    def blocks(self) -> list[nn.Module]:
        """Transformer blocks in execution order (what block swap streams)."""
        return [*self.transformer_blocks, *self.single_transformer_blocks]

    def working_memory_bytes(self, workload) -> int:
        """Device working memory of one forward at the workload's largest unit (a `pyramid_core.memory.Workload`)."""
        from ..memory.estimates import dit_working_memory

        dense = self.attention_mode == "masked"
        return dit_working_memory(workload, self.context_embedder.out_features, PATCH_SIZE, dense_mask=dense)

    def forward(
        self,
        clips: list[torch.Tensor],
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | HostTextMask | None,
        pooled_projections: torch.Tensor,
    ) -> torch.Tensor:
        """Velocity for the current (last) clip, [B, C, t, h, w], from history + current clips.

        `encoder_attention_mask`: [B, T] (a device tensor is read once per forward), a `HostTextMask` (never
        read from the device), or None (all text real). Positions and RoPE come from the clip shapes.
        """
        current = clips[-1]
        dtype = current.dtype
        residual = self.residual_dtype or residual_dtype_for(dtype)
        layout = TokenLayout.from_clips(clips, PATCH_SIZE, encoder_attention_mask, encoder_hidden_states.shape[:2])

        temb = self.time_text_embed(timestep, pooled_projections).to(residual)
        context = self.context_embedder(encoder_hidden_states.to(residual))
        x = self.x_embedder(torch.cat([patchify(clip) for clip in clips], dim=1).to(residual))

        rope = rope_on_device(clips, PATCH_SIZE, "thw", self.axes_dims_rope, current.device)  # text sits at the origin
        mode, attend = self.attention_mode, self.attention_fn

        for block in self.transformer_blocks:
            context, x = block(x, context, temb, rope, layout, mode, attend, dtype)
        s = torch.cat([context, x], dim=1)
        for block in self.single_transformer_blocks:
            s = block(s, temb, rope, layout, mode, attend, dtype)

        _, _, t, h, w = current.shape
        current_tokens = s[:, -t * (h // 2) * (w // 2) :]  # only the current clip is read out
        out = self.proj_out(self.norm_out(current_tokens, temb).to(residual))
        return unpatchify(out.to(dtype), t, h, w)
