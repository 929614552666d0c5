"""One miniFLUX DiT forward at real token counts: the current blocks against the previous (unfused) path.

Real width (30 heads x 64 = 1920), 1 double-stream + 2 single-stream blocks (`--double`, `--single`), random
weights, CFG batch 2 with 128 text tokens padded differently per sample, the clips of one pyramid step (default:
384p, unit 3, stage 2 = 2220 video + 128 text tokens). Three variants on the same weights and inputs:

* reference: the previous path, kept here only (op-by-op q/k RMSNorm, RoPE split into pairs, stacked and
  concatenated, q/k/v concatenated, RoPE tables rebuilt every forward, last block over every token);
* no pruning: the current blocks with the last block computing every token;
* current: the library as it is (fused small ops, cached RoPE tables, last block on the current clip only).

Prints the best of `--repeat` runs of each (interleaved; wall time and the process's CPU time, the steadier figure
on a shared host), ratios vs the reference, the largest difference from the reference,
then the small ops alone at the same token count (best of 5): q/k RMSNorm, RoPE with the joint q/k assembly
of one single-stream block, and the RoPE tables (built vs cached).

    python bench/dit_forward.py [--res 384p|768p] [--unit 3] [--stage 2] [--repeat 2] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _models
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _models import fill_random  # noqa: E402
from pyramid_core.models.attention import HostTextMask, joint_attention  # noqa: E402
from pyramid_core.models.double_stream import DoubleStreamAttention  # noqa: E402
from pyramid_core.models.flux import FluxSingleAttention, PyramidFluxTransformer, patchify  # noqa: E402
from pyramid_core.models.layers import (  # noqa: E402
    RMSNorm,
    apply_rope_,
    clip_positions,
    host_to_device,
    rope_cos_sin,
)
from pyramid_core.sampling import clean_pyramid, history_for_stage  # noqa: E402

LATENT = {"384p": (48, 80), "768p": (96, 160)}  # latent (h, w) of 640x384 and 1280x768 video


# ----------------------------------------------------------------------------- the previous path (reference)


def _reference_rms_norm(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    input_dtype = x.dtype
    variance = x.float().pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + self.eps)
    weight = self.weight
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    elif weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    x = x * weight
    return x.to(input_dtype) if self.cast_to_input else x


def _reference_heads(x, to_q, to_k, to_v, norm_q, norm_k, heads):
    shape = (x.shape[0], x.shape[1], heads, -1)
    q, k, v = norm_q(to_q(x).view(shape)), norm_k(to_k(x).view(shape)), to_v(x).view(shape)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


def _reference_double_attention(self, *, x, context, rope, spec, keep_last=None):
    q, k, v = _reference_heads(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k, self.heads)
    cq, ck, cv = _reference_heads(context, self.add_q_proj, self.add_k_proj, self.add_v_proj, *self.context_norms(),
                                  self.heads)
    q, k = _reference_rope(q, *rope), _reference_rope(k, *rope)
    out = joint_attention(torch.cat([cq, q], 2), torch.cat([ck, k], 2), torch.cat([cv, v], 2), spec)
    out = out.transpose(1, 2).flatten(2)
    text_len = context.shape[1]
    context_out = None if self.context_pre_only else self.to_add_out(out[:, :text_len])
    return self.to_out[0](out[:, text_len:]), context_out


def _reference_single_attention(self, *, x, rope, spec, keep_last=None):
    q, k, v = _reference_heads(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k, self.heads)
    text_len = spec.layout.text_len
    q = torch.cat([q[:, :, :text_len], _reference_rope(q[:, :, text_len:], *rope)], dim=2)
    k = torch.cat([k[:, :, :text_len], _reference_rope(k[:, :, text_len:], *rope)], dim=2)
    return joint_attention(q, k, v, spec).transpose(1, 2).flatten(2)


def _reference_transform(self, *, clips, context, temb, spec):
    x = self.x_embedder(torch.cat([patchify(clip) for clip in clips], dim=1).to(spec.residual_dtype))
    positions, _ = clip_positions(clips, 2, "thw")  # tables rebuilt on every forward
    cos, sin = rope_cos_sin(positions, self.axes_dims_rope)
    rope = tuple(host_to_device(torch.stack([cos, sin]), clips[-1].device).unbind(0))
    for block in self.transformer_blocks:
        context, x = block(x=x, context=context, temb=temb, rope=rope, spec=spec)
    joint = torch.cat([context, x], dim=1)
    for block in self.single_transformer_blocks:
        joint = block(x=joint, temb=temb, rope=rope, spec=spec)
    return joint


def _unpruned_transform(self, *, clips, context, temb, spec):
    x = self.x_embedder(torch.cat([patchify(clip) for clip in clips], dim=1).to(spec.residual_dtype))
    rope = self.rotary_tables(clips, "thw", self.axes_dims_rope)
    for block in self.transformer_blocks:
        context, x = block(x=x, context=context, temb=temb, rope=rope, spec=spec)
    joint = torch.cat([context, x], dim=1)
    for block in self.single_transformer_blocks:
        joint = block(x=joint, temb=temb, rope=rope, spec=spec)
    return joint


def reference_path() -> contextlib.ExitStack:
    """The previous forward, patched in for the duration of a `with` block."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(RMSNorm, "forward", _reference_rms_norm))
    stack.enter_context(mock.patch.object(DoubleStreamAttention, "forward", _reference_double_attention))
    stack.enter_context(mock.patch.object(FluxSingleAttention, "forward", _reference_single_attention))
    stack.enter_context(mock.patch.object(PyramidFluxTransformer, "transform", _reference_transform))
    return stack


