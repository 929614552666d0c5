"""Launch detection, the choice of degrees, and the process groups of one multi-process run.

Ranks are laid out cfg-major: rank = cfg_index * sp + sp_index, so the ranks of a sequence-parallel group
(the chatty one: two all-to-alls per block) are neighbours, on one machine when there are several. Every rank
holds the whole DiT; nothing here is global: the groups live in the `ParallelGroups` a run creates.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping, TypeVar

import torch
import torch.distributed as dist

from ..settings import DIST_TIMEOUT_S
from .comm import Channel, CommStats, PeerFailure
from .guidance import CfgParallel
from .sequence import SequenceParallel, sp_degrees

__all__ = ["LaunchEnv", "ParallelGroups", "ParallelPlan", "choose_plan", "start_process_group", "stop_process_group"]

T = TypeVar("T")
MAX_LISTED_WORLD = 64  # world sizes listed in an error message


@dataclass(frozen=True)
class LaunchEnv:
    """What a launcher (torchrun) tells each process: its rank, the world size and where to rendezvous."""

    world_size: int
    rank: int
    local_rank: int

    @classmethod
    def detect(cls, env: Mapping[str, str] | None = None) -> LaunchEnv | None:
        """The launch of this process, or None for a single process (no WORLD_SIZE, or WORLD_SIZE=1).

        ValueError when the variables are incomplete or inconsistent (start it with torchrun).
        """
        env = os.environ if env is None else env
        if int(env.get("WORLD_SIZE", "1") or 1) <= 1:
            return None
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={env['WORLD_SIZE']} is set but {', '.join(missing)} is not: start several processes "
                "with torchrun (torchrun --nproc-per-node N -m pyramid_core ...), or unset WORLD_SIZE"
            )
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local = int(env.get("LOCAL_RANK", rank))
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(world, rank, local)


@dataclass(frozen=True)
class ParallelPlan:
    """How a world splits: `cfg` ranks per guidance pair (1 or 2) times `sp` sequence-parallel ranks."""

    cfg: int
    sp: int

    @property
    def world_size(self) -> int:
        return self.cfg * self.sp

    def describe(self) -> str:
        parts = [f"CFG-parallel {self.cfg}" if self.cfg > 1 else "", f"sequence-parallel {self.sp}" if self.sp > 1 else ""]
        return f"{self.world_size} processes: " + (" x ".join(p for p in parts if p) or "each runs everything")


def choose_plan(
    world_size: int, *, guidance: bool, heads: int, cfg: str | int = "auto", sp: int | None = None
) -> ParallelPlan:
    """The degrees of a world: `cfg` 'auto' (2 when guidance is on and the world is even), 1 or 2; `sp` None:
    the rest. ValueError naming what works when the world cannot split so (heads must divide by sp)."""
    if sp is not None and (sp < 1 or world_size % sp):
        raise ValueError(f"--sp-degree {sp} does not divide the world size {world_size}")
    if cfg == "auto":
        candidates = [2, 1] if guidance and world_size % 2 == 0 else [1]
        if sp is not None:
            candidates = [world_size // sp]
    else:
        if int(cfg) not in (1, 2):
            raise ValueError(f"--cfg-parallel must be auto, 1 or 2, got {cfg}")
        if int(cfg) == 2 and world_size % 2:
            raise ValueError(f"--cfg-parallel 2 pairs the ranks: it needs an even world size, got {world_size}")
        candidates = [int(cfg)]
    for degree in candidates:
        plan = ParallelPlan(degree, world_size // degree)
        if sp is not None and plan.sp != sp:
            raise ValueError(f"--cfg-parallel {degree} x --sp-degree {sp} makes {degree * sp} processes, but "
                             f"{world_size} were started")
        if plan.cfg > 2:
            raise ValueError(f"--sp-degree {sp} leaves {plan.cfg} ranks per guidance pair in a world of {world_size}; "
                             f"use --sp-degree {world_size}" + (f" or {world_size // 2}" if world_size % 2 == 0 else ""))
        if plan.cfg == 2 and not guidance:
            raise ValueError("CFG-parallel 2 splits the two guidance branches, but guidance is off (--guidance 0); "
                             "use --cfg-parallel 1 or auto" + (f" and --sp-degree {world_size}" if sp else ""))
        if heads % plan.sp == 0:
            return plan
    raise ValueError(_no_split(world_size, guidance, heads, candidates))


def _no_split(world_size: int, guidance: bool, heads: int, candidates: list[int]) -> str:
    degrees = sp_degrees(heads)
    worlds = sorted({d for d in degrees} | ({2 * d for d in degrees} if guidance else set()))
    tried = " or ".join(f"sequence-parallel {world_size // c}" + (" with CFG-parallel 2" if c == 2 else "")
                        for c in candidates)
    listed = ", ".join(str(w) for w in worlds if 1 < w <= MAX_LISTED_WORLD)
    return (f"a world of {world_size} processes needs {tried}, but this DiT's {heads} attention heads split only over "
            f"sequence-parallel degrees {', '.join(map(str, degrees))}; launch one of {listed} processes"
            + ("" if guidance else " (guidance is off: no CFG-parallel pairs)"))


def start_process_group(launch: LaunchEnv, device: torch.device, timeout_s: float = DIST_TIMEOUT_S) -> torch.device:
    """Join the launch's default process group: gloo for `device` cpu, NCCL for cuda (each rank on
    cuda:LOCAL_RANK). Returns the device this rank runs on; ValueError naming the fix for a setup that cannot work."""
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed: run one process, or install a build with it")
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise ValueError("--device cuda with several processes needs NCCL, which this PyTorch build lacks (Windows "
                             "and macOS builds have none): use a Linux CUDA build of PyTorch, or --device cpu (gloo)")
        if device.index is not None and device.index != launch.local_rank:
            raise ValueError(f"with several processes each rank runs on cuda:LOCAL_RANK (here cuda:{launch.local_rank}); "
                             f"pass --device cuda, not {device} (choose GPUs with CUDA_VISIBLE_DEVICES)")
        count = torch.cuda.device_count()
        if launch.local_rank >= count:
            raise ValueError(f"LOCAL_RANK {launch.local_rank} has no GPU: this machine shows {count}; start at most "
                             f"--nproc-per-node {count}")
        device, backend = torch.device("cuda", launch.local_rank), "nccl"
        torch.cuda.set_device(device)
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"several processes run on cuda (NCCL) or cpu (gloo), not {device.type}")
    try:
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:  # DistNetworkError / DistStoreError: the rendezvous did not complete
        raise PeerFailure(
            f"rank {launch.rank}: could not join the {launch.world_size}-process group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within {timeout_s:g} s: "
            f"{' '.join(str(exc).split())[:200]}"
        ) from exc
    return device


def stop_process_group() -> None:
    """Leave the default process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True, eq=False)
