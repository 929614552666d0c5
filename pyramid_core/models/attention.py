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

The layout (frame segments from the clip shapes, sample groups from a host copy of the text mask) is
worked out on the host once per DiT forward, so no attention call waits for the device.

What a block needs besides its data (layout, mode, kernel, dtypes) travels as one `AttentionSpec`. The
unmasked kernel is pluggable (`configure_dit(model, attention_backend=...)`): PyTorch SDPA (default),
SageAttention or flash-attn, or any registered function taking [B, H, L, D] q/k/v (Lq may differ from Lk).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..settings import ATTENTION_MODES
from .layers import FP16_MAX, frame_token_counts, host_to_device, pow2_scale

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked scaled-dot-product attention on [B, H, L, D] tensors (PyTorch SDPA)."""
    return F.scaled_dot_product_attention(q, k, v)


class SampleGroup(NamedTuple):
    """Samples sharing one text mask: their batch rows and their real and padded text positions.

    Each index is a slice when the positions form a contiguous range (the usual case: T5 masks are a
    prefix of ones, CFG rows are 0 and 1), else an int64 index tensor already on the execution device.
    """

    rows: slice | torch.Tensor
    valid: slice | torch.Tensor
    padded: slice | torch.Tensor
    num_valid: int
    num_padded: int


@dataclass(frozen=True, eq=False)
class HostTextMask:
    """A [B, T] text attention mask held on the host, its sample groups worked out once.

    What the sampler hands the DiT as `encoder_attention_mask` (built once per generation): not being a
    tensor, memory hooks that move a module's tensor inputs to the device leave it alone, and no DiT
    forward has to read the device to learn which text tokens are real.
    """

    mask: torch.Tensor  # [B, T]; kept as a bool CPU tensor (a device mask is read once, here)
    _on_device: dict = field(default_factory=dict, init=False, repr=False)  # device -> its SampleGroups

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask", self.mask.to("cpu").bool())  # frozen: normalise once

    @classmethod
    def from_mask(cls, mask: "torch.Tensor | HostTextMask") -> "HostTextMask":
        """Wrap a mask of any device and integer/bool dtype; a `HostTextMask` is returned as is."""
        return mask if isinstance(mask, HostTextMask) else cls(mask)

    @property
    def shape(self) -> torch.Size:
        return self.mask.shape

    @cached_property
    def groups(self) -> tuple[tuple[list[int], list[int], list[int]], ...]:
        """(rows, real text positions, padded text positions) per distinct mask row, in order of first appearance."""
        rows_by_mask: dict[tuple[bool, ...], list[int]] = {}
        for row, values in enumerate(self.mask.tolist()):
            rows_by_mask.setdefault(tuple(values), []).append(row)
        return tuple(
            (rows, [i for i, real in enumerate(key) if real], [i for i, real in enumerate(key) if not real])
            for key, rows in rows_by_mask.items()
        )

    def sample_groups(self, device: torch.device | str) -> tuple[SampleGroup, ...]:
        """`groups` as `SampleGroup`s indexing tensors on `device`, made once per device."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = tuple(
                SampleGroup(_index(rows, device), _index(valid, device), _index(padded, device), len(valid), len(padded))
                for rows, valid, padded in self.groups
            )
        return self._on_device[device]


