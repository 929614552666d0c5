"""A tiny random Pyramid Flow model in the official folder layout, built offline.

`build_tiny_model` writes every component the real checkpoints have (DiT variant folder, causal
video VAE, CLIP/T5 text encoders and their tokenizers) at toy sizes with seeded random weights, so
the whole pipeline - loading included - can be exercised without downloads or the test fixtures.
Its videos are noise: the weights are random.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .loading import (
    OFFICIAL_FLUX_CONFIG,
    OFFICIAL_MMDIT_CONFIG,
    OFFICIAL_VAE_CONFIG,
    VAE_FOLDER,
    loader_extras,
    model_class,
    save_single_file,
)
from .loading.quiet import quiet_transformers
from .settings import FAMILIES

__all__ = ["DEMO_VARIANT", "build_tiny_model"]

DEMO_VARIANT = "diffusion_transformer_384p"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# Text the tokenizers learn from: plain words of the kind video prompts use.
_CORPUS = """
a cat is walking on the beach at sunset while the waves roll in and the sky turns orange
a dog runs through the green park in the morning light and jumps over a small wooden fence
the camera slowly moves along a quiet city street at night with bright neon signs and rain
an old man reads a book by the window as snow falls over the mountains and the forest
two birds fly above the ocean, a boat sails towards the harbour under a clear blue sky
a woman in a red dress dances in a field of flowers; the wind moves her hair and the grass
close up of a cup of hot coffee on a table with steam rising in the soft warm light
a train crosses a long bridge over the river, clouds drift across the hills in the distance
children play with a ball in the garden, the sun shines and the trees sway in the breeze
hyper quality, ultra hd, 8k, cartoon style, worst quality, low quality, blurry, low res
absolute black, absolute white, extra limbs, extra digits, misplaced objects, monochrome, horror
"""

_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_T5_EXTRA_IDS = 100
_CLIP_MERGES = 160


# --------------------------------------------------------------------------------------------
# public entry point


def build_tiny_model(folder: str | Path, family: str = "flux", seed: int = 0) -> Path:
    """Write a tiny random Pyramid Flow model (official layout) into `folder` and return it.

    `family`: "flux" (miniFLUX: CLIP-L + T5 in text_encoder/, text_encoder_2/) or "mmdit" (SD3-style:
    CLIP-L + CLIP-G with projections + T5 in text_encoder_3/). One DiT variant folder
    (`diffusion_transformer_384p/`) is written. Weights are seeded (`seed`) and scaled so activations stay
    finite; `PyramidFlowPipeline.from_pretrained(folder)` loads the result. Needs no network and no fixtures.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use 'flux' (miniFLUX) or 'mmdit' (SD3-style MMDiT)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    root = Path(folder).expanduser()
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; pass a folder for the tiny model")
    if root.is_dir() and any(root.iterdir()):
        raise ValueError(f"{root} is not empty; pass a new or empty folder for the tiny model")
    root.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        _write_all(root, family, seed)
    return root


