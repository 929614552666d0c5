"""CPU forward time of a real-width miniFLUX block stack on file-mapped weights vs the loader's aligned copies.

Writes a random fp32 miniFLUX DiT (1920 wide: 30 heads x 64, a few double + single blocks) to a temporary
safetensors folder, then builds the same model twice:

* mapped: every tensor is a view into safetensors' memory mapping of the file (what the loader used to hand
  out when no cast was needed; those views start at arbitrary addresses, mostly not 64-byte aligned);
* aligned: `pyramid_core.loading.load_dit`, every tensor in its own 64-byte aligned allocation.

Both run the same DiT forward (CFG batch 2, 128 text tokens) side by side, alternating, and the script prints
the median seconds of each, the ratio, and the largest difference between their outputs (GEMM kernels may
sum in a different order on unaligned weights; where they do, the mapped run is not bit-identical to the
aligned one).

    python bench/cpu_alignment.py [--blocks 1 2] [--tokens 240 960] [--repeats 5] [--dtype fp32]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pyramid_core.loading import load_dit  # noqa: E402
from pyramid_core.models.flux import PyramidFluxTransformer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LATENT_CHANNELS = 16  # miniFLUX packs 2x2 patches of 16 channels into its 64 inputs
TEXT_TOKENS = 128


def write_checkpoint(folder: Path, double: int, single: int, heads: int, dtype: torch.dtype) -> dict:
    """A random DiT variant folder (config.json + safetensors); returns the constructor config."""
    from safetensors.torch import save_file

    config = dict(num_layers=double, num_single_layers=single, num_attention_heads=heads, attention_head_dim=64)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in PyramidFluxTransformer(**config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=gen) / max(1, s[-1]) ** 0.5).to(dtype) for k, s in shapes.items()}
    variant = folder / "diffusion_transformer_384p"
    variant.mkdir(parents=True)
    save_file(tensors, str(variant / "diffusion_pytorch_model.safetensors"))
    official = {"_class_name": "PyramidFluxTransformer", "in_channels": 64, "joint_attention_dim": 4096,
                "pooled_projection_dim": 768, "patch_size": 1, "axes_dims_rope": [16, 24, 24], **config}
    (variant / "config.json").write_text(json.dumps(official))
    return config


def mapped_model(folder: Path, config: dict) -> tuple[PyramidFluxTransformer, object]:
    """The DiT with every tensor a view of safetensors' file mapping (the handle keeps the mapping alive)."""
    from safetensors import safe_open

    handle = safe_open(str(folder / "diffusion_transformer_384p" / "diffusion_pytorch_model.safetensors"), "pt")
    with torch.device("meta"):
        model = PyramidFluxTransformer(**config)
    model.load_state_dict({k: handle.get_tensor(k) for k in handle.keys()}, strict=True, assign=True)
    return model.requires_grad_(False).eval(), handle


def misaligned_share(model: torch.nn.Module) -> str:
    tensors = list(model.state_dict().values())
    return f"{sum(t.data_ptr() % 64 != 0 for t in tensors)}/{len(tensors)} tensors not 64-byte aligned"


def make_inputs(tokens: int, dtype: torch.dtype) -> tuple:
    """One current clip of `tokens` video tokens (latent h x w with h*w/4 = tokens), CFG batch 2."""
    height = 2 * max(1, round((tokens * 3 / 5) ** 0.5))  # 384p aspect (3:5)
    width = 4 * tokens // height
    gen = torch.Generator().manual_seed(1)
    clip = torch.randn(2, LATENT_CHANNELS, 1, height, width, generator=gen).to(dtype)
    text = torch.randn(2, TEXT_TOKENS, 4096, generator=gen).to(dtype)
    mask = torch.ones(2, TEXT_TOKENS, dtype=torch.long)
    pooled = torch.randn(2, 768, generator=gen).to(dtype)
    return [clip], torch.tensor([700.0, 700.0]), text, mask, pooled


def time_forward(model, inputs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model(*inputs)
    return time.perf_counter() - start, out


def compare(models: dict, inputs, repeats: int) -> dict[str, list[float]]:
    """Alternate the models call by call, swapping which goes first each round (after one warm-up each), so
    drifts and cache effects hit both alike."""
    for model in models.values():
        time_forward(model, inputs)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    for _ in range(repeats):
        for name in order:
            seconds[name].append(time_forward(models[name], inputs)[0])
        order.reverse()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs=2, default=(1, 2), metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--heads", type=int, default=30, help="30 x 64 = 1920 wide, the real width")
    parser.add_argument("--tokens", type=int, nargs="+", default=(240,),
                        help="video tokens of the current clip (240: stage 1 of 384p; 960: stage 2)")
    parser.add_argument("--repeats", type=int, default=6, help="timed calls per model (even: each goes first as often)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        config = write_checkpoint(Path(tmp), *args.blocks, args.heads, dtype)
        mapped, handle = mapped_model(Path(tmp), config)
        aligned = load_dit(tmp, "384p", dtype=None).model
        print(f"miniFLUX {args.blocks[0]} double + {args.blocks[1]} single blocks, width {args.heads * 64}, "
              f"{args.dtype}, CFG batch 2, {TEXT_TOKENS} text tokens, torch threads {torch.get_num_threads()}, "
              f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
        print(f"mapped:  {misaligned_share(mapped)}")
        print(f"aligned: {misaligned_share(aligned)}")
        print("| video tokens | mapped s | aligned s | mapped / aligned | max |mapped - aligned| |")
        print("|---|---|---|---|---|")
        for tokens in args.tokens:
            inputs = make_inputs(tokens, dtype)
            seconds = compare({"mapped": mapped, "aligned": aligned}, inputs, args.repeats)
            m, a = statistics.median(seconds["mapped"]), statistics.median(seconds["aligned"])
            diff = (time_forward(mapped, inputs)[1].float() - time_forward(aligned, inputs)[1].float()).abs().max()
            print(f"| {tokens} | {m:.3f} | {a:.3f} | {m / a:.3f} | {diff.item():.3g} |")
        del mapped, handle


if __name__ == "__main__":
    main()
