"""Random-weight Pyramid Flow components for the memory benchmarks (no downloads).

`build_components(size)` returns a text encoder (CLIP-L + T5 through the real `PyramidTextEncoder`, with a
hashing tokenizer), a miniFLUX DiT and the causal VAE, all on the host. size="full" uses the real shapes
(T5-XXL, the 8 + 16 block miniFLUX, the official VAE) built on the meta device and filled tensor by
tensor; size="small" uses a few-MB version of each for CPU runs, size="tiny" a smaller one still.
"""
from __future__ import annotations

import zlib
from types import SimpleNamespace

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from pyramid_core.models.flux import PyramidFluxTransformer
from pyramid_core.models.vae import CausalVideoVAE
from pyramid_core.text import PyramidTextEncoder

FULL = dict(
    clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408),
    t5=dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128),
    dit=dict(),  # the official miniFLUX config is the constructor default
    vae=dict(),
)
SMALL = dict(
    clip=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=77, vocab_size=1000),
    t5=dict(d_model=128, d_ff=256, d_kv=32, num_heads=4, num_layers=4, vocab_size=1000),
    dit=dict(num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=6),
    vae=dict(encoder_block_out_channels=(16, 16, 32, 32), decoder_block_out_channels=(16, 16, 32, 32),
             encoder_norm_num_groups=8, decoder_norm_num_groups=8),
)

TINY = dict(  # the fastest models that still run every code path (gpu_check.py's CPU self-check)
    clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              max_position_embeddings=77, vocab_size=1000),
    t5=dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2, vocab_size=1000),
    dit=dict(num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
             axes_dims_rope=(8, 12, 12)),
    vae=dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
             encoder_norm_num_groups=4, decoder_norm_num_groups=4),
)
SPECS = {"full": FULL, "small": SMALL, "tiny": TINY}


class HashTokenizer:
    """Deterministic word-hash token ids in the shape the real CLIP / T5 tokenizers return."""

    def __init__(self, vocab_size: int, model_max_length: int):
        self.vocab_size = vocab_size
        self.model_max_length = model_max_length

    def __call__(self, prompts, padding="max_length", max_length=None, truncation=True, return_tensors="pt",
                 add_special_tokens=True):
        length = max_length or self.model_max_length
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = [1 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in prompt.split()][: length - 1]
            words.append(self.vocab_size - 1)  # an end token, the largest id (CLIP pools at the argmax)
            ids[row, : len(words)] = torch.tensor(words)
            mask[row, : len(words)] = 1
        return SimpleNamespace(input_ids=ids, attention_mask=mask)


def fill_random(module: nn.Module, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Materialise a meta-device module on the host with random weights (drawn on CUDA when there is one).

    Matrices ~ N(0, 1/fan_in), norm weights 1, other vectors 0; `position_ids` buffers get their arange.
    """
    module.to(dtype).to_empty(device="cpu")  # cast on meta first: no full-precision host copy
    draw = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(draw).manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            if tensor.ndim >= 2:
                fan_in = tensor[0].numel()
                values = torch.randn(tensor.shape, generator=generator, device=draw, dtype=torch.float32)
                tensor.copy_(values.mul_(fan_in ** -0.5).to(dtype))
            else:
                tensor.fill_(1.0 if "norm" in name else 0.0)
        for name, buffer in module.named_buffers():
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
            else:
                buffer.zero_()
    return module.eval()


def build_components(size: str = "small", dtype: torch.dtype = torch.bfloat16):
    """(text_encoder, dit, vae) with random weights on the host; size "full", "small" or "tiny"."""
    spec = SPECS.get(size, SMALL)
    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(**spec["clip"]))
        t5 = T5EncoderModel(T5Config(feed_forward_proj="gated-gelu", **spec["t5"]))
        dit_kwargs = dict(spec["dit"])
        if size != "full":
            dit_kwargs.setdefault("joint_attention_dim", spec["t5"]["d_model"])
            dit_kwargs.setdefault("pooled_projection_dim", spec["clip"]["hidden_size"])
        dit = PyramidFluxTransformer(**dit_kwargs)
        vae = CausalVideoVAE(**spec["vae"])
    clip, t5 = fill_random(clip, dtype, 1), fill_random(t5, dtype, 2)
    text = PyramidTextEncoder(
        "flux", [HashTokenizer(spec["clip"]["vocab_size"], 77)], [clip],
        HashTokenizer(spec["t5"]["vocab_size"], 128), t5, identity=f"bench-{size}",
    )
    return text, fill_random(dit, dtype, 3), fill_random(vae, dtype, 4)
