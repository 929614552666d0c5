"""The plan chooser: sizes and working memory in, placements out. Pure: no devices, no modules.

Placements, fastest first: none (everything resident), model (whole component while it runs),
block_swap (non-block weights + K blocks resident, the rest streamed through `prefetch` slots) and
sequential (each module's own weights through slots). 'auto' takes, per component, the fastest that
fits the budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from ..settings import PLANS
from .estimates import GiB, VAE_DECODE_OPTIONS, ComponentSizes, Demand, Workload

DEFAULT_PREFETCH = 2
ASSUMED_HOST_TO_DEVICE_BYTES_PER_S = 20e9  # pinned PCIe 4.0 x16; only for reported estimates


def check_plan(plan: str) -> None:
    """ValueError listing the plans when `plan` is not one."""
    if plan not in PLANS:
        raise ValueError(f"unknown memory plan {plan!r}; choose one of {', '.join(PLANS)}")


def format_bytes(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / (1 << 20):.1f} MiB"


def budget_gb_text(nbytes: int, up: bool) -> str:
    """`nbytes` as a budget_gb value rounded to 3 significant digits (up: at least nbytes; else at most)."""
    gb = max(nbytes, 1) / GiB
    step = 10 ** (math.floor(math.log10(gb)) - 2)
    steps = math.ceil(gb / step - 1e-9) if up else math.floor(gb / step + 1e-9)
    return f"{steps * step:.{max(0, -int(math.floor(math.log10(step))))}f}"


@dataclass(frozen=True)
class ComponentPlan:
    """Placement of one component and its device estimate."""

    placement: str  # none | model | block_swap | sequential
    peak_bytes: int  # weights on the device plus working memory while it runs
    resident_blocks: int | None = None  # block_swap: K
    prefetch: int = DEFAULT_PREFETCH
    streamed_bytes: int = 0  # weight bytes copied per forward

    def describe(self, sizes: ComponentSizes | None = None) -> str:
        text = self.placement
        if self.placement == "block_swap":
            total = f"/{len(sizes.blocks)}" if sizes is not None else ""
            k = self.resident_blocks if sizes is None else min(self.resident_blocks or 0, len(sizes.blocks))
            text += f" K={k}{total} prefetch {self.prefetch}"
        return f"{text} ({format_bytes(self.peak_bytes)})"


@dataclass(frozen=True)
class MemoryPlan:
    """A plan resolved for one workload: per-component placements and the estimated device peak."""

    name: str  # the requested plan ('auto' included)
    chosen: str  # what it resolved to: the DiT's placement ('none' when everything stays resident)
    components: Mapping[str, ComponentPlan]
    peak_bytes: int
    budget_bytes: int | None
    workload: Workload
    demands: Mapping[str, Demand] = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        parts = ", ".join(f"{n} {p.describe(self.demands[n].sizes if n in self.demands else None)}"
                          for n, p in self.components.items())
        budget = f" within a budget of {format_bytes(self.budget_bytes)}" if self.budget_bytes is not None else ""
        head = f"memory plan {self.name!r}" + (f" -> {self.chosen!r}" if self.name != self.chosen else "")
        return f"{head} for {self.workload.describe()}: {parts}; estimated peak {format_bytes(self.peak_bytes)}{budget}"

    def seconds_of_transfer_per_forward(self, name: str = "dit") -> float:
        """Weight-copy time of one forward at the assumed host-to-device bandwidth (an estimate)."""
        plan = self.components.get(name)
        return 0.0 if plan is None else plan.streamed_bytes / ASSUMED_HOST_TO_DEVICE_BYTES_PER_S


def resident_block_indices(block_bytes: Sequence[int], count: int) -> set[int]:
    """Which `count` blocks stay resident: the largest first, evenly spread within equal sizes.

    Keeping large blocks resident makes the streamed ones (and so the slots) small; spreading them gives
    every streamed copy resident compute to hide behind.
    """
    count = max(0, min(count, len(block_bytes)))
    chosen: list[int] = []
    for size in sorted(set(block_bytes), reverse=True):
        members = [i for i, b in enumerate(block_bytes) if b == size]
        take = min(len(members), count - len(chosen))
        chosen += [members[int((j + 0.5) * len(members) / take)] for j in range(take)] if take else []
    return set(chosen)


def block_swap_plan(demand: Demand, resident: int, prefetch: int) -> ComponentPlan:
    """Rest + K resident blocks + `prefetch` slots of the largest streamed block + working memory."""
    sizes = demand.sizes
    keep = resident_block_indices(sizes.blocks, resident)
    streamed = [b for i, b in enumerate(sizes.blocks) if i not in keep]
    slots = min(prefetch, len(streamed)) * max(streamed) if streamed else 0
    peak = sizes.rest + sum(sizes.blocks[i] for i in keep) + slots + demand.activation
    return ComponentPlan("block_swap", peak, resident, prefetch, sum(streamed))  # K as asked: attach clamps and warns


def sequential_slots(sizes: ComponentSizes, prefetch: int) -> int:
    """Device bytes of the sequential plan's slots: the running chain of nested modules plus prefetch."""
    return (sizes.nesting + prefetch - 1) * sizes.largest_group