def _write_all(root: Path, family: str, seed: int) -> None:
    clip_vocab, clip_merges = _learn_clip_bpe(_CORPUS, _CLIP_MERGES)
    t5_pieces = _t5_pieces(_CORPUS)
    t5_vocab_size = len(t5_pieces) + _T5_EXTRA_IDS + 20  # spare rows, like 32128 vs 32100 in the real T5
    clip_l = _clip_config(len(clip_vocab), hidden=64, projection=64, act="quick_gelu")

    if family == "flux":
        _write_clip_tokenizer(root / "tokenizer", clip_vocab, clip_merges, pad=_CLIP_EOS)
        _write_clip_encoder(root / "text_encoder", clip_l, with_projection=False, seed=seed + 3)
        _write_t5_tokenizer(root / "tokenizer_2", t5_pieces)
        _write_t5_encoder(root / "text_encoder_2", t5_vocab_size, seed=seed + 4)
        dit_config = {
            **OFFICIAL_FLUX_CONFIG,
            "num_attention_heads": 2,  # head dim stays 64: the RoPE axes (16, 24, 24) fix it
            "num_layers": 1,
            "num_single_layers": 1,
            "joint_attention_dim": 64,
            "pooled_projection_dim": clip_l["hidden_size"],
        }
        class_name, dit_family = "PyramidFluxTransformer", "flux"
    else:
        clip_g = _clip_config(len(clip_vocab), hidden=80, projection=80, act="gelu")
        _write_clip_tokenizer(root / "tokenizer", clip_vocab, clip_merges, pad=_CLIP_EOS)
        _write_clip_tokenizer(root / "tokenizer_2", clip_vocab, clip_merges, pad="!")  # SD3's CLIP-G pads with "!"
        _write_clip_encoder(root / "text_encoder", clip_l, with_projection=True, seed=seed + 3)
        _write_clip_encoder(root / "text_encoder_2", clip_g, with_projection=True, seed=seed + 4)
        _write_t5_tokenizer(root / "tokenizer_3", t5_pieces)
        _write_t5_encoder(root / "text_encoder_3", t5_vocab_size, seed=seed + 5)
        dit_config = {
            **OFFICIAL_MMDIT_CONFIG,
            "attention_head_dim": 32,
            "num_attention_heads": 2,
            "num_layers": 2,
            "caption_projection_dim": 64,
            "joint_attention_dim": 64,
            "pooled_projection_dim": clip_l["projection_dim"] + clip_g["projection_dim"],
            "pos_embed_max_size": 24,
            "sample_size": 32,
        }
        class_name, dit_family = "PyramidDiffusionMMDiT", "mmdit"

    _write_component(root / DEMO_VARIANT, dit_family, class_name, dit_config, seed=seed + 1)
    vae_config = {
        **OFFICIAL_VAE_CONFIG,
        "encoder_block_out_channels": [8, 8, 16, 16],
        "decoder_block_out_channels": [8, 8, 16, 16],
        "encoder_norm_num_groups": 4,
        "decoder_norm_num_groups": 4,
        # one resnet per stage instead of the official 2 / 3: the full-resolution 3-D convolutions of the
        # decoder are most of the demo's time on a CPU (8-channel conv3d takes a slow generic kernel there)
        "encoder_layers_per_block": [1, 1, 1, 1],
        "decoder_layers_per_block": [1, 1, 1, 1],
    }
    _write_component(root / VAE_FOLDER, "vae", "CausalVideoVAE", vae_config, seed=seed + 2)


# --------------------------------------------------------------------------------------------
# random weights


def _randomize(module: nn.Module, generator: torch.Generator) -> None:
    """N(0, 1/fan_in) matrices, norm weights 1 (biases 0), other vectors 0.05*N(0,1), in a fixed order."""
    with torch.no_grad():
        for owner in module.modules():
            is_norm = "norm" in type(owner).__name__.lower()
            for name, param in owner.named_parameters(recurse=False):
                if param.ndim >= 2:
                    fan_in = math.prod(param.shape[1:])
                    value = torch.randn(param.shape, generator=generator) / math.sqrt(fan_in)
                elif is_norm:
                    value = torch.ones(param.shape) if name == "weight" else torch.zeros(param.shape)
                else:
                    value = 0.05 * torch.randn(param.shape, generator=generator)
                param.copy_(value.to(param.dtype))


def _write_component(folder: Path, family: str, class_name: str, config: dict[str, Any], seed: int) -> None:
    """A DiT or VAE folder: config.json (official keys) + diffusion_pytorch_model.safetensors."""
    folder.mkdir(parents=True)
    model = model_class(family)(**{**config, **loader_extras(family)})
    _randomize(model, torch.Generator("cpu").manual_seed(seed))
    if family == "vae":
        with torch.no_grad():  # keeps decoded pixels mostly inside [-1, 1] instead of saturating
            for param in model.decoder.conv_out.parameters():
                param.mul_(0.35)
    save_single_file(model, folder / WEIGHTS_NAME)
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name, **config}, indent=2, sort_keys=True))


