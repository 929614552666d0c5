"""CPU benchmark of the memory plans on small random models (a script, not a test).

Runs every plan in its own process (so peak RSS is per plan) on the same random text encoder, miniFLUX DiT
and VAE, and prints per plan: peak host RSS, the manager's peak of weights "on the device" (on CPU the
device is the host, so this is bookkeeping of what a GPU would hold), seconds per DiT step per stage,
end-to-end seconds, the ratio to 'none', and how far the latents are from 'none' (bit-identical, or the
largest difference relative to the largest value).

    python bench/cpu_plans.py                      # 256x256, temp 4, steps 2 per stage
    python bench/cpu_plans.py --width 384 --height 256 --temp 6 --json cpu_plans.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).absolute().parents[1]
sys.path.insert(0, str(REPO))

PLANS = ("none", "model", "block_swap", "sequential", "auto")


def worker(args) -> dict:
    import torch

    from bench._models import build_components
    from pyramid_core.memory import DirectCopies, GiB, MemoryManager, Workload
    from pyramid_core.pipeline import PyramidFlowPipeline

    torch.manual_seed(0)
    text, dit, vae = build_components("small", torch.float32)
    kwargs = {}
    if args.worker == "block_swap":
        kwargs = dict(resident_blocks=len(dit.blocks) // 2, prefetch=2)
    # an explicit backend: the plans' mechanics run as asked (the default runs every plan as 'none' on a CPU)
    memory = MemoryManager(args.worker, device="cpu", margin_gb=0, backend=DirectCopies(torch.device("cpu")), **kwargs)
    pipe = PyramidFlowPipeline(dit, vae, text, "flux", "diffusion_transformer_384p", torch.float32, memory)
    if args.worker == "auto":  # 80 % of what the DiT needs whole (or the next largest floor): auto streams blocks
        demands = memory.demands(Workload(args.width, args.height, args.temp, True, 4))
        need = demands["dit"].sizes.total + demands["dit"].activation
        others = max(d.sizes.total + d.floor_activation for n, d in demands.items() if n != "dit")
        memory.budget_gb = max(0.8 * need, others) / GiB

    step_times: dict[int, list[float]] = {0: [], 1: [], 2: []}
    clock = [time.perf_counter()]

    def on_step(info):
        now = time.perf_counter()
        step_times[info.stage].append(now - clock[0])
        clock[0] = now

    def on_unit(unit, num_units):
        clock[0] = time.perf_counter()

    start = time.perf_counter()
    latents = pipe.generate(
        prompt="a red fox running through snow", height=args.height, width=args.width, temp=args.temp,
        num_inference_steps=[args.steps] * 3, video_num_inference_steps=[args.steps] * 3,
        output_type="latent", seed=1, step_callback=on_step, callback=on_unit,
    )
    sampled = time.perf_counter()
    frames = pipe.decode(latents, output_type="pt")
    end = time.perf_counter()
    torch.save(latents, args.latents_out)
    plan = memory.last_plan
    return {
        "plan": args.worker,
        "chosen": plan.chosen,
        "describe": plan.describe(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_weights_mib": memory.stats.peak_device_bytes / 2**20,
        "pinned_or_packed_mib": memory.stats.streamed_bytes / 2**20,
        "sync_loads": memory.stats.sync_loads,
        "weight_copies_mib": memory.stats.bytes_copied / 2**20,
        "s_per_step": {str(s): sum(t) / len(t) for s, t in step_times.items() if t},
        "sampling_s": sampled - start,
        "end_to_end_s": end - start,
        "frames": list(frames.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--temp", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="Euler steps per stage, every unit")
    parser.add_argument("--plans", default=",".join(PLANS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=PLANS, help=argparse.SUPPRESS)
    parser.add_argument("--latents-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for plan in args.plans.split(","):
            out = os.path.join(tmp, f"{plan}.pt")
            cmd = [sys.executable, __file__, "--worker", plan, "--latents-out", out, "--width", str(args.width),
                   "--height", str(args.height), "--temp", str(args.temp), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode:
                sys.exit(f"plan {plan} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["latents"] = out
            results.append(result)
        reference = next((r for r in results if r["plan"] == "none"), results[0])
        ref_latents = torch.load(reference["latents"])
        for r in results:
            latents = torch.load(r["latents"])
            r["same_latents_as_none"] = bool(torch.equal(latents, ref_latents))
            r["max_rel_diff_to_none"] = float((latents - ref_latents).abs().max() / ref_latents.abs().max())
            r["ratio_to_none"] = r["end_to_end_s"] / reference["end_to_end_s"]
            del r["latents"]

    print(f"\n{args.width}x{args.height}, temp {args.temp}, {args.steps} steps per stage, "
          f"torch threads {torch.get_num_threads()}")
    header = ("| plan | chosen | peak RSS MiB | device weights MiB | s/step st0 | st1 | st2 | end-to-end s | x none "
              "| vs none |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        steps = [r["s_per_step"].get(str(s), float("nan")) for s in range(3)]
        print(f"| {r['plan']} | {r['chosen']} | {r['peak_rss_mib']:.0f} | {r['peak_device_weights_mib']:.1f} | "
              f"{steps[0]:.3f} | {steps[1]:.3f} | {steps[2]:.3f} | {r['end_to_end_s']:.2f} | "
              f"{r['ratio_to_none']:.2f} | "
              f"{'identical' if r['same_latents_as_none'] else format(r['max_rel_diff_to_none'], '.1e')} |")
    for r in results:
        print(f"  {r['plan']}: {r['describe']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