VARIANTS = {
    "reference": reference_path,
    "no pruning": lambda: mock.patch.object(PyramidFluxTransformer, "transform", _unpruned_transform),
    "current": contextlib.nullcontext,
}


# ----------------------------------------------------------------------------- inputs and timing


def step_inputs(res: str, unit: int, stage: int, device: torch.device, dtype: torch.dtype):
    """DiT arguments of one CFG step at (unit, stage): the history clips as the sampler builds them, plus x."""
    h, w = LATENT[res]
    gen = torch.Generator().manual_seed(0)
    size = (h >> (2 - stage), w >> (2 - stage))
    history = history_for_stage(clean_pyramid(torch.randn(2, 16, unit, h, w, generator=gen)), stage) if unit else []
    clips = [c.to(device, dtype) for c in history] + [torch.randn(2, 16, 1, *size, generator=gen).to(device, dtype)]
    mask = torch.zeros(2, 128, dtype=torch.bool)
    mask[0, :60], mask[1, :23] = True, True  # negative and positive prompts of different lengths
    embeds = torch.randn(2, 128, 4096, generator=gen).to(device, dtype)
    pooled = torch.randn(2, 768, generator=gen).to(device, dtype)
    return clips, torch.full((2,), 500.0, dtype=dtype, device=device), embeds, HostTextMask(mask), pooled


