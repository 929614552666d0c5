"""What the two Pyramid Flow DiTs share around their blocks: settings, the per-forward spec, start and end.

A DiT's settings (`DiTSettings`: attention mode and backend, residual dtype) say how it runs, not what it
computes on; they change only through `configure_dit`, which replaces them whole. Each forward turns them,
with the clip shapes and the text mask, into one `AttentionSpec` that every block receives by keyword.

RoPE tables depend only on the clip shapes, which stay the same for every step of a pyramid stage: each DiT keeps
the host tables of its last few shape sets (`rotary_tables`), so a step costs one asynchronous copy, no recompute.
"""
from __future__ import annotations

import abc

from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING

import torch
from torch import nn

from .attention import (
    ATTENTION_MODES,
    AttentionFn,
    AttentionSpec,
    HostTextMask,
    TokenLayout,
    resolve_attention_backend,
    sdpa,
)
from .layers import RotaryTables, residual_dtype_for, rope_tables

if TYPE_CHECKING:
    from ..parallel.sequence import SequenceParallel, SequenceShard

__all__ = ["DiTSettings", "PyramidDiT", "configure_dit", "unpatchify"]

RESIDUAL_DTYPES = (None, torch.float16, torch.bfloat16, torch.float32)
ROPE_CACHE_SIZE = 4  # shape sets whose RoPE tables a DiT keeps: the current stage's, with room for a few more


@dataclass(frozen=True)
class DiTSettings:
    """How a DiT runs. Change it with `configure_dit` (which resolves `attention_kernel` from the backend name).

    attention_mode: 'segmented' (fused per-frame kernels) or 'masked' (the official dense mask, SDPA only).
    attention_backend: the segmented path's kernel by name ('sdpa', 'sage', 'flash' or registered).
    residual_dtype: the residual streams' dtype; None = `residual_dtype_for(compute dtype)` (fp32 under fp16).
    sequence_parallel: the group whose ranks each run a shard of every forward's tokens (None: all here).
    """

    attention_mode: str = "segmented"
    attention_backend: str = "sdpa"
    attention_kernel: AttentionFn = sdpa
    residual_dtype: torch.dtype | None = None
    sequence_parallel: SequenceParallel | None = None


class _Unchanged(Enum):
    UNCHANGED = "unchanged"


UNCHANGED = _Unchanged.UNCHANGED  # a `configure_dit` keyword left out: that setting stays as it is


def configure_dit(
    model: PyramidDiT,
    *,
    attention_mode: str | _Unchanged = UNCHANGED,
    attention_backend: str | _Unchanged = UNCHANGED,
    residual_dtype: torch.dtype | None | _Unchanged = UNCHANGED,
    sequence_parallel: SequenceParallel | None | _Unchanged = UNCHANGED,
) -> PyramidDiT:
    """Change a DiT's settings (the keywords given; `residual_dtype=None` = automatic); returns the model.

    Raises ImportError naming the pip package of a missing backend library, ValueError for an unknown name,
    a non-SDPA backend with the dense-mask mode, or a sequence-parallel group the heads do not divide over.
    """
    if not isinstance(getattr(model, "settings", None), DiTSettings):
        raise TypeError(f"configure_dit expects a Pyramid Flow DiT, got {type(model).__name__}")
    changes: dict = {}
    if attention_backend is not UNCHANGED:
        kernel = resolve_attention_backend(attention_backend)
        changes.update(attention_backend=attention_backend, attention_kernel=kernel)
    if attention_mode is not UNCHANGED:
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"unknown attention mode {attention_mode!r}; choose one of {ATTENTION_MODES}")
        changes["attention_mode"] = attention_mode
    if residual_dtype is not UNCHANGED:
        if residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"residual dtype must be None, fp16, bf16 or fp32, got {residual_dtype}")
        changes["residual_dtype"] = residual_dtype
    if sequence_parallel is not UNCHANGED:
        if sequence_parallel is not None:
            sequence_parallel.check_heads(model.attention_heads)
        changes["sequence_parallel"] = sequence_parallel
    settings = replace(model.settings, **changes)
    if settings.attention_backend != "sdpa" and settings.attention_mode != "segmented":
        raise ValueError(
            f"attention backend {settings.attention_backend!r} plugs into the segmented path, but "
            f"attention_mode {settings.attention_mode!r} runs on its own kernels only; use configure_dit(model, "
            "attention_mode='segmented') or attention_backend='sdpa'"
        )
    model.settings = settings
    model.clear_rope_cache()
    return model


