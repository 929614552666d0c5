"""Pyramid Flow text conditioning: CLIP pooled vector + T5 token embeddings, loaded offline.

miniFLUX: CLIP-L ``pooler_output`` + T5-XXL; SD3 (MMDiT): CLIP-L and CLIP-G projected ``text_embeds``
concatenated + T5-XXL. Both read the official Hugging Face folder layout (``text_encoder*/``, ``tokenizer*/``).
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Literal

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from . import settings

PROMPT_SUFFIX = ", hyper quality, Ultra HD, 8K"
DEFAULT_NEGATIVE_PROMPT = (
    "cartoon style, worst quality, low quality, blurry, absolute black, absolute white, low res, "
    "extra limbs, extra digits, misplaced objects, mutated anatomy, monochrome, horror"
)
T5_MAX_LENGTH = 128

# Eager attention reproduces the official (transformers 4.39) numerics bit for bit; SDPA drifts slightly on T5
# and gains nothing at 77/128 tokens.
ATTN_IMPLEMENTATION = "eager"

Family = Literal["flux", "mmdit"]

# subfolder -> (what goes there, transformers class); per family, in the official order
_CLIP_L = "CLIP-L text model (config.json + model.safetensors)"
_CLIP_G = "CLIP-G (bigG) text model with projection (config.json + model.safetensors)"
_T5 = "T5-v1.1-XXL encoder (config.json + model*.safetensors, sharded with model.safetensors.index.json)"
_CLIP_TOK = "CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json)"
_T5_TOK = "T5 tokenizer (spiece.model / tokenizer.json, tokenizer_config.json)"
_LAYOUT: dict[str, dict[str, object]] = {
    "flux": {
        "clip": [("tokenizer", _CLIP_TOK, "text_encoder", _CLIP_L, CLIPTextModel)],
        "t5": ("tokenizer_2", "text_encoder_2"),
        "repo": "rain1011/pyramid-flow-miniflux",
    },
    "mmdit": {
        "clip": [
            ("tokenizer", _CLIP_TOK, "text_encoder", _CLIP_L, CLIPTextModelWithProjection),
            ("tokenizer_2", _CLIP_TOK, "text_encoder_2", _CLIP_G, CLIPTextModelWithProjection),
        ],
        "t5": ("tokenizer_3", "text_encoder_3"),
        "repo": "rain1011/pyramid-flow-sd3",
    },
}


@dataclass
class TextEmbeddings:
    """Text conditioning for the DiT: T5 tokens ``[B,128,D]``, their mask ``[B,128]`` (int64), pooled ``[B,P]``."""

    prompt_embeds: torch.Tensor
    attention_mask: torch.Tensor
    pooled: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def device(self) -> torch.device:
        return self.prompt_embeds.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt_embeds.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextEmbeddings":
        """Move all parts to ``device``; cast only the float parts (embeds, pooled) to ``dtype``."""
        return TextEmbeddings(
            prompt_embeds=self.prompt_embeds.to(device=device, dtype=dtype),
            attention_mask=self.attention_mask.to(device=device),
            pooled=self.pooled.to(device=device, dtype=dtype),
        )

    def clone(self) -> "TextEmbeddings":
        return TextEmbeddings(self.prompt_embeds.clone(), self.attention_mask.clone(), self.pooled.clone())

    def __getitem__(self, index: int | slice) -> "TextEmbeddings":
        """Batch slice that keeps the batch dimension (``emb[1]`` is a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TextEmbeddings(self.prompt_embeds[index], self.attention_mask[index], self.pooled[index])

    def chunk_cfg(self) -> tuple["TextEmbeddings", "TextEmbeddings"]:
        """Split a CFG batch ``[negative..., positive...]`` into ``(negative, positive)``."""
        if self.batch_size % 2:
            raise ValueError(f"a CFG batch has an even batch size, got {self.batch_size}")
        half = self.batch_size // 2
        return self[:half], self[half:]

    @staticmethod
    def cat(items: Sequence["TextEmbeddings"]) -> "TextEmbeddings":
        """Concatenate along the batch dimension (all items must share device, sequence length and widths)."""
        if not items:
            raise ValueError("TextEmbeddings.cat needs at least one item")
        return TextEmbeddings(
            prompt_embeds=torch.cat([e.prompt_embeds for e in items]),
            attention_mask=torch.cat([e.attention_mask for e in items]),
            pooled=torch.cat([e.pooled for e in items]),
        )


def normalize_family(family: str) -> Family:
    """The family key (``"flux"`` | ``"mmdit"``) of any name in `settings.FAMILIES` (``"miniflux"``, ``"sd3"``, ...)."""
    return settings.family_name(family)  # type: ignore[return-value]


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype the text encoders run in: a compute dtype (bf16, fp16, fp32) given by name or as a dtype."""
    try:
        name: str | None = settings.dtype_name(str(dtype))
    except ValueError:
        name = None
    if name not in settings.COMPUTE_DTYPES:
        why = ": fp8 weight storage applies to the DiT only" if name and name.startswith("fp8") else ""
        raise ValueError(
            f"text encoder dtype must be one of {', '.join(settings.COMPUTE_DTYPES)} (bf16 is the official one), "
            f"got {dtype!r}{why}"
        )
    return getattr(torch, settings.torch_dtype_name(name))


def text_encoder_identity(root: str | Path, family: str, dtype: torch.dtype | str = torch.bfloat16) -> str:
    """Cache identity of the encoder ``from_folder(root, family, dtype)`` would build (computable without loading)."""
    return f"{normalize_family(family)}|{Path(root).expanduser().resolve()}|{_resolve_dtype(dtype)}"


def _require_folder(root: Path, name: str, what: str, repo: str) -> Path:
    folder = root / name
    if not (folder.is_dir() and any(folder.iterdir())):
        raise FileNotFoundError(
            f"missing subfolder '{name}/' under {root}: it must hold the {what}. "
            f"Download it from the Hugging Face repo {repo} (keep its folder layout)."
        )
    return folder


def _load_kwargs(dtype: torch.dtype) -> dict:
    # Load straight into the target dtype on meta-initialised modules: never an fp32 copy of T5-XXL in RAM.
    kwargs: dict = {"local_files_only": True, "attn_implementation": ATTN_IMPLEMENTATION}
    if Version(transformers.__version__) >= Version("4.56"):
        kwargs["dtype"] = dtype
    else:
        kwargs["torch_dtype"] = dtype
    if Version(transformers.__version__) < Version("5"):
        kwargs["low_cpu_mem_usage"] = True
    return kwargs


def _execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: an accelerate offload hook's device if present, else its weights' device."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(module.parameters()).device


def _module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class PyramidTextEncoder(nn.Module):
    """The Pyramid Flow text encoder of one family (``flux`` = CLIP-L + T5, ``mmdit`` = CLIP-L + CLIP-G + T5).

    Runs each sub-model on the device its weights are on; a memory planner may move ``clip_encoders`` and
    ``t5_encoder`` independently.
    """

    def __init__(
        self,
        family: str,
        clip_tokenizers: Sequence[CLIPTokenizer],
        clip_encoders: Sequence[nn.Module],
        t5_tokenizer: T5TokenizerFast,
        t5_encoder: nn.Module,
        identity: str = "",
    ) -> None:
        super().__init__()
        self.family: Family = normalize_family(family)
        expected = len(_LAYOUT[self.family]["clip"])  # type: ignore[arg-type]
        if len(clip_tokenizers) != expected or len(clip_encoders) != expected:
            raise ValueError(f"family {self.family!r} needs {expected} CLIP tokenizer/encoder pair(s)")
        self.clip_tokenizers = list(clip_tokenizers)
        self.clip_encoders = nn.ModuleList(clip_encoders)
        self.t5_tokenizer = t5_tokenizer
        self.t5_encoder = t5_encoder
        self.identity = identity or f"{self.family}|unnamed-{id(self)}"
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_folder(
        cls,
        root: str | Path,
        family: str,
        dtype: torch.dtype | str = torch.bfloat16,
    ) -> "PyramidTextEncoder":
        """Load tokenizers and text encoders offline from an official checkpoint folder (never downloads).

        ``root`` is the model folder (e.g. ``pyramid-flow-miniflux/``) holding ``text_encoder*/`` and
        ``tokenizer*/``; weights are loaded on the host directly in ``dtype`` (a memory manager places them).
        """
        root = Path(root).expanduser()
        fam = normalize_family(family)
        dtype = _resolve_dtype(dtype)
        if not root.is_dir():
            raise FileNotFoundError(f"model folder {root} does not exist; pass the Pyramid Flow checkpoint root folder")
        layout = _LAYOUT[fam]
        repo = str(layout["repo"])
        kwargs = _load_kwargs(dtype)

        # check every folder before loading anything, so a bad layout fails fast
        clip_folders = [
            (_require_folder(root, tok, tok_what, repo), _require_folder(root, enc, enc_what, repo), model_cls)
            for tok, tok_what, enc, enc_what, model_cls in layout["clip"]  # type: ignore[union-attr]
        ]
        t5_tok_name, t5_enc_name = layout["t5"]  # type: ignore[misc]
        t5_tok_dir = _require_folder(root, t5_tok_name, _T5_TOK, repo)
        t5_enc_dir = _require_folder(root, t5_enc_name, _T5, repo)

        clip_tokenizers = [CLIPTokenizer.from_pretrained(str(t), local_files_only=True) for t, _, _ in clip_folders]
        clip_encoders = [model_cls.from_pretrained(str(e), **kwargs) for _, e, model_cls in clip_folders]
        t5_tokenizer = T5TokenizerFast.from_pretrained(str(t5_tok_dir), local_files_only=True)
        t5_encoder = T5EncoderModel.from_pretrained(str(t5_enc_dir), **kwargs)

        encoder = cls(
            fam, clip_tokenizers, clip_encoders, t5_tokenizer, t5_encoder,
            identity=text_encoder_identity(root, fam, dtype),
        )
        return encoder

    @property
    def pooled_dim(self) -> int:
        if self.family == "flux":
            return self.clip_encoders[0].config.hidden_size
        return sum(enc.config.projection_dim for enc in self.clip_encoders)

    @property
    def embed_dim(self) -> int:
        return self.t5_encoder.config.d_model

    def working_memory_bytes(self, workload) -> int:
        """Device working memory of encoding one prompt (a `pyramid_core.memory.Workload`; T5 dominates)."""
        from .memory.estimates import text_working_memory

        config = self.t5_encoder.config
        return text_working_memory(workload, config.d_model, config.d_ff, config.num_heads)

    def _clip_max_length(self) -> int:
        # the official code pads every CLIP tokenizer to the first (CLIP-L) tokenizer's model_max_length
        return int(self.clip_tokenizers[0].model_max_length)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids exactly as the official encoders feed them: ``clip_0``, ``clip_1``, ``t5``, ``t5_mask``."""
        prompts = _check_prompts(prompts)
        out: dict[str, torch.Tensor] = {}
        for i, tokenizer in enumerate(self.clip_tokenizers):
            out[f"clip_{i}"] = tokenizer(
                prompts, padding="max_length", max_length=self._clip_max_length(), truncation=True, return_tensors="pt"
            ).input_ids
        t5 = self.t5_tokenizer(
            prompts, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )
        out["t5"] = t5.input_ids
        out["t5_mask"] = t5.attention_mask
        return out

    def t5_token_counts(self, prompts: Sequence[str]) -> list[int]:
        """T5 tokens of each prompt (end-of-sequence token included), counted before the cut at ``T5_MAX_LENGTH``."""
        ids = self.t5_tokenizer(
            _check_prompts(prompts), add_special_tokens=True, padding=False, truncation=False, verbose=False
        ).input_ids
        return [len(row) for row in ids]

    def truncation_message(self, prompts: Sequence[str], what: str = "prompt") -> str | None:
        """What T5 drops of ``prompts`` (``what`` names them: "prompt", "negative prompt"); None when all fit.

        E.g. "prompt is 153 T5 tokens; the last 25 are dropped (T5 reads 128), shorten it to keep them". CLIP's
        cut at 77 tokens is not reported: the official pipeline relies on T5 for long prompts.
        """
        prompts = _check_prompts(prompts)
        parts = []
        for i, (prompt, count) in enumerate(zip(prompts, self.t5_token_counts(prompts))):
            if count <= T5_MAX_LENGTH:
                continue
            label = f"{what} {i + 1} of {len(prompts)}" if len(prompts) > 1 else what
            suffix = "; the quality suffix at its end goes first" if prompt.endswith(PROMPT_SUFFIX) else ""
            parts.append(
                f"{label} is {count} T5 tokens; the last {count - T5_MAX_LENGTH} are dropped "
                f"(T5 reads {T5_MAX_LENGTH}{suffix}), shorten it to keep them"
            )
        return ". ".join(parts) or None

    def _warn_truncation(self, batches: Sequence[tuple[Sequence[str], str]]) -> None:
        """One UserWarning for everything T5 would drop of the (prompts, what) batches, attributed to the caller
        of the public encode method."""
        messages = [m for prompts, what in batches if (m := self.truncation_message(prompts, what))]
        if messages:
            warnings.warn(". ".join(messages), UserWarning, stacklevel=3)

    def encode(self, prompts: list[str], *, warn_truncation: bool = True) -> TextEmbeddings:
        """Encode prompts as given (no suffix, no negative) into ``TextEmbeddings`` on the T5 device.

        T5 reads the first ``T5_MAX_LENGTH`` tokens of each prompt (like the official pipeline); a longer prompt
        gives one UserWarning saying how many tokens are dropped, unless ``warn_truncation`` is False.
        """
        if warn_truncation:
            self._warn_truncation([(prompts, "prompt")])
        return self._encode(prompts)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        tokens = self.tokenize(prompts)

        pooled_parts = []
        for i, clip in enumerate(self.clip_encoders):
            # no attention mask for CLIP: the official models see the padding tokens
            out = clip(tokens[f"clip_{i}"].to(_execution_device(clip)))
            part = out.pooler_output if self.family == "flux" else out.text_embeds
            pooled_parts.append(part.to(dtype=_module_dtype(clip)))

        t5_device = _execution_device(self.t5_encoder)
        mask = tokens["t5_mask"].to(device=t5_device, dtype=torch.int64)
        hidden = self.t5_encoder(tokens["t5"].to(t5_device), attention_mask=mask).last_hidden_state
        prompt_embeds = hidden.to(dtype=_module_dtype(self.t5_encoder))

        pooled = torch.cat([p.to(t5_device) for p in pooled_parts], dim=-1)
        return TextEmbeddings(prompt_embeds=prompt_embeds, attention_mask=mask, pooled=pooled)

    def encode_for_guidance(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = DEFAULT_NEGATIVE_PROMPT,
        *,
        add_suffix: bool = True,
        do_cfg: bool = True,
    ) -> TextEmbeddings:
        """Embeddings as the pipeline uses them: ``[negative..., positive...]`` when ``do_cfg`` else positive only.

        ``PROMPT_SUFFIX`` is appended to each positive prompt only; a ``None`` negative means ``""``; a single
        negative string is shared by every positive prompt. Prompts longer than T5 reads give one UserWarning.
        """
        positives, negatives = guidance_prompts(prompt, negative_prompt, add_suffix=add_suffix)
        self._warn_truncation([(positives, "prompt"), *([(negatives, "negative prompt")] if do_cfg else [])])
        positive = self.encode(positives, warn_truncation=False)
        if not do_cfg:
            return positive
        # encoded in separate calls, like the official pipeline (prompt first, then negative)
        negative = self.encode(negatives, warn_truncation=False)
        return TextEmbeddings.cat([negative, positive])


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt string")
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
    return prompts


def guidance_prompts(
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = DEFAULT_NEGATIVE_PROMPT,
    *,
    add_suffix: bool = True,
) -> tuple[list[str], list[str]]:
    """The exact (positive, negative) strings the encoders see, one negative per positive."""
    positives = _check_prompts(prompt)
    if add_suffix:
        positives = [p + PROMPT_SUFFIX for p in positives]
    if negative_prompt is None:
        negative_prompt = ""
    negatives = [negative_prompt] * len(positives) if isinstance(negative_prompt, str) else _check_prompts(negative_prompt)
    if len(negatives) != len(positives):
        raise ValueError(
            f"{len(negatives)} negative prompts for {len(positives)} prompts; pass one negative string or one per prompt"
        )
    return positives, negatives


class TextEmbeddingCache:
    """LRU cache of CFG embeddings, so re-running the same prompts needs no text encoder (caller owns it).

    Keyed by (prompts, negative prompts, add_suffix, do_cfg, encoder identity); entries are stored on the CPU.
    """

    def __init__(self, max_entries: int = 16) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, TextEmbeddings] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(
        identity: str,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = DEFAULT_NEGATIVE_PROMPT,
        *,
        add_suffix: bool = True,
        do_cfg: bool = True,
    ) -> tuple:
        positives, negatives = guidance_prompts(prompt, negative_prompt, add_suffix=add_suffix)
        return (identity, tuple(positives), tuple(negatives) if do_cfg else None, bool(add_suffix), bool(do_cfg))

    def lookup(self, key: tuple) -> TextEmbeddings | None:
        """The cached embeddings (a CPU copy) for ``key``, or ``None``."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.clone()

    def store(self, key: tuple, embeddings: TextEmbeddings) -> None:
        """Store a CPU copy of ``embeddings`` under ``key``, evicting the least recently used entry if full."""
        self._entries[key] = embeddings.to("cpu").clone()
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def encode_for_guidance(
        self,
        encoder: PyramidTextEncoder,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = DEFAULT_NEGATIVE_PROMPT,
        *,
        add_suffix: bool = True,
        do_cfg: bool = True,
        placement: Callable[[], ContextManager[PyramidTextEncoder]] | None = None,
    ) -> TextEmbeddings:
        """``encoder.encode_for_guidance(...)`` through the cache; the result is on the CPU.

        ``placement``: a context manager factory that puts the encoder on its device (a memory plan's
        ``use("text_encoder")``); entered only on a cache miss, so a hit never moves the encoder.
        """
        key = self.key(encoder.identity, prompt, negative_prompt, add_suffix=add_suffix, do_cfg=do_cfg)
        cached = self.lookup(key)
        if cached is not None:
            return cached
        with placement() if placement is not None else contextlib.nullcontext(encoder) as active:
            embeddings = active.encode_for_guidance(prompt, negative_prompt, add_suffix=add_suffix, do_cfg=do_cfg)
        self.store(key, embeddings)
        return embeddings.to("cpu")

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def clear(self) -> None:
        self._entries.clear()
