"""Fused frame-causal attention vs the official dense-mask attention, at real token counts.

Builds the joint sequence of one miniFLUX attention call (30 heads x 64, CFG batch 2, 128 text tokens with
different padding per sample) for a chosen resolution / unit / stage, runs both paths on random q/k/v and
prints seconds, the dense mask's size, and the largest difference between the two on real tokens.

    python bench/attention.py [--res 384p|768p] [--unit 15] [--stage 2] [--device cpu|cuda] [--dtype fp32|bf16]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pyramid_core.models.attention import TokenLayout, masked_attention, segmented_attention  # noqa: E402

GRIDS = {"384p": (24, 40), "768p": (48, 80)}  # full-resolution latent token grid per frame (h/2, w/2)


def frame_sizes(res: str, unit: int, stage: int) -> list[int]:
    """Tokens per frame of the history + current clip at (unit, stage), oldest first (FACTS 2.4)."""
    h, w = GRIDS[res]
    per_stage = [(h // 4) * (w // 4), (h // 2) * (w // 2), h * w]
    if unit == 0:
        return [per_stage[stage]]
    levels = [stage]  # newest history frame at the stage's resolution, then one stage lower per frame (>= 1)
    level = stage
    while len(levels) < unit and level > 1:
        level -= 1
        levels.append(level)
    levels += [0] * (unit - len(levels))
    return [per_stage[s] for s in reversed(levels)] + [per_stage[stage]]


def timed(fn, device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", choices=tuple(GRIDS), default="384p")
    parser.add_argument("--unit", type=int, default=15)
    parser.add_argument("--stage", type=int, default=2, choices=(0, 1, 2))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16

    sizes = frame_sizes(args.res, args.unit, args.stage)
    frame_ids = torch.cat([torch.full((n,), f) for f, n in enumerate(sizes)])
    text_mask = torch.zeros(2, 128, dtype=torch.bool)
    text_mask[0, :60], text_mask[1, :23] = True, True  # negative and positive prompts of different lengths
    layout = TokenLayout(text_mask.to(device), frame_ids.to(device))
    length = 128 + len(frame_ids)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 30, length, 64, generator=gen).to(device, dtype) for _ in range(3))

    fused = segmented_attention(q, k, v, layout)
    dense = masked_attention(q, k, v, layout)
    real = torch.cat([text_mask, torch.ones(2, len(frame_ids), dtype=torch.bool)], 1).to(device)
    diff = (fused - dense).abs().amax(dim=(1, 3))[real].max().item()
    t_fused = timed(lambda: segmented_attention(q, k, v, layout), device)
    t_dense = timed(lambda: masked_attention(q, k, v, layout), device)
    print(f"{args.res} unit {args.unit} stage {args.stage}: {len(sizes)} frames, {length} tokens, {args.dtype} on {device}")
    print(f"dense mask [2,1,L,L] bool:      {2 * length * length / 2**20:8.1f} MiB (built on every attention call)")
    print(f"official dense-mask attention:  {t_dense * 1e3:8.1f} ms")
    print(f"fused frame-causal attention:   {t_fused * 1e3:8.1f} ms   ({t_dense / t_fused:.2f}x)")
    print(f"max |difference| on real tokens: {diff:.2e}")


if __name__ == "__main__":
    main()
