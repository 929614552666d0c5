"""Joint text+video attention with the official padding and frame-causal rules.

The official code builds a dense boolean [B,1,L,L] mask: a token attends to a key iff both
belong to the same sample and neither is padded text (padded text only sees padded text), and
the key's frame index is <= the query's (text counts as frame 0). That mask rules out fused
attention kernels and costs gigabytes at 768p.

Along the joint sequence [text; clip tokens, oldest first] the frame index never decreases, so
"key frame <= query frame" means "key lies in a prefix". `segmented_attention` therefore runs,
per sample, one unmasked attention call per frame segment (queries of frame f against the
valid text plus all video tokens up to the end of frame f). Every call has no mask, so SDPA can
pick flash / memory-efficient kernels. `masked_attention` is the plain reference path.

The unmasked kernel is pluggable (`set_attention_backend`): PyTorch SDPA (default), SageAttention
or flash-attn, or any registered function taking [B, H, L, D] q/k/v (Lq may differ from Lk).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
import torch.nn.functional as F

from .layers import FP16_MAX, pow2_scale

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked scaled-dot-product attention on [B, H, L, D] tensors (PyTorch SDPA)."""
    return F.scaled_dot_product_attention(q, k, v)


@dataclass(frozen=True)
class TokenLayout:
    """Where things are in the joint sequence [text tokens; video tokens].

    text_mask: [B, T] bool, True for real (non-padding) text tokens.
    frame_ids: [N] int64 frame index of each video token (non-decreasing; same for every sample).
    """

    text_mask: torch.Tensor
    frame_ids: torch.Tensor

    @property
    def text_len(self) -> int:
        return self.text_mask.shape[1]

    def frame_segments(self) -> list[tuple[int, int]]:
        """[start, end) ranges of video tokens sharing one frame index, in sequence order."""
        return list(self.segments)

    # Computed once per DiT forward (the layout is shared by every block), so the per-block attention
    # calls never synchronise with the device to read the frame ids or the text mask.
    @cached_property
    def segments(self) -> tuple[tuple[int, int], ...]:
        ids = self.frame_ids.tolist()
        segments, start = [], 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[start]:
                segments.append((start, i))
                start = i
        return tuple(segments)

    @cached_property
    def sample_groups(self) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]:
        """(rows, valid text positions, padded text positions) per group of samples with equal text masks."""
        device = self.text_mask.device
        groups: dict[tuple, list[int]] = {}
        for b, row in enumerate(self.text_mask.tolist()):
            groups.setdefault(tuple(row), []).append(b)
        result = []
        for mask_key, rows in groups.items():
            valid = [i for i, m in enumerate(mask_key) if m]
            padded = [i for i, m in enumerate(mask_key) if not m]
            result.append(tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (rows, valid, padded)))
        return tuple(result)

    def dense_mask(self) -> torch.Tensor:
        """The official boolean mask [B, 1, L, L] (True = attend)."""
        batch, text_len = self.text_mask.shape
        device = self.text_mask.device
        sample_ids = torch.arange(1, batch + 1, device=device)[:, None]
        text_ids = torch.where(self.text_mask, sample_ids, torch.zeros_like(sample_ids))
        video_ids = sample_ids.expand(batch, self.frame_ids.shape[0])
        token_ids = torch.cat([text_ids, video_ids], dim=1)
        same_group = token_ids[:, None, :, None] == token_ids[:, None, None, :]
        order = torch.cat([torch.zeros(text_len, dtype=torch.long, device=device), self.frame_ids.to(device)])
        causal = order[:, None] >= order[None, :]
        return same_group & causal[None, None]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Reference path: SDPA with the dense official mask. q, k, v: [B, H, L, D]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask().to(q.device))


def segmented_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, attend: AttentionFn = sdpa
) -> torch.Tensor:
    """Same result as `masked_attention` for every non-padding token, with no N x N mask.

    Padded text queries attend to padded text keys only (as official); their outputs never reach
    real tokens either way.
    """
    text_len = layout.text_len
    out = torch.empty_like(q)
    segments = layout.segments
    # samples with identical text masks share every kernel call (e.g. B=1, or equal prompt lengths)
    for rows_idx, valid, padded in layout.sample_groups:
        rows_idx, valid, padded = rows_idx.to(q.device), valid.to(q.device), padded.to(q.device)
        qb, kb, vb = (t.index_select(0, rows_idx) for t in (q, k, v))
        n_text = valid.numel()
        keys = torch.cat([kb.index_select(2, valid), kb[:, :, text_len:]], dim=2)
        values = torch.cat([vb.index_select(2, valid), vb[:, :, text_len:]], dim=2)
        ob = torch.empty_like(qb)
        for index, (start, end) in enumerate(segments):
            prefix = n_text + end
            video_q = qb[:, :, text_len + start : text_len + end]
            if index == 0:  # text shares frame 0: it sees text and frame-0 tokens, like them
                queries = torch.cat([qb.index_select(2, valid), video_q], dim=2)
                result = attend(queries, keys[:, :, :prefix], values[:, :, :prefix])
                ob[:, :, valid] = result[:, :, :n_text]
                ob[:, :, text_len + start : text_len + end] = result[:, :, n_text:]
            else:
                ob[:, :, text_len + start : text_len + end] = attend(
                    video_q, keys[:, :, :prefix], values[:, :, :prefix]
                )
        if padded.numel():
            pq, pk, pv = (t.index_select(2, padded) for t in (qb, kb, vb))
            ob[:, :, padded] = attend(pq, pk, pv)
        out[rows_idx] = ob
    return out


