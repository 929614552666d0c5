"""Several processes, one generation (launched with torchrun; gloo on CPU, NCCL on GPU).

* `groups`: launch detection (`LaunchEnv`), the degrees (`ParallelPlan`, `choose_plan`), the process groups
  of a run (`ParallelGroups`), joining and leaving the default group.
* `guidance`: CFG-parallel (`CfgParallel`): a pair of ranks, one guidance branch each.
* `sequence`: Ulysses sequence parallelism inside the DiT (`SequenceParallel`, `SequenceShard`).
* `comm`: the collectives (`Channel`), their timing (`CommStats`) and `PeerFailure`.
"""
from .comm import Channel, CommStats, PeerFailure
from .groups import LaunchEnv, ParallelGroups, ParallelPlan, choose_plan, start_process_group, stop_process_group
from .guidance import CfgParallel
from .sequence import SequenceParallel, SequenceShard, sp_degrees

__all__ = [
    "CfgParallel", "Channel", "CommStats", "LaunchEnv", "ParallelGroups", "ParallelPlan", "PeerFailure",
    "SequenceParallel", "SequenceShard", "choose_plan", "sp_degrees", "start_process_group", "stop_process_group",
]
