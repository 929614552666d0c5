"""The three attention paths against the official dense mask, and the segmented path against its previous self.

Bit-identity: where the segmented path makes the same kernel calls as before (one unmasked call per frame
segment), its fp32 CPU output equals the pre-issue-10 implementation (kept in bench/attention.py) bit for bit.
Batched runs and FlexAttention compute differently: they match the dense mask to float rounding.
"""
from __future__ import annotations

import pytest
import torch

from bench.attention import reference_segmented_attention
from pyramid_core.models import attention
from pyramid_core.models.attention import (
    AttentionSpec,
    HostTextMask,
    TokenLayout,
    _flex_tables,
    attention_keywords,
    flex_joint_attention,
    joint_attention,
    masked_attention,
    segment_runs,
    segmented_attention,
)
from pyramid_core.settings import ATTENTION_MODES

# (text mask rows, tokens per frame): prefix masks (the T5 case), no padding, left padding, an all-padded row,
# scattered real text, rows sharing a mask that are not adjacent (index rows)
LAYOUTS = {
    "prefix": ([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], (4, 4, 8, 3)),
    "unpadded": ([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], (4, 4, 8, 3)),
    "left-padded": ([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], (4, 4, 8, 3)),
    "empty-row": ([[0, 0, 0, 0], [1, 1, 0, 0]], (5, 6)),
    "scattered": ([[1, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0]], (3, 3, 5)),
    "one-frame": ([[1, 1, 0], [1, 0, 0]], (7,)),
}


