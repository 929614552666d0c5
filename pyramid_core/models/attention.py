"""Joint text+video attention with the official padding and frame-causal rules.

The official code builds a dense boolean [B,1,L,L] mask: a token attends to a key iff both
belong to the same sample and neither is padded text (padded text only sees padded text), and
the key's frame index is <= the query's (text counts as frame 0). That mask rules out fused
attention kernels and costs gigabytes at 768p.

Along the joint sequence [text; clip tokens, oldest first] the frame index never decreases, so
"key frame <= query frame" means "key lies in a prefix". Three paths compute the same thing:

* `segmented_attention` (default): per sample group, one unmasked call per frame segment (queries of frame f
  against the real text plus all video tokens up to the end of frame f), on views of q/k/v wherever the layout
  allows, written in place into one output. With no mask SDPA can pick flash / memory-efficient kernels, and
  the kernel is pluggable. On CUDA, runs of small history frames share one SDPA call with a small mask.
* `flex_joint_attention`: one FlexAttention call (torch >= 2.5) with a block mask built on the host from
  the layout (compiled on CUDA).
* `masked_attention`: the plain reference, SDPA with the dense mask.

The layout (frame segments from the clip shapes, sample groups from a host copy of the text mask) is
worked out on the host once per DiT forward, so no attention call waits for the device.

What a block needs besides its data (layout, mode, kernel, dtypes) travels as one `AttentionSpec`. The
unmasked kernel is pluggable (`configure_dit(model, attention_backend=...)`): PyTorch SDPA (default),
SageAttention or flash-attn, or any registered function taking [B, H, L, D] q/k/v (Lq may differ from Lk).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from types import ModuleType
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..settings import ATTENTION_MODES
from .layers import FP16_MAX, frame_token_counts, host_to_device, pow2_scale

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from ..parallel.sequence import SequenceShard

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
    _run_masks: dict = field(default_factory=dict, init=False, repr=False)  # (text, run) -> its mask on `device`

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

    def run_mask(self, num_text: int, text_rows: int, first: int, last: int) -> torch.Tensor:
        """Frame-causal bool mask [rows, keys] of segments first..last batched into one call, on the device.

        Keys: `num_text` real text tokens, then the video up to the end of segment `last`. Rows: `text_rows`
        text queries (with segment 0; they see what frame 0 sees), then the segments' video queries; a row
        sees the keys before the end of its frame. Built once per layout from shapes (no host data copied).
        """
        key = (num_text, text_rows, first, last)
        if key not in self._run_masks:
            segments = self.segments
            limits = [(text_rows, num_text + segments[0][1])] if text_rows else []
            limits += [(end - start, num_text + end) for start, end in segments[first : last + 1]]
            limit = torch.cat([torch.full((rows,), value, device=self.device) for rows, value in limits])
            keys = torch.arange(num_text + segments[last][1], device=self.device)
            self._run_masks[key] = keys[None, :] < limit[:, None]
        return self._run_masks[key]

    def block_mask(self) -> "BlockMask":
        """The FlexAttention `BlockMask` of the official mask on the layout's device, built once per layout.

        Tables from the shapes and the host text mask (no device read); one asynchronous copy to the device.
        ImportError naming the fix on torch < 2.5.
        """
        return self._block_mask

    @cached_property
    def _block_mask(self) -> "BlockMask":
        return _block_mask(self)



@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """What a DiT block needs besides its data; built once per DiT forward and handed to every block.

    layout: where text and frames sit in the joint sequence. compute_dtype: the attention kernels' dtype (the
    DiT's input and output dtype). residual_dtype: the residual streams' dtype, which modulated activations
    return to before each Linear. mode: 'segmented' (fused per-frame kernels), 'flex' (one FlexAttention call
    with a block mask) or 'masked' (the official dense mask, SDPA). kernel: the unmasked attention function of
    the segmented path. shard: under sequence parallelism (`pyramid_core.parallel`), this rank's part of the joint
    sequence; the layout still describes the whole sequence.
    """

    layout: TokenLayout
    compute_dtype: torch.dtype
    residual_dtype: torch.dtype
    mode: str = "segmented"
    kernel: AttentionFn = sdpa
    shard: SequenceShard | None = None  # sequence parallelism: the blocks hold this rank's tokens only

    def __post_init__(self) -> None:
        if self.mode not in ATTENTION_MODES:
            raise ValueError(f"unknown attention mode {self.mode!r}; choose one of {ATTENTION_MODES}")

    @property
    def takes_query_tail(self) -> bool:
        """Whether `joint_attention` can take the queries of the sequence's last tokens only (the last block's
        current clip): the segmented and dense paths can; FlexAttention and sequence parallelism take all."""
        return self.shard is None and self.mode != "flex"

    @property
    def local_text_len(self) -> int:
        """Text tokens at the start of the sequence the blocks hold (this rank's shard under sequence parallelism)."""
        return self.layout.text_len if self.shard is None else self.shard.local_text_len


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
    """Reference path: SDPA with the dense official mask. k, v: [B, H, L, D]; q: [B, H, Lq, D], the last Lq
    positions (Lq = L: all)."""
    mask = layout.dense_mask().to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, mask.shape[2] - q.shape[2] :])