# --------------------------------------------------------------------------------------------
# text encoders


def _clip_config(vocab_size: int, hidden: int, projection: int, act: str) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "projection_dim": projection,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": act,
        # the pooled vector is read at the first end-of-text token, the last id of the vocabulary
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


def _write_clip_encoder(folder: Path, config: dict[str, Any], with_projection: bool, seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = model_cls(CLIPTextConfig(**config))
    _randomize(model, torch.Generator("cpu").manual_seed(seed))
    model.save_pretrained(str(folder))


def _write_t5_encoder(folder: Path, vocab_size: int, seed: int) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
    )
    model = T5EncoderModel(config)
    _randomize(model, torch.Generator("cpu").manual_seed(seed))
    model.save_pretrained(str(folder))


# --------------------------------------------------------------------------------------------
# CLIP tokenizer: byte-level BPE in CLIP's file format (vocab.json + merges.txt)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in vocabulary order (printable bytes keep their char)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _words(text: str) -> Counter[str]:
    return Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", text.lower()))


def _learn_clip_bpe(text: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Greedy BPE on `text` (most frequent pair first, ties by the pair itself, so it is deterministic)."""
    counts = _words(text)
    splits = {w: (*w[:-1], w[-1] + "</w>") for w in counts}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in counts.items():
            symbols = splits[word]
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        for word in counts:
            splits[word] = _merge(splits[word], best)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [_CLIP_BOS, _CLIP_EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _special(content: str, normalized: bool = True) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def _write_clip_tokenizer(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad: str) -> None:
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=2))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    added = {str(vocab[t]): {**_special(t), "special": True} for t in (_CLIP_BOS, _CLIP_EOS)}
    if pad != _CLIP_EOS:
        added[str(vocab[pad])] = {**_special(pad, normalized=False), "special": True}
    config = {
        "added_tokens_decoder": dict(sorted(added.items(), key=lambda kv: int(kv[0]))),
        "bos_token": _CLIP_BOS, "eos_token": _CLIP_EOS, "unk_token": _CLIP_EOS, "pad_token": pad,
        "clean_up_tokenization_spaces": True, "errors": "replace", "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {"bos_token": _special(_CLIP_BOS), "eos_token": _special(_CLIP_EOS), "unk_token": _special(_CLIP_EOS),
                   "pad_token": pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


# --------------------------------------------------------------------------------------------
# T5 tokenizer: a SentencePiece-style unigram model saved as tokenizer.json (T5TokenizerFast reads it)


def _t5_pieces(text: str) -> list[tuple[str, float]]:
    """Unigram pieces with log-probability scores: T5 specials, whole words, then single characters."""
    counts = _words(text)
    total = sum(counts.values())
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in _T5_SPECIALS] + [("\u2581", -2.0)]
    for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        pieces.append(("\u2581" + word, math.log(n / total)))
    seen = {p for p, _ in pieces}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()":
        for piece in (char, "\u2581" + char):
            if piece not in seen:
                pieces.append((piece, -12.0))  # fallback pieces: only used when no word piece fits
                seen.add(piece)
    return pieces


def _write_t5_tokenizer(folder: Path, pieces: list[tuple[str, float]]) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    folder.mkdir(parents=True)
    extra_ids = [f"<extra_id_{i}>" for i in range(_T5_EXTRA_IDS)]
    vocab = list(pieces) + [(token, 0.0) for token in reversed(extra_ids)]  # as in T5: <extra_id_99> comes first
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in _T5_SPECIALS])
    tokenizer.add_special_tokens([AddedToken(t, lstrip=True, rstrip=True, normalized=False) for t in reversed(extra_ids)])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "extra_ids": _T5_EXTRA_IDS, "additional_special_tokens": extra_ids, "model_max_length": 512,
        "legacy": True, "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": extra_ids}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