def placement_plan(demand: Demand, placement: str, prefetch: int, resident: int | None = None) -> ComponentPlan:
    sizes = demand.sizes
    if placement in ("none", "model") or not sizes.streamable:
        return ComponentPlan("model" if placement != "none" else "none", sizes.total + demand.activation)
    if placement == "block_swap":
        return block_swap_plan(demand, resident or 0, prefetch)
    return ComponentPlan("sequential", sequential_slots(sizes, prefetch) + demand.activation, prefetch=prefetch,
                         streamed_bytes=sizes.total)


def fastest_fit(demand: Demand, budget: int, prefetch: int) -> ComponentPlan | None:
    """model, else block_swap with the most resident blocks, else sequential - the first that fits."""
    floor = Demand(demand.sizes, demand.floor_activation)
    for candidate in (placement_plan(demand, "model", prefetch), placement_plan(floor, "model", prefetch)):
        if candidate.peak_bytes <= budget:
            return candidate
    if not demand.sizes.streamable:
        return None
    for k in range(len(demand.sizes.blocks) - 1, -1, -1):
        candidate = block_swap_plan(floor, k, prefetch)
        if candidate.peak_bytes <= budget:
            return candidate
    last = placement_plan(floor, "sequential", prefetch)
    return last if last.peak_bytes <= budget else None


def minimum_budget(demands: Mapping[str, Demand], prefetch: int = DEFAULT_PREFETCH) -> int:
    """Smallest device budget (bytes) any plan runs in: every component at its floor."""
    floors = [placement_plan(Demand(d.sizes, d.floor_activation), "sequential", prefetch) for d in demands.values()]
    return max((f.peak_bytes for f in floors), default=0)


def plan_memory(
    plan: str,
    demands: Mapping[str, Demand],
    budget: int | None,
    workload: Workload = Workload(),
    *,
    resident_blocks: int | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    margin: int = 0,
) -> MemoryPlan:
    """Resolve `plan` for these components. `budget` (bytes, margin already taken off) bounds 'auto'
    and the K of 'block_swap' when `resident_blocks` is None; None means unlimited. `resident_blocks`
    is the DiT's ('dit'); streamed encoders take the most blocks that fit.

    Raises ValueError for 'auto' when even the floor (sequential) does not fit; the message names
    the smallest workable budget (`margin` added back, so it is what to pass as budget_gb).
    """
    check_plan(plan)
    everything = sum(d.sizes.total for d in demands.values()) + max((d.activation for d in demands.values()), default=0)
    if plan == "none" or (plan == "auto" and (budget is None or everything <= budget)):
        components = {n: ComponentPlan("none", everything) for n in demands}
        return MemoryPlan(plan, "none", components, everything, budget, workload, dict(demands))
    components: dict[str, ComponentPlan] = {}
    for name, demand in demands.items():
        if plan == "auto":
            choice = fastest_fit(demand, budget, prefetch)  # type: ignore[arg-type]
            if choice is None:
                raise ValueError(_below_floor(demands, budget, workload, prefetch, margin))  # type: ignore[arg-type]
        elif plan == "block_swap" and demand.sizes.streamable:
            k = resident_blocks if name == "dit" else None
            if k is None and budget is not None:
                fit = [block_swap_plan(demand, n, prefetch) for n in range(len(demand.sizes.blocks), -1, -1)]
                choice = next((c for c in fit if c.peak_bytes <= budget), fit[-1])
            else:
                choice = block_swap_plan(demand, k or 0, prefetch)
        else:
            choice = placement_plan(demand, plan, prefetch, resident_blocks)
        components[name] = choice
    chosen = components["dit"].placement if "dit" in components else plan
    peak = max((c.peak_bytes for c in components.values()), default=0)
    return MemoryPlan(plan, chosen, components, peak, budget, workload, dict(demands))


def _below_floor(demands: Mapping[str, Demand], budget: int, workload: Workload, prefetch: int, margin: int) -> str:
    floor = minimum_budget(demands, prefetch) + margin
    with_margin = f" with the {format_bytes(margin)} safety margin" if margin else ""
    return (f"a budget of {format_bytes(budget + margin)} is below what the smallest plan needs for "
            f"{workload.describe()}: offload='sequential' needs about {format_bytes(floor)}{with_margin}; pass "
            f"budget_gb >= {budget_gb_text(floor, up=True)}, or lower the resolution or temp")


def vae_decode_choice(
    decode_bytes: Callable[[Workload, int, int], int] | None, available: int | None, save_memory: bool = True,
    workload: Workload = Workload(),
) -> tuple[int, int]:
    """(window_size, tile_sample_min_size) for a decode with `available` bytes of working memory: the
    official pair for `save_memory` ((1, 256) or (2, 512)) when it fits, else the largest smaller one
    (tiling changes pixels slightly, so the official pair is kept whenever possible).

    `decode_bytes(workload, window, tile)`: the VAE's own estimate (its `decode_working_memory_bytes`).
    """
    official = VAE_DECODE_OPTIONS[3] if save_memory else VAE_DECODE_OPTIONS[0]
    if decode_bytes is None or available is None:
        return official
    options = [o for o in VAE_DECODE_OPTIONS if o[0] <= official[0] and o[1] <= official[1]]
    for window, tile in options:
        if decode_bytes(workload, window, tile) <= available:
            return window, tile
    return options[-1]