def _index(positions: list[int], device: torch.device) -> slice | torch.Tensor:
    """A slice for a contiguous ascending range (views, no gather kernel), else an index tensor on `device`."""
    start = positions[0] if positions else 0
    if positions == list(range(start, start + len(positions))):
        return slice(start, start + len(positions))
    return host_to_device(torch.tensor(positions, dtype=torch.long, device="cpu"), device)


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """Where things are in the joint sequence [text tokens; video tokens]; lives for one DiT forward.

    text_mask: [B, T], nonzero for real (non-padding) text tokens: a `HostTextMask` (no device read), or a
        tensor (a device tensor is read once per layout, i.e. once per DiT forward).
    frame_sizes: video tokens of each frame in sequence order (from clip shapes: no tensor is read), or
    frame_ids: [N] int64 frame index of each video token (non-decreasing), read on the host once.
    device: where the attention runs (None: the text mask tensor's device); index tensors and the dense
        mask are placed there with asynchronous copies.
    """

    text_mask: torch.Tensor | HostTextMask
    frame_ids: torch.Tensor | None = None
    frame_sizes: tuple[int, ...] | None = None
    device: torch.device | None = None

    def __post_init__(self) -> None:
        if (self.frame_ids is None) == (self.frame_sizes is None):
            raise ValueError("TokenLayout needs exactly one of frame_sizes (tokens per frame) and frame_ids")
        if self.device is None:
            device = self.text_mask.mask.device if isinstance(self.text_mask, HostTextMask) else self.text_mask.device
        else:
            device = torch.device(self.device)
        object.__setattr__(self, "device", device)  # frozen: resolve the default once

    @classmethod
    def from_clips(
        cls,
        clips: list[torch.Tensor],
        patch: int,
        text_mask: torch.Tensor | HostTextMask | None,
        text_shape: tuple[int, int],
    ) -> "TokenLayout":
        """Layout of one DiT forward from the clip shapes; `text_mask` None = every text token is real."""
        if text_mask is None:
            text_mask = HostTextMask(torch.ones(tuple(text_shape), dtype=torch.bool, device="cpu"))
        return cls(text_mask, frame_sizes=frame_token_counts(clips, patch), device=clips[-1].device)

    @property
    def text_len(self) -> int:
        return self.text_mask.shape[1]

    @property
    def num_video_tokens(self) -> int:
        return self.segments[-1][1] if self.segments else 0

    def frame_segments(self) -> list[tuple[int, int]]:
        """[start, end) ranges of video tokens sharing one frame index, in sequence order."""
        return list(self.segments)

    # Everything below is computed once per layout (one DiT forward, shared by every block) on the host,
    # so the per-block attention calls never wait for the device.
    @cached_property
    def host_text_mask(self) -> HostTextMask:
        return HostTextMask.from_mask(self.text_mask)

    @cached_property
    def segments(self) -> tuple[tuple[int, int], ...]:
        sizes = self.frame_sizes if self.frame_sizes is not None else _run_lengths(self.frame_ids.to("cpu").tolist())
        segments, start = [], 0
        for size in sizes:
            segments.append((start, start + size))
            start += size
        return tuple(segments)

    @cached_property
    def sample_groups(self) -> tuple[SampleGroup, ...]:
        """One `SampleGroup` per distinct text mask row, in order of first appearance."""
        return self.host_text_mask.sample_groups(self.device)

    def dense_mask(self) -> torch.Tensor:
        """The official boolean mask [B, 1, L, L] (True = attend) on the layout's device, built once per layout."""
        return self._dense_mask

    @cached_property
    def _dense_mask(self) -> torch.Tensor:
        mask = self.host_text_mask.mask
        batch, text_len = mask.shape
        sample_ids = torch.arange(1, batch + 1, device="cpu")[:, None]
        text_ids = torch.where(mask, sample_ids, torch.zeros_like(sample_ids))
        token_ids = torch.cat([text_ids, sample_ids.expand(batch, self.num_video_tokens)], dim=1)
        sizes = torch.tensor([end - start for start, end in self.segments], dtype=torch.long, device="cpu")
        frame_of_token = torch.repeat_interleave(torch.arange(len(sizes), device="cpu"), sizes)
        order = torch.cat([torch.zeros(text_len, dtype=torch.long, device="cpu"), frame_of_token])  # text = frame 0
        ids = host_to_device(torch.cat([token_ids, order[None]]), self.device)  # one small copy; the mask is built there
        token_ids, order = ids[:-1], ids[-1]
        same_group = token_ids[:, None, :, None] == token_ids[:, None, None, :]
        causal = order[:, None] >= order[None, :]
        return same_group & causal[None, None]



