"""`SimulatedStreams`: a CPU stand-in for CUDA streams and events that proves the streaming protocol.

Device buffers are CPU tensors, so a whole generation runs and its latents can be compared; every copy,
wait and weight read is put on a recorded timeline, and a mistake raises `StreamOrderError` at once:

- a read of streamed weights whose copy event compute has not waited on (CUDA would read garbage);
- a copy into a device buffer before the side stream waited on a compute event recorded after the
  buffer's last read (CUDA would overwrite weights a queued kernel still reads);
- a weight read from memory that is not device memory (a forgotten copy);
- more live streaming slots than `max_slots`.

Reads are reported by `watch(module)`, which hooks every module that owns tensors, independently of the
engine under test. Device bytes are measured from the buffers themselves (allocation to garbage collection).
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn


class StreamOrderError(AssertionError):
    """The streaming engine broke the copy/compute ordering protocol."""


@dataclass(eq=False)
class SimEvent:
    stream: str  # "compute" or "side"
    position: int  # compute events: compute operations queued before it
    waited: bool = False  # copy events: compute has waited on it


@dataclass(eq=False)
class _Buffer:
    start: int
    end: int
    slot: bool
    serial: int
    last_copy: SimEvent | None = None  # the side-stream copy that last wrote here (None: written in compute order)
    last_read: int | None = None  # compute position of the last read


@dataclass
class SimulatedStreams:
    """A stream backend on the CPU that records the timeline and checks it (see the module docstring)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    max_slots: int | None = None
    pin_fails: bool = False

    def __post_init__(self) -> None:
        self.log: list[tuple] = []
        self.compute_position = 0
        self.side_waited = 0
        self.buffers: dict[int, _Buffer] = {}
        self.device_bytes = 0
        self.peak_device_bytes = 0
        self.live_slots = 0
        self.peak_live_slots = 0
        self.slot_allocations = 0
        self.pinned_bytes = 0
        self.peak_pinned_bytes = 0
        self.reads = 0
        self._serial = itertools.count()

    # ------------------------------------------------------------------ device memory
    def empty(self, nbytes: int, slot: bool = False) -> torch.Tensor:
        tensor = torch.empty(nbytes, dtype=torch.uint8)
        buffer = _Buffer(tensor.data_ptr(), tensor.data_ptr() + nbytes, slot, next(self._serial))
        self.buffers[buffer.serial] = buffer
        self.device_bytes += nbytes
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)
        if slot:
            self.slot_allocations += 1
            self.live_slots += 1
            self.peak_live_slots = max(self.peak_live_slots, self.live_slots)
            if self.max_slots is not None and self.live_slots > self.max_slots:
                raise StreamOrderError(f"{self.live_slots} streaming slots live, more than the {self.max_slots} allowed")
        self.log.append(("alloc", buffer.serial, nbytes, slot))
        weakref.finalize(tensor, self._free, buffer.serial)
        return tensor

    def _free(self, serial: int) -> None:
        buffer = self.buffers.pop(serial)
        self.device_bytes -= buffer.end - buffer.start
        if buffer.slot:
            self.live_slots -= 1
        self.log.append(("free", serial))

    def _buffer_of(self, tensor: torch.Tensor) -> _Buffer | None:
        ptr = tensor.data_ptr()
        for buffer in self.buffers.values():
            if buffer.start <= ptr < buffer.end:
                return buffer
        return None

    def holds(self, tensor: torch.Tensor) -> bool:
        return tensor.numel() > 0 and self._buffer_of(tensor) is not None

    def to_host(self, tensor: torch.Tensor, offload_device: torch.device) -> torch.Tensor:
        return tensor.clone() if self.holds(tensor) else tensor

    # ------------------------------------------------------------------ copies and events
    def copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        buffer = self._require(dst, "copy_now destination")
        self._check_overwrite(buffer, "copy on the compute stream")
        dst.copy_(src)
        buffer.last_copy = None
        self.compute_position += 1
        self.log.append(("copy_now", buffer.serial))

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> SimEvent:
        buffer = self._require(dst, "side-stream copy destination")
        if buffer.last_read is not None and self.side_waited <= buffer.last_read:
            raise StreamOrderError(
                f"device buffer {buffer.serial} overwritten on the side stream before it waited for compute to "
                f"finish its last read (read at compute position {buffer.last_read}, side stream has waited up "
                f"to {self.side_waited})")
        dst.copy_(src)
        event = SimEvent("side", self.compute_position)
        buffer.last_copy = event
        self.log.append(("copy_async", buffer.serial, dst.numel()))
        return event

    def record_compute(self) -> SimEvent:
        self.log.append(("record", self.compute_position))
        return SimEvent("compute", self.compute_position)

    def side_wait(self, event: SimEvent | None) -> None:
        if event is None:
            return
        if event.stream != "compute":
            raise StreamOrderError("the side stream waits on compute events only")
        self.side_waited = max(self.side_waited, event.position)
        self.log.append(("side_wait", event.position))

    def compute_wait(self, event: SimEvent | None) -> None:
        if event is None:
            return
        if event.stream != "side":
            raise StreamOrderError("the compute stream waits on copy events only")
        event.waited = True
        self.log.append(("compute_wait",))

    def join(self) -> None:
        for buffer in self.buffers.values():
            if buffer.last_copy is not None:
                buffer.last_copy.waited = True
        self.log.append(("join",))

    def synchronize(self) -> None:
        self.join()
        self.side_waited = self.compute_position
        self.log.append(("synchronize",))

    def pin(self, host: torch.Tensor) -> bool:
        if self.pin_fails:
            return False
        self.pinned_bytes += host.numel() * host.element_size()
        self.peak_pinned_bytes = max(self.peak_pinned_bytes, self.pinned_bytes)
        return True

    def unpin(self, host: torch.Tensor) -> None:
        self.pinned_bytes -= host.numel() * host.element_size()

    # ------------------------------------------------------------------ reads
    def read(self, tensor: torch.Tensor, what: str) -> None:
        """A kernel on the compute stream reads `tensor` (a weight)."""
        if tensor.numel() == 0:
            return
        buffer = self._require(tensor, f"weight {what}")
        if buffer.last_copy is not None and not buffer.last_copy.waited:
            raise StreamOrderError(f"weight {what} read before compute waited on the copy that brought it")
        buffer.last_read = self.compute_position
        self.compute_position += 1
        self.reads += 1

    def watch(self, module: nn.Module) -> list:
        """Report every weight read of `module`'s submodules (hooks run after the engine's own pre-hooks)."""
        return [sub.register_forward_pre_hook(lambda m, a, prefix=name: self._read_module(m, prefix))
                for name, sub in module.named_modules()]

    def _read_module(self, module: nn.Module, prefix: str) -> None:
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            self.read(tensor, f"{prefix}.{name}" if prefix else name)

    # ------------------------------------------------------------------ helpers
    def _require(self, tensor: torch.Tensor, what: str) -> _Buffer:
        buffer = self._buffer_of(tensor)
        if buffer is None:
            raise StreamOrderError(f"{what} is not in device memory (a host tensor used on the device)")
        return buffer

    def _check_overwrite(self, buffer: _Buffer, what: str) -> None:
        if buffer.last_copy is not None and not buffer.last_copy.waited and buffer.slot:
            raise StreamOrderError(f"{what} into slot {buffer.serial} races a side-stream copy nobody waited on")
