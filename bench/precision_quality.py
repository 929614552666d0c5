"""Quality of the DiT precisions (bf16, fp16, fp8 storage) against fp32, on real-shape random-weight models.

    python bench/precision_quality.py                   # miniFLUX + MMDiT real shapes, then the tiny e2e runs
    python bench/precision_quality.py --families flux --no-e2e --markdown /tmp/table.md

Real-shape part: the released configs (miniFLUX 8+16 blocks, D=1920; MMDiT 24 blocks, D=1536) with random
weights (matrices N(0, 1/fan_in), norm weights 1 + 0.1 N, biases 0.05 N), one forward at 384p stage 0
(history clip + current clip [2, 16, 1, 12, 20], 128 text tokens, CFG batch 2). Blocks are built one at a
time from a per-tensor seed, so every variant sees identical weights and peak RAM stays ~2 GB.
Tiny e2e part: the official tiny fixture models through the whole pipeline (text encoders, DiT, VAE) in each
dtype, latents compared with the official fp32 run. `--cost` times one real-size block pair per precision
(CPU best-of-3; relative cost only, GPUs differ).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyramid_core.models.flux import PyramidFluxTransformer  # noqa: E402
from pyramid_core.models.mmdit import PyramidMMDiT, sincos_table_2d  # noqa: E402
from pyramid_core.precision import apply_fp8_storage, configure_dit_precision, wrap_fp8_checkpoint  # noqa: E402

REAL_CONFIGS = {  # config.json of the released checkpoints + the official loader arguments (FACTS 1.4)
    "flux": (PyramidFluxTransformer, dict(
        attention_head_dim=64, axes_dims_rope=[16, 24, 24], in_channels=64, joint_attention_dim=4096,
        num_attention_heads=30, num_layers=8, num_single_layers=16, patch_size=1, pooled_projection_dim=768,
    )),
    "mmdit": (PyramidMMDiT, dict(
        attention_head_dim=64, caption_projection_dim=1536, in_channels=16, joint_attention_dim=4096,
        num_attention_heads=24, num_layers=24, patch_size=2, pooled_projection_dim=2048, pos_embed_max_size=192,
        sample_size=128,
    )),
}
POOLED = {"flux": 768, "mmdit": 2048}
MODULATION = ("norm1.linear", "norm1_context.linear", "norm.linear")  # adaLN linears, block-relative names


@dataclass(frozen=True)
class Variant:
    name: str
    compute: torch.dtype
    residual: torch.dtype | None = None  # None = automatic (fp32 under fp16)
    fp8: str | None = None  # 'row' | 'tensor' | 'cast' (every tensor cast to fp8, unit scale: a Kijai-style file)
    keep_modulation: bool = False


VARIANTS = [
    Variant("fp32", torch.float32),
    Variant("bf16 (official flow)", torch.bfloat16),
    Variant("fp16 official flow (fp16 residual)", torch.float16, residual=torch.float16),
    Variant("fp16 ours (fp32 residual)", torch.float16),
    Variant("fp8-row, bf16 compute", torch.bfloat16, fp8="row"),
    Variant("fp8-tensor, bf16 compute", torch.bfloat16, fp8="tensor"),
    Variant("fp8-row, adaLN kept bf16", torch.bfloat16, fp8="row", keep_modulation=True),
    Variant("fp8-row, fp16 compute", torch.float16, fp8="row"),
    Variant("fp8 plain cast, unit scale (Kijai-style file)", torch.bfloat16, fp8="cast"),
]


def init_random(module: nn.Module, prefix: str) -> None:
    """Fill a (materialised) module in place, seeded per tensor name: identical values for every variant."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            full = f"{prefix}{name}"
            gen = torch.Generator().manual_seed(zlib.crc32(full.encode()))
            if param.dim() >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
            elif "norm" in full.rsplit(".", 2)[-2] and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))


class LazyBlock(nn.Module):
    """Stands in for transformer block `index`: builds it (fp32, seeded), converts it, runs it, frees it."""

    def __init__(self, template: nn.Module, prefix: str, variant: Variant, timer: dict):
        super().__init__()
        self._template = [template]  # a list: not registered as a submodule (no parameters here)
        self.prefix, self.variant, self.timer = prefix, variant, timer

    def forward(self, **kwargs):
        block = copy.deepcopy(self._template[0]).to_empty(device="cpu")
        init_random(block, self.prefix)
        v = self.variant
        if v.fp8 == "cast":
            wrap_fp8_checkpoint(block.to(torch.float8_e4m3fn), v.compute)
        elif v.fp8:
            keep = MODULATION if v.keep_modulation else ()
            apply_fp8_storage(block, v.fp8, keep=keep, compute_dtype=v.compute)
        else:
            block.to(v.compute)
        start = time.perf_counter()
        with torch.no_grad():
            out = block(**kwargs)
        self.timer["s"] += time.perf_counter() - start
        peak = max(t.abs().max().item() for t in (out if isinstance(out, tuple) else (out,)) if t is not None)
        self.timer["residual_peak"] = max(self.timer["residual_peak"], peak)
        return out


