"""The SD3-style MMDiT Pyramid Flow DiT (`PyramidDiffusionMMDiT` in the official checkpoints).

Same calling convention as the miniFLUX DiT: clips of one stage (history oldest first, current
clip last) -> velocity of the current clip. Spatial positions come from the stored 2-D sin-cos
table (cropped around the centre, resized for lower-resolution history); temporal positions
from a RoPE over the whole head dim.

dtypes as in the miniFLUX DiT: the clips' dtype is the compute dtype, the residual streams run in the
`residual_dtype` setting (`configure_dit`; None = fp32 under fp16, otherwise the compute dtype = official flow).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionSpec
from .dit import PyramidDiT
from .double_stream import DoubleStreamAttention, DoubleStreamBlock
from .layers import AdaLayerNormContinuous, RMSNorm, time_text_embedder
from .operations import Operations, TorchOperations, on_device_of


def sincos_table_2d(dim: int, grid: int, base_size: int) -> torch.Tensor:
    """SD3's 2-D sin-cos table [1, grid*grid, dim]: first half encodes x (columns), second half y."""
    coords = torch.arange(grid, dtype=torch.float32) / (grid / base_size)

    def encode(pos: torch.Tensor, half: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2.0))
        angles = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    table = torch.cat([encode(xs, dim // 2), encode(ys, dim // 2)], dim=1)
    return table.float()[None]


class PatchEmbed(nn.Module):
    """Conv patchify per frame plus the cropped (and, for history, resized) position table."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, pos_embed_max_size: int, base_size: int,
                 operations: type[Operations] = TorchOperations):
        super().__init__()
        self.patch_size = patch_size
        self.max_size = pos_embed_max_size
        self.proj = operations.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_table_2d(dim, pos_embed_max_size, base_size), persistent=True)

    def position_table(self, grid_h: int, grid_w: int, ref_h: int, ref_w: int) -> torch.Tensor:
        """Crop the reference (current clip) grid around the centre; resize it to a smaller grid."""
        if ref_h > self.max_size or ref_w > self.max_size:
            raise ValueError(
                f"a {ref_h}x{ref_w} token grid exceeds this MMDiT's position table ({self.max_size}x{self.max_size}"
                f" tokens = {self.max_size * 16} px per side); use a smaller resolution"
            )
        top, left = (self.max_size - ref_h) // 2, (self.max_size - ref_w) // 2
        table = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)[:, top : top + ref_h, left : left + ref_w]
        if (grid_h, grid_w) != (ref_h, ref_w):
            table = F.interpolate(table.permute(0, 3, 1, 2), size=(grid_h, grid_w), mode="bilinear", align_corners=False)
            table = table.permute(0, 2, 3, 1)
        return table.reshape(1, grid_h * grid_w, -1)

    def forward(self, clips: list[torch.Tensor]) -> torch.Tensor:
        p = self.patch_size
        ref_h, ref_w = clips[-1].shape[-2] // p, clips[-1].shape[-1] // p
        tokens = []
        for clip in clips:
            b, c, t, h, w = clip.shape
            frames = clip.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w).to(self.proj.weight.dtype)
            x = self.proj(frames).flatten(2).transpose(1, 2)
            x = (x + on_device_of(self.position_table(h // p, w // p, ref_h, ref_w), x)).to(x.dtype)
            tokens.append(x.reshape(b, t * x.shape[1], -1))
        return torch.cat(tokens, dim=1)


class JointAttention(DoubleStreamAttention):
    """MMDiT joint attention; `context_pre_only` (last block) drops the text output projection."""

    def __init__(self, dim: int, heads: int, context_pre_only: bool, operations: type[Operations] = TorchOperations):
        super().__init__(heads, context_pre_only)
        linear = operations.Linear
        head_dim = dim // heads
        self.to_q, self.to_k, self.to_v = (linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, 1e-5, cast_to_input=True), RMSNorm(head_dim, 1e-5, cast_to_input=True)
        self.add_k_proj, self.add_v_proj, self.add_q_proj = (linear(dim, dim) for _ in range(3))
        self.norm_add_q = RMSNorm(head_dim, 1e-5, cast_to_input=True)
        self.norm_add_k = RMSNorm(head_dim, 1e-5, cast_to_input=True)
        self.to_out = nn.ModuleList([linear(dim, dim), nn.Dropout(0.0)])
        if not context_pre_only:
            self.to_add_out = linear(dim, dim)

    def context_norms(self) -> tuple[nn.Module, nn.Module]:
        return self.norm_add_q, self.norm_add_k


class JointTransformerBlock(DoubleStreamBlock):
    """MMDiT block: video and text streams with their own weights, one joint attention."""

    def __init__(self, dim: int, heads: int, context_pre_only: bool, operations: type[Operations] = TorchOperations):
        super().__init__(dim, JointAttention(dim, heads, context_pre_only, operations), context_pre_only, operations)


class PyramidMMDiT(PyramidDiT):
    """SD3-style MMDiT with Pyramid Flow's temporal RoPE and frame-causal attention (official names)."""

    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 24,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        caption_projection_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        pos_embed_max_size: int = 192,
        max_num_frames: int = 200,
        qk_norm: str = "rms_norm",
        pos_embed_type: str = "sincos",
        temp_pos_embed_type: str = "rope",
        joint_attention_dim: int = 4096,
        use_temporal_causal: bool = True,
        use_t5_mask: bool = True,
        add_temp_pos_embed: bool = True,
        interp_condition_pos: bool = True,
        use_flash_attn: bool = False,
        use_gradient_checkpointing: bool = False,
        operations: type[Operations] = TorchOperations,
    ):
        super().__init__(token_patch=patch_size)
        if qk_norm != "rms_norm" or pos_embed_type != "sincos" or temp_pos_embed_type != "rope":
            raise ValueError(
                "PyramidMMDiT supports the released configuration only "
                "(qk_norm='rms_norm', pos_embed_type='sincos', temp_pos_embed_type='rope')"
            )
        if not (use_temporal_causal and use_t5_mask and add_temp_pos_embed and interp_condition_pos):
            raise ValueError(
                "PyramidMMDiT needs the loader arguments of the official pipeline: use_temporal_causal, use_t5_mask,"
                " add_temp_pos_embed and interp_condition_pos all True"
            )
        dim = num_attention_heads * attention_head_dim
        if caption_projection_dim != dim:
            raise ValueError(f"caption_projection_dim {caption_projection_dim} must equal heads*head_dim = {dim}")
        self.in_channels = in_channels
        self.head_dim = attention_head_dim
        self.pos_embed = PatchEmbed(in_channels, dim, patch_size, pos_embed_max_size, sample_size // patch_size, operations)
        self.time_text_embed = time_text_embedder(dim, pooled_projection_dim, operations)
        self.context_embedder = operations.Linear(joint_attention_dim, caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(dim, num_attention_heads, i == num_layers - 1, operations) for i in range(num_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim, operations)
        self.proj_out = operations.Linear(dim, patch_size * patch_size * in_channels)

    @property
    def blocks(self) -> list[nn.Module]:
        """Transformer blocks in execution order (what block swap streams)."""
        return list(self.transformer_blocks)

    def transform(
        self, *, clips: list[torch.Tensor], context: torch.Tensor, temb: torch.Tensor, spec: AttentionSpec
    ) -> torch.Tensor:
        """Video tokens embedded and run through the blocks with the text (see `PyramidDiT.transform`)."""
        x = self.pos_embed(clips).to(spec.residual_dtype)
        rope = self.rotary_tables(clips, "t", [self.head_dim], spec.shard)
        keep = self.kept_token_count(clips, spec)  # the last block computes only what the read-out keeps
        context, x = self.local_streams(context, x, spec)
        last = self.transformer_blocks[-1]
        for block in self.transformer_blocks:
            context, x = block(
                x=x, context=context, temb=temb, rope=rope, spec=spec, keep_last=keep if block is last else None
            )
        return x
