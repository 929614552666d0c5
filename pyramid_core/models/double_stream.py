"""The double-stream block both DiTs share: video and text keep their own weights and attend jointly.

miniFLUX's `FluxTransformerBlock` and MMDiT's `JointTransformerBlock` compute the same thing under the
same parameter names (`norm1`, `norm1_context`, `attn`, `ff`, `ff_context`); their attentions differ only in
the q/k norms (epsilon, dtype rule, the text norms' names), which the family modules define.

`keep_last` (the DiT's last block): only the last `keep_last` video tokens (the current clip, all the DiT reads
out) get the output projection, residual and MLP; attention still runs over every token, so they are exact.
"""
from __future__ import annotations

import abc

import torch
from torch import nn

from .attention import AttentionSpec, joint_attention
from .operations import Operations, TorchOperations
from .layers import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    FeedForward,
    Modulation,
    RotaryTables,
    apply_rope_,
    project_heads,
)

__all__ = ["DoubleStreamAttention", "DoubleStreamBlock"]


class DoubleStreamAttention(nn.Module, abc.ABC):
    """Joint attention of a double-stream block over the sequence [text; video].

    Video and text project to heads with their own weights and back with their own output projections.
    Subclasses register the parameters under their checkpoint's names: `to_q`, `to_k`, `to_v`, `norm_q`,
    `norm_k`, `add_q_proj`, `add_k_proj`, `add_v_proj`, the text q/k norms (returned by `context_norms`),
    `to_out` and, unless `context_pre_only`, `to_add_out`.
    """

    def __init__(self, heads: int, context_pre_only: bool = False):
        super().__init__()
        self.heads = heads
        self.context_pre_only = context_pre_only

    @abc.abstractmethod
    def context_norms(self) -> tuple[nn.Module, nn.Module]:
        """The per-head q and k norms of the text stream."""
        raise NotImplementedError

    def forward(
        self,
        *,
        x: torch.Tensor,
        context: torch.Tensor,
        rope: RotaryTables,
        spec: AttentionSpec,
        keep_last: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(video output, text output); the text output is None when `context_pre_only`.

        `keep_last`: the video output covers only the last `keep_last` tokens (None: all). Where nothing reads the
        text output (`context_pre_only`), only those video tokens' queries are computed.
        """
        tail = keep_last if keep_last is not None and self.context_pre_only and spec.takes_query_tail else None
        q, k, v = project_heads(
            x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k, heads=self.heads, query_tail=tail
        )
        cq, ck, cv = project_heads(  # no text queries when only the video tail's are computed
            context, self.add_q_proj, self.add_k_proj, self.add_v_proj, *self.context_norms(), heads=self.heads,
            query_tail=None if tail is None else 0,
        )
        apply_rope_(q, rope if tail is None else rope.last(tail))  # video only: text sits at the origin (identity)
        apply_rope_(k, rope)
        if tail is not None:  # the current clip's queries against every key
            keys, values = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((ck, k), (cv, v)))
            out = joint_attention(q.transpose(1, 2), keys, values, spec).transpose(1, 2)
            return self.to_out[0](out.flatten(2)), None
        # token-major [B, L, H, D] joint tensors; the attention reads them as [B, H, L, D] views
        joint = [torch.cat(pair, dim=1).transpose(1, 2) for pair in ((cq, q), (ck, k), (cv, v))]
        out = joint_attention(*joint, spec).transpose(1, 2)  # [B, L, H, D]
        text_len = context.shape[1]
        context_out = None if self.context_pre_only else self.to_add_out(out[:, :text_len].flatten(2))
        video = out[:, text_len:] if keep_last is None else out[:, out.shape[1] - keep_last :]
        return self.to_out[0](video.flatten(2)), context_out


class DoubleStreamBlock(nn.Module):
    """adaLN-Zero attention and MLP on the video and text streams, each with its own weights, one joint attention.

    `context_pre_only` (MMDiT's last block): the text stream is only read (a continuous norm, no text output).
    """

    def __init__(self, dim: int, attn: DoubleStreamAttention, context_pre_only: bool = False,
                 operations: type[Operations] = TorchOperations):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZero(dim, operations=operations)
        self.norm1_context = (
            AdaLayerNormContinuous(dim, dim, operations) if context_pre_only else AdaLayerNormZero(dim, operations=operations)
        )
        self.attn = attn
        self.ff = FeedForward(dim, dim, operations=operations)
        if not context_pre_only:
            self.ff_context = FeedForward(dim, dim, operations=operations)

    def forward(
        self,
        *,
        x: torch.Tensor,
        context: torch.Tensor,
        temb: torch.Tensor,
        rope: RotaryTables,
        spec: AttentionSpec,
        keep_last: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(text stream, video stream) after the block; the text stream is None after a `context_pre_only` block.

        `keep_last`: the video stream comes back with only its last `keep_last` tokens (None: all of them).
        """
        residual = spec.residual_dtype  # the Linears take it (fp32 under fp16 compute: see layers.Linear)
        x_attn, x_mlp = self.norm1(temb)
        if self.context_pre_only:
            context_in = self.norm1_context(context, temb)
        else:
            context_attn, context_mlp = self.norm1_context(temb)
            context_in = context_attn.modulate(context)
        x_out, context_out = self.attn(
            x=x_attn.modulate(x).to(residual), context=context_in.to(residual), rope=rope, spec=spec,
            keep_last=keep_last,
        )
        if keep_last is not None:
            x = x[:, x.shape[1] - keep_last :]
        x = _add_mlp(x + x_attn.gate * x_out, x_mlp, self.ff, residual)
        if self.context_pre_only:
            return None, x
        context = _add_mlp(context + context_attn.gate * context_out, context_mlp, self.ff_context, residual)
        return context, x


def _add_mlp(stream: torch.Tensor, modulation: Modulation, ff: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The stream plus its gated MLP branch (the modulated input brought back to `dtype` for the Linears)."""
    return stream + modulation.gate * ff(modulation.modulate(stream).to(dtype))
