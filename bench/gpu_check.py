"""GPU check of the memory plans on real-size random models (a script, not a test; no downloads).

Builds the real miniFLUX DiT, the causal VAE and a T5-XXL + CLIP-L text encoder with random bf16 weights,
then for 384p and 768p (temp 16, one Euler step per stage - reduced steps) runs every plan, 'auto' under
simulated budgets of 8, 12 and 24 GiB (torch.cuda.set_per_process_memory_fraction) and the official
default path (plan 'none' with dense-mask attention). Per run: peak allocated / reserved device memory per
phase (text, sampling, decode), the plan's own estimate, seconds per step per stage (CUDA events),
end-to-end seconds (text + sampling + decode of the first two latent frames: with temporal chunking the
decode's peak does not depend on length) and ratios to 'none'. Writes one JSON file and prints a table and
the target checks. Needs one CUDA GPU with >= 40 GB; expected to take 4-6 minutes on an H100 (a deadline skips
the remaining runs after --deadline-s).

    python bench/gpu_check.py --out gpu_check.json
    python bench/gpu_check.py --small --device cpu      # a quick self-check of this script on CPU
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).absolute().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench._models import build_components  # noqa: E402
from pyramid_core.memory import GiB, MemoryManager  # noqa: E402
from pyramid_core.pipeline import PyramidFlowPipeline  # noqa: E402

PROMPT = "a red fox running through fresh snow, cinematic"
RESOLUTIONS = {"384p": (640, 384, "diffusion_transformer_384p"), "768p": (1280, 768, "diffusion_transformer_768p")}
# name -> (plan, budget GiB simulated with set_per_process_memory_fraction, manager kwargs, attention mode)
CASES = {
    "none": ("none", None, {}, "segmented"),
    "official": ("none", None, {}, "masked"),  # the official default: no offload, dense boolean mask
    "model": ("model", None, {}, "segmented"),
    "block_swap": ("block_swap", None, {"budget_gb": 6.0}, "segmented"),  # K from a 6 GiB budget
    "sequential": ("sequential", None, {}, "segmented"),
    "auto@24": ("auto", 24, {}, "segmented"),
    "auto@12": ("auto", 12, {}, "segmented"),
    "auto@8": ("auto", 8, {}, "segmented"),
}
TARGETS_768P = [  # (description, check(results by case) -> (ok, value text))
    ("model peak <= 10 GiB", lambda r: _peak_at_most(r, "model", 10)),
    ("block_swap peak <= 6 GiB", lambda r: _peak_at_most(r, "block_swap", 6)),
    ("sequential peak <= 4 GiB", lambda r: _peak_at_most(r, "sequential", 4)),
    ("auto under 8 GiB <= 1.15x the time of none", lambda r: _ratio_at_most(r, "auto@8", "none", 1.15)),
    ("none >= 1.5x faster than the official path", lambda r: _ratio_at_most(r, "none", "official", 1 / 1.5)),
]


class Clock:
    """Wall time with device synchronisation, and CUDA events per DiT step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list[tuple[int, object]] = []

    def sync(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def mark(self, stage: int) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = time.perf_counter()
        self.events.append((stage, event))

    def per_stage(self) -> dict[str, float]:
        """Mean seconds per step of each stage (a step = the time since the previous mark)."""
        sums: dict[int, list[float]] = {}
        for (_, before), (stage, after) in zip(self.events, self.events[1:]):
            if stage < 0:
                continue
            seconds = before.elapsed_time(after) / 1000 if self.cuda else after - before
            sums.setdefault(stage, []).append(seconds)
        return {str(s): sum(v) / len(v) for s, v in sorted(sums.items())}


class Peaks:
    """Peak allocated / reserved device memory of one phase."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, float | None]:
        if not self.cuda:
            return {"allocated_gib": None, "reserved_gib": None}
        return {"allocated_gib": torch.cuda.max_memory_allocated() / GiB,
                "reserved_gib": torch.cuda.max_memory_reserved() / GiB}


def run_case(name: str, resolution: str, models, args) -> dict:
    plan, budget, kwargs, attention = CASES[name]
    width, height, variant = RESOLUTIONS[resolution]
    text, dit, vae = models
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget * GiB / total) if budget else 1.0)
    dit.attention_mode = attention
    if budget:  # also given to the planner: older torch cannot read the per-process fraction back
        kwargs = {**kwargs, "budget_gb": float(budget)}
    memory = MemoryManager(plan, device=device, **kwargs)
    pipe = PyramidFlowPipeline(dit, vae, text, "flux", variant, torch.bfloat16, memory)
    clock, peaks, result = Clock(device), Peaks(device), {"case": name, "resolution": resolution, "plan": plan}
    try:
        steps = [args.steps] * 3
        plan_info = memory.prepare(width, height, args.temp, dtype=torch.bfloat16)
        result.update(chosen=plan_info.chosen, describe=plan_info.describe(),
                      estimate_gib=plan_info.peak_bytes / GiB,
                      budget_gib=None if plan_info.budget_bytes is None else plan_info.budget_bytes / GiB)
        pipe.text_cache.clear()
        start = clock.sync()
        peaks.start()
        embeddings = pipe.encode_prompt(PROMPT)
        text_done = clock.sync()
        result["text_peak"] = peaks.read()
        peaks.start()
        clock.mark(-1)
        latents = pipe.generate(
            prompt_embeds=embeddings, height=height, width=width, temp=args.temp, num_inference_steps=steps,
            video_num_inference_steps=steps, output_type="latent", seed=0,
            step_callback=lambda info: clock.mark(info.stage), callback=lambda unit, n: clock.mark(-1),
        )
        sampled = clock.sync()
        result["sampling_peak"] = peaks.read()
        peaks.start()
        frames = pipe.decode(latents[:, :, :2], output_type="pt")
        done = clock.sync()
        result["decode_peak"] = peaks.read()
        result.update(
            text_s=text_done - start, sampling_s=sampled - text_done, decode_s=done - sampled, end_to_end_s=done - start,
            s_per_step=clock.per_stage(), frames=list(frames.shape), weight_copies_gib=memory.stats.bytes_copied / GiB,
            finite=bool(torch.isfinite(latents.float()).all()),
        )
        phases = [result[p] for p in ("text_peak", "sampling_peak", "decode_peak")]
        for key in ("allocated_gib", "reserved_gib"):
            values = [p[key] for p in phases if p[key] is not None]
            result[f"peak_{key}"] = max(values) if values else None
    except Exception as err:  # an OOM (or anything else) is a result too; the next case starts clean
        result["error"] = f"{type(err).__name__}: {err}"
    finally:
        memory.close()
        dit.attention_mode = "segmented"
        gc.collect()
    return result


def _by_case(results, resolution="768p"):
    return {r["case"]: r for r in results if r["resolution"] == resolution and "error" not in r}


def _peak_at_most(results, case, limit):
    r = _by_case(results).get(case)
    if r is None or r.get("peak_allocated_gib") is None:
        return None, "not measured"
    return r["peak_allocated_gib"] <= limit, f"{r['peak_allocated_gib']:.2f} GiB allocated, {r['peak_reserved_gib']:.2f} reserved"


def _ratio_at_most(results, case, reference, limit):
    rows = _by_case(results)
    if case not in rows or reference not in rows:
        return None, "not measured"
    ratio = rows[case]["end_to_end_s"] / rows[reference]["end_to_end_s"]
    sampling = rows[case]["sampling_s"] / rows[reference]["sampling_s"]
    return ratio <= limit, f"end-to-end ratio {ratio:.3f}, sampling ratio {sampling:.3f} (limit {limit:.3f})"


def table(results) -> str:
    lines = ["| res | case | chosen | est. GiB | peak alloc GiB | peak reserved GiB | s/step st0 | st1 | st2 | "
             "sampling s | end-to-end s | x none |", "|" + "---|" * 12]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['resolution']} | {r['case']} | {r.get('chosen', '-')} | | | | | | | | | {r['error'][:90]} |")
            continue
        none = _by_case(results, r["resolution"]).get("none")
        ratio = f"{r['end_to_end_s'] / none['end_to_end_s']:.2f}" if none else "-"
        steps = [r["s_per_step"].get(str(s), float("nan")) for s in range(3)]
        fmt = (lambda v: "-" if v is None else f"{v:.2f}")
        lines.append(
            f"| {r['resolution']} | {r['case']} | {r['chosen']} | {r['estimate_gib']:.2f} | {fmt(r['peak_allocated_gib'])} | "
            f"{fmt(r['peak_reserved_gib'])} | {steps[0]:.3f} | {steps[1]:.3f} | {steps[2]:.3f} | {r['sampling_s']:.1f} | "
            f"{r['end_to_end_s']:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small random models (script self-check)")
    parser.add_argument("--temp", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1, help="Euler steps per stage, every unit")
    parser.add_argument("--resolutions", default="384p,768p")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--deadline-s", type=float, default=450, help="skip the remaining runs after this long")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a machine with one NVIDIA GPU (or use --small --device cpu to self-check)")
    if args.small:
        RESOLUTIONS.update({"384p": (128, 128, "diffusion_transformer_384p"), "768p": (256, 128, "diffusion_transformer_768p")})

    began = time.perf_counter()
    models = build_components("small" if args.small else "full", torch.bfloat16)
    setup_s = time.perf_counter() - began
    print(f"built random models in {setup_s:.0f} s", flush=True)
    warm = argparse.Namespace(**{**vars(args), "temp": 2})
    run_case("none", args.resolutions.split(",")[0], models, warm)  # CUDA/cuBLAS start-up off the clock
    results, skipped = [], []
    for resolution in args.resolutions.split(","):
        for name in args.cases.split(","):
            if time.perf_counter() - began > args.deadline_s:
                skipped.append(f"{resolution}/{name}")
                continue
            result = run_case(name, resolution, models, args)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "describe"}), flush=True)

    checks = []
    for description, check in TARGETS_768P:
        ok, detail = check(results)
        checks.append({"target": description, "ok": ok, "detail": detail})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device.startswith("cuda") else args.device
    report = {
        "device": device, "torch": torch.__version__, "temp": args.temp, "steps_per_stage": args.steps,
        "small_models": args.small, "setup_s": setup_s, "total_s": time.perf_counter() - began,
        "skipped": skipped, "results": results, "targets_768p": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{device}, temp {args.temp}, {args.steps} step(s) per stage\n")
    print(table(results))
    print()
    for r in results:
        if "describe" in r:
            print(f"  {r['resolution']} {r['case']}: {r['describe']}")
    print()
    for c in checks:
        mark = {True: "PASS", False: "FAIL", None: "----"}[c["ok"]]
        print(f"{mark}  {c['target']}: {c['detail']}")
    if skipped:
        print(f"skipped after the deadline: {', '.join(skipped)}")
    print(f"\nwrote {args.out} ({report['total_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