# --------------------------------------------------------------------------------------------
# the segmented path


def default_batch_tokens(device: torch.device) -> int:
    """Largest query count of one batched run of small frame segments on `device` (0: no batching).

    CUDA: many small history frames (60 queries at 384p) underfill the GPU one launch each, so runs of them
    share one masked SDPA call. CPU: per-call overhead is negligible and the masked call computes the whole
    run x prefix rectangle, so every segment keeps its own unmasked call.
    """
    return 1024 if device.type == "cuda" else 0


def segment_runs(sizes: list[int], batch_tokens: int) -> list[tuple[int, int]]:
    """Consecutive segment index ranges [first, last] that share one kernel call.

    `sizes`: query rows of each segment (segment 0 counts its text rows). Segments are joined greedily while the
    run's rows stay within `batch_tokens`; a segment that alone exceeds it is a run of its own.
    """
    runs: list[tuple[int, int]] = []
    rows = 0
    for index, size in enumerate(sizes):
        if runs and rows + size <= batch_tokens:
            runs[-1] = (runs[-1][0], index)
            rows += size
        else:
            runs.append((index, index))
            rows = size
    return runs


def _write(out: torch.Tensor, rows: slice | torch.Tensor, positions: slice | torch.Tensor, value: torch.Tensor) -> None:
    """out[rows, :, positions] = value, in place (value: [rows, H, positions, D])."""
    if isinstance(rows, slice):
        target = out[rows]  # a view: the writes below land in `out`
        if isinstance(positions, slice):
            target[:, :, positions].copy_(value)
        else:
            target.index_copy_(2, positions, value)
    elif isinstance(positions, slice):
        out[rows, :, positions] = value
    else:  # two index tensors around a slice: indexing puts their dims first
        out[rows[:, None], :, positions] = value.transpose(1, 2)


