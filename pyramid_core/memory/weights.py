"""The only code that moves model weights: tensor references, weight groups, device slots and streaming.

A `WeightGroup` is a set of parameters/buffers that move together (a transformer block, a module's own
weights, a whole component). Its host copies ("masters") are the source of truth while it is offloaded.
A *packed* group keeps its masters as views of one flat, aligned host buffer (pinned in place where the
backend can), so it reaches the device in one copy into a fixed `DeviceSlot`.

`SlotStream` streams packed groups through `count` slots sized for the largest group, allocated once
per use: device memory is bounded by construction, whatever the CPU queues ahead. Ordering follows the
protocol in `streams`: a slot is overwritten only after the side stream waited for compute's release
event of its last reader; compute reads a slot only after waiting for its copy's event.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .streams import Event, StreamBackend

ALIGN = 64  # CPU GEMM kernels and CUDA vector loads both like 64-byte aligned weights
SMALL_ALIGN = 16  # tensors under SMALL_TENSOR bytes (norm weights, biases): keeps the padding small
SMALL_TENSOR = 4096


@dataclass
class MemoryStats:
    """A manager's own accounting of weights on the execution device."""

    device_bytes: int = 0  # weights and streaming slots on the device now
    peak_device_bytes: int = 0
    bytes_copied: int = 0  # host -> device weight traffic
    loads: int = 0  # weight-group copies
    sync_loads: int = 0  # streamed groups fetched on demand although their order was known (prefetch missed)
    slots_allocated: int = 0  # streaming slots allocated (per use: prefetch for block_swap)
    pinned_bytes: int = 0  # page-locked host bytes held now
    streamed_bytes: int = 0  # weight bytes of the packed (streamed) groups held now
    peak_blocks_on_device: dict[str, int] = field(default_factory=dict)

    def account(self, delta: int, copied: bool = False) -> None:
        self.device_bytes += delta
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)
        if copied and delta > 0:
            self.bytes_copied += delta
            self.loads += 1


class TensorRef:
    """One parameter or buffer of one module, re-pointable at another tensor (tied parameters follow)."""

    __slots__ = ("owner", "name", "is_param")

    def __init__(self, owner: nn.Module, name: str, is_param: bool):
        self.owner, self.name, self.is_param = owner, name, is_param

    def get(self) -> torch.Tensor:
        if self.is_param:
            return self.owner._parameters[self.name].data
        return self.owner._buffers[self.name]

    def key(self) -> int:
        return id(self.owner._parameters[self.name]) if self.is_param else id(self.owner._buffers[self.name])

    def set(self, tensor: torch.Tensor) -> None:
        if not self.is_param:
            self.owner._buffers[self.name] = tensor
            return
        param = self.owner._parameters[self.name]
        try:
            param.data = tensor
        except RuntimeError:  # no shallow copy between some device kinds (cpu <-> meta): swap the objects' contents
            torch.utils.swap_tensors(param, nn.Parameter(tensor, requires_grad=param.requires_grad))


def own_refs(module: nn.Module) -> list[TensorRef]:
    """A module's own (non-recursive) parameters and buffers."""
    refs = [TensorRef(module, n, True) for n, p in module._parameters.items() if p is not None]
    return refs + [TensorRef(module, n, False) for n, b in module._buffers.items() if b is not None]


