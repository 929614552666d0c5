"""`MemoryManager`: owns where each registered component's weights live under one plan.

The pipeline registers its components and wraps each use in ``manager.use(name)``; the manager asks the
planner for placements (for 'auto', from a device budget) and performs every move through the
placements. Out-of-memory errors inside a plan come back as `DeviceOutOfMemoryError` with advice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import traceback
import warnings
from types import MappingProxyType
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from .estimates import GiB, Demand, Workload, component_demands, measure_component
from .placements import BlockStream, LeafStream, Placement, PlacementContext, Resident, WholeSwap, find_stream_blocks
from ..settings import PLACEMENTS
from .planner import (
    DEFAULT_PREFETCH,
    ComponentPlan,
    MemoryPlan,
    budget_gb_text,
    check_plan,
    format_bytes,
    plan_memory,
    vae_decode_choice,
)
from .streams import PinWarning, StreamBackend, backend_for
from .weights import MemoryStats

logger = logging.getLogger(__name__)

DEFAULT_MARGIN_GB = 0.75  # allocator fragmentation and kernels' workspaces
CPU_PLAN_NOTE = ("offload plans have no effect on a CPU device (its weights already live in host memory); "
                 "running as 'none' instead of {plan!r}")

_OOM = torch.cuda.OutOfMemoryError  # torch.OutOfMemoryError is the same class on newer torch


class DeviceOutOfMemoryError(_OOM):  # type: ignore[misc, valid-type]
    """The device ran out of memory; the message names the plan and budget to use instead.

    A subclass of ``torch.OutOfMemoryError``, so code that handles OOM (ComfyUI) still recognises it.
    """


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (CPU for a module without parameters)."""
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