def segmented_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    attend: AttentionFn = sdpa,
    batch_tokens: int | None = None,
) -> torch.Tensor:
    """Same result as `masked_attention` for every token, with no N x N mask. k, v: [B, H, L, D]; q: [B, H, L, D],
    or the queries of the last Lq video positions only ([B, H, Lq, D]: the last block's current clip).

    Per sample group (rows sharing one text mask; rows as a view when contiguous), the keys are the real text
    followed by the video: a view when the real text ends where the video starts (no padding, or left padding),
    else one copy. Queries are views: segment 0 reads from the first real text token on, so padded text rows
    between them ride along and are overwritten by the padded-text call, which runs last (padded text attends
    to padded text only, as official). Every result is written in place into one output tensor.

    `batch_tokens` (None: `default_batch_tokens(device)`; SDPA only, other kernels take no mask): runs of
    consecutive small segments up to that many query rows share one SDPA call with a small [rows, prefix]
    frame-causal mask instead of one unmasked call each (same result up to float rounding).
    """
    if q.shape[2] != k.shape[2]:
        return _segmented_query_tail(q, k, v, layout, attend)
    text_len = layout.text_len
    segments = layout.segments
    if batch_tokens is None:
        batch_tokens = default_batch_tokens(q.device)
    if attend is not sdpa:
        batch_tokens = 0
    out = torch.empty_like(q)
    for group in layout.sample_groups:
        rows, valid, n_text = group.rows, group.valid, group.num_valid
        qb, kb, vb = (_select(t, 0, rows) for t in (q, k, v))  # views for a row range, else one gather
        keys, values, text_start = _group_keys(kb, vb, group, text_len)
        text_rows = n_text if text_start is None else text_len - text_start
        sizes = [end - start for start, end in segments]
        if sizes:
            sizes[0] += text_rows
        for first, last in segment_runs(sizes, batch_tokens):
            start, end = segments[first][0], segments[last][1]
            if first > 0:
                queries, places = qb[:, :, text_len + start : text_len + end], slice(text_len + start, text_len + end)
            elif text_start is not None:
                queries, places = qb[:, :, text_start : text_len + end], slice(text_start, text_len + end)
            else:
                queries = torch.cat([qb.index_select(2, valid), qb[:, :, text_len : text_len + end]], dim=2)
                places = None
            prefix = n_text + end
            if first == last:
                result = attend(queries, keys[:, :, :prefix], values[:, :, :prefix])
            else:
                mask = layout.run_mask(n_text, text_rows if first == 0 else 0, first, last)
                result = F.scaled_dot_product_attention(
                    queries, keys[:, :, :prefix], values[:, :, :prefix], attn_mask=mask
                )
            if places is not None:
                _write(out, rows, places, result)
            else:
                _write(out, rows, valid, result[:, :, :n_text])
                _write(out, rows, slice(text_len, text_len + end), result[:, :, n_text:])
            del queries, result  # before the next call allocates its own
        del keys, values  # before the next group's copies: one group's at a time
        if group.num_padded:  # last: overwrites the padded rows segment 0 computed along the way
            padded = group.padded
            _write(out, rows, padded, attend(*(_select(t, 2, padded) for t in (qb, kb, vb))))
        del qb, kb, vb  # gathered rows (scattered groups) go before the next group's
    return out