def make(name: str, dtype=torch.float32, heads: int = 2, dim: int = 16, seed: int = 0):
    rows, sizes = LAYOUTS[name]
    mask = torch.tensor(rows, dtype=torch.bool)
    layout = TokenLayout(HostTextMask(mask), frame_sizes=sizes, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    shape = (mask.shape[0], heads, mask.shape[1] + sum(sizes), dim)
    return layout, [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("name", LAYOUTS)
def test_segmented_is_bit_identical_to_the_previous_implementation(name):
    layout, (q, k, v) = make(name)
    fused = segmented_attention(q, k, v, layout, batch_tokens=0)
    assert torch.equal(fused, reference_segmented_attention(q, k, v, layout))


def test_segmented_is_bit_identical_at_real_text_length_and_head_size():
    """128 text tokens padded differently per prompt, 30 x 64 heads, 60-token history frames (384p stage 0).

    q/k/v as the blocks pass them: [B, H, L, D] views of token-major [B, L, H, D] tensors. The output keeps that
    layout, so the blocks' transpose back to [B, L, H * D] is free.
    """
    mask = torch.zeros(2, 128, dtype=torch.bool)
    mask[0, :60], mask[1, :23] = True, True
    layout = TokenLayout(HostTextMask(mask), frame_sizes=(60,) * 4 + (240,), device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 128 + 480, 30, 64, generator=gen).transpose(1, 2) for _ in range(3))
    fused = segmented_attention(q, k, v, layout, batch_tokens=0)
    assert torch.equal(fused, reference_segmented_attention(q, k, v, layout))
    assert fused.transpose(1, 2).is_contiguous()
    batched = segmented_attention(q, k, v, layout, batch_tokens=1024)  # everything in one masked call per sample
    assert (batched - masked_attention(q, k, v, layout)).abs().max() < 2e-6


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("path", ["per-segment", "runs", "flex"])
def test_every_path_matches_the_dense_mask_on_every_token(name, path):
    """Padded text rows included: they attend to padded text only, as official."""
    layout, (q, k, v) = make(name, torch.float64)
    if path == "flex":
        out = flex_joint_attention(q, k, v, layout)
    else:
        out = segmented_attention(q, k, v, layout, batch_tokens=0 if path == "per-segment" else 12)
    assert (out - masked_attention(q, k, v, layout)).abs().max() < 1e-12


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("mode", ["segmented", "masked"])
def test_query_tail_gives_the_last_tokens_of_the_full_attention(name, mode):
    """The last block's queries: only the current clip's (a tail inside the video, from mid-frame too)."""
    layout, (q, k, v) = make(name, torch.float64)
    spec = AttentionSpec(layout, torch.float64, torch.float64, mode=mode)
    full = joint_attention(q, k, v, spec)
    current = layout.segments[-1][1] - layout.segments[-1][0]
    for tail in (current, 3, layout.num_video_tokens):
        out = joint_attention(q[:, :, q.shape[2] - tail :], k, v, spec)
        expected = full[:, :, full.shape[2] - tail :]
        assert out.shape == expected.shape
        if tail == current and len(layout.segments) > 1:  # the same calls as the full path: bit for bit
            assert mode == "masked" or torch.equal(out, expected)
        assert (out - expected).abs().max() < 1e-12, tail
    with pytest.raises(ValueError, match="video part"):
        segmented_attention(q[:, :, 1:], k, v, layout)


def test_flex_takes_the_queries_of_every_token():
    layout, (q, k, v) = make("prefix")
    spec = AttentionSpec(layout, torch.float32, torch.float32, mode="flex")
    assert not spec.takes_query_tail
    with pytest.raises(ValueError, match="takes the queries of every token"):
        joint_attention(q[:, :, -3:], k, v, spec)


def test_runs_batch_small_segments_and_build_each_mask_once():
    assert segment_runs([9, 4, 4, 8, 3], 12) == [(0, 0), (1, 2), (3, 4)]
    assert segment_runs([9, 4, 4, 8, 3], 0) == [(i, i) for i in range(5)]
    assert segment_runs([20, 1], 12) == [(0, 0), (1, 1)]  # a segment above the limit stands alone
    layout, (q, k, v) = make("prefix")
    segmented_attention(q, k, v, layout, batch_tokens=12)
    masks = dict(layout._run_masks)
    assert len(masks) == 2  # rows per segment [5 + 4, 4, 8, 3]: one run (segments 1-2) per sample group
    mask = layout.run_mask(3, 0, 1, 2)
    # keys: 3 real text + frames 0..2 (16 video tokens); frame 1's rows see up to its end, frame 2's everything
    assert mask.shape == (4 + 8, 3 + 16) and mask[:4].sum(1).tolist() == [3 + 8] * 4 and mask[4:].all()
    segmented_attention(q, k, v, layout, batch_tokens=12)
    assert all(layout._run_masks[key] is masks[key] for key in masks)


def test_plugged_kernels_never_get_a_mask(monkeypatch):
    """Runs need a masked call: with any kernel but SDPA every call is the unmasked per-segment one."""
    calls = []

    def kernel(q, k, v):
        calls.append(q.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    layout, (q, k, v) = make("prefix")
    reference = masked_attention(q, k, v, layout)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        _refuse_masks(torch.nn.functional.scaled_dot_product_attention))
    out = segmented_attention(q, k, v, layout, attend=kernel, batch_tokens=1000)
    # per sample group: segment 0 from the first text row (all 5 text rows + frame 0), frames 1-3, padded text
    assert calls == [5 + 4, 4, 8, 3, 2] + [5 + 4, 4, 8, 3, 3]
    assert (out - reference).abs().max() < 1e-6


def _refuse_masks(sdpa):
    def unmasked(q, k, v, attn_mask=None, **kwargs):
        assert attn_mask is None, "a plugged kernel's path passed a mask"
        return sdpa(q, k, v, **kwargs)

    return unmasked


@pytest.mark.parametrize("block", [4, 8, 128])
@pytest.mark.parametrize("name", ["prefix", "left-padded", "scattered", "empty-row"])
def test_block_tables_list_every_allowed_tile_and_only_complete_full_ones(name, block):
    layout, _ = make(name)
    dense = layout.dense_mask()[:, 0]  # [B, L, L]
    length = dense.shape[-1]
    _, (num_partial, partial, num_full, full) = _flex_tables(layout.host_text_mask.mask, layout.segments, block)
    blocks = -(-length // block)
    padded = torch.zeros(dense.shape[0], blocks * block, blocks * block, dtype=torch.bool)
    padded[:, :length, :length] = dense
    tiles = padded.view(-1, blocks, block, blocks, block).transpose(2, 3)  # [B, q block, kv block, block, block]
    inside = torch.zeros_like(padded)
    inside[:, :length, :length] = True
    inside = inside.view(-1, blocks, block, blocks, block).transpose(2, 3)
    listed_partial = _listed(num_partial, partial, blocks)
    listed_full = _listed(num_full, full, blocks)
    assert not (listed_partial & listed_full).any()
    assert torch.equal(listed_full, tiles.all(-1).all(-1) & inside.all(-1).all(-1)), "full = complete, all allowed"
    missing = tiles.any(-1).any(-1) & ~(listed_partial | listed_full)
    assert not missing.any(), "every tile with an allowed pair is listed"


def _listed(num: torch.Tensor, indices: torch.Tensor, blocks: int) -> torch.Tensor:
    """[B, q block, kv block] bool from counts [B, 1, nq] and indices [B, 1, nq, nk] (the listed ones first)."""
    rank = torch.arange(blocks)[None, None, :]
    chosen = rank < num[:, 0, :, None]
    out = torch.zeros(num.shape[0], blocks, blocks, dtype=torch.bool)
    return out.scatter(2, indices[:, 0].long(), chosen)


def test_flex_block_mask_is_built_once_per_layout_on_the_device():
    layout, (q, k, v) = make("prefix")
    first = layout.block_mask()
    assert layout.block_mask() is first and first.kv_indices.dtype == torch.int32
    assert first.shape[-2:] == (q.shape[2], q.shape[2])
    assert torch.equal(flex_joint_attention(q, k, v, layout), flex_joint_attention(q, k, v, layout))


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_joint_attention_runs_every_mode_in_fp16_with_rescaled_values(mode):
    """Each mode through the blocks' one entry, fp16 compute with fp32 values beyond fp16's range."""
    layout, (q, k, v) = make("prefix")
    v = v * 1e6
    reference = masked_attention(q.double(), k.double(), v.double(), layout)
    spec = AttentionSpec(layout, compute_dtype=torch.float16, residual_dtype=torch.float32, mode=mode)
    out = joint_attention(q, k, v, spec)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert ((out.double() - reference).abs().max() / reference.abs().max()) < 2e-3


def test_attention_names_map_to_dit_settings():
    assert attention_keywords("sdpa") == {"attention_mode": "segmented", "attention_backend": "sdpa"}
    assert attention_keywords("sage") == {"attention_mode": "segmented", "attention_backend": "sage"}
    assert attention_keywords("flex") == {"attention_mode": "flex", "attention_backend": "sdpa"}
    assert attention_keywords("masked") == {"attention_mode": "masked", "attention_backend": "sdpa"}
    assert attention_keywords("segmented") == {"attention_mode": "segmented", "attention_backend": "sdpa"}


def test_flex_on_old_torch_names_the_fix(monkeypatch):
    real_import = attention.importlib.import_module

    def no_flex(name, *args):
        if name == "torch.nn.attention.flex_attention":
            raise ModuleNotFoundError(name)
        return real_import(name, *args)

    monkeypatch.setattr(attention.importlib, "import_module", no_flex)
    with pytest.raises(ImportError, match=r"torch >= 2\.5.*pip install -U torch.*segmented"):
        attention_keywords("flex")
    layout, (q, k, v) = make("prefix")
    with pytest.raises(ImportError, match=r"torch >= 2\.5"):
        flex_joint_attention(q, k, v, layout)
