"""Several processes from one command line: torchrun's environment read, the degrees chosen and checked before
anything loads, the process group joined for the run and left after it. Without a launcher (no WORLD_SIZE, or
WORLD_SIZE=1) nothing here touches torch.distributed."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING, Iterator

from .request import GenerationRequest, UsageError

if TYPE_CHECKING:
    from ..parallel import ParallelGroups

__all__ = ["parallel_session"]


@contextlib.contextmanager
def parallel_session(
    args: argparse.Namespace, request: GenerationRequest, heads: int
) -> Iterator[tuple[GenerationRequest, ParallelGroups | None]]:
    """(the request as this rank runs it, its groups or None for one process) for the length of a run.

    Under torchrun the request's device becomes this rank's (cuda:LOCAL_RANK, or cpu with gloo) and every rank
    but 0 turns quiet. Bad degrees, NCCL missing, or a GPU count below the process count: UsageError / ValueError
    before the process group is joined.
    """
    from ..parallel import LaunchEnv, ParallelGroups, choose_plan, start_process_group, stop_process_group

    launch = LaunchEnv.detect()
    if launch is None:
        if args.cfg_parallel == "2" or (args.sp_degree or 1) > 1:
            raise UsageError("--cfg-parallel 2 and --sp-degree split the work of several processes: start them with "
                             "torchrun --nproc-per-node N -m pyramid_core ...")
        yield request, None
        return
    timeout = args.dist_timeout
    if not (math.isfinite(timeout) and timeout > 0):
        raise UsageError(f"--dist-timeout must be a positive number of seconds, got {timeout}")
    plan = choose_plan(launch.world_size, guidance=request.guidance > 0, heads=heads, cfg=args.cfg_parallel,
                       sp=args.sp_degree)
    device = start_process_group(launch, request.device, timeout)
    try:
        groups = ParallelGroups.create(plan, device, timeout)
        quiet = request.quiet or not groups.is_first
        yield dataclasses.replace(request, device=device, quiet=quiet, verbose=request.verbose and not quiet), groups
    finally:
        stop_process_group()
