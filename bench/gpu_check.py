"""GPU check on real-size random-weight models (a script, not a test; no downloads).

Written for one run of at most 8 minutes on one H200: the models are built once (T5-XXL + CLIP-L, the 24-block
miniFLUX DiT, the causal VAE; bf16), 768p runs before 384p, OUT/gpu_check.json is rewritten after every
section (a kill loses nothing), and past the global deadline every item records "skipped: deadline".

 1. dit     DiT-only forwards (all 24 blocks, CFG batch 2 with unequal text masks) at 768p and 384p, at (last
            unit, stage 2) and (unit temp/2, stage 1), clips built with the sampler's own history rule:
            segmented attention, FlexAttention ('flex', compiled: warm-ups include the compile), the official
            dense mask ('masked') and segmented forced to flash. CUDA-event
            times over 3 warm-ups + 10 reps, CPU enqueue time, the top CUDA kernels of one profiled rep (which
            SDPA kernel ran), and how far the outputs differ.
 2. memory  sampling only (embeddings precomputed, no decode) at 768p temp 16, one step per stage, for none,
            model, block_swap (6 GiB), sequential and auto at 8 / 12 / 16 GiB. Where there is a budget the
            allocator is capped at budget - CUDA context (measured). Per phase: max allocated / reserved, the
            mem_get_info in-use figure, allocator counters, beside the plan's own estimate; latents vs none.
 3. time    sampling seconds at 768p and 384p temp 16 (allocator uncapped) for none, model, block_swap with K
            from 6 and from 8 GiB and with K=8, sequential; ratios to none. A chrome trace of one block_swap
            (K=8) DiT forward (OUT/block_swap_trace.json.gz), the share of H2D copy time overlapped by GEMMs
            on another stream, and the stream synchronisations during that forward.
 4. vae     decode of 3 latent frames at 768p with (tile 256, window 1) and (tile 512, window 2): peak, time.
 5. fp8     one 768p forward with fp8 weight storage (dequantised; then torch._scaled_mm on sm89+) vs bf16.
            Quantises the DiT in place, so it runs last.

    python bench/gpu_check.py --out DIR                         # one CUDA GPU; >= 32 GB host RAM
    python bench/gpu_check.py --small --device cpu --out DIR    # self-check of every CPU-runnable path
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

REPO = Path(__file__).absolute().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bench._models import build_components  # noqa: E402
from pyramid_core import PyramidFlowPipeline  # noqa: E402
from pyramid_core.memory import GiB, MemoryManager, backend_for  # noqa: E402
from pyramid_core.models.attention import TokenLayout  # noqa: E402
from pyramid_core.models.dit import configure_dit  # noqa: E402
from pyramid_core.sampling import clean_pyramid, history_for_stage  # noqa: E402
from pyramid_core.text import TextEmbeddings  # noqa: E402

NA = "n/a on cpu"
SKIPPED = "skipped: deadline"
SECTIONS = ("dit", "memory", "time", "vae", "fp8")
FAMILY = "flux"
TEXT_TOKENS = 128
TEXT_LENGTHS = (60, 23)  # real tokens of the negative and the positive prompt: unequal masks
LATENT_CHANNELS = 16
PROFILE_LABEL = "dit_forward"
COUNTERS = ("num_alloc_retries", "num_sync_all_streams", "num_device_alloc", "num_device_free")
FULL_SIZES = {"768p": (1280, 768, "diffusion_transformer_768p"), "384p": (640, 384, "diffusion_transformer_384p")}
SMALL_SIZES = {"768p": (128, 64, "diffusion_transformer_768p"), "384p": (64, 64, "diffusion_transformer_384p")}
FULL_VAE = ((256, 1), (512, 2))  # (tile_sample_min_size, window_size)
SMALL_VAE = ((32, 1), (64, 2))  # at 64x64 the first tiles, the second does not
ATTENTION_MODES = ("segmented", "flex", "masked", "flash")
DOUBLES = "double blocks"


@dataclass(frozen=True)
class Case:
    """One sampling run: a plan, its budget (also the allocator cap in section 2), a fixed K, repetitions."""

    name: str
    plan: str
    budget_gb: float | None = None
    resident_blocks: int | str | None = None  # DOUBLES: the double-stream blocks (8 of 24)
    repeats: int = 1  # > 1: the earlier runs are warm-ups, the last one counts


MEMORY_CASES = (
    Case("none", "none"),
    Case("model", "model"),
    Case("block_swap@6GiB", "block_swap", 6.0),
    Case("sequential", "sequential"),
    Case("auto@8GiB", "auto", 8.0),
    Case("auto@12GiB", "auto", 12.0),
    Case("auto@16GiB", "auto", 16.0),
)
TIME_CASES = (
    Case("none", "none", repeats=2),
    Case("model", "model"),
    Case("block_swap@6GiB", "block_swap", 6.0),
    Case("block_swap@8GiB", "block_swap", 8.0),
    Case("block_swap K=8", "block_swap", resident_blocks=DOUBLES),  # streams the 16 single blocks at any size
    Case("sequential", "sequential"),
)


# ------------------------------------------------------------------------------------------------ setup


@dataclass
class Config:
    """What to run, resolved from the command line."""

    device: torch.device
    dtype: torch.dtype
    small: bool
    temp: int
    sizes: dict[str, tuple[int, int, str]]
    vae_size: tuple[int, int]  # (width, height) of the decode
    vae_settings: tuple[tuple[int, int], ...]
    warmup: int
    reps: int
    out: Path
    sections: tuple[str, ...]

    def need(self, seconds: float) -> float:
        """Seconds an item needs before the deadline (nothing for the small self-check)."""
        return 0.0 if self.small else seconds


class Deadline:
    """A global wall-clock limit for the whole run."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, need_s: float = 0.0) -> bool:
        left = self.left()
        return left > 0 and left >= need_s