ATTENTION_MODES = ("segmented", "masked")


@torch.compiler.disable  # data-dependent Python loop over frames: keep it out of compiled block graphs
def joint_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, mode: str = "segmented",
    attend: AttentionFn = sdpa, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dispatch to the fused segmented path (default) or the dense-mask reference path.

    `dtype`: kernel dtype (None = as given). The result comes back in v's dtype. Going from wider v to
    fp16, v is divided per (sample, head) by a power of two when it would not fit fp16 (attention is
    linear in v, so the scale is undone exactly afterwards); q and k are RMS-normalised, hence bounded.
    """
    out_dtype, v_scale = v.dtype, None
    if dtype is not None and (q.dtype, k.dtype, v.dtype) != (dtype, dtype, dtype):
        if dtype == torch.float16 and v.dtype != torch.float16:
            v_scale = pow2_scale(v, (-2, -1), limit=FP16_MAX / 4).clamp_min(1.0).to(v.dtype)
            v = v / v_scale
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if mode == "segmented":
        out = segmented_attention(q, k, v, layout, attend)
    elif mode == "masked":
        out = masked_attention(q, k, v, layout)
    else:
        raise ValueError(f"unknown attention mode {mode!r}; choose one of {ATTENTION_MODES}")
    out = out.to(out_dtype)
    return out if v_scale is None else out * v_scale


# --------------------------------------------------------------------------------------------
# pluggable kernels for the segmented path


def _needs_half_on_cuda(q: torch.Tensor, backend: str) -> torch.dtype:
    """Kernel dtype for a half-only CUDA library: the input's if half, else bf16."""
    if not q.is_cuda:
        raise RuntimeError(f"attention backend {backend!r} runs on CUDA only; use set_attention_backend(model, 'sdpa')")
    return q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _sage_backend() -> AttentionFn:
    sageattn = _import("sageattention", "sage", "sageattention").sageattn

    def sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kernel_dtype = _needs_half_on_cuda(q, "sage")
        out = sageattn(q.to(kernel_dtype), k.to(kernel_dtype), v.to(kernel_dtype), tensor_layout="HND", is_causal=False)
        return out.to(q.dtype)

    return sage


def _flash_backend() -> AttentionFn:
    flash_attn_func = _import("flash_attn", "flash", "flash-attn").flash_attn_func

    def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kernel_dtype = _needs_half_on_cuda(q, "flash")
        # flash-attn wants [B, L, H, D]
        q_, k_, v_ = (t.to(kernel_dtype).transpose(1, 2) for t in (q, k, v))
        return flash_attn_func(q_, k_, v_, dropout_p=0.0, causal=False).transpose(1, 2).to(q.dtype)

    return flash


def _import(module: str, backend: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"attention backend {backend!r} needs the {package!r} package: pip install {package} "
            "(or use set_attention_backend(model, 'sdpa'))"
        ) from exc


_BACKEND_FACTORIES: dict[str, Callable[[], AttentionFn]] = {
    "sdpa": lambda: sdpa,
    "sage": _sage_backend,
    "flash": _flash_backend,
}


def attention_backends() -> list[str]:
    """Names accepted by `set_attention_backend` (built-in and registered)."""
    return list(_BACKEND_FACTORIES)


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Make `fn(q, k, v) -> out` ([B, H, L, D], unmasked, scale 1/sqrt(D)) selectable as `name`."""
    _BACKEND_FACTORIES[name] = lambda: fn


def resolve_attention_backend(name: str) -> AttentionFn:
    """The kernel function for a backend name; ImportError naming the pip package when it is missing."""
    if name not in _BACKEND_FACTORIES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(_BACKEND_FACTORIES)}")
    return _BACKEND_FACTORIES[name]()


def set_attention_backend(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Run the DiT's segmented attention with backend `name` ('sdpa' | 'sage' | 'flash' | registered)."""
    fn = resolve_attention_backend(name)
    if name != "sdpa" and getattr(model, "attention_mode", "segmented") != "segmented":
        raise ValueError(
            f"attention backend {name!r} plugs into the segmented path, but this model uses attention_mode="
            f"{model.attention_mode!r} (the dense-mask reference, SDPA only); set model.attention_mode = 'segmented'"
        )
    model.attention_fn = fn
    model.attention_backend = name
    return model
