"""How one component is placed: resident, whole swap, block streaming or leaf streaming.

Each placement is mechanism only (which weight groups exist, which hooks move them); which placement a
component gets is the planner's decision. `enter`/`exit` bracket each use of the component.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .streams import StreamBackend, same_device
from .weights import MemoryStats, SlotStream, WeightGroup, collect_refs, own_refs, tensor_bytes

BLOCK_LIST_NAMES = ("blocks", "block", "layers", "transformer_blocks", "single_transformer_blocks")


def find_stream_blocks(module: nn.Module) -> list[nn.Module]:
    """Transformer blocks in execution order: a DiT's ``.blocks``, else the block lists of its encoders.

    Lists named like ``layers`` / ``block`` (CLIP, T5) are taken in registration order, which is the
    order the text encoders run in. Empty for modules without such lists (the VAE).
    """
    blocks = getattr(module, "blocks", None)
    if isinstance(blocks, (list, tuple, nn.ModuleList)) and all(isinstance(b, nn.Module) for b in blocks):
        return list(blocks)
    found: list[nn.Module] = []
    taken: set[int] = set()
    for name, child in module.named_modules():
        if id(child) in taken or not isinstance(child, nn.ModuleList):
            continue
        if name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES and len(child) and all(
            any(True for _ in b.parameters()) for b in child
        ):
            found.extend(child)
            taken.update(id(m) for m in child.modules())
    return found


def move_inputs(value: Any, device: torch.device) -> Any:
    """Tensors inside `value` (lists, tuples, dicts) on `device`."""
    if isinstance(value, torch.Tensor):
        return value if same_device(value.device, device) else value.to(device, non_blocking=True)
    if isinstance(value, list):
        return [move_inputs(v, device) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(move_inputs(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move_inputs(v, device) for k, v in value.items()}
    return value


@dataclass
class PlacementContext:
    """What every placement of one manager shares."""

    backend: StreamBackend
    device: torch.device
    offload_device: torch.device
    stats: MemoryStats
    pin: bool  # pin streamed host copies
    on_pin_failure: Callable[[int], None]


class Placement:
    """Base: a component whose weights stay where they are."""

    kind = "none"

    def __init__(self, ctx: PlacementContext, name: str, module: nn.Module):
        self.ctx, self.name, self.module = ctx, name, module
        self.hooks: list[Any] = []
        self.active = False

    @property
    def spec(self) -> tuple:
        return (self.kind,)

    def attach(self) -> None: ...

    def enter(self) -> None:
        self.active = True

    def exit(self) -> None:
        self.active = False
        self.offload()

    def offload(self) -> None: ...

    def detach(self) -> None:
        self.active = False
        self.offload()
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()

    def loaded_blocks(self) -> list[int]:
        return []

    def _load_whole(self, group: WeightGroup) -> None:
        if not group.loaded:
            size = group.load_whole(self.ctx.backend)
            self.ctx.stats.account(size)
            self.ctx.stats.bytes_copied += group.nbytes
            self.ctx.stats.loads += 1

    def _release(self, group: WeightGroup) -> None:
        if group.device_buffer is not None:
            self.ctx.stats.account(-group.device_buffer.numel())
        group.release()


class Resident(Placement):
    """Plan 'none': weights live on the execution device (no host copies kept)."""

    kind = "none"

    def attach(self) -> None:
        self.refs = collect_refs(list(self.module.modules()), set())
        self.nbytes = tensor_bytes([r.get() for r in self.refs])
        self.on_device = False
        self._to_device()

    def enter(self) -> None:
        super().enter()
        self._to_device()

    def exit(self) -> None:
        self.active = False

    def detach(self) -> None:
        self.active = False  # resident weights stay put: a new placement takes them from wherever they are

    def offload(self) -> None:
        if not self.on_device:
            return
        backend = self.ctx.backend
        for ref in self.refs:
            ref.set(backend.to_host(ref.get(), self.ctx.offload_device))
        self.ctx.stats.account(-self.nbytes)
        self.on_device = False

    def _to_device(self) -> None:
        if self.on_device:
            return
        backend = self.ctx.backend
        for ref in self.refs:
            tensor = ref.get()
            if not backend.holds(tensor):
                copy = backend.empty(tensor.numel() * tensor.element_size()).view(tensor.dtype).view(tensor.shape)
                backend.copy_now(copy, tensor.contiguous())
                ref.set(copy)
        self.ctx.stats.account(self.nbytes, copied=True)
        self.on_device = True


class WholeSwap(Placement):
    """Plan 'model': the whole component on the device while it runs (one device buffer)."""

    kind = "model"

    def attach(self) -> None:
        self.group = WeightGroup(self.name, collect_refs(list(self.module.modules()), set()))
        self.group.capture(self.ctx.backend, self.ctx.offload_device)

    def enter(self) -> None:
        super().enter()
        self._load_whole(self.group)

    def offload(self) -> None:
        self._release(self.group)


class BlockStream(Placement):
    """Plan 'block_swap': non-block weights and K blocks resident, the others streamed through
    `prefetch` fixed device slots (the running block included) in execution order."""

    kind = "block_swap"

    def __init__(self, ctx: PlacementContext, name: str, module: nn.Module, resident_blocks: int, prefetch: int):
        super().__init__(ctx, name, module)
        self.requested = resident_blocks
        self.prefetch = prefetch

    @property
    def spec(self) -> tuple:
        return (self.kind, self.requested, self.prefetch)

    def attach(self) -> None:
        from .planner import resident_block_indices

        blocks = find_stream_blocks(self.module)
        if not blocks:
            raise ValueError(f"component {self.name!r} has no transformer blocks to swap; use plan 'model' for it")
        k = self.requested
        if k > len(blocks):
            warnings.warn(
                f"resident_blocks={k} is more than the {len(blocks)} transformer blocks of {self.name!r}; "
                f"keeping all {len(blocks)} resident", stacklevel=5,
            )
            k = len(blocks)
        self.resident_blocks = k
        inside = {id(m) for b in blocks for m in b.modules()}
        seen: set[int] = set()
        ctx = self.ctx
        self.rest = WeightGroup(f"{self.name}.rest", collect_refs([m for m in self.module.modules() if id(m) not in inside], seen))
        self.blocks = [WeightGroup(f"{self.name}.block{i}", collect_refs(list(b.modules()), seen)) for i, b in enumerate(blocks)]
        resident = resident_block_indices([g.nbytes for g in self.blocks], k)
        self.rest.capture(ctx.backend, ctx.offload_device)
        streamed = []
        for i, group in enumerate(self.blocks):
            if i in resident:
                group.capture(ctx.backend, ctx.offload_device)
            else:
                group.capture_packed(ctx.backend, ctx.pin, ctx.on_pin_failure)
                streamed.append(group)
        self.resident = [self.blocks[i] for i in sorted(resident)]
        self.engine = SlotStream(ctx.backend, streamed, min(self.prefetch, len(streamed)), ctx.stats, order=streamed)
        _note_packed(ctx, streamed, +1)
        for block, group in zip(blocks, self.blocks):
            if group in streamed:
                self.hooks.append(block.register_forward_pre_hook(lambda m, a, g=group: self._before(g), prepend=True))
                self.hooks.append(block.register_forward_hook(lambda m, a, o, g=group: self._after(g)))

    def enter(self) -> None:
        super().enter()
        for group in [self.rest, *self.resident]:
            self._load_whole(group)
        self.engine.start()
        self._note_peak()

    def offload(self) -> None:
        self.engine.stop()
        for group in [self.rest, *self.resident]:
            self._release(group)

    def detach(self) -> None:
        super().detach()
        _unpin(self.ctx, self.engine.groups)

    def _before(self, group: WeightGroup) -> None:
        if self.active:
            self.engine.acquire(group)
            self._note_peak()

    def _after(self, group: WeightGroup) -> None:
        if self.active:
            self.engine.release(group)
            self._note_peak()

    def _note_peak(self) -> None:
        peaks = self.ctx.stats.peak_blocks_on_device
        peaks[self.name] = max(peaks.get(self.name, 0), len(self.loaded_blocks()))

    def loaded_blocks(self) -> list[int]:
        return [i for i, g in enumerate(self.blocks) if g.loaded]


class LeafStream(Placement):
    """Plan 'sequential': each module's own weights on the device only around its own forward, streamed
    through fixed slots with the next modules (in the order learned on the first forward) prefetched.

    Every module also moves its tensor inputs to the execution device (as accelerate's offload hooks do):
    with no weight on the device, callers such as the text encoders place their inputs on the host.
    """

    kind = "sequential"

    def __init__(self, ctx: PlacementContext, name: str, module: nn.Module, prefetch: int):
        super().__init__(ctx, name, module)
        self.prefetch = prefetch

    @property
    def spec(self) -> tuple:
        return (self.kind, self.prefetch)

    def attach(self) -> None:
        if getattr(self.module, "compiled_blocks", None):
            raise ValueError(
                f"{self.name!r} has compiled blocks, and offload='sequential' hooks every submodule inside them; "
                "use offload 'none', 'model' or 'block_swap' with compile, or load the model without compile")
        ctx = self.ctx
        owner: dict[int, WeightGroup] = {}  # tensor key -> its group (tied tensors: the first owner's group)
        self.needs: dict[int, list[WeightGroup]] = {}
        groups: list[WeightGroup] = []
        for module in self.module.modules():
            refs = own_refs(module)
            fresh = [r for r in refs if r.key() not in owner]
            if fresh:
                group = WeightGroup(f"{self.name}.{type(module).__name__}", fresh)
                groups.append(group)
                for ref in fresh:
                    owner[ref.key()] = group
            needed = list({id(owner[r.key()]): owner[r.key()] for r in refs}.values())
            self.needs[id(module)] = needed
        for group in groups:
            group.capture_packed(ctx.backend, ctx.pin, ctx.on_pin_failure)
        depth = _nesting(self.module, self.needs)
        self.engine = SlotStream(ctx.backend, groups, min(len(groups), max(1, depth + self.prefetch - 1)), ctx.stats)
        _note_packed(ctx, groups, +1)
        for module in self.module.modules():
            needed = self.needs[id(module)]
            self.hooks.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, g=needed: self._before(g, args, kwargs), with_kwargs=True, prepend=True))
            if needed:
                self.hooks.append(module.register_forward_hook(lambda m, a, o, g=needed: self._after(g)))

    def enter(self) -> None:
        super().enter()
        self.engine.start()

    def offload(self) -> None:
        self.engine.stop()

    def detach(self) -> None:
        super().detach()
        _unpin(self.ctx, self.engine.groups)

    def _before(self, groups: list[WeightGroup], args, kwargs):
        if not self.active:
            return None
        for group in groups:
            self.engine.acquire(group)
        device = self.ctx.device
        return move_inputs(args, device), move_inputs(kwargs, device)

    def _after(self, groups: list[WeightGroup]) -> None:
        if self.active:
            for group in groups:
                self.engine.release(group)


def _note_packed(ctx: PlacementContext, groups: list[WeightGroup], sign: int) -> None:
    ctx.stats.streamed_bytes += sign * sum(g.nbytes for g in groups)
    ctx.stats.pinned_bytes += sign * sum(g.packed_bytes for g in groups if g.pinned)


def _unpin(ctx: PlacementContext, groups: list[WeightGroup]) -> None:
    """Give page-locked host memory back once no copy can still read it (the weights stay, pageable)."""
    ctx.backend.synchronize()
    _note_packed(ctx, groups, -1)
    for group in groups:
        group.unpin(ctx.backend)


def _nesting(module: nn.Module, needs: dict[int, list[WeightGroup]]) -> int:
    """Most weight groups a chain of nested modules holds at once (the slots the running chain needs)."""
    deepest = max((_nesting(child, needs) for child in module.children()), default=0)
    return len(needs.get(id(module), [])) + deepest