def build_lazy_model(family: str, variant: Variant, timer: dict) -> nn.Module:
    cls, config = REAL_CONFIGS[family]
    with torch.device("meta"):
        model = cls(**config)
    lists = ["transformer_blocks", "single_transformer_blocks"] if family == "flux" else ["transformer_blocks"]
    for list_name in lists:
        blocks = getattr(model, list_name)
        for i, block in enumerate(blocks):
            blocks[i] = LazyBlock(block, f"{list_name}.{i}.", variant, timer)
    model.to_empty(device="cpu")
    init_random(model, "")
    if family == "mmdit":  # the position table is a constructor-computed buffer, not random
        model.pos_embed.pos_embed = sincos_table_2d(1536, 192, 64)
    if variant.fp8 == "cast":
        model.to(torch.float8_e4m3fn)  # what save_single_file(..., dtype=float8_e4m3fn) stores
    fp8 = None if variant.fp8 == "cast" else variant.fp8
    configure_dit_precision(model, variant.compute, fp8=fp8, residual_dtype=variant.residual)
    return model.eval()


def real_inputs(family: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    clip = lambda: torch.randn(2, 16, 1, 12, 20, generator=gen)  # noqa: E731 - 640x384, stage 0
    mask = torch.zeros(2, 128, dtype=torch.long)
    mask[0, :21], mask[1, :34] = 1, 1  # negative / positive prompt lengths
    return dict(
        clips=[clip(), clip()],  # previous frame (history) + current noisy frame
        timestep=torch.full((2,), 900.0),
        text=torch.randn(2, 128, 4096, generator=gen) * 0.2,
        mask=mask,
        pooled=torch.randn(2, POOLED[family], generator=gen),
    )


def run_variant(family: str, variant: Variant) -> tuple[torch.Tensor, float, float]:
    timer = {"s": 0.0, "residual_peak": 0.0}
    model = build_lazy_model(family, variant, timer)
    x = real_inputs(family)
    dt = variant.compute
    with torch.no_grad():
        out = model([c.to(dt) for c in x["clips"]], x["timestep"], x["text"].to(dt), x["mask"], x["pooled"].to(dt))
    return out.float(), timer["s"], timer["residual_peak"]


_ONLY: list[str] = []


def selected(variant: Variant) -> bool:
    """fp32 and bf16 are the references; the rest run unless --only filters them out."""
    return variant.name.startswith(("fp32", "bf16")) or not _ONLY or any(t in variant.name for t in _ONLY)


def errors(out: torch.Tensor, ref: torch.Tensor) -> str:
    if not torch.isfinite(out).all():
        return f"non-finite ({(~torch.isfinite(out)).float().mean().item():.0%})"
    diff = (out - ref).abs()
    return f"{diff.max().item():.3g} / {diff.mean().item():.3g}"


def real_shape_table(family: str) -> list[str]:
    results = {}
    for variant in VARIANTS:
        if not selected(variant):
            continue
        out, seconds, peak = run_variant(family, variant)
        results[variant.name] = (out, seconds, peak)
        print(f"  {family} {variant.name}: {seconds:.1f} s, residual peak {peak:.3g}", flush=True)
    ref, bf16 = results["fp32"][0], results["bf16 (official flow)"][0]
    rows = ["| variant | max / mean abs err vs fp32 | max / mean abs err vs bf16 |", "|---|---|---|"]
    for name, (out, _, _) in results.items():
        rows.append(f"| {name} | {errors(out, ref)} | {errors(out, bf16)} |")
    rows.append(f"\nmax |output| (fp32) = {ref.abs().max().item():.3g}, mean |output| = {ref.abs().mean().item():.3g}; "
                f"fp32 residual-stream peak = {results['fp32'][2]:.3g}")
    return rows


def e2e_table() -> list[str]:
    from pyramid_core.pipeline import PyramidFlowPipeline
    from tests.reference import model_dir, tensors

    rows = ["| model | variant | latents max / mean abs err vs official fp32 | vs our bf16 "
            "| frames max / mean abs diff (uint8) |", "|---|---|---|---|---|"]
    for model in ("miniflux_tiny", "sd3_tiny"):
        expected = tensors(f"{model}/e2e/t2v")
        outs = {}
        for variant in VARIANTS:
            if variant.residual is not None or variant.keep_modulation or not selected(variant):
                continue
            pipe = PyramidFlowPipeline.from_pretrained(model_dir(model), dtype=variant.compute, device="cpu")
            if variant.fp8 == "cast":
                pipe.dit.to(torch.float8_e4m3fn)
            configure_dit_precision(pipe.dit, variant.compute, fp8=None if variant.fp8 == "cast" else variant.fp8)
            latents = _official_t2v(pipe, "latent").float()
            frames = _official_t2v(pipe, "pt")
            outs[variant.name] = (latents, frames)
        bf16 = outs["bf16 (official flow)"][0]
        for name, (latents, frames) in outs.items():
            diff = (frames.int() - expected["frames"].int()).abs().float()
            rows.append(f"| {model} | {name} | {errors(latents, expected['latents'])} | {errors(latents, bf16)} | "
                        f"{diff.max().item():.0f} / {diff.mean().item():.3f} |")
    rows.append("\nmax |latent| (official fp32): miniflux "
                f"{tensors('miniflux_tiny/e2e/t2v')['latents'].abs().max().item():.3g}, sd3 "
                f"{tensors('sd3_tiny/e2e/t2v')['latents'].abs().max().item():.3g}")
    return rows


def cost_table(repeats: int = 3) -> list[str]:
    """Best-of-N time of one real-size miniFLUX double + single block per precision (same weights, same tokens).

    384p unit 1 stage 1: history + current clip of 240 tokens each, 128 text tokens, CFG batch 2.
    """
    from pyramid_core.models.attention import AttentionSpec, TokenLayout
    from pyramid_core.models.flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from pyramid_core.models.layers import clip_positions, rope_cos_sin

    gen = torch.Generator().manual_seed(1)
    clips = [torch.zeros(2, 16, 1, 24, 40), torch.zeros(2, 16, 1, 24, 40)]
    positions, frame_ids = clip_positions(clips, 2)
    rope = rope_cos_sin(positions, [16, 24, 24])
    mask = torch.zeros(2, 128, dtype=torch.bool)
    mask[0, :21], mask[1, :34] = True, True
    layout = TokenLayout(mask, frame_ids)
    x = torch.randn(2, frame_ids.numel(), 1920, generator=gen)
    context = torch.randn(2, 128, 1920, generator=gen)
    temb = torch.randn(2, 1920, generator=gen)
    base = [FluxTransformerBlock(1920, 30, 64), FluxSingleTransformerBlock(1920, 30, 64)]
    for i, block in enumerate(base):
        init_random(block, f"cost.{i}.")
    cases = {  # name: (weights, residual dtype, fp8)
        "bf16 (official flow)": (torch.bfloat16, torch.bfloat16, None),
        "fp16 official flow (fp16 residual)": (torch.float16, torch.float16, None),
        "fp16 ours (fp32 residual)": (torch.float16, torch.float32, None),
        "fp8-row, bf16 compute": (torch.bfloat16, torch.bfloat16, "row"),
    }
    blocks = {}
    for name, (dtype, _, fp8) in cases.items():
        converted = [copy.deepcopy(b) for b in base]
        for b in converted:
            if fp8:
                apply_fp8_storage(b, fp8, keep=(), compute_dtype=dtype)
            else:
                b.to(dtype)
        blocks[name] = converted
    best = {name: float("inf") for name in cases}
    with torch.no_grad():
        for _ in range(repeats):  # interleaved: machine load hits every variant alike
            for name, (dtype, residual, _) in cases.items():
                double, single = blocks[name]
                spec = AttentionSpec(layout, compute_dtype=dtype, residual_dtype=residual)
                start = time.perf_counter()
                c, h = double(x=x.to(residual), context=context.to(residual), temb=temb.to(residual), rope=rope,
                              spec=spec)
                single(x=torch.cat([c, h], 1), temb=temb.to(residual), rope=rope, spec=spec)
                best[name] = min(best[name], time.perf_counter() - start)
    rows = ["| variant | double + single block, best of %d (CPU) | vs bf16 |" % repeats, "|---|---|---|"]
    for name, seconds in best.items():
        rows.append(f"| {name} | {seconds * 1e3:.0f} ms | {seconds / best['bf16 (official flow)']:.2f}x |")
    return rows


def _official_t2v(pipe, output_type):
    torch.manual_seed(4321)
    return pipe.generate(
        prompt="a cat walking on the beach at sunset", height=64, width=64, temp=3, num_inference_steps=[2, 2, 2],
        video_num_inference_steps=[2, 2, 2], guidance_scale=7.0, video_guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(1234), output_type=output_type,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["flux", "mmdit"], choices=["flux", "mmdit"])
    parser.add_argument("--no-e2e", action="store_true", help="skip the tiny end-to-end runs")
    parser.add_argument("--cost", action="store_true", help="only time one real-size block pair per precision")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="run only variants whose name contains one of these (fp32 and bf16 always run)")
    args = parser.parse_args()
    _ONLY.extend(args.only or [])
    lines = [f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads"]
    if args.cost:
        lines += ["", "### Cost: one real-size miniFLUX double + single block, 384p unit 1 stage 1", ""]
        lines += cost_table()
        args.families, args.no_e2e = [], True
    for family in args.families:
        lines += ["", f"### Real-shape {family} DiT, one forward at 384p stage 0 (history + current clip)", ""]
        lines += real_shape_table(family)
    if not args.no_e2e:
        lines += ["", "### Tiny fixture models, whole t2v pipeline (64x64, temp 3, steps [2,2,2])", ""]
        lines += e2e_table()
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