@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """What a DiT block needs besides its data; built once per DiT forward and handed to every block.

    layout: where text and frames sit in the joint sequence. compute_dtype: the attention kernels' dtype (the
    DiT's input and output dtype). residual_dtype: the residual streams' dtype, which modulated activations
    return to before each Linear. mode: 'segmented' (fused per-frame kernels) or 'masked' (the official dense
    mask, SDPA). kernel: the unmasked attention function of the segmented path.
    """

    layout: TokenLayout
    compute_dtype: torch.dtype
    residual_dtype: torch.dtype
    mode: str = "segmented"
    kernel: AttentionFn = sdpa

    def __post_init__(self) -> None:
        if self.mode not in ATTENTION_MODES:
            raise ValueError(f"unknown attention mode {self.mode!r}; choose one of {ATTENTION_MODES}")


def _run_lengths(values: list[int]) -> list[int]:
    """Lengths of the runs of equal consecutive values."""
    lengths: list[int] = []
    for i, value in enumerate(values):
        if i and value == values[i - 1]:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


def _select(t: torch.Tensor, dim: int, index: slice | torch.Tensor) -> torch.Tensor:
    """`t` restricted to `index` along `dim`: a view for a slice, a gathered copy for an index tensor."""
    if isinstance(index, slice):
        return t.narrow(dim, index.start, index.stop - index.start)
    return t.index_select(dim, index)


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
    for group in layout.sample_groups:
        qb, kb, vb = (_select(t, 0, group.rows) for t in (q, k, v))
        # a row range is written in place through a view of `out`; an index set is scattered back at the end
        ob = out[group.rows] if isinstance(group.rows, slice) else torch.empty_like(qb)
        n_text = group.num_valid
        keys = torch.cat([_select(kb, 2, group.valid), kb[:, :, text_len:]], dim=2)
        values = torch.cat([_select(vb, 2, group.valid), vb[:, :, text_len:]], dim=2)
        for index, (start, end) in enumerate(segments):
            prefix = n_text + end
            video_q = qb[:, :, text_len + start : text_len + end]
            if index == 0:  # text shares frame 0: it sees text and frame-0 tokens, like them
                queries = torch.cat([_select(qb, 2, group.valid), video_q], dim=2)
                result = attend(queries, keys[:, :, :prefix], values[:, :, :prefix])
                ob[:, :, group.valid] = result[:, :, :n_text]
                ob[:, :, text_len + start : text_len + end] = result[:, :, n_text:]
            else:
                ob[:, :, text_len + start : text_len + end] = attend(
                    video_q, keys[:, :, :prefix], values[:, :, :prefix]
                )
        if group.num_padded:
            pq, pk, pv = (_select(t, 2, group.padded) for t in (qb, kb, vb))
            ob[:, :, group.padded] = attend(pq, pk, pv)
        if not isinstance(group.rows, slice):
            out[group.rows] = ob
    return out


@torch.compiler.disable  # data-dependent Python loop over frames: keep it out of compiled block graphs
def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """Attention over the joint sequence as `spec` says: fused segmented path or dense-mask reference.

    q, k, v [B, H, L, D] run in `spec.compute_dtype`; the result comes back in v's dtype. Going from wider v to
    fp16, v is divided per (sample, head) by a power of two when it would not fit fp16 (attention is linear
    in v, so the scale is undone exactly afterwards); q and k are RMS-normalised, hence bounded.
    """
    dtype, out_dtype, v_scale = spec.compute_dtype, v.dtype, None
    if (q.dtype, k.dtype, v.dtype) != (dtype, dtype, dtype):
        if dtype == torch.float16 and v.dtype != torch.float16:
            v_scale = pow2_scale(v, (-2, -1), limit=FP16_MAX / 4).clamp_min(1.0).to(v.dtype)
            v = v / v_scale
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if spec.mode == "segmented":
        out = segmented_attention(q, k, v, spec.layout, spec.kernel)
    else:
        out = masked_attention(q, k, v, spec.layout)
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
    """Run the DiT's segmented attention with backend `name` ('sdpa' | 'sage' | 'flash' | registered).

    Shorthand for `configure_dit(model, attention_backend=name)`.
    """
    from .dit import configure_dit  # dit builds on this module

    return configure_dit(model, attention_backend=name)
