"""Pyramid Flow text conditioning from a ComfyUI `CLIP` (DualCLIPLoader flux / TripleCLIPLoader sd3).

Reuses the T5-XXL and CLIP files users already have, with Pyramid Flow's rules: T5 cut to 128
tokens with its attention mask applied inside T5, CLIP to its first 77 tokens; pooled = CLIP-L
`pooler_output` (miniFLUX) or projected CLIP-L + CLIP-G (SD3). The CLIP object is restored after use.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from pyramid_core.text import T5_MAX_LENGTH, TextEmbeddings

T5_END, T5_PAD = 1, 0


def clip_family(clip: Any) -> str:
    """'flux' for clip_l + t5xxl, 'mmdit' for clip_l + clip_g + t5xxl; a clear error otherwise."""
    model = getattr(clip, "cond_stage_model", None)
    parts = {name for name in ("clip_l", "clip_g", "t5xxl") if getattr(model, name, None) is not None}
    if parts == {"clip_l", "t5xxl"}:
        return "flux"
    if parts == {"clip_l", "clip_g", "t5xxl"}:
        return "mmdit"
    raise ValueError(
        "this CLIP cannot condition Pyramid Flow: load clip_l + t5xxl with DualCLIPLoader (type flux) for miniFLUX, "
        f"or clip_l + clip_g + t5xxl with TripleCLIPLoader for SD3 (found: {', '.join(sorted(parts)) or 'none'})"
    )


@contextlib.contextmanager
def _options(encoder: Any, **options: Any) -> Iterator[None]:
    encoder.reset_clip_options()
    encoder.set_clip_options(options)
    try:
        yield
    finally:
        encoder.reset_clip_options()


@contextlib.contextmanager
def _t5_attention_mask(t5: Any) -> Iterator[None]:
    # the flag pair that makes ComfyUI's T5 apply and return the padding mask; put back afterwards
    saved = (t5.enable_attention_masks, t5.return_attention_masks)
    t5.enable_attention_masks = t5.return_attention_masks = True
    try:
        yield
    finally:
        t5.enable_attention_masks, t5.return_attention_masks = saved


def _t5_tokens(chunks: list[list[tuple]]) -> list[tuple]:
    """The first 128 T5 tokens of ComfyUI's token list, ending in </s> when cut (official truncation)."""
    tokens = [tuple(t) for chunk in chunks for t in chunk]
    ids = [t[0] for t in tokens]
    if T5_END in ids and ids.index(T5_END) < T5_MAX_LENGTH:
        return tokens[:T5_MAX_LENGTH]
    return tokens[: T5_MAX_LENGTH - 1] + [(T5_END, 1.0) + tuple(tokens[0][2:])]


def _encode_one(clip: Any, text: str, family: str, device: torch.device) -> TextEmbeddings:
    model = clip.cond_stage_model
    tokens = clip.tokenize(text, tokenizer_options={"t5xxl_min_length": T5_MAX_LENGTH})
    pooled = []
    for key, name in (("l", "clip_l"), ("g", "clip_g")) if family == "mmdit" else (("l", "clip_l"),):
        encoder = getattr(model, name)
        with _options(encoder, projected_pooled=family == "mmdit", execution_device=device):
            pooled.append(encoder.encode_token_weights(tokens[key][:1])[1])  # first 77-token chunk only
    with _t5_attention_mask(model.t5xxl), _options(model.t5xxl, execution_device=device):
        hidden, _, extra = model.t5xxl.encode_token_weights([_t5_tokens(tokens["t5xxl"])])
    mask = extra["attention_mask"].to(torch.int64).reshape(1, -1)
    return TextEmbeddings(hidden.float().cpu(), mask.cpu(), torch.cat([p.float().cpu() for p in pooled], dim=-1))


def encode_with_clip(clip: Any, positive: str, negative: str) -> tuple[TextEmbeddings, str]:
    """CFG batch [negative, positive] (exact strings: add any suffix before) and the DiT family."""
    (embeddings,), family = encode_pairs_with_clip(clip, [(positive, negative)])
    return embeddings, family


def encode_pairs_with_clip(clip: Any, pairs: Sequence[tuple[str, str]]) -> tuple[list[TextEmbeddings], str]:
    """One CFG batch [negative, positive] per (positive, negative) pair (exact strings), loading the CLIP
    once (a prompt schedule's distinct pairs), and the DiT family."""
    family = clip_family(clip)
    clip.load_model()  # through load_models_gpu: ComfyUI manages the text encoders
    device = clip.patcher.load_device
    batches = [TextEmbeddings.cat([_encode_one(clip, text, family, device) for text in (negative, positive)])
               for positive, negative in pairs]
    return batches, family
