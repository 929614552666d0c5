"""Double of `comfy.sd.CLIP` as DualCLIPLoader (type flux) / TripleCLIPLoader (sd3) build it, backed by
the Hugging Face models of a fixture folder. Follows ComfyUI's token handling: CLIP in 77-token chunks
(start + 75 + end, padded), T5 padded to `t5xxl_min_length` (default 256) and never truncated, T5 run
without a mask unless `enable_attention_masks` is set; `projected_pooled` picks text_embeds."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from . import model_management
from .model_patcher import ModelPatcher


class _ClipTokenizer:
    def __init__(self, folder: Path, key: str, pad_with_end: bool):
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.key = key
        self.start, self.end = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self.pad = self.end if pad_with_end else 0

    def tokenize_with_weights(self, text, return_word_ids=False, tokenizer_options={}, **kwargs):
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        chunks = [ids[i:i + 75] for i in range(0, max(len(ids), 1), 75)]
        out = []
        for chunk in chunks:
            tokens = [self.start] + chunk + [self.end]
            out.append([(t, 1.0) for t in tokens + [self.pad] * (77 - len(tokens))])
        return out


class _T5Tokenizer:
    key = "t5xxl"

    def __init__(self, folder: Path):
        self.tokenizer = T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)

    def tokenize_with_weights(self, text, return_word_ids=False, tokenizer_options={}, **kwargs):
        min_length = tokenizer_options.get("t5xxl_min_length", 256)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids + [1]
        ids += [0] * max(0, min_length - len(ids))
        return [[(t, 1.0) for t in ids]]


class _Tokenizers:
    def __init__(self, parts):
        self.parts = parts

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {key: tok.tokenize_with_weights(text, return_word_ids, **kwargs) for key, tok in self.parts.items()}


class _ClipEncoder(nn.Module):
    def __init__(self, model: nn.Module, return_projected_pooled: bool):
        super().__init__()
        self.transformer = model
        self.options_default = return_projected_pooled
        self.reset_clip_options()

    def set_clip_options(self, options):
        self.return_projected_pooled = options.get("projected_pooled", self.return_projected_pooled)
        self.execution_device = options.get("execution_device", self.execution_device)

    def reset_clip_options(self):
        self.return_projected_pooled = self.options_default
        self.execution_device = None

    def encode_token_weights(self, token_weight_pairs):
        ids = torch.tensor([[t[0] for t in chunk] for chunk in token_weight_pairs])
        text_model = getattr(self.transformer, "text_model", self.transformer)  # the part before any projection
        out = text_model(ids.to(next(self.parameters()).device))
        pooled = out.pooler_output  # ComfyUI: unprojected unless projected_pooled (and the model has a projection)
        if self.return_projected_pooled and hasattr(self.transformer, "text_projection"):
            pooled = self.transformer.text_projection(pooled)
        hidden = out.last_hidden_state
        return hidden.reshape(1, -1, hidden.shape[-1]).float(), pooled[:1].float()


class _T5Encoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.transformer = model
        self.enable_attention_masks = False
        self.return_attention_masks = False
        self.execution_device = None

    def set_clip_options(self, options):
        self.execution_device = options.get("execution_device", self.execution_device)

    def reset_clip_options(self):
        self.execution_device = None

    def encode_token_weights(self, token_weight_pairs):
        ids = torch.tensor([[t[0] for t in chunk] for chunk in token_weight_pairs])
        mask = torch.zeros_like(ids)
        for row, chunk in enumerate(ids.tolist()):
            end = chunk.index(1) if 1 in chunk else len(chunk) - 1
            mask[row, : end + 1] = 1
        hidden = self.transformer(ids, attention_mask=mask if self.enable_attention_masks else None).last_hidden_state
        if self.return_attention_masks:
            return hidden.float(), None, {"attention_mask": mask.flatten().unsqueeze(0)}
        return hidden.float(), None


class _ClipModels(nn.Module):
    def __init__(self, **encoders):
        super().__init__()
        for name, encoder in encoders.items():
            setattr(self, name, encoder)

    def reset_clip_options(self):
        for child in self.children():
            child.reset_clip_options()

    def set_clip_options(self, options):
        for child in self.children():
            child.set_clip_options(options)


class CLIP:
    """`comfy.sd.CLIP` for a Pyramid Flow fixture folder: flux -> clip_l + t5xxl, sd3 -> clip_l + clip_g + t5xxl."""

    def __init__(self, folder: str | Path, kind: str = "flux"):
        folder = Path(folder)
        load = dict(local_files_only=True, dtype=torch.float32, attn_implementation="eager")
        if kind == "flux":
            tokenizers = {"l": _ClipTokenizer(folder / "tokenizer", "clip_l", True), "t5xxl": _T5Tokenizer(folder / "tokenizer_2")}
            encoders = dict(clip_l=_ClipEncoder(CLIPTextModel.from_pretrained(str(folder / "text_encoder"), **load), False),
                            t5xxl=_T5Encoder(T5EncoderModel.from_pretrained(str(folder / "text_encoder_2"), **load)))
        else:
            tokenizers = {"l": _ClipTokenizer(folder / "tokenizer", "clip_l", True),
                          "g": _ClipTokenizer(folder / "tokenizer_2", "clip_g", False),
                          "t5xxl": _T5Tokenizer(folder / "tokenizer_3")}
            encoders = dict(
                clip_l=_ClipEncoder(CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder"), **load), False),
                clip_g=_ClipEncoder(CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2"), **load), True),
                t5xxl=_T5Encoder(T5EncoderModel.from_pretrained(str(folder / "text_encoder_3"), **load)))
        self.tokenizer = _Tokenizers(tokenizers)
        self.cond_stage_model = _ClipModels(**encoders).eval().requires_grad_(False)
        self.patcher = ModelPatcher(self.cond_stage_model, model_management.text_encoder_device(),
                                    model_management.text_encoder_offload_device())
        self.tokenizer_options = {}

    def tokenize(self, text, return_word_ids=False, **kwargs):
        options = {**self.tokenizer_options, **kwargs.pop("tokenizer_options", {})}
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, tokenizer_options=options, **kwargs)

    def load_model(self, tokens={}):
        model_management.load_models_gpu([self.patcher])
        return self.patcher

    @torch.no_grad()
    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.cond_stage_model.reset_clip_options()
        self.load_model(tokens)
        t5 = self.cond_stage_model.t5xxl.encode_token_weights(tokens["t5xxl"])
        pooled = self.cond_stage_model.clip_l.encode_token_weights(tokens["l"])[1]
        if return_dict:
            out = {"cond": t5[0], "pooled_output": pooled}
            if len(t5) > 2:
                out.update(t5[2])
            return out
        return (t5[0], pooled) if return_pooled else t5[0]