def timed_cpu(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds over all threads) of fn(); CPU time is steadier on a shared host."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", choices=tuple(LATENT), default="384p")
    parser.add_argument("--unit", type=int, default=3)
    parser.add_argument("--stage", type=int, default=2, choices=(0, 1, 2))
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each variant (best is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16

    with torch.device("meta"):
        dit = PyramidFluxTransformer(num_layers=args.double, num_single_layers=args.single)
    dit = fill_random(dit, dtype, seed=3).to(device)
    inputs = step_inputs(args.res, args.unit, args.stage, device, dtype)
    clips = inputs[0]
    tokens = 128 + sum(c.shape[2] * (c.shape[3] // 2) * (c.shape[4] // 2) for c in clips)
    print(f"{args.res} unit {args.unit} stage {args.stage}: {len(clips)} clips, {tokens} tokens (128 text), "
          f"batch 2, width 1920, {args.double} double + {args.single} single blocks, {args.dtype} on {device}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")

    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, variant in VARIANTS.items():  # warm-up (allocator, kernels, the RoPE cache)
            with variant():
                outputs[name] = dit(*inputs).float()
        for _ in range(args.repeat):
            for name, variant in VARIANTS.items():
                with variant():
                    elapsed, cpu = timed_cpu(lambda: dit(*inputs), device)
                seconds[name].append(elapsed)
                cpu_seconds[name].append(cpu)

        parts = small_ops(dit, clips, device, dtype)

    best = {name: min(runs) for name, runs in seconds.items()}
    best_cpu = {name: min(runs) for name, runs in cpu_seconds.items()}
    for name in VARIANTS:
        print(f"{name:11s} wall {best[name]:8.3f} s (x{best['reference'] / best[name]:.2f})   "
              f"CPU {best_cpu[name]:8.3f} s (x{best_cpu['reference'] / best_cpu[name]:.2f})   runs (wall/CPU) "
              + " ".join(f"{w:.2f}/{c:.2f}" for w, c in zip(seconds[name], cpu_seconds[name])))
    scale = outputs["reference"].abs().max().item()
    diffs = {name: (out - outputs["reference"]).abs().max().item() for name, out in outputs.items()}
    print("max |difference| from the reference: "
          + ", ".join(f"{name} {d:.2e} ({d / scale:.1e} of max|out|)" for name, d in diffs.items() if name != "reference"))
    for name, (before, after) in parts.items():
        print(f"{name:34s} reference {before:8.2f} ms   current {after:8.2f} ms   (x{before / after:.2f})")
    print(f"load {os.getloadavg()[0]:.2f}")
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "best": best, "best_cpu": best_cpu, "diffs": diffs,
            "tokens": tokens, "parts_ms": parts}


def small_ops(dit: PyramidFluxTransformer, clips: list[torch.Tensor], device: torch.device, dtype: torch.dtype,
              runs: int = 5) -> dict[str, tuple[float, float]]:
    """Best-of-`runs` milliseconds (reference, current) of the small ops of one single-stream block."""
    block = dit.single_transformer_blocks[0].attn
    text = 128
    video = sum(c.shape[2] * (c.shape[3] // 2) * (c.shape[4] // 2) for c in clips)
    gen = torch.Generator().manual_seed(1)
    heads = torch.randn(2, text + video, 30, 64, generator=gen).to(device, dtype)  # a projection's output, [B, L, H, D]
    positions, _ = clip_positions(clips, 2, "thw")
    cos, sin = (t.to(device) for t in rope_cos_sin(positions, dit.axes_dims_rope))
    tables = dit.rotary_tables(clips, "thw", dit.axes_dims_rope)

    def reference_rope():
        q = heads.transpose(1, 2)
        return torch.cat([q[:, :, :text], _reference_rope(q[:, :, text:], cos, sin)], dim=2)

    def current_rope(q):
        return apply_rope_(q[:, text:], tables)

    def from_scratch():
        dit.clear_rope_cache()
        return dit.rotary_tables(clips, "thw", dit.axes_dims_rope)

    cases = {
        "q/k RMSNorm (one tensor)": (lambda: _reference_rms_norm(block.norm_q, heads), lambda: block.norm_q(heads), None),
        "RoPE + joint q/k (one tensor)": (reference_rope, current_rope, lambda: heads.clone()),
        "RoPE tables per forward": (from_scratch, lambda: dit.rotary_tables(clips, "thw", dit.axes_dims_rope), None),
    }
    results = {}
    for name, (before, after, fresh) in cases.items():
        best = []
        for fn, needs_input in ((before, False), (after, fresh is not None)):
            times = []
            for _ in range(runs):
                arg = fresh() if needs_input else None  # the in-place op gets a fresh tensor, untimed
                elapsed, _ = timed_cpu((lambda fn=fn, arg=arg: fn(arg)) if needs_input else fn, device)
                times.append(elapsed)
            best.append(min(times) * 1e3)
        results[name] = tuple(best)
    return results


if __name__ == "__main__":
    main()