class Probe:
    """Device measurements; every CUDA-only figure reads NA on another device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.context_bytes = 0  # device memory outside the caching allocator (context, libraries)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def event(self) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def in_use(self) -> int | None:
        """Device bytes in use by anything (mem_get_info), None off CUDA."""
        if not self.cuda:
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def counters(self) -> dict[str, int]:
        if not self.cuda:
            return {}
        stats = torch.cuda.memory_stats(self.device)
        return {key: int(stats.get(key, 0)) for key in COUNTERS}

    def reset_peaks(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> dict[str, Any]:
        if not self.cuda:
            return {"max_allocated_gib": NA, "max_reserved_gib": NA}
        return {"max_allocated_gib": torch.cuda.max_memory_allocated(self.device) / GiB,
                "max_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GiB}

    def allocated_gib(self) -> float | str:
        return torch.cuda.memory_allocated(self.device) / GiB if self.cuda else NA

    def release(self) -> None:
        """Free what garbage still holds on the device and return the allocator's cache (CUDA only)."""
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()

    def measure_context(self) -> dict[str, Any]:
        """In-use bytes outside the caching allocator now; the largest figure seen is kept for the caps."""
        if not self.cuda:
            return {"context_gib": NA}
        outside = self.in_use() - torch.cuda.memory_reserved(self.device)
        self.context_bytes = max(self.context_bytes, outside)
        return {"context_gib": outside / GiB, "context_used_for_caps_gib": self.context_bytes / GiB}

    def cap(self, budget_gb: float) -> float | str:
        """Cap the caching allocator at budget - context (a card of `budget_gb` GiB); returns the cap in GiB."""
        if not self.cuda:
            return NA
        total = torch.cuda.get_device_properties(self.device).total_memory
        limit = budget_gb * GiB - self.context_bytes
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(0.0, limit / total)), self.device)
        return limit / GiB

    def uncap(self) -> None:
        if self.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)


class Phase:
    """A measured phase (context manager): seconds between synchronisations, and on CUDA the peaks, the
    mem_get_info in-use figure (at the end and the largest `sample()`d) and allocator counter deltas.
    `result` is filled on exit, also when the phase raised."""

    def __init__(self, probe: Probe):
        self.probe = probe
        self.result: dict[str, Any] = {}
        self.seconds = 0.0
        self._in_use_max: int | None = None

    def __enter__(self) -> "Phase":
        self.probe.sync()
        self.probe.reset_peaks()
        self._before = self.probe.counters()
        self._in_use_max = self.probe.in_use()
        self._start = time.perf_counter()
        return self

    def sample(self) -> None:
        """Take a mem_get_info reading (e.g. from a step callback)."""
        now = self.probe.in_use()
        if now is not None:
            self._in_use_max = max(self._in_use_max or 0, now)

    def __exit__(self, *exc) -> bool:
        try:  # never mask the phase's own exception
            self.probe.sync()
            memory = self._memory()
        except Exception as err:
            memory = {"memory_error": repr(err)[:300]}
        self.seconds = time.perf_counter() - self._start
        self.result.update(seconds=self.seconds, **memory)
        return False

    def _memory(self) -> dict[str, Any]:
        if not self.probe.cuda:
            return {**self.probe.peaks(), "in_use_gib": NA, "in_use_max_gib": NA, "allocator": NA}
        end = self.probe.in_use()
        self.sample()
        after = self.probe.counters()
        return {**self.probe.peaks(), "in_use_gib": end / GiB, "in_use_max_gib": self._in_use_max / GiB,
                "allocator": {k: after[k] - self._before.get(k, 0) for k in after}}


class Report:
    """The JSON report, rewritten (atomically) after every section."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {**header, "sections": {}}
        path.parent.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, value: Any) -> None:
        self.data["sections"][name] = value
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = time.perf_counter() - self.started
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


@dataclass
class Models:
    text: Any
    dit: torch.nn.Module
    vae: torch.nn.Module


@dataclass
class Run:
    """Everything a section needs."""

    cfg: Config
    probe: Probe
    deadline: Deadline
    models: Models
    text: TextEmbeddings
    scratch: Path
    last_unit_output: torch.Tensor | None = None  # section 1's segmented 768p last-unit output, for section 5


# ------------------------------------------------------------------------------------------------ small helpers


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "min": min(values),
            "max": max(values), "n": len(values)}


def difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """max |a - b| and ||a - b|| / ||b|| (float32, on the host: a and b may sit on different devices)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    diff = a - b
    return {"max_abs": diff.abs().max().item(), "rel_l2": (diff.norm() / b.norm().clamp_min(1e-30)).item()}


def error_text(err: BaseException) -> dict[str, str]:
    tail = "".join(traceback.format_exception(type(err), err, err.__traceback__))[-1500:]
    return {"error": f"{type(err).__name__}: {str(err)[:400]}", "traceback": tail}


def guarded(fn: Callable[[], dict]) -> dict:
    """fn()'s result, or its error: one failing item never stops the run."""
    try:
        return fn()
    except Exception as err:  # an OOM or a missing kernel is a result too
        return error_text(err)


def cuda_only(probe: Probe, value: Any) -> Any:
    """`value` on CUDA, NA elsewhere (the analysis still ran, so its code is exercised on CPU)."""
    return value if probe.cuda else NA


