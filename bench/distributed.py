"""One guided DiT step split over several processes: time per step and the share spent communicating.

Real-width miniFLUX (30 heads x 64 = 1920; `--double` double-stream and `--single` single-stream blocks), random
weights, 128 text tokens padded differently for the negative and positive prompt, the clips of one pyramid step
(default: 384p, unit 1, stage 1 = 480 video + 128 text tokens). A step is what the sampler does per Euler step:
the DiT on the CFG batch [negative; positive], then u + g (c - u). Each layout runs in its own set of processes:

* 1 process: the CFG batch of 2 in one forward (the reference);
* CFG-parallel 2: each rank of a pair one branch (batch 1), one all-gather of the velocities;
* sequence-parallel K: each rank 1/K of the tokens, two all-to-alls per block, one all-gather at the end;
* both (4 processes: CFG 2 x SP 2) with `--worlds ...,4`.

Prints per layout: the median step time over `--repeat` steps (after one warm-up), the speed-up over one
process, the communication share (time inside collectives, waiting for slower ranks included, over the step
time; rank 0), and the largest difference of the guided velocity from one process's, relative to its largest
value. CPU runs use gloo with cores/processes threads each (a 2-core host with 3 processes is oversubscribed:
the figures show the overheads, not a speed-up); `--device cuda` runs one process per GPU with NCCL.

    python bench/distributed.py [--worlds 1,2,3] [--device cpu|cuda] [--res 384p] [--unit 1] [--stage 1]
                                [--repeat 3] [--double 1] [--single 2]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pyramid_core.models.attention import HostTextMask  # noqa: E402
from pyramid_core.models.dit import configure_dit  # noqa: E402
from pyramid_core.models.flux import PyramidFluxTransformer  # noqa: E402
from pyramid_core.parallel import CommStats, LaunchEnv, ParallelGroups, ParallelPlan  # noqa: E402
from pyramid_core.parallel import start_process_group, stop_process_group  # noqa: E402
from pyramid_core.sampling import clean_pyramid, guided_velocity, history_for_stage  # noqa: E402
from pyramid_core.text import TextEmbeddings  # noqa: E402
from bench.official_compare import fill_fixture_weights  # noqa: E402

LATENT = {"384p": (48, 80), "768p": (96, 160)}  # latent (h, w) of 640x384 and 1280x768 video
TEXT_TOKENS, TEXT_DIM, POOLED_DIM, GUIDANCE = 128, 4096, 768, 7.0
LAYOUTS = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 3: [(1, 3)], 4: [(2, 2), (1, 4)]}  # world -> (cfg, sp) layouts
LAYOUTS_30_HEADS = {world: [(c, s) for c, s in layouts if 30 % s == 0] for world, layouts in LAYOUTS.items()}


def build_dit(double: int, single: int) -> PyramidFluxTransformer:
    """Real-width miniFLUX with `double` + `single` blocks, seeded weights (the same in every process)."""
    dit = PyramidFluxTransformer(num_layers=double, num_single_layers=single)
    fill_fixture_weights(dit, seed=1001)
    return dit.eval()


def step_inputs(res: str, unit: int, stage: int, device: torch.device):
    """(clips, timestep, text [negative; positive], host mask) of one step at `unit`, `stage`: batch 1, the CFG
    batch is made per layout."""
    generator = torch.Generator("cpu").manual_seed(7)
    h, w = LATENT[res]
    history = []
    if unit:
        pyramid = clean_pyramid(torch.randn(1, 16, unit, h, w, generator=generator))
        history = history_for_stage(pyramid, stage)
    scale = 2 ** (2 - stage)
    current = torch.randn(1, 16, 1, h // scale, w // scale, generator=generator)
    mask = torch.zeros(2, TEXT_TOKENS, dtype=torch.long)
    mask[0, :40], mask[1, :20] = 1, 1  # negative and positive prompts of different lengths
    text = TextEmbeddings(torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=generator), mask,
                          torch.randn(2, POOLED_DIM, generator=generator)).to(device)
    clips = [c.to(device) for c in [*history, current]]
    return clips, torch.full((1,), 600.0, device=device), text, HostTextMask(mask)


def guided_step(dit, clips, timestep, text, mask, groups: ParallelGroups | None) -> torch.Tensor:
    """One sampler step's velocity: the DiT on the CFG batch (or this rank's branch) and the guidance."""
    if groups is not None and groups.cfg is not None:
        text, mask = groups.cfg.branch_text(text, mask)
        velocity = groups.cfg.gather(dit(clips, timestep, text.prompt_embeds, mask, text.pooled))
    else:
        doubled = [torch.cat([c, c]) for c in clips]
        velocity = dit(doubled, timestep.repeat(2), text.prompt_embeds, mask, text.pooled)
    return guided_velocity(velocity, GUIDANCE)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(rank: int, world: int, cfg: int, port: int, args: argparse.Namespace, folder: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    groups = None
    stats = CommStats(enabled=True)
    if world > 1:
        device = start_process_group(LaunchEnv(world, rank, rank), device, timeout_s=600)
        groups = ParallelGroups.create(ParallelPlan(cfg, world // cfg), device, 600, stats=stats)
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dit = build_dit(args.double, args.single).to(device)
        if groups is not None and groups.sequence is not None:
            configure_dit(dit, sequence_parallel=groups.sequence)
        clips, timestep, text, mask = step_inputs(args.res, args.unit, args.stage, device)
        times, comm = [], []
        with torch.no_grad():
            for repeat in range(args.repeat + 1):  # the first is a warm-up
                if groups is not None:
                    groups.world.broadcast(torch.zeros(1, device=device))  # start together
                _sync(device)
                stats.reset()
                start = time.perf_counter()
                velocity = guided_step(dit, clips, timestep, text, mask, groups)
                _sync(device)
                if repeat:
                    times.append(time.perf_counter() - start)
                    comm.append(stats.total_seconds)
        if rank == 0:
            torch.save({"times": times, "comm": comm, "velocity": velocity.float().cpu(),
                        "tokens": TEXT_TOKENS + sum(c.shape[2] * c.shape[3] * c.shape[4] // 4 for c in clips)},
                       folder / f"{world}-{cfg}.pt")
    finally:
        stop_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(world: int, cfg: int) -> str:
    sp = world // cfg
    if world == 1:
        return "1 process"
    parts = [f"CFG-parallel {cfg}" if cfg > 1 else "", f"sequence-parallel {sp}" if sp > 1 else ""]
    return " x ".join(p for p in parts if p)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="1,2,3", help="process counts to run, comma-separated (1..4)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--res", default="384p", choices=tuple(LATENT))
    parser.add_argument("--unit", type=int, default=1, help="latent frames of history (default 1)")
    parser.add_argument("--stage", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (default 1; the real model: 8)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (default 2; the real model: 16)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process (default cores/processes)")
    args = parser.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        parser.error(f"--worlds {args.worlds} needs {max(worlds)} GPUs; this machine has {torch.cuda.device_count()}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for world in worlds:
            for cfg, sp in LAYOUTS_30_HEADS[world]:
                mp.start_processes(_worker, args=(world, cfg, free_port(), args, folder), nprocs=world,
                                   start_method="spawn")  # forked OpenMP threads can deadlock
                result = torch.load(folder / f"{world}-{cfg}.pt")
                rows.append({"world": world, "cfg": cfg, "sp": sp, "layout": describe(world, cfg), **result})
    reference = rows[0] if rows[0]["world"] == 1 else None
    backend = "NCCL" if args.device == "cuda" else f"gloo, {os.cpu_count()} cores"
    print(f"miniFLUX 30 heads x 64, {args.double}+{args.single} blocks, {args.res} unit {args.unit} stage "
          f"{args.stage}: {rows[0]['tokens']} tokens per sample, CFG batch 2; {args.device} ({backend})")
    print(f"{'processes':>9}  {'layout':<36}{'s/step':>8}{'speed-up':>10}{'comm share':>12}{'max rel diff':>14}")
    for row in rows:
        median = statistics.median(row["times"])
        share = statistics.median(c / t for c, t in zip(row["comm"], row["times"]))
        speed = f"{statistics.median(reference['times']) / median:.2f}x" if reference else "-"
        diff = "-"
        if reference is not None:
            ref = reference["velocity"]
            diff = f"{((row['velocity'] - ref).abs().max() / ref.abs().max()).item():.1e}"
        row.update(median_s=median, comm_share=share)
        print(f"{row['world']:>9}  {row['layout']:<36}{median:>8.3f}{speed:>10}{share:>11.0%}{diff:>14}")
    return rows


if __name__ == "__main__":
    main()