class _Setting:
    """A `DiTSettings` field read through the model; writing it names the setter instead."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, model: PyramidDiT | None, owner: type | None = None):
        return self if model is None else getattr(model.settings, self.name)

    def __set__(self, model: PyramidDiT, value) -> None:
        raise AttributeError(f"{self.name} is a DiT setting: use configure_dit(model, {self.name}=...)")


def unpatchify(tokens: torch.Tensor, t: int, h: int, w: int, patch: int) -> torch.Tensor:
    """[B, t*(h/p)*(w/p), p*p*C] tokens, features ordered (row, column, channel) -> latents [B, C, t, h, w]."""
    b = tokens.shape[0]
    x = tokens.reshape(b, t, h // patch, w // patch, patch, patch, -1)
    return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, -1, t, h, w)


class PyramidDiT(nn.Module, abc.ABC):
    """Base of the Pyramid Flow DiTs: settings, working-memory estimate, the forward's start and end.

    Subclasses own the parameters under the official names; the helpers here use `time_text_embed`,
    `context_embedder`, `norm_out` and `proj_out`. `token_patch`: latent pixels per token side.
    """

    attention_mode = _Setting()
    attention_backend = _Setting()
    residual_dtype = _Setting()

    def __init__(self, token_patch: int):
        super().__init__()
        self.token_patch = token_patch
        self.settings = DiTSettings()
        self._rope_cache: dict[tuple, torch.Tensor] = {}  # key -> host tables, least recently used first

    def rotary_tables(
        self, clips: list[torch.Tensor], axes: str, axes_dims: list[int], shard: SequenceShard | None = None
    ) -> RotaryTables:
        """RoPE tables of the video tokens on the clips' device: built on the host once per shape set, then cached.

        The key is everything the tables depend on: the clip shapes (t, h, w), the token patch, the position
        axes and their channel counts, and the device (tables for CUDA are kept in pinned memory). They are
        fp32 whatever the compute dtype. Each call makes one asynchronous host-to-device copy and reads nothing
        back from the device; the cache keeps the `ROPE_CACHE_SIZE` most recently used shape sets.
        `shard`: only the rows of this rank's video tokens (and its padding) under sequence parallelism.
        """
        device = clips[-1].device
        shapes = tuple(tuple(int(n) for n in clip.shape[-3:]) for clip in clips)
        key = (shapes, self.token_patch, axes, tuple(axes_dims), device)
        if shard is not None:
            key += (shard.video, shard.pad)
        tables = self._rope_cache.pop(key, None)
        if tables is None:
            tables = rope_tables(shapes, self.token_patch, axes, axes_dims)
            if shard is not None:
                tables = shard.local_rope(tables)
            if device.type == "cuda":
                tables = tables.pin_memory()  # pinned once: every step's copy is truly asynchronous
        self._rope_cache[key] = tables  # (re)inserted as the most recently used
        while len(self._rope_cache) > ROPE_CACHE_SIZE:
            del self._rope_cache[next(iter(self._rope_cache))]
        return RotaryTables.from_host(tables, device)

    def clear_rope_cache(self) -> None:
        """Drop the cached RoPE tables (`configure_dit` does, on every settings change)."""
        self._rope_cache.clear()

    def current_token_count(self, clips: list[torch.Tensor]) -> int:
        """Tokens of the current (last) clip: what the forward reads out, so all the last block has to compute."""
        t, h, w = clips[-1].shape[-3:]
        return t * (h // self.token_patch) * (w // self.token_patch)

    def kept_token_count(self, clips: list[torch.Tensor], spec: AttentionSpec) -> int:
        """Tokens the last block computes here: the current clip's (of this rank's shard under sequence parallelism)."""
        count = self.current_token_count(clips)
        return count if spec.shard is None else spec.shard.kept(count)

    @staticmethod
    def local_streams(context: torch.Tensor, x: torch.Tensor, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """The text and video streams the blocks run on: all of them, or this rank's shard (padding included)."""
        return (context, x) if spec.shard is None else spec.shard.split(context, x)

    @property
    def attention_heads(self) -> int:
        """Attention heads per block (what sequence parallelism splits)."""
        return self.blocks[0].attn.heads

    def working_memory_bytes(self, workload) -> int:
        """Device working memory of one forward at the workload's largest unit (a `pyramid_core.memory.Workload`)."""
        from ..memory.estimates import dit_working_memory

        dense = self.settings.attention_mode == "masked"
        return dit_working_memory(workload, self.context_embedder.out_features, self.token_patch, dense_mask=dense)

    def attention_spec(
        self,
        clips: list[torch.Tensor],
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | HostTextMask | None,
    ) -> AttentionSpec:
        """The spec of one forward: layout from the clip shapes and text mask, the rest from the settings.

        The compute dtype is the clips' dtype.
        """
        compute = clips[-1].dtype
        layout = TokenLayout.from_clips(
            clips, self.token_patch, encoder_attention_mask, encoder_hidden_states.shape[:2]
        )
        settings = self.settings
        group = settings.sequence_parallel
        return AttentionSpec(
            layout=layout,
            compute_dtype=compute,
            residual_dtype=settings.residual_dtype or residual_dtype_for(compute),
            mode=settings.attention_mode,
            kernel=settings.attention_kernel,
            shard=None if group is None else group.shard(layout.text_len, layout.num_video_tokens),
        )

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
        spec = self.attention_spec(clips, encoder_hidden_states, encoder_attention_mask)
        temb = self.time_text_embed(timestep, pooled_projections).to(spec.residual_dtype)
        context = self.context_embedder(encoder_hidden_states.to(spec.residual_dtype))
        tokens = self.transform(clips=clips, context=context, temb=temb, spec=spec)

        t, h, w = clips[-1].shape[-3:]
        current_tokens = tokens[:, tokens.shape[1] - self.kept_token_count(clips, spec) :]  # only the current clip
        out = self.proj_out(self.norm_out(current_tokens, temb).to(spec.residual_dtype))
        if spec.shard is not None:  # each rank holds a part of the current clip: every rank gets all of it
            out = spec.shard.gather_kept(out, self.current_token_count(clips))
        return unpatchify(out.to(spec.compute_dtype), t, h, w, self.token_patch)

    @abc.abstractmethod
    def transform(
        self, *, clips: list[torch.Tensor], context: torch.Tensor, temb: torch.Tensor, spec: AttentionSpec
    ) -> torch.Tensor:
        """The family's own part: embed the clips, run the blocks; returns the final token sequence.

        `context`: text tokens [B, T, D] and `temb`: time + pooled text embedding [B, D], in the residual dtype.
        The returned sequence ends with the current clip's tokens (`kept_token_count`), the only ones read; it
        may hold just those (the last block skips the output projection and MLP of the rest). Under sequence
        parallelism (`spec.shard`) the blocks run on `local_streams` with the shard's RoPE rows.
        """
        raise NotImplementedError