def _group_keys(
    kb: torch.Tensor, vb: torch.Tensor, group: SampleGroup, text_len: int
) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(keys, values, text_start) of one sample group: its real text followed by the video.

    Views when the real text ends where the video starts (no padding, or left padding), else one copy;
    text_start: where segment 0's queries start in the sequence (None: the real text is scattered).
    """
    valid, n_text = group.valid, group.num_valid
    if not isinstance(valid, slice):  # scattered real text: gathered (at most the text length)
        keys, values = (torch.cat([t.index_select(2, valid), t[:, :, text_len:]], dim=2) for t in (kb, vb))
        return keys, values, None
    text_start = valid.start if n_text else text_len
    if not n_text or valid.stop == text_len:  # real text right before the video: keys are views
        return kb[:, :, text_start:], vb[:, :, text_start:], text_start
    keys, values = (torch.cat([t[:, :, valid], t[:, :, text_len:]], dim=2) for t in (kb, vb))
    return keys, values, text_start


def _segmented_query_tail(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, attend: AttentionFn
) -> torch.Tensor:
    """`segmented_attention` for the queries of the last q.shape[2] positions, which lie in the video: per sample
    group, one unmasked call per frame segment that reaches into them (keys: the real text and the video up to
    the end of the segment)."""
    text_len, first = layout.text_len, k.shape[2] - q.shape[2]
    if first < text_len:
        raise ValueError(f"a query tail must lie in the video part: starts at {first}, the text ends at {text_len}")
    out = torch.empty_like(q)
    for group in layout.sample_groups:
        rows, n_text = group.rows, group.num_valid
        qb, kb, vb = (_select(t, 0, rows) for t in (q, k, v))
        keys, values, _ = _group_keys(kb, vb, group, text_len)
        for start, end in layout.segments:
            if text_len + end <= first:
                continue
            places = slice(max(text_len + start, first) - first, text_len + end - first)
            prefix = n_text + end
            _write(out, rows, places, attend(qb[:, :, places], keys[:, :, :prefix], values[:, :, :prefix]))
        del keys, values, qb, kb, vb
    return out


# --------------------------------------------------------------------------------------------
# the FlexAttention path

FLEX_BLOCK = 128  # FlexAttention's default sparse block size (tokens per side of one block-mask tile)
FLEX_COMPILED_DEVICES = ("cuda",)  # where `flex_joint_attention` compiles by default (see its docstring)


def flex_module() -> ModuleType:
    """`torch.nn.attention.flex_attention` (torch >= 2.5); ImportError naming the fix when missing."""
    try:
        return importlib.import_module("torch.nn.attention.flex_attention")
    except ImportError as exc:
        raise ImportError(
            f"attention 'flex' needs torch >= 2.5 (torch.nn.attention.flex_attention), this is torch "
            f"{torch.__version__}: upgrade torch (pip install -U torch), or use attention 'segmented' (CLI: "
            "--attention sdpa)"
        ) from exc


def _flex_function(compiled: bool) -> Callable:
    """flex_attention, compiled or eager. torch.compile keeps its graphs on the function's code object, so a
    fresh wrapper per call reuses them (no module-level cache needed)."""
    flex = flex_module().flex_attention
    return torch.compile(flex) if compiled else flex


def flex_joint_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, compiled: bool | None = None
) -> torch.Tensor:
    """The official frame-causal attention as one FlexAttention call with the layout's block mask; [B, H, L, D].

    `compiled` None: compiled on CUDA (a fused Triton kernel that skips masked tiles; torch.compile's default
    recompiles the second token count with dynamic shapes), eager elsewhere. Eager FlexAttention materialises
    the full [B, H, L, L] scores (fine for checks at small sizes; 7.6 GB and ~74 s at 384p on CPU). On CPU,
    torch 2.13's compiled kernel works for one fixed shape but takes 20-40 s to build per token count, fails
    to build with dynamic shapes, and runs slower than the segmented path, so CPU stays eager: real CPU runs
    want 'segmented'.
    """
    if compiled is None:
        compiled = q.device.type in FLEX_COMPILED_DEVICES
    block_mask = layout.block_mask()
    if compiled:
        if q.device.type == "cuda" and importlib.util.find_spec("triton") is None:
            raise ImportError(
                "attention 'flex' compiles a Triton kernel on CUDA: pip install triton (triton-windows on Windows), "
                "or use attention 'segmented' (CLI: --attention sdpa)"
            )
        return _flex_function(True)(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():  # eager on purpose: not the "use torch.compile" advice
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex_function(False)(q, k, v, block_mask=block_mask)


def _flex_tables(
    text_mask: torch.Tensor, segments: tuple[tuple[int, int], ...], block: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """Host tensors of the frame-causal block mask: (per-token tables, block tables), all int64.

    Per token: `kind` [B, L] (1 real text or video, 0 padded text; a query sees a key only of its own kind)
    and `limit` [L] (it sees keys before this position: the end of its frame, text counting as frame 0).
    Per (q block, kv block): partial and full blocks as counts [B, 1, nq] and indices [B, 1, nq, nk], listed
    first in ascending order. A tile is full only when it lies inside the sequence and every pair is allowed.
    """
    batch, text_len = text_mask.shape
    num_video = segments[-1][1] if segments else 0
    length = text_len + num_video
    # text and frame 0 share one limit (the end of frame 0); every later frame has its own
    ends = [text_len + end for _, end in segments] or [text_len]
    sizes = [text_len + (segments[0][1] if segments else 0)] + [end - start for start, end in segments[1:]]
    limit = torch.repeat_interleave(torch.tensor(ends, device="cpu"), torch.tensor(sizes, device="cpu"))
    kind = torch.cat([text_mask.long(), torch.ones(batch, num_video, dtype=torch.long, device="cpu")], dim=1)

    blocks = -(-length // block)
    starts = torch.arange(blocks, device="cpu") * block
    stops = (starts + block).clamp(max=length)
    complete = stops - starts == block
    causal_full = stops[None, :] <= limit[starts][:, None]  # [q block, kv block]: every key before every limit
    causal_any = starts[None, :] < limit[stops - 1][:, None]
    padded_kind = torch.full((batch, blocks * block), -1, dtype=torch.long, device="cpu")
    padded_kind[:, :length] = kind
    padded_kind = padded_kind.view(batch, blocks, block)
    has = [(padded_kind == value).any(-1) for value in (0, 1)]  # [B, blocks]: the tile holds that kind
    only = [has[0] & ~has[1] & complete, has[1] & ~has[0] & complete]
    kind_full = (only[0][:, :, None] & only[0][:, None, :]) | (only[1][:, :, None] & only[1][:, None, :])
    kind_any = (has[0][:, :, None] & has[0][:, None, :]) | (has[1][:, :, None] & has[1][:, None, :])
    full = kind_full & causal_full
    partial = kind_any & causal_any & ~full

    def listed(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True)
        return selected.sum(-1)[:, None], order[:, None]

    return (kind, limit), (*listed(partial), *listed(full))


def _block_mask(layout: TokenLayout, block: int = FLEX_BLOCK) -> "BlockMask":
    """The layout's FlexAttention `BlockMask` on its device: host tables, one asynchronous copy."""
    flex = flex_module()
    (kind, limit), tables = _flex_tables(layout.host_text_mask.mask, layout.segments, block)
    host = [kind, limit, *tables]
    packed = host_to_device(torch.cat([t.flatten() for t in host]), layout.device)
    pieces, offset = [], 0
    for t in host:
        pieces.append(packed[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    kind, limit = pieces[:2]
    num_partial, partial, num_full, full = (t.to(torch.int32) for t in pieces[2:])

    def frame_causal(b, h, q_idx, kv_idx):
        return (kind[b, q_idx] == kind[b, kv_idx]) & (kv_idx < limit[q_idx])

    length = kind.shape[1]
    options = inspect.signature(flex.BlockMask.from_kv_blocks).parameters
    extra = {"seq_lengths": (length, length)} if "seq_lengths" in options else {}
    if "compute_q_blocks" in options:
        extra["compute_q_blocks"] = False  # the transposed tables serve the backward pass only
    return flex.BlockMask.from_kv_blocks(
        num_partial, partial, num_full, full, BLOCK_SIZE=block, mask_mod=frame_causal, **extra
    )


# --------------------------------------------------------------------------------------------
# the one entry of the blocks


@torch.compiler.disable  # data-dependent Python loop over frames: keep it out of compiled block graphs
def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """Attention over the joint sequence as `spec.mode` says: segmented, FlexAttention or the dense-mask reference.

    q, k, v [B, H, L, D] run in `spec.compute_dtype`; the result comes back in v's dtype. Going from wider v to
    fp16, v is divided per (sample, head) by a power of two when it would not fit fp16 (attention is linear
    in v, so the scale is undone exactly afterwards); q and k are RMS-normalised, hence bounded.
    With `spec.shard` (sequence parallelism) q, k, v and the result hold this rank's tokens, all heads: an
    all-to-all gives the attention every token for a subset of the heads, and another one brings it back.
    Where `spec.takes_query_tail`, q may hold the last Lq positions only (video tokens; the result is theirs).
    """
    if q.shape[2] != k.shape[2] and not spec.takes_query_tail:
        raise ValueError(f"attention {spec.mode!r}{' with sequence parallelism' if spec.shard else ''} takes the "
                         f"queries of every token ({k.shape[2]}), got {q.shape[2]}")
    if spec.shard is not None:
        return spec.shard.attend(q, k, v, lambda q, k, v: _joint_attention(q, k, v, spec))
    return _joint_attention(q, k, v, spec)


def _joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """`joint_attention` over the whole sequence."""
    dtype, out_dtype, v_scale = spec.compute_dtype, v.dtype, None
    if (q.dtype, k.dtype, v.dtype) != (dtype, dtype, dtype):
        if dtype == torch.float16 and v.dtype != torch.float16:
            v_scale = pow2_scale(v, (-2, -1), limit=FP16_MAX / 4).clamp_min(1.0).to(v.dtype)
            v = v / v_scale
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if spec.mode == "segmented":
        out = segmented_attention(q, k, v, spec.layout, spec.kernel)
    elif spec.mode == "flex":
        out = flex_joint_attention(q, k, v, spec.layout)
    else:
        out = masked_attention(q, k, v, spec.layout)
    out = out.to(out_dtype)
    return out if v_scale is None else out * v_scale


def attention_keywords(name: str) -> dict[str, str]:
    """`configure_dit` keywords of one user-facing attention name (the CLI's --attention, the loader's widget).

    A mode ('segmented', 'masked', 'flex') runs with SDPA kernels; any other name ('sdpa', 'sage', 'flash' or
    registered) is a kernel of the segmented path. 'flex' raises ImportError naming the fix on torch < 2.5.
    """
    if name in ATTENTION_MODES:
        if name == "flex":
            flex_module()
        return {"attention_mode": name, "attention_backend": "sdpa"}
    return {"attention_mode": "segmented", "attention_backend": name}


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