def weight_gib(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / GiB


def text_dims(dit: torch.nn.Module) -> tuple[int, int]:
    """(T5 width, pooled CLIP width) the DiT takes."""
    return dit.context_embedder.in_features, dit.time_text_embed.text_embedder.linear_1.in_features


def make_text(dit: torch.nn.Module, dtype: torch.dtype) -> TextEmbeddings:
    """Precomputed CFG text conditioning [negative, positive] on the host, with unequal prompt lengths."""
    gen = torch.Generator().manual_seed(7)
    width, pooled = text_dims(dit)
    mask = torch.zeros(2, TEXT_TOKENS, dtype=torch.long)
    for row, length in enumerate(TEXT_LENGTHS):
        mask[row, :length] = 1
    embeds = torch.randn(2, TEXT_TOKENS, width, generator=gen).to(dtype)
    return TextEmbeddings(embeds, mask, torch.randn(2, pooled, generator=gen).to(dtype))


def dit_shapes(temp: int) -> tuple[tuple[int, int], ...]:
    """(unit, stage) pairs of section 1: the last unit at stage 2 and the middle unit at stage 1."""
    return (temp - 1, 2), (temp // 2, 1)


def dit_inputs(run: Run, res: str, unit: int, stage: int) -> tuple:
    """DiT forward arguments for (unit, stage): the history built by the sampler's own rule, CFG batch 2."""
    width, height, _ = run.cfg.sizes[res]
    h, w = height // 8, width // 8
    gen = torch.Generator().manual_seed(1000 * unit + stage)
    clips: list[torch.Tensor] = []
    if unit:
        past = torch.randn(1, LATENT_CHANNELS, unit, h, w, generator=gen)
        clips = history_for_stage(clean_pyramid(past), stage)
    scale = 2 ** (2 - stage)
    clips.append(torch.randn(1, LATENT_CHANNELS, 1, h // scale, w // scale, generator=gen))
    device, dtype = run.cfg.device, run.cfg.dtype
    clips = [torch.cat([c, c]).to(device, dtype) for c in clips]
    text = run.text.to(device, dtype)
    timestep = torch.full((2,), 500.0).to(device, dtype)
    return clips, timestep, text.prompt_embeds, sampler_text_mask(run.text.attention_mask, device), text.pooled


def sampler_text_mask(mask: torch.Tensor, device: torch.device) -> Any:
    """The text mask as the sampler hands it to the DiT: on the host (`HostTextMask`) where the models
    take one, else on the device."""
    from pyramid_core.models import attention as attention_module

    host_mask = getattr(attention_module, "HostTextMask", None)
    return host_mask.from_mask(mask) if host_mask is not None else mask.to(device)


def token_count(clips: list[torch.Tensor]) -> int:
    """Joint sequence length of one sample: text plus 2x2 patches of every clip."""
    return TEXT_TOKENS + sum(c.shape[2] * (c.shape[3] // 2) * (c.shape[4] // 2) for c in clips)


@contextlib.contextmanager
def attention(dit: torch.nn.Module, mode: str):
    """'segmented', 'flex', 'masked' (the official dense mask) or 'flash' (segmented, SDPA forced to flash)."""
    old = dit.attention_mode
    configure_dit(dit, attention_mode=mode if mode in ("flex", "masked") else "segmented")
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if mode == "flash" else contextlib.nullcontext():
            yield
    finally:
        configure_dit(dit, attention_mode=old)


def dense_mask_cached() -> bool | None:
    """Whether TokenLayout hands out the same dense mask twice (built once per forward)."""
    try:
        layout = TokenLayout(torch.ones(1, 2, dtype=torch.bool), torch.zeros(3, dtype=torch.long))
        get = (lambda: layout.dense_mask()) if callable(layout.dense_mask) else (lambda: layout.dense_mask)
        return get() is get()
    except Exception:
        return None


def time_calls(fn: Callable[[], Any], probe: Probe, warmup: int, reps: int) -> tuple[dict, Any]:
    """Per call: device milliseconds (CUDA events; wall clock elsewhere) and CPU enqueue milliseconds.

    Each rep starts on an idle device, so the device time of a launch-bound call shows as such."""
    out = None
    for _ in range(warmup):
        out = fn()
    device_ms, enqueue_ms = [], []
    for _ in range(reps):
        probe.sync()
        start, t0 = probe.event(), time.perf_counter()
        out = fn()
        t1, end = time.perf_counter(), probe.event()
        probe.sync()
        wall = (time.perf_counter() - t0) * 1e3
        device_ms.append(start.elapsed_time(end) if start is not None else wall)
        enqueue_ms.append((t1 - t0) * 1e3)
    timer = "cuda events" if probe.cuda else "wall clock"
    return {"timer": timer, "ms": summary(device_ms), "enqueue_ms": summary(enqueue_ms)}, out


# ------------------------------------------------------------------------------------------------ traces


class Span(NamedTuple):
    """One device activity: start and end (microseconds) and its stream."""

    start: float
    end: float
    stream: str


def profile_trace(fn: Callable[[], Any], probe: Probe, path: Path) -> dict:
    """Chrome trace (parsed) of one call of fn, labelled PROFILE_LABEL; written to `path` as JSON."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if probe.cuda else [])
    probe.sync()
    with profile(activities=activities) as prof:
        with record_function(PROFILE_LABEL):
            fn()
        probe.sync()
    prof.export_chrome_trace(str(path))
    return json.loads(path.read_text())


def complete_events(trace: dict) -> list[dict]:
    return [e for e in trace.get("traceEvents", []) if isinstance(e, dict) and e.get("ph") == "X"]


def device_spans(trace: dict, category: str) -> list[tuple[str, Span]]:
    """(name, span) of the trace's events of one category ('kernel', 'gpu_memcpy', ...)."""
    spans = []
    for e in complete_events(trace):
        if e.get("cat") == category:
            stream = str(e.get("args", {}).get("stream", e.get("tid")))
            start = float(e["ts"])
            spans.append((e.get("name", ""), Span(start, start + float(e.get("dur", 0)), stream)))
    return spans


def merge(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of intervals, sorted and disjoint."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def covered(start: float, end: float, merged: list[tuple[float, float]]) -> float:
    """Length of [start, end] inside a sorted disjoint union."""
    i = max(0, bisect_right([m[0] for m in merged], start) - 1)
    total = 0.0
    while i < len(merged) and merged[i][0] < end:
        total += max(0.0, min(end, merged[i][1]) - max(start, merged[i][0]))
        i += 1
    return total


def overlap_fraction(copies: list[Span], kernels: list[Span]) -> float | None:
    """Share of the copies' time during which some kernel runs on another stream (None: no copy time)."""
    total = sum(c.end - c.start for c in copies)
    if total <= 0:
        return None
    unions: dict[str, list[tuple[float, float]]] = {}
    hidden = 0.0
    for copy in copies:
        if copy.stream not in unions:
            unions[copy.stream] = merge((k.start, k.end) for k in kernels if k.stream != copy.stream)
        hidden += covered(copy.start, copy.end, unions[copy.stream])
    return hidden / total


def attention_kind(name: str) -> str | None:
    """Which SDPA implementation a kernel name belongs to, None for other kernels."""
    low = name.lower()
    if "cudnn" in low and any(w in low for w in ("sdpa", "attn", "mha", "fmha")):
        return "cudnn"
    if "flash" in low:
        return "flash"
    if any(w in low for w in ("fmha", "mem_eff", "memeff", "efficient_attention", "attentionkernel")):
        return "mem_efficient"
    if "softmax" in low:
        return "math (softmax)"
    return None


def is_gemm(name: str) -> bool:
    low = name.lower()
    return attention_kind(name) is None and any(w in low for w in ("gemm", "nvjet", "xmma", "cutlass", "matmul"))


def kernel_summary(trace: dict, top: int = 8) -> dict[str, Any]:
    """The top kernels by device time, time per SDPA implementation, kernel count and busy time."""
    totals: dict[str, list[float]] = {}
    spans = device_spans(trace, "kernel")
    for name, span in spans:
        entry = totals.setdefault(name, [0.0, 0])
        entry[0] += span.end - span.start
        entry[1] += 1
    attention_ms: dict[str, float] = {}
    for name, (us, _) in totals.items():
        kind = attention_kind(name)
        if kind:
            attention_ms[kind] = attention_ms.get(kind, 0.0) + us / 1e3
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    busy = sum(end - start for start, end in merge((s.start, s.end) for _, s in spans))
    return {
        "top": [{"name": n[:160], "ms": us / 1e3, "calls": int(calls),
                 "kind": attention_kind(n) or ("gemm" if is_gemm(n) else "other")} for n, (us, calls) in rows],
        "attention_ms": attention_ms, "kernels": len(spans), "busy_ms": busy / 1e3,
    }


def label_window(trace: dict, label: str = PROFILE_LABEL) -> tuple[float, float] | None:
    for e in complete_events(trace):
        if e.get("cat") == "user_annotation" and e.get("name") == label:
            return float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))
    return None


def runtime_calls(trace: dict, word: str = "Synchronize", label: str = PROFILE_LABEL) -> dict[str, int]:
    """CUDA runtime/driver calls whose name contains `word`, counted inside the labelled range."""
    window = label_window(trace, label)
    counts: dict[str, int] = {}
    for e in complete_events(trace):
        name = e.get("name", "")
        if e.get("cat") not in ("cuda_runtime", "cuda_driver") or word not in name:
            continue
        if window is None or window[0] <= float(e["ts"]) <= window[1]:
            counts[name] = counts.get(name, 0) + 1
    return counts


def copy_overlap(trace: dict) -> dict[str, Any]:
    """Host-to-device copies of a trace and how much of their time kernels on other streams covered."""
    copies = [(n, s) for n, s in device_spans(trace, "gpu_memcpy") if "HtoD" in n]
    kernels = device_spans(trace, "kernel")
    spans = [s for _, s in copies]
    nbytes = sum(float(e.get("args", {}).get("bytes", 0)) for e in complete_events(trace)
                 if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", ""))
    return {
        "h2d_copies": len(spans), "h2d_ms": sum(s.end - s.start for s in spans) / 1e3, "h2d_gb": nbytes / 1e9,
        "h2d_streams": sorted({s.stream for s in spans}), "kernel_streams": sorted({s.stream for _, s in kernels}),
        "overlap_with_gemm": overlap_fraction(spans, [s for n, s in kernels if is_gemm(n)]),
        "overlap_with_any_kernel": overlap_fraction(spans, [s for _, s in kernels]),
    }


# ------------------------------------------------------------------------------------------------ 1. dit


def dit_mode(run: Run, inputs: tuple, mode: str, tag: str) -> tuple[dict, torch.Tensor]:
    """Timing (and, except for forced flash, the kernels of one profiled rep) of one attention mode."""
    dit = run.models.dit
    with torch.no_grad(), attention(dit, mode):
        timing, out = time_calls(lambda: dit(*inputs), run.probe, run.cfg.warmup, run.cfg.reps)
        if mode != "flash":
            trace = profile_trace(lambda: dit(*inputs), run.probe, run.scratch / f"{tag}_{mode}.json")
            timing["kernels"] = cuda_only(run.probe, kernel_summary(trace))
            timing["syncs"] = cuda_only(run.probe, runtime_calls(trace))
    return timing, out.float().cpu()


def dit_shape(run: Run, res: str, unit: int, stage: int) -> dict:
    inputs = dit_inputs(run, res, unit, stage)
    row: dict[str, Any] = {"resolution": res, "unit": unit, "stage": stage, "tokens": token_count(inputs[0]),
                           "frames": sum(c.shape[2] for c in inputs[0])}
    outputs: dict[str, torch.Tensor] = {}
    for mode in ATTENTION_MODES:
        if not run.deadline.allows(run.cfg.need(15)):
            row[mode] = SKIPPED
            continue
        try:
            row[mode], outputs[mode] = dit_mode(run, inputs, mode, f"{res}_u{unit}_s{stage}")
        except Exception as err:  # e.g. no flash kernel for these inputs
            row[mode] = error_text(err)
        print(f"  {res} u{unit} s{stage} {mode}: {fmt(_median(row[mode]))} ms", flush=True)
    if (unit, stage) == (run.cfg.temp - 1, 2) and res == "768p":
        run.last_unit_output = outputs.get("segmented")
    for mode in ("flex", "masked", "flash"):
        if mode in outputs and "segmented" in outputs:
            row[f"{mode}_vs_segmented"] = difference(outputs[mode], outputs["segmented"])
    row["finite"] = all(bool(torch.isfinite(o).all()) for o in outputs.values())
    return row


def section_dit(run: Run) -> dict:
    dit = run.models.dit
    dit.to(run.cfg.device)
    rows = []
    try:
        for res in ("768p", "384p"):
            for unit, stage in dit_shapes(run.cfg.temp):
                rows.append(guarded(lambda: dit_shape(run, res, unit, stage)))
    finally:
        dit.to("cpu")
        run.probe.release()
    return {"rows": rows, "dense_mask_cached": dense_mask_cached(), "warmup": run.cfg.warmup, "reps": run.cfg.reps}


# ------------------------------------------------------------------------------------------------ 2. and 3. sampling


def plan_fields(plan: Any) -> dict[str, Any]:
    """The plan's own figures: what it chose, its estimate, the DiT's K."""
    dit = getattr(plan, "components", {}).get("dit")
    swap = dit is not None and getattr(dit, "placement", None) == "block_swap"
    return {"chosen": getattr(plan, "chosen", None), "describe": plan.describe(), "estimate_gib": plan.peak_bytes / GiB,
            "dit_estimate_gib": dit.peak_bytes / GiB if dit is not None else None,
            "resident_blocks": dit.resident_blocks if swap else None}


def manager_stats(manager: MemoryManager) -> dict[str, Any]:
    """The manager's own counters (peak_device_bytes, bytes_copied, loads, sync_loads, ...), bytes in GiB."""
    stats = dict(vars(manager.stats))
    return {k.replace("bytes", "gib"): v / GiB if "bytes" in k else v for k, v in stats.items()}


def generate(run: Run, pipe: PyramidFlowPipeline, res: str, phase: Phase) -> torch.Tensor:
    width, height, _ = run.cfg.sizes[res]
    steps = [1, 1, 1]
    return pipe.generate(
        prompt_embeds=run.text, height=height, width=width, temp=run.cfg.temp, num_inference_steps=steps,
        video_num_inference_steps=steps, output_type="latent", seed=0, step_callback=lambda info: phase.sample(),
    )


def sampling_body(run: Run, res: str, case: Case, manager: MemoryManager, row: dict) -> torch.Tensor:
    """Placement then `case.repeats` generations (sampling only), each measured as a phase."""
    width, height, variant = run.cfg.sizes[res]
    models = run.models
    place = Phase(run.probe)
    row["placement"] = place.result
    with place:
        pipe = PyramidFlowPipeline(models.dit, models.vae, models.text, FAMILY, variant, run.cfg.dtype, manager)
        plan = manager.prepare(width, height, run.cfg.temp, cfg=True, dtype=run.cfg.dtype)
    row.update(plan_fields(plan))
    seconds = []
    for _ in range(case.repeats):
        phase = Phase(run.probe)
        row["sampling"] = phase.result
        with phase:
            latents = generate(run, pipe, res, phase)
        seconds.append(phase.seconds)
    row.update(plan_fields(manager.last_plan or plan))  # as generate() resolved it
    row.update(sampling_s=seconds[-1], sampling_runs_s=seconds, weights=manager_stats(manager),
               finite=bool(torch.isfinite(latents).all()))
    return latents.float().cpu()


def sampling_case(run: Run, res: str, case: Case, capped: bool) -> tuple[dict, torch.Tensor | None]:
    """One plan on a fresh manager; a failure (OOM included) is recorded with the figures measured so far."""
    probe = run.probe
    probe.release()
    row: dict[str, Any] = {"case": case.name, "plan": case.plan, "budget_gib": case.budget_gb,
                           "baseline_allocated_gib": probe.allocated_gib()}
    row["allocator_cap_gib"] = probe.cap(case.budget_gb) if capped and case.budget_gb else (
        "uncapped" if probe.cuda else NA)
    # an explicit backend: the CPU self-check runs the plans as asked (the default runs them as 'none' on a CPU)
    manager = MemoryManager(case.plan, device=run.cfg.device, budget_gb=case.budget_gb,
                            resident_blocks=resident_blocks(case, run.models.dit), prefetch=2,
                            backend=backend_for(run.cfg.device))
    latents = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            latents = sampling_body(run, res, case, manager, row)
        if caught:
            row["warnings"] = sorted({str(w.message)[:300] for w in caught})
    except Exception as err:
        row.update(error_text(err))
    finally:
        try:
            manager.close()
        finally:
            probe.uncap()
            probe.release()
    return row, latents


def resident_blocks(case: Case, dit: torch.nn.Module) -> int | None:
    """The case's fixed K (DOUBLES: as many as the DiT has double-stream blocks), None to fit the budget."""
    return len(dit.transformer_blocks) if case.resident_blocks == DOUBLES else case.resident_blocks


def compare_latents(rows: list[dict], latents: dict[str, torch.Tensor]) -> None:
    """Each row's latents against the 'none' row's (same seed and inputs)."""
    reference = latents.get("none")
    for row in rows:
        mine = latents.get(row["case"])
        if reference is None or mine is None:
            row["vs_none"] = None
            continue
        row["vs_none"] = {"equal": bool(torch.equal(mine, reference)), **difference(mine, reference)}


def run_cases(run: Run, res: str, cases: tuple[Case, ...], capped: bool, need: Callable[[Case], float]) -> list[dict]:
    rows, latents = [], {}
    for case in cases:
        if not run.deadline.allows(run.cfg.need(need(case))):
            rows.append({"case": case.name, "plan": case.plan, "status": SKIPPED})
            continue
        row, out = sampling_case(run, res, case, capped)
        rows.append(row)
        if out is not None:
            latents[case.name] = out
        print(f"  {res} {case.name}: {short_row(row)}", flush=True)
    compare_latents(rows, latents)
    return rows


def short_row(row: dict) -> str:
    if "error" in row:
        return row["error"][:160]
    peak = row.get("sampling", {}).get("max_allocated_gib")
    return f"{row.get('sampling_s', 0):.2f} s, peak {fmt(peak)} GiB, {row.get('describe', '')}"


def section_memory(run: Run) -> dict:
    context = run.probe.measure_context()
    need = lambda case: 40 if case.plan == "sequential" else 25  # noqa: E731
    rows = run_cases(run, "768p", MEMORY_CASES, capped=True, need=need)
    add_ratios(rows)
    return {"resolution": "768p", "temp": run.cfg.temp, "steps_per_stage": 1, "context": context, "rows": rows}


def add_ratios(rows: list[dict]) -> None:
    none = next((r for r in rows if r["case"] == "none" and "sampling_s" in r), None)
    for row in rows:
        if none is not None and "sampling_s" in row:
            row["x_none"] = row["sampling_s"] / none["sampling_s"]


def block_swap_trace(run: Run) -> dict:
    """One block_swap DiT forward at 768p (last unit, stage 2) under the profiler. K = the double blocks, so
    the single blocks stream whatever the planner's estimates say (K from a budget may keep all resident)."""
    width, height, _ = run.cfg.sizes["768p"]
    k = len(run.models.dit.transformer_blocks)
    manager = MemoryManager("block_swap", device=run.cfg.device, resident_blocks=k, prefetch=2,
                            backend=backend_for(run.cfg.device))
    manager.register("dit", run.models.dit)
    try:
        plan = manager.prepare(width, height, run.cfg.temp, cfg=True, dtype=run.cfg.dtype)
        inputs = dit_inputs(run, "768p", run.cfg.temp - 1, 2)
        raw = run.scratch / "block_swap_trace.json"
        with torch.no_grad(), manager.use("dit") as model:
            model(*inputs)  # a first forward fills the prefetch slots as in a real step
            trace = profile_trace(lambda: model(*inputs), run.probe, raw)
        target = run.cfg.out / "block_swap_trace.json.gz"
        with open(raw, "rb") as src, gzip.open(target, "wb") as dst:
            dst.writelines(src)
        probe = run.probe
        return {**plan_fields(plan), "trace_file": target.name, "weights": manager_stats(manager),
                "copies": cuda_only(probe, copy_overlap(trace)), "syncs": cuda_only(probe, runtime_calls(trace)),
                "stream_waits": cuda_only(probe, runtime_calls(trace, "StreamWaitEvent")),
                "kernels": cuda_only(probe, kernel_summary(trace, top=5))}
    finally:
        manager.close()
        run.probe.release()


def section_time(run: Run) -> dict:
    result: dict[str, Any] = {"temp": run.cfg.temp, "steps_per_stage": 1, "allocator": "uncapped"}
    for res in ("768p", "384p"):
        need = lambda case: (45 if case.plan == "sequential" else 20) * (1 if res == "768p" else 0.7)  # noqa: E731
        rows = run_cases(run, res, TIME_CASES, capped=False, need=need)
        add_ratios(rows)
        result[res] = rows
    if run.deadline.allows(run.cfg.need(20)):
        result["block_swap_trace"] = guarded(lambda: block_swap_trace(run))
    else:
        result["block_swap_trace"] = SKIPPED
    return result


# ------------------------------------------------------------------------------------------------ 4. vae


def vae_estimate_gib(run: Run, tile: int, window: int) -> float | None:
    """The VAE's own decode working-memory estimate (what the planner uses), None where it has none."""
    from pyramid_core.memory import Workload

    estimate = getattr(run.models.vae, "decode_working_memory_bytes", None)
    if estimate is None:
        return None
    width, height = run.cfg.vae_size
    return estimate(Workload(width, height, 3, act_bytes=run.cfg.dtype.itemsize), window, tile) / GiB


def vae_case(run: Run, latents: torch.Tensor, tile: int, window: int) -> dict:
    """Decodes to host uint8 frames; on CUDA a first one warms the kernels and the second counts."""
    from pyramid_core.latent_format import decode_latents

    phases = []
    for _ in range(2 if run.probe.cuda else 1):
        phase = Phase(run.probe)
        with phase:
            frames = decode_latents(run.models.vae, latents, FAMILY, window_size=window, tile_sample_min_size=tile)
        phases.append(phase.result)
        run.probe.release()
    print(f"  decode tile {tile} window {window}: {phases[-1]['seconds']:.2f} s", flush=True)
    return {"tile": tile, "window": window, "seconds": phases[-1]["seconds"], "memory": phases[-1],
            "first_run_s": phases[0]["seconds"], "frames": list(frames.shape),
            "estimate_gib": vae_estimate_gib(run, tile, window)}


def section_vae(run: Run) -> dict:
    width, height = run.cfg.vae_size
    gen = torch.Generator().manual_seed(11)
    latents = torch.randn(1, LATENT_CHANNELS, 3, height // 8, width // 8, generator=gen)
    latents = latents.to(run.cfg.device, run.cfg.dtype)
    vae = run.models.vae
    vae.to(run.cfg.device)
    rows = []
    try:
        for tile, window in run.cfg.vae_settings:
            if run.deadline.allows(run.cfg.need(20)):
                rows.append(guarded(lambda: vae_case(run, latents, tile, window)))
            else:
                rows.append({"tile": tile, "window": window, "status": SKIPPED})
    finally:
        vae.to("cpu")
        run.probe.release()
    return {"size": [width, height], "latent_frames": 3, "rows": rows}


# ------------------------------------------------------------------------------------------------ 5. fp8


def scaled_mm_case(run: Run, dit: torch.nn.Module, inputs: tuple, reference: torch.Tensor) -> dict:
    """The fp8 forward again with torch._scaled_mm switched on in every Fp8Linear."""
    from pyramid_core.precision import Fp8Linear

    layers = [m for m in dit.modules() if isinstance(m, Fp8Linear)]
    for layer in layers:
        layer.use_scaled_mm = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        timing, out = time_calls(lambda: dit(*inputs), run.probe, run.cfg.warmup, run.cfg.reps)
    timing.update(vs_reference=difference(out, reference), layers=len(layers),
                  fell_back=sum(not layer.use_scaled_mm for layer in layers),
                  warnings=sorted({str(w.message)[:200] for w in caught})[:3])
    return timing


def fp8_forwards(run: Run, dit: torch.nn.Module) -> dict:
    from pyramid_core.precision import apply_fp8_storage

    inputs = dit_inputs(run, "768p", run.cfg.temp - 1, 2)
    result: dict[str, Any] = {"unit": run.cfg.temp - 1, "stage": 2, "tokens": token_count(inputs[0]),
                              "reference_dtype": str(run.cfg.dtype), "granularity": "row"}
    with torch.no_grad():
        result["reference"], reference = time_calls(lambda: dit(*inputs), run.probe, run.cfg.warmup, run.cfg.reps)
        result["reference"]["weights_gib"] = weight_gib(dit)
        if run.last_unit_output is not None:  # the same forward as in section 1: were the weights restored?
            result["reference"]["vs_dit_section"] = difference(reference, run.last_unit_output)
        apply_fp8_storage(dit, "row", compute_dtype=run.cfg.dtype)  # in place: nothing uses the DiT after this
        result["fp8"], out = time_calls(lambda: dit(*inputs), run.probe, run.cfg.warmup, run.cfg.reps)
        result["fp8"].update(weights_gib=weight_gib(dit), vs_reference=difference(out, reference))
        supported = not run.probe.cuda or torch.cuda.get_device_capability(run.cfg.device) >= (8, 9)
        result["scaled_mm"] = (guarded(lambda: scaled_mm_case(run, dit, inputs, reference)) if supported
                               else "n/a: needs CUDA sm89+")
        result["scaled_mm_kernel"] = "torch._scaled_mm" if run.probe.cuda and supported else "dequantise (no CUDA)"
    return result


def section_fp8(run: Run) -> dict:
    dit = run.models.dit
    dit.to(run.cfg.device)
    try:
        return fp8_forwards(run, dit)
    finally:
        dit.to("cpu")
        run.probe.release()


# ------------------------------------------------------------------------------------------------ summary


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in [*row, *[""] * (len(header) - len(row))]) + " |" for row in rows]
    return "\n".join(lines)


def _median(entry: Any) -> Any:
    """Median ms of a timing entry, else its error or status."""
    if isinstance(entry, dict):
        return entry["ms"]["median"] if "ms" in entry else str(entry.get("error", "?"))[:40]
    return entry


def _attention_of(entry: Any) -> str:
    kernels = entry.get("kernels") if isinstance(entry, dict) else None
    if not isinstance(kernels, dict):
        return fmt(kernels)
    return ", ".join(f"{k} {v:.1f} ms" for k, v in kernels["attention_ms"].items()) or "none found"


def summary_dit(section: dict) -> str:
    rows = []
    for r in section.get("rows", []):
        if "error" in r:
            rows.append([r["error"][:80]])
            continue
        seg = r.get("segmented")
        enqueue = seg["enqueue_ms"]["median"] if isinstance(seg, dict) and "enqueue_ms" in seg else None
        rows.append([r["resolution"], f"u{r['unit']} s{r['stage']}", r["tokens"], _median(seg), enqueue,
                     _median(r.get("flex")), _median(r.get("masked")), _median(r.get("flash")), _attention_of(seg),
                     _attention_of(r.get("masked")), (r.get("flex_vs_segmented") or {}).get("rel_l2"),
                     (r.get("masked_vs_segmented") or {}).get("rel_l2")])
    return table(["res", "unit/stage", "tokens", "segmented ms", "enqueue ms", "flex ms", "masked ms", "flash ms",
                  "SDPA (segmented)", "SDPA (masked)", "flex vs seg rel", "masked vs seg rel"], rows)


def _sampling_row(r: dict) -> list[Any]:
    s = r.get("sampling", {})
    alloc = s.get("allocator") if isinstance(s.get("allocator"), dict) else {}
    status = r.get("status") or (r["error"][:60] if "error" in r else "")
    return [r["case"], r.get("chosen"), r.get("resident_blocks"), r.get("estimate_gib"), r.get("dit_estimate_gib"),
            r.get("allocator_cap_gib"), s.get("max_allocated_gib"), s.get("max_reserved_gib"), s.get("in_use_max_gib"),
            alloc.get("num_alloc_retries"), alloc.get("num_sync_all_streams"), r.get("sampling_s"), r.get("x_none"),
            (r.get("vs_none") or {}).get("equal"), status]


SAMPLING_HEADER = ["case", "chosen", "K", "est GiB", "DiT est GiB", "cap GiB", "max alloc GiB", "max reserved GiB",
                   "in use max GiB", "retries", "sync all", "sampling s", "x none", "= none", "status"]


def summary_time(section: dict) -> str:
    parts = []
    for res in ("768p", "384p"):
        if res in section:
            parts.append(f"{res}:\n" + table(SAMPLING_HEADER, [_sampling_row(r) for r in section[res]]))
    trace = section.get("block_swap_trace")
    if isinstance(trace, dict) and "copies" in trace:
        copies = trace["copies"]
        if isinstance(copies, dict):
            parts.append(f"block_swap trace ({trace['describe']}): {copies['h2d_copies']} H2D copies, "
                         f"{fmt(copies['h2d_ms'])} ms, overlapped by GEMMs {fmt(copies['overlap_with_gemm'])}, "
                         f"by any kernel {fmt(copies['overlap_with_any_kernel'])}; syncs {trace['syncs']}")
        else:
            parts.append(f"block_swap trace ({trace.get('describe')}): copies {copies}")
    elif trace is not None:
        parts.append(f"block_swap trace: {trace if not isinstance(trace, dict) else trace.get('error')}")
    return "\n".join(parts)


def summary_vae(section: dict) -> str:
    rows = []
    for r in section.get("rows", []):
        mem = r.get("memory", {})
        rows.append([r.get("tile"), r.get("window"), r.get("seconds"), mem.get("max_allocated_gib"),
                     mem.get("max_reserved_gib"), r.get("estimate_gib"), r.get("status") or r.get("error", "")])
    return table(["tile", "window", "s", "max alloc GiB", "max reserved GiB", "estimate GiB", "status"], rows)


def summary_fp8(section: dict) -> str:
    rows = []
    for name in ("reference", "fp8", "scaled_mm"):
        r = section.get(name)
        label = f"reference ({section.get('reference_dtype')})" if name == "reference" else name
        if isinstance(r, dict) and "ms" in r:
            rows.append([label, r["ms"]["median"], r.get("weights_gib"), (r.get("vs_reference") or {}).get("rel_l2")])
        elif r is not None:
            rows.append([label, fmt(r if not isinstance(r, dict) else r.get("error")), None, None])
    return table(["weights", "ms", "weights GiB", "rel diff vs reference"], rows)


def print_summary(report: dict) -> None:
    printers = {"dit": summary_dit, "memory": lambda s: table(SAMPLING_HEADER, [_sampling_row(r) for r in s["rows"]]),
                "time": summary_time, "vae": summary_vae, "fp8": summary_fp8}
    print(f"\n{report['device']}, torch {report['torch']}, {report['dtype']}, temp {report['temp']}")
    for name, section in report["sections"].items():
        print(f"\n== {name} ==")
        if not isinstance(section, dict) or "error" in section:
            print(section if not isinstance(section, dict) else section["error"])
            continue
        try:
            print(printers[name](section))
        except Exception as err:  # the JSON is the record; a summary glitch must not hide it
            print(f"(summary failed: {err!r})")


# ------------------------------------------------------------------------------------------------ main


SECTION_FUNCTIONS = {"dit": section_dit, "memory": section_memory, "time": section_time, "vae": section_vae,
                     "fp8": section_fp8}
SECTION_NEED_S = {"dit": 30, "memory": 30, "time": 30, "vae": 15, "fp8": 15}


def run_section(run: Run, name: str) -> Any:
    if not run.deadline.allows(run.cfg.need(SECTION_NEED_S[name])):
        return SKIPPED
    started = time.perf_counter()
    print(f"-- {name} ({run.deadline.left():.0f} s left)", flush=True)
    try:
        result = SECTION_FUNCTIONS[name](run)
    except Exception as err:
        result = error_text(err)
    finally:
        run.probe.uncap()
        run.probe.release()
    result["section_s"] = time.perf_counter() - started
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")),
                        help="output folder (default $OUT or ./gpu_check_out)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny random models and shapes (a CPU self-check)")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="compute dtype (auto: bf16 on CUDA, fp32 elsewhere: CPU bf16 matmuls are slow)")
    parser.add_argument("--temp", type=int, help="latent frames (default 16; 3 with --small)")
    parser.add_argument("--warmup", type=int, help="DiT warm-up forwards (default 3; 1 with --small)")
    parser.add_argument("--reps", type=int, help="timed DiT forwards (default 10; 2 with --small)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="subset of " + ",".join(SECTIONS))
    parser.add_argument("--deadline-s", type=float, default=450.0,
                        help="global deadline from start; later items record 'skipped: deadline'")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    sections = tuple(s for s in SECTIONS if s in args.sections.split(","))
    name = args.dtype if args.dtype != "auto" else ("bf16" if args.device.startswith("cuda") else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    return Config(
        device=torch.device(args.device), dtype=dtype, small=args.small, temp=args.temp or (3 if args.small else 16),
        sizes=SMALL_SIZES if args.small else FULL_SIZES, vae_size=(64, 64) if args.small else FULL_SIZES["768p"][:2],
        vae_settings=SMALL_VAE if args.small else FULL_VAE,
        warmup=args.warmup if args.warmup is not None else (1 if args.small else 3),
        reps=args.reps if args.reps is not None else (2 if args.small else 10),
        out=args.out, sections=sections,
    )


def device_header(cfg: Config) -> dict[str, Any]:
    header: dict[str, Any] = {"device": str(cfg.device), "torch": torch.__version__, "dtype": str(cfg.dtype),
                              "temp": cfg.temp, "small_models": cfg.small, "sizes": cfg.sizes,
                              "warmup": cfg.warmup, "reps": cfg.reps}
    if cfg.device.type == "cuda":
        props = torch.cuda.get_device_properties(cfg.device)
        header.update(device=props.name, cuda=torch.version.cuda, capability=list(torch.cuda.get_device_capability()),
                      sm_count=props.multi_processor_count, total_gib=props.total_memory / GiB)
    return header


def context_at_start(probe: Probe) -> dict[str, Any]:
    """mem_get_info in-use right after CUDA initialisation, before any tensor (the bare context)."""
    if not probe.cuda:
        return {"at_init_gib": NA}
    used = probe.in_use()
    probe.context_bytes = used
    return {"at_init_gib": used / GiB}


def warm_libraries(cfg: Config) -> None:
    """Load cuBLAS, the SDPA kernels and cuDNN conv3d once, so the context figure includes them."""
    if cfg.device.type != "cuda":
        return
    x = torch.randn(2, 2, 64, 64, device=cfg.device, dtype=cfg.dtype)
    torch.nn.functional.scaled_dot_product_attention(x, x, x)
    _ = x @ x
    conv = torch.nn.Conv3d(2, 2, 3, padding=1).to(cfg.device, cfg.dtype)
    conv(torch.randn(1, 2, 3, 8, 8, device=cfg.device, dtype=cfg.dtype))
    torch.cuda.synchronize(cfg.device)


@contextlib.contextmanager
def cpu_threads(count: int | None):
    """Run with `count` torch threads (None: unchanged). One thread keeps tiny CPU runs fast on a busy machine."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_all(cfg: Config, probe: Probe, deadline: Deadline, report: Report) -> None:
    """Build the models once, then run the chosen sections in order, writing the report after each."""
    began = time.perf_counter()
    text, dit, vae = build_components("tiny" if cfg.small else "full", cfg.dtype)
    warm_libraries(cfg)
    probe.release()
    report.data.update(build_s=time.perf_counter() - began, text_encoder="registered, never run (embeddings made up)")
    report.data["context"]["after_build"] = probe.measure_context()
    print(f"built random models in {report.data['build_s']:.0f} s", flush=True)
    gc.freeze()  # later collections skip the models and the imported modules: a full one takes ~1 s here
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
            run = Run(cfg, probe, deadline, Models(text, dit, vae), make_text(dit, cfg.dtype), Path(scratch))
            for name in cfg.sections:
                report.put(name, run_section(run, name))
    finally:
        gc.unfreeze()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = make_config(args)
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a machine with one NVIDIA GPU (or --small --device cpu to self-check)")
    deadline = Deadline(args.deadline_s)
    probe = Probe(cfg.device)
    start_context = context_at_start(probe)
    report = Report(cfg.out / "gpu_check.json", {**device_header(cfg), "argv": sys.argv[1:] if argv is None else argv,
                                                 "deadline_s": args.deadline_s})
    report.data["context"] = {"start": start_context}
    report.write()
    try:
        with cpu_threads(1 if cfg.small and not probe.cuda else None):
            run_all(cfg, probe, deadline, report)
    except BaseException as err:  # e.g. the model build: the file says so
        report.data["fatal"] = error_text(err)
        raise
    finally:
        report.write()
    print_summary(report.data)
    print(f"\nwrote {report.path} ({report.data['elapsed_s']:.0f} s)")
    return report.data


if __name__ == "__main__":
    main()
