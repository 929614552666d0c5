"""One joint attention call at real token counts: every attention path side by side, time and peak memory.

Builds the joint sequence of one miniFLUX attention call (30 heads x 64, CFG batch 2, 128 text tokens padded
differently per prompt) at the last unit's stage 2 (history frames + current frame) for each resolution, runs
on random q/k/v:

  dense      the official formulation: SDPA with the dense [B,1,L,L] mask (mask built once, as per forward)
  seg-old    the segmented path as it was before issue 10 (a reference copy kept here only)
  segmented  the segmented path, one unmasked call per frame segment
  seg-runs   the same with runs of small history frames batched into one masked SDPA call (the CUDA default)
  flex       one FlexAttention call with the frame-causal block mask (compiled; eager materialises L x L
             scores, 7.6 GB at 384p on CPU; `--flex-eager` adds it)

and prints, per resolution, the median wall time of `--reps` calls after one warm-up (for flex a compile, its
time printed apart), the peak memory one call allocates above what was allocated before it (CUDA: the
allocator's peak; CPU: the profiler's allocation events; the output counts), the ratios to dense and to seg-old,
and the largest difference from dense on real tokens.

    python bench/attention.py [--res 384p,768p] [--unit 15] [--stage 2] [--device cpu|cuda] [--dtype fp32|bf16]
                              [--reps 3] [--only dense,segmented,...]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pyramid_core.models.attention import (  # noqa: E402
    AttentionFn,
    HostTextMask,
    TokenLayout,
    flex_joint_attention,
    masked_attention,
    sdpa,
    segmented_attention,
)

GRIDS = {"384p": (24, 40), "768p": (48, 80)}  # full-resolution latent token grid per frame (h/2, w/2)
TEXT_TOKENS, REAL_TEXT = 128, (60, 23)  # negative and positive prompts of different lengths
PATHS = ("dense", "seg-old", "segmented", "seg-runs", "flex")


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


def reference_segmented_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, attend: AttentionFn = sdpa
) -> torch.Tensor:
    """The segmented path before issue 10, verbatim (the reference of `tests/test_attention.py` too)."""

    def select(t: torch.Tensor, dim: int, index: slice | torch.Tensor) -> torch.Tensor:
        if isinstance(index, slice):
            return t.narrow(dim, index.start, index.stop - index.start)
        return t.index_select(dim, index)

    text_len = layout.text_len
    out = torch.empty_like(q)
    segments = layout.segments
    for group in layout.sample_groups:
        qb, kb, vb = (select(t, 0, group.rows) for t in (q, k, v))
        ob = out[group.rows] if isinstance(group.rows, slice) else torch.empty_like(qb)
        n_text = group.num_valid
        keys = torch.cat([select(kb, 2, group.valid), kb[:, :, text_len:]], dim=2)
        values = torch.cat([select(vb, 2, group.valid), vb[:, :, text_len:]], dim=2)
        for index, (start, end) in enumerate(segments):
            prefix = n_text + end
            video_q = qb[:, :, text_len + start : text_len + end]
            if index == 0:
                queries = torch.cat([select(qb, 2, group.valid), video_q], dim=2)
                result = attend(queries, keys[:, :, :prefix], values[:, :, :prefix])
                ob[:, :, group.valid] = result[:, :, :n_text]
                ob[:, :, text_len + start : text_len + end] = result[:, :, n_text:]
            else:
                result = attend(video_q, keys[:, :, :prefix], values[:, :, :prefix])
                ob[:, :, text_len + start : text_len + end] = result
        if group.num_padded:
            pq, pk, pv = (select(t, 2, group.padded) for t in (qb, kb, vb))
            ob[:, :, group.padded] = attend(pq, pk, pv)
        if not isinstance(group.rows, slice):
            out[group.rows] = ob
    return out


class PeakMemory:
    """Peak bytes allocated above the level at entry: the CUDA allocator's peak, or on CPU the running sum of
    the profiler's allocation events (every c10 allocation and free, compiled kernels' buffers included)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return
        self.profiler.__exit__(*exc)
        events = [e for e in self.profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            live += event.nbytes()
            self.peak = max(self.peak, live)


def measure(fn: Callable[[], torch.Tensor], device: torch.device, reps: int, compiled: bool = False) -> dict:
    """Median time over `reps` after a warm-up (a compile for `compiled`), peak memory of one call, its result.

    The peak is taken on the warm-up call (on one more call after it when the warm-up compiles), so the timed
    calls run without the profiler.
    """

    def call() -> torch.Tensor:
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    start = time.perf_counter()
    if compiled:
        call()
    with PeakMemory(device) as memory:
        out = call()
    warmup = time.perf_counter() - start
    times = []
    for _ in range(reps):
        del out
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return {"warmup": warmup, "time": statistics.median(times), "peak": memory.peak, "out": out}


def run_resolution(res: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    sizes = frame_sizes(res, args.unit, args.stage)
    text_mask = torch.zeros(2, TEXT_TOKENS, dtype=torch.bool)
    for row, n in enumerate(REAL_TEXT):
        text_mask[row, :n] = True
    layout = TokenLayout(HostTextMask(text_mask), frame_sizes=tuple(sizes), device=device)
    length = TEXT_TOKENS + sum(sizes)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(2, 30, length, 64, generator=gen, device=device, dtype=dtype) for _ in range(3))
    layout.dense_mask()  # built once per forward in the model: not part of one call
    paths = {
        "dense": lambda: masked_attention(q, k, v, layout),
        "seg-old": lambda: reference_segmented_attention(q, k, v, layout),
        "segmented": lambda: segmented_attention(q, k, v, layout, batch_tokens=0),
        "seg-runs": lambda: segmented_attention(q, k, v, layout, batch_tokens=1024),
        "flex": lambda: flex_joint_attention(q, k, v, layout, compiled=True),
    }
    if args.flex_eager:
        paths["flex-eager"] = lambda: flex_joint_attention(q, k, v, layout, compiled=False)
    wanted = [p for p in paths if p in args.only or (p == "flex-eager" and args.flex_eager)]
    mask_mib = layout.dense_mask().numel() / 2**20
    print(f"\n{res} unit {args.unit} stage {args.stage}: {len(sizes)} frames ({sizes[0]} .. {sizes[-1]} tokens), "
          f"{length} tokens, {args.dtype} on {device}; dense bool mask {mask_mib:.0f} MiB (per forward, not counted)")
    print(f"{'path':<11}{'time ms':>10}{'vs dense':>10}{'vs seg-old':>11}{'peak MiB':>10}{'max|diff| vs dense':>20}"
          f"{'warm-up s':>11}")
    results = {}
    real = torch.cat([text_mask, torch.ones(2, sum(sizes), dtype=torch.bool)], 1).to(device)
    for name in wanted:
        try:
            results[name] = measure(paths[name], device, args.reps, compiled=name == "flex")
        except Exception as exc:  # noqa: BLE001 - a bench reports every path it can
            print(f"{name:<11} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            continue
        r = results[name]
        dense, old = results.get("dense"), results.get("seg-old")
        vs_dense = f"{dense['time'] / r['time']:.2f}x" if dense else "-"
        vs_old = f"{old['time'] / r['time']:.2f}x" if old else "-"
        diff = "-"
        if dense and name != "dense":
            diff = f"{(r['out'] - dense['out']).abs().amax(dim=(1, 3))[real].max().item():.1e}"
        print(f"{name:<11}{r['time'] * 1e3:>10.1f}{vs_dense:>10}{vs_old:>11}{r['peak'] / 2**20:>10.0f}{diff:>20}"
              f"{r['warmup']:>11.1f}", flush=True)
        r["out"] = r["out"] if name == "dense" else None  # keep only the reference around


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", default="384p,768p", help="comma-separated: 384p, 768p")
    parser.add_argument("--unit", type=int, default=15)
    parser.add_argument("--stage", type=int, default=2, choices=(0, 1, 2))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per path (default: 10 on CUDA, 1 on CPU)")
    parser.add_argument("--only", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--flex-eager", action="store_true", help="also run FlexAttention uncompiled (L x L scores)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.reps = args.reps or (10 if device.type == "cuda" else 1)
    args.only = args.only.split(",")
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for res in args.res.split(","):
        run_resolution(res, args, device, dtype)


if __name__ == "__main__":
    main()