def collect_refs(modules: Sequence[nn.Module], seen: set[int]) -> list[TensorRef]:
    """Own tensors of `modules`, skipping those already in `seen` (tied weights belong to their first group)."""
    out = []
    for module in modules:
        for ref in own_refs(module):
            if ref.key() not in seen:
                seen.add(ref.key())
                out.append(ref)
    return out


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def packed_offsets(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offsets of `tensors` packed into one buffer (64-byte aligned, 16 for small ones) and its size."""
    offsets, end = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        align = ALIGN if nbytes >= SMALL_TENSOR else SMALL_ALIGN
        end = -(-end // align) * align
        offsets.append(end)
        end += nbytes
    return offsets, end


def typed_views(buffer: torch.Tensor, offsets: Sequence[int], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of a uint8 buffer shaped and typed like `like`, at `offsets`."""
    return [buffer[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for o, t in zip(offsets, like)]


class WeightGroup:
    """Tensors that move together. `capture` makes host masters; `load_whole`/`release` move them."""

    def __init__(self, label: str, refs: list[TensorRef]):
        self.label = label
        self.refs = refs
        self.nbytes = tensor_bytes([r.get() for r in refs])
        self.masters: list[torch.Tensor] = []
        self.host_buffer: torch.Tensor | None = None  # packed groups: the flat host buffer
        self.offsets: list[int] = []
        self.packed_bytes = 0
        self.pinned = False
        self.device_buffer: torch.Tensor | None = None  # whole-group device copy
        self.slot: "DeviceSlot | None" = None  # streamed: the slot holding it

    @property
    def loaded(self) -> bool:
        return self.device_buffer is not None or self.slot is not None

    def capture(self, backend: StreamBackend, offload_device: torch.device) -> None:
        """Host masters, one per tensor (moved to the offload device where needed); the module points at them."""
        self.masters = []
        for ref in self.refs:
            tensor = backend.to_host(ref.get(), offload_device)
            ref.set(tensor)
            self.masters.append(tensor)

    def capture_packed(self, backend: StreamBackend, pin: bool, on_pin_failure: Callable[[int], None]) -> None:
        """Host masters as views of one flat aligned host buffer, page-locked in place when `pin` and the backend can."""
        current = [r.get() for r in self.refs]
        self.offsets, self.packed_bytes = packed_offsets(current)
        buffer = torch.empty(self.packed_bytes, dtype=torch.uint8)
        self.masters = typed_views(buffer, self.offsets, current)
        for ref, master, tensor in zip(self.refs, self.masters, current):
            master.copy_(tensor)
            ref.set(master)
        self.host_buffer = buffer
        pin = pin and self.packed_bytes > 0
        self.pinned = pin and backend.pin(buffer)
        if pin and not self.pinned:
            on_pin_failure(self.packed_bytes)

    def unpin(self, backend: StreamBackend) -> None:
        if self.pinned and self.host_buffer is not None:
            backend.unpin(self.host_buffer)
        self.pinned = False

    def load_whole(self, backend: StreamBackend) -> int:
        """Copy every master to one device buffer on the compute stream; returns the device bytes taken."""
        offsets, size = packed_offsets(self.masters)
        buffer = backend.empty(size)
        views = typed_views(buffer, offsets, self.masters)
        for ref, view, master in zip(self.refs, views, self.masters):
            backend.copy_now(view, master)
            ref.set(view)
        self.device_buffer = buffer
        return size

    def release(self) -> None:
        """Point the module back at the host masters (the device copy is dropped, not copied back)."""
        for ref, master in zip(self.refs, self.masters):
            ref.set(master)
        self.device_buffer = None
        self.slot = None


class DeviceSlot:
    """A fixed device buffer one streamed group at a time lives in."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self.group: WeightGroup | None = None
        self.ready: Event = None  # copy of the current group done (compute waits on it before reading)
        self.released: Event = None  # compute finished the last reader (the side stream waits before overwriting)
        self.running = 0  # forwards of the current group in progress (nested calls count)


class SlotStream:
    """Streams packed weight groups through `count` device slots, in a learned execution order.

    `order` starts as the expected order (transformer blocks) or empty (learned on first use); groups
    are appended in first-call order. After each call the groups following the newest call in the order
    are prefetched into slots nobody is reading; a call whose group is not there loads it on demand.
    """

    def __init__(self, backend: StreamBackend, groups: Sequence[WeightGroup], count: int, stats: MemoryStats,
                 order: Sequence[WeightGroup] = ()):
        self.backend = backend
        self.groups = list(groups)
        self.count = count
        self.stats = stats
        self.order: list[WeightGroup] = list(order)
        self.position = {id(g): i for i, g in enumerate(self.order)}
        self.slot_bytes = max((g.packed_bytes for g in self.groups), default=0)
        self.slots: list[DeviceSlot] = []
        self.cursor: WeightGroup | None = None  # the group acquired last: prefetching looks ahead of it

    @property
    def open(self) -> bool:
        return bool(self.slots)

    def start(self) -> None:
        """Allocate the slots and prefetch the first groups of the order."""
        if self.slots or not self.groups:
            return
        self.slots = [DeviceSlot(self.backend.empty(self.slot_bytes, slot=True)) for _ in range(self.count)]
        self.stats.slots_allocated += self.count
        self.stats.account(self.count * self.slot_bytes)
        self._prefetch(self.order[: self.count])

    def stop(self) -> None:
        """Point every group back at its host masters and free the slots (after the side stream's last copy)."""
        if not self.slots:
            return
        for slot in self.slots:
            if slot.group is not None:
                slot.group.release()
        self.backend.join()
        self.stats.account(-self.count * self.slot_bytes)
        self.slots = []

    def loaded(self) -> list[WeightGroup]:
        return [s.group for s in self.slots if s.group is not None]

    def acquire(self, group: WeightGroup) -> None:
        """Before a forward reading `group`: make sure it is in a slot, and order compute after its copy."""
        if group.slot is None:
            if id(group) in self.position:
                self.stats.sync_loads += 1
            slot = self._victim(self._window(group, include_self=True), allow_window=True)
            if slot is None:
                raise RuntimeError(f"no free streaming slot for {group.label}: every slot is being read")
            self._load(group, slot)
        if id(group) not in self.position:
            self.position[id(group)] = len(self.order)
            self.order.append(group)
        slot = group.slot
        self.backend.compute_wait(slot.ready)
        slot.running += 1
        self.cursor = group

    def release(self, group: WeightGroup) -> None:
        """After a forward reading `group`: mark the slot reusable once compute passes here; prefetch ahead."""
        slot = group.slot
        if slot is None:
            return
        slot.running -= 1
        if slot.running == 0:
            slot.released = self.backend.record_compute()
        # look ahead of the newest call, not of `group`: a parent module finishes after its children ran
        self._prefetch(self._window(self.cursor or group, include_self=False))

    def _window(self, group: WeightGroup, include_self: bool) -> list[WeightGroup]:
        """The groups expected next after `group` (itself first when asked), as many as slots not being read."""
        own = [group] if include_self else []
        room = sum(1 for s in self.slots if s.running == 0) - len(own)
        if id(group) not in self.position or room <= 0:
            return own
        start = self.position[id(group)]
        ahead = [self.order[(start + i) % len(self.order)] for i in range(1, len(self.order))]
        return own + ahead[:room]

    def _prefetch(self, wanted: Sequence[WeightGroup]) -> None:
        for group in wanted:
            if group.slot is None:
                slot = self._victim(wanted, allow_window=False)
                if slot is None:
                    return
                self._load(group, slot)

    def _victim(self, wanted: Sequence[WeightGroup], allow_window: bool) -> DeviceSlot | None:
        """A slot to (re)fill: empty first, then one holding a group not wanted soon; never one being read."""
        keep = {id(g) for g in wanted}
        idle = [s for s in self.slots if s.running == 0]
        for slot in idle:
            if slot.group is None:
                return slot
        for slot in idle:
            if id(slot.group) not in keep:
                return slot
        return idle[-1] if idle and allow_window else None

    def _load(self, group: WeightGroup, slot: DeviceSlot) -> None:
        if slot.group is not None:
            slot.group.release()
        self.backend.side_wait(slot.released)  # its last reader has finished on the compute stream
        target = slot.buffer[: group.packed_bytes]
        slot.ready = self.backend.copy_async(target, group.host_buffer)
        for ref, view in zip(group.refs, typed_views(slot.buffer, group.offsets, group.masters)):
            ref.set(view)
        slot.group, group.slot = group, slot
        self.stats.bytes_copied += group.nbytes
        self.stats.loads += 1
