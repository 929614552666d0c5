"""Where model weights live, and every move of them between host and execution device.

The models and the sampler never move weights: a pipeline registers its components with a
`MemoryManager` and wraps each use in ``manager.use(name)``. Plans (fastest first):

  none        everything resident on the execution device.
  model       each component on the device only while it runs (the official ``cpu_offloading``).
  block_swap  while a component runs, its non-block weights and K transformer blocks are resident; the
              other blocks stream from pinned host memory through ``prefetch`` fixed device slots (the
              running block included) on a side stream, ordered against compute by events, so device
              memory is bounded by construction.
  sequential  each module's own weights on the device only around its own forward, through the same
              slots, with the next modules prefetched (the floor).
  auto        the fastest placement per component that fits a VRAM budget (default: free device memory
              minus a margin), from the real weight sizes and each component's own working-memory
              estimate; the VAE's decode tile and chunk come from the same budget.

Components without transformer blocks (the VAE) move whole under block_swap and sequential. While a
component is offloaded its host copies are the source of truth: weights must not be modified in place
while they are on the device (change them under plan 'none' or after ``offload_all()``, then
``register`` the component again).

Modules: `streams` (CUDA / plain / protocol), `weights` (the only tensor mover: groups, slots,
streaming), `placements` (per-component mechanism), `estimates` (sizes, working-memory formulas),
`planner` (pure plan chooser), `manager` (`MemoryManager`), `policy` (`MemoryPolicy`, the interface the
pipeline is typed against; the ComfyUI nodes implement it over ComfyUI's loader), `simulated` (a CPU stream
model for tests).
"""
from .estimates import (
    GiB,
    OFFICIAL_VAE_DECODE,
    TEXT_TOKENS,
    VAE_DECODE_OPTIONS,
    ComponentSizes,
    Demand,
    Workload,
    component_demands,
    dit_tokens,
    dit_working_memory,
    measure_component,
    text_working_memory,
    vae_decode_working_memory,
)
from .manager import (
    DEFAULT_MARGIN_GB,
    DeviceOutOfMemoryError,
    MemoryManager,
    converted_oom,
    default_device,
    is_device_oom,
    module_device,
    oom_advice,
)
from .policy import MemoryPolicy
from .placements import BLOCK_LIST_NAMES, find_stream_blocks
from ..settings import PLACEMENTS, PLANS
from .planner import (
    DEFAULT_PREFETCH,
    ComponentPlan,
    MemoryPlan,
    check_plan,
    minimum_budget,
    plan_memory,
    resident_block_indices,
    vae_decode_choice,
)
from .simulated import SimulatedStreams, StreamOrderError
from .streams import CudaStreams, DirectCopies, StreamBackend, backend_for
from .weights import MemoryStats

__all__ = [
    "BLOCK_LIST_NAMES", "DEFAULT_MARGIN_GB", "DEFAULT_PREFETCH", "GiB", "OFFICIAL_VAE_DECODE", "PLACEMENTS", "PLANS",
    "TEXT_TOKENS", "VAE_DECODE_OPTIONS", "ComponentPlan", "ComponentSizes", "CudaStreams", "Demand",
    "DeviceOutOfMemoryError", "DirectCopies", "MemoryManager", "MemoryPlan", "MemoryPolicy", "MemoryStats", "SimulatedStreams",
    "StreamBackend", "StreamOrderError", "Workload", "backend_for", "check_plan", "component_demands", "converted_oom",
    "default_device", "dit_tokens", "dit_working_memory", "find_stream_blocks", "is_device_oom",
    "measure_component", "minimum_budget", "module_device", "oom_advice", "plan_memory", "resident_block_indices",
    "text_working_memory", "vae_decode_choice", "vae_decode_working_memory",
]