class ParallelGroups:
    """This rank's groups in a run: `cfg` (None unless CFG-parallel), `sequence` (None unless sequence-parallel)
    and `world` (every rank: text sharing, broadcasts)."""

    plan: ParallelPlan
    device: torch.device
    world: Channel
    cfg: CfgParallel | None
    sequence: SequenceParallel | None

    @classmethod
    def create(cls, plan: ParallelPlan, device: torch.device, timeout_s: float = DIST_TIMEOUT_S,
               stats: CommStats | None = None) -> ParallelGroups:
        """Make the groups of `plan` in the joined default group (every rank calls this, with the same plan)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelGroups.create needs a process group: call start_process_group first")
        world, rank = dist.get_world_size(), dist.get_rank()
        if plan.world_size != world:
            raise ValueError(f"{plan.describe()} does not fit a world of {world}")
        stats = stats if stats is not None else CommStats()
        timeout = timedelta(seconds=timeout_s)
        cfg_index, sp_index = divmod(rank, plan.sp)
        channels: dict[str, Channel] = {}
        layouts = {  # name -> (its groups' ranks, this rank's group, index inside it)
            "sequence-parallel": ([[c * plan.sp + i for i in range(plan.sp)] for c in range(plan.cfg)], cfg_index, sp_index),
            "CFG-parallel": ([[c * plan.sp + i for c in range(plan.cfg)] for i in range(plan.sp)], sp_index, cfg_index),
        }
        for name, (groups, mine, index) in layouts.items():
            if len(groups[0]) < 2:
                continue
            for number, ranks in enumerate(groups):  # every rank creates every group, in the same order
                group = dist.new_group(ranks, timeout=timeout)
                if number == mine:
                    channels[name] = Channel(name, group, tuple(ranks), index, timeout_s, stats)
        everyone = Channel("world", None, tuple(range(world)), rank, timeout_s, stats)
        cfg = CfgParallel(channels["CFG-parallel"]) if "CFG-parallel" in channels else None
        sequence = SequenceParallel(channels["sequence-parallel"]) if "sequence-parallel" in channels else None
        return cls(plan, device, everyone, cfg, sequence)

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def is_first(self) -> bool:
        """Rank 0: the one that encodes text, decodes and writes."""
        return self.world.rank == 0

    def share(self, make: Callable[[], T]) -> T:
        """`make()` run on rank 0 only, its (picklable) result on every rank; a failure there fails every rank."""
        if not self.is_first:
            status, value = self.world.broadcast_object(None)
            if status == "error":
                raise PeerFailure(f"rank {self.rank}: rank 0 failed: {value}")
            return value
        try:
            value = make()
        except Exception as exc:
            self.world.broadcast_object(("error", f"{type(exc).__name__}: {exc}"))
            raise
        self.world.broadcast_object(("ok", value))
        return value

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` on every rank (same shape everywhere), in place."""
        return self.world.broadcast(tensor)