def is_device_oom(exc: BaseException) -> bool:
    """Whether an exception is an accelerator out-of-memory error."""
    if isinstance(exc, _OOM):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _normalize(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def converted_oom(message: Callable[[str], str], recover: Callable[[], None] | None = None) -> Iterator[None]:
    """A device out-of-memory error inside the block becomes a `DeviceOutOfMemoryError` (torch's OOM type, so
    callers such as ComfyUI still recognise it) reading `message(failure)`, failure being the first line of
    torch's error; `recover()` runs first. An already converted error passes through unchanged."""
    failure = None
    try:
        yield
    except DeviceOutOfMemoryError:
        raise
    except Exception as exc:
        if not is_device_oom(exc):
            raise
        traceback.clear_frames(exc.__traceback__)  # drop the activations the failed frames still hold
        failure = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if failure is not None:
        if recover is not None:
            recover()
        raise DeviceOutOfMemoryError(message(failure)) from None


def oom_advice(
    plan: str,
    demands: Mapping[str, Demand],
    budget: int | None,
    workload: Workload,
    failed_peak: int | None = None,
    *,
    prefetch: int = DEFAULT_PREFETCH,
    margin: int = int(DEFAULT_MARGIN_GB * GiB),
    budget_name: str = "budget_gb",
) -> str:
    """What to use instead after running out of device memory under `plan`: the plan 'auto' picks for a budget
    below what failed (`failed_peak`, the failed plan's estimate) or below `budget` (usable bytes, margin off;
    None: unknown). `budget_name`: what the budget setting is called where the user sets it."""
    if failed_peak is not None and (budget is None or failed_peak <= budget):
        budget = int(failed_peak * 0.8)  # the plan was estimated to fit and did not: aim below its estimate
    if budget is None:
        order = PLACEMENTS.index(plan) if plan in PLACEMENTS else len(PLACEMENTS) - 1
        lower = PLACEMENTS[min(order + 1, len(PLACEMENTS) - 1)]
        return f"Use offload={lower!r}, or offload='auto' with {budget_name} below your free device memory."
    try:
        chosen = plan_memory("auto", demands, budget, workload, prefetch=prefetch, margin=margin)
    except ValueError as err:
        return str(err)[0].upper() + str(err)[1:]
    detail = chosen.components.get("dit")
    k = f" with resident_blocks={detail.resident_blocks}" if detail and detail.placement == "block_swap" else ""
    return (f"Use offload={chosen.chosen!r}{k} (estimated peak {format_bytes(chosen.peak_bytes)}), or offload='auto' with "
            f"{budget_name}={budget_gb_text(budget + margin, up=False)} to choose automatically.")


class MemoryManager:
    """Owns the placement of registered components under one plan (see the module docstring).

    resident_blocks: K for 'block_swap' (None: the most that fit the budget, 0 without one).
    prefetch: streamed blocks on the device at once, the running one included (2 = one copies while
    one runs). budget_gb: device budget for 'auto' (and K); default free device memory minus
    `margin_gb`. pin_memory: pin streamed host copies (default: when the device is CUDA).
    backend: how copies and events happen (default: CUDA streams on CUDA, plain copies elsewhere;
    `SimulatedStreams` checks the streaming protocol on the CPU).

    On a CPU device with the default backend every plan runs as 'none' (`requested_plan` keeps the one
    asked for; a note says so once): a placement's point is device memory, which a CPU run does not have,
    so streaming would only copy weights host to host. A given backend (`SimulatedStreams`, or
    `DirectCopies` to measure the plans' mechanics on the CPU) models a device: the plan runs as asked.
    """

    def __init__(
        self,
        plan: str = "none",
        device: torch.device | str | None = None,
        offload_device: torch.device | str = "cpu",
        *,
        resident_blocks: int | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        budget_gb: float | None = None,
        margin_gb: float = DEFAULT_MARGIN_GB,
        pin_memory: bool | None = None,
        backend: StreamBackend | None = None,
    ):
        check_plan(plan)
        if resident_blocks is not None and (not isinstance(resident_blocks, int) or resident_blocks < 0):
            raise ValueError(
                f"resident_blocks must be an integer >= 0 (or None to fit the budget), got {resident_blocks!r}")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an integer >= 1 (blocks on the device at once), got {prefetch!r}")
        if budget_gb is not None and not budget_gb > 0:
            raise ValueError(
                f"budget_gb must be a positive number of GiB (or None for free device memory), got {budget_gb!r}")
        if margin_gb < 0:
            raise ValueError(f"margin_gb must be >= 0, got {margin_gb!r}")
        self.device = _normalize(device if device is not None else default_device())
        self.requested_plan = plan
        self.host_only = self.device.type == "cpu" and backend is None
        self.plan = "none" if self.host_only else plan
        self.offload_device = _normalize(offload_device)
        self.resident_blocks = resident_blocks
        self.prefetch = prefetch
        self.budget_gb = budget_gb
        self.margin_gb = margin_gb
        self.backend = backend if backend is not None else backend_for(self.device)
        pin = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self.stats = MemoryStats()
        self._context = PlacementContext(self.backend, self.device, self.offload_device, self.stats, pin, PinWarning())
        self._components: dict[str, nn.Module] = {}
        self._placements: dict[str, Placement] = {}
        self.last_plan: MemoryPlan | None = None
        self.workload = Workload()
        if self.plan != self.requested_plan:  # once per manager, at the one place a plan is chosen
            warnings.warn(CPU_PLAN_NOTE.format(plan=self.requested_plan), stacklevel=2)

    # ---------------------------------------------------------------- registration and use
    @property
    def components(self) -> Mapping[str, nn.Module]:
        """Registered components by name (read-only)."""
        return MappingProxyType(self._components)

    def register(self, name: str, module: nn.Module | None) -> None:
        """Take ownership of a component's placement. None unregisters it: streamed weights go back to
        their host copies, resident ones (plan 'none') stay where they are."""
        old = self._placements.get(name)
        if old is not None and old.active:
            raise RuntimeError(f"cannot register {name!r} while it is in use")
        if old is not None:
            old.detach()
            del self._placements[name]
        if module is None:
            self._components.pop(name, None)
            return
        self._components[name] = module
        self._placements[name] = self._attach(name, module, self._initial_placement(name, module))

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[nn.Module]:
        """The component, placed for running on the execution device for the duration of the block."""
        if name not in self._components:
            raise KeyError(f"no component {name!r} registered; have {sorted(self._components)}")
        if self.plan == "auto" and self.last_plan is None:
            self.prepare()
        placement = self._placements[name]
        try:
            placement.enter()
            yield self._components[name]
        finally:
            placement.exit()
            if self.device.type == "cuda" and placement.kind != "none":
                torch.cuda.empty_cache()

    def offload_all(self) -> None:
        """Move every component to the offload device (e.g. before another program needs the GPU)."""
        for placement in self._placements.values():
            placement.offload()
        self.backend.synchronize()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Offload and unregister everything, removing this manager's hooks from the models."""
        self.offload_all()
        for name in list(self._components):
            self.register(name, None)
        self.backend.synchronize()

    def loaded_blocks(self, name: str) -> list[int]:
        """Indices of the component's transformer blocks on the execution device now (block_swap)."""
        return self._placements[name].loaded_blocks()

    def placement(self, name: str) -> str:
        """The placement a component has now: none, model, block_swap or sequential."""
        return self._placements[name].kind

    def reset_stats(self) -> None:
        """Zero the counters and peaks (keeps the current device bytes)."""
        fresh = MemoryStats(device_bytes=self.stats.device_bytes, peak_device_bytes=self.stats.device_bytes,
                            pinned_bytes=self.stats.pinned_bytes, streamed_bytes=self.stats.streamed_bytes)
        self.stats.__dict__.update(fresh.__dict__)  # placements hold this object

    # ---------------------------------------------------------------- planning
    def budget_bytes(self) -> int | None:
        """The usable device budget in bytes (margin taken off), or None where there is no limit to read."""
        margin = int(self.margin_gb * GiB)
        if self.budget_gb is not None:
            return int(self.budget_gb * GiB) - margin  # may be negative: then nothing fits and 'auto' says so
        if self.device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        allowed = free
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if fraction is not None:  # a per-process cap (set_per_process_memory_fraction) binds before free memory
            allowed = min(free, int(fraction(self.device) * total) - torch.cuda.memory_reserved(self.device))
        return max(0, allowed + self.stats.device_bytes - margin)

    def demands(self, workload: Workload | None = None) -> dict[str, Demand]:
        """Weight sizes and working memory of every registered component for a workload."""
        return component_demands(self._components, workload or self.workload)

    def estimate(self, workload: Workload | None = None) -> MemoryPlan:
        """Resolve this manager's plan for a workload without moving anything (`chosen`: the plan used)."""
        workload = workload or self.workload
        plan = plan_memory(
            self.plan, self.demands(workload), self.budget_bytes(), workload,
            resident_blocks=self.resident_blocks, prefetch=self.prefetch, margin=int(self.margin_gb * GiB),
        )
        # on a CPU device: named as asked, chosen 'none' (describe() reads "memory plan 'auto' -> 'none'")
        return dataclasses.replace(plan, name=self.requested_plan) if self.plan != self.requested_plan else plan

    def prepare(
        self,
        width: int | None = None,
        height: int | None = None,
        temp: int | None = None,
        *,
        cfg: bool = True,
        dtype: torch.dtype | None = None,
    ) -> MemoryPlan:
        """Resolve the plan for a generation and place the components accordingly; returns the plan.

        'auto' raises ValueError when the budget is below the smallest workable one (named in the
        message); an explicit plan whose estimate exceeds the budget only warns.
        """
        self.workload = Workload.for_generation(
            width or self.workload.width, height or self.workload.height, temp or self.workload.temp, cfg, dtype
        )
        plan = self.estimate(self.workload)
        budget = plan.budget_bytes
        if self.plan != "auto" and not self.host_only and budget is not None and plan.peak_bytes > budget:
            warnings.warn(
                f"offload={self.plan!r} needs about {format_bytes(plan.peak_bytes)} for {self.workload.describe()}, more than "
                f"the {format_bytes(budget)} budget; offload='auto' picks a plan that fits", stacklevel=2,
            )
        for name, component_plan in plan.components.items():
            wanted = self._spec(component_plan)
            current = self._placements[name]
            if current.spec != wanted:
                if current.active:
                    raise RuntimeError(f"cannot change the placement of {name!r} while it is in use")
                current.detach()
                self._placements[name] = self._attach(name, self._components[name], component_plan)
        self.last_plan = plan
        logger.info("%s", plan.describe())
        return plan

    def vae_decode_settings(self, save_memory: bool = True) -> tuple[int, int]:
        """(window_size, tile_sample_min_size) for a VAE decode: the official pair for `save_memory`
        ((1, 256) or (2, 512)) when it fits the budget, else the largest smaller pair that does."""
        vae = self._components.get("vae")
        budget = self.budget_bytes()
        estimate = getattr(vae, "decode_working_memory_bytes", None)
        if estimate is None or budget is None:
            return vae_decode_choice(None, None, save_memory)
        # under 'none' every resident weight shares the device with the decode
        weights = self.stats.device_bytes if self._placements["vae"].kind == "none" else measure_component(vae).total
        return vae_decode_choice(estimate, budget - weights, save_memory, self.workload)

    # ---------------------------------------------------------------- out of memory
    @contextlib.contextmanager
    def oom_guard(self, phase: str) -> Iterator[None]:
        """Turn a device out-of-memory error inside the block into a `DeviceOutOfMemoryError` that names the
        plan and budget to use instead, after moving every weight back to the offload device (once: an
        already converted error passes through)."""
        # recover first, so the advice reads the memory that is really free
        with converted_oom(lambda failure: self._oom_message(phase, failure), self.recover):
            yield

    def recover(self) -> None:
        """After a failure: wait for copies in flight, put every weight back on the offload device, free the cache."""
        self.backend.synchronize()
        for placement in self._placements.values():
            placement.active = False
            placement.offload()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _oom_message(self, phase: str, failure: str) -> str:
        plan = self.last_plan
        head = f"out of device memory while {phase} with offload={self.plan!r}"
        if plan is not None:
            chosen = f" (chose {plan.chosen!r})" if self.plan == "auto" else ""
            head += f"{chosen} at {plan.workload.describe()}, estimated peak {format_bytes(plan.peak_bytes)}"
        head += f". All weights are back on {self.offload_device}; the models are usable. "
        advice = self._oom_advice()
        return f"{head}{advice} [{failure[:200]}]"

    def _oom_advice(self) -> str:
        failed = self.last_plan.peak_bytes if self.last_plan is not None else None
        return oom_advice(self.plan, self.demands(), self.budget_bytes(), self.workload, failed,
                          prefetch=self.prefetch, margin=int(self.margin_gb * GiB))

    # ---------------------------------------------------------------- internals
    def _initial_placement(self, name: str, module: nn.Module) -> ComponentPlan:
        if self.last_plan is not None and name in self.last_plan.components and self.plan != "auto":
            return self.last_plan.components[name]
        placement = {"auto": "model"}.get(self.plan, self.plan)  # auto: host until the first prepare()
        if placement in ("block_swap", "sequential") and not find_stream_blocks(module):
            placement = "model"
        resident = (self.resident_blocks or 0) if name == "dit" else 0
        return ComponentPlan(placement, 0, resident, self.prefetch)

    @staticmethod
    def _spec(plan: ComponentPlan) -> tuple:
        if plan.placement == "block_swap":
            return (plan.placement, plan.resident_blocks or 0, plan.prefetch)
        if plan.placement == "sequential":
            return (plan.placement, plan.prefetch)
        return (plan.placement,)

    def _attach(self, name: str, module: nn.Module, plan: ComponentPlan) -> Placement:
        kind = plan.placement
        if kind in ("block_swap", "sequential") and not find_stream_blocks(module):
            kind = "model"
        if kind == "none":
            placement: Placement = Resident(self._context, name, module)
        elif kind == "model":
            placement = WholeSwap(self._context, name, module)
        elif kind == "block_swap":
            placement = BlockStream(self._context, name, module, plan.resident_blocks or 0, plan.prefetch)
        else:
            placement = LeafStream(self._context, name, module, plan.prefetch)
        placement.attach()
        return placement
