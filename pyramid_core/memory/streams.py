"""Stream backends: how copies, events and device buffers happen on one kind of execution device.

The streaming engine (``weights.SlotStream``) only speaks this interface, so the same engine runs on
CUDA (a side copy stream and events), on any other device (plain synchronous copies) and under
``SimulatedStreams`` (CPU tensors plus a recorded timeline that fails on any ordering mistake).

Event protocol for a device slot:
  side stream:    wait(release event of the slot's last reader) -> copy into the slot -> record ready event
  compute stream: wait(ready event) -> run the kernels that read the slot -> record release event
"""
from __future__ import annotations

import warnings
from typing import Any, Protocol

import torch

Event = Any  # a backend's event object; None means "already complete"


def same_device(a: torch.device, b: torch.device) -> bool:
    """Same device, treating an unindexed device as any index of its type."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class StreamBackend(Protocol):
    """What the weight mover needs from a device."""

    device: torch.device

    def empty(self, nbytes: int, slot: bool = False) -> torch.Tensor:
        """A uint8 device buffer of `nbytes` (weight storage; `slot`: a streaming slot)."""

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` lives in this device's memory."""

    def to_host(self, tensor: torch.Tensor, offload_device: torch.device) -> torch.Tensor:
        """`tensor` on the offload device (itself when it is there already)."""

    def copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy host -> device ordered on the compute stream (usable by the next kernel)."""

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> Event:
        """Copy host -> device on the side stream; returns the event to wait on before reading `dst`."""

    def record_compute(self) -> Event:
        """An event on the compute stream after everything queued so far."""

    def side_wait(self, event: Event) -> None:
        """The side stream waits for a compute event (before overwriting what compute read)."""

    def compute_wait(self, event: Event) -> None:
        """The compute stream waits for a copy event (before reading what was copied)."""

    def join(self) -> None:
        """The compute stream waits for all side-stream work (before freeing buffers the side stream wrote)."""

    def synchronize(self) -> None:
        """The host waits for everything (before releasing pinned host memory)."""

    def pin(self, host: torch.Tensor) -> bool:
        """Page-lock a host buffer in place (no over-allocation); False when it cannot be pinned."""

    def unpin(self, host: torch.Tensor) -> None:
        """Undo `pin`."""


class DirectCopies:
    """Any non-CUDA device (CPU, meta, MPS...): synchronous copies, no streams, no pinning."""

    def __init__(self, device: torch.device):
        self.device = device

    def empty(self, nbytes: int, slot: bool = False) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def holds(self, tensor: torch.Tensor) -> bool:
        return same_device(tensor.device, self.device)

    def to_host(self, tensor: torch.Tensor, offload_device: torch.device) -> torch.Tensor:
        return tensor if same_device(tensor.device, offload_device) else tensor.to(offload_device)

    def copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> Event:
        dst.copy_(src)
        return None

    def record_compute(self) -> Event:
        return None

    def side_wait(self, event: Event) -> None:
        pass

    def compute_wait(self, event: Event) -> None:
        pass

    def join(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def pin(self, host: torch.Tensor) -> bool:
        return False

    def unpin(self, host: torch.Tensor) -> None:
        pass


class CudaStreams(DirectCopies):
    """One CUDA device: copies on a side stream, ordered against compute with events.

    Host buffers are pinned in place with ``cudaHostRegister`` (exact size), not through torch's caching
    host allocator, which rounds every block up to a power of two and keeps it after use.
    """

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.side = torch.cuda.Stream(device)

    def _compute(self) -> "torch.cuda.Stream":
        return torch.cuda.current_stream(self.device)

    def copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=src.is_pinned())

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> Event:
        with torch.cuda.stream(self.side):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.side)
        return event

    def record_compute(self) -> Event:
        event = torch.cuda.Event()
        event.record(self._compute())
        return event

    def side_wait(self, event: Event) -> None:
        if event is not None:
            self.side.wait_event(event)

    def compute_wait(self, event: Event) -> None:
        if event is not None:
            self._compute().wait_event(event)

    def join(self) -> None:
        self._compute().wait_stream(self.side)

    def synchronize(self) -> None:
        self.side.synchronize()
        self._compute().synchronize()

    def pin(self, host: torch.Tensor) -> bool:
        cudart = torch.cuda.cudart()
        status = cudart.cudaHostRegister(host.data_ptr(), host.numel() * host.element_size(), 0)
        if int(status) == 0:
            return True
        try:  # the failed call left CUDA's last-error state set; the next launch check reads and clears it
            torch.zeros(1, device=self.device)
        except RuntimeError:
            pass
        return False

    def unpin(self, host: torch.Tensor) -> None:
        torch.cuda.cudart().cudaHostUnregister(host.data_ptr())


def backend_for(device: torch.device) -> StreamBackend:
    """The real backend of an execution device."""
    return CudaStreams(device) if device.type == "cuda" else DirectCopies(device)


class PinWarning:
    """Warns once per owner when host memory cannot be pinned (WSL, container limits)."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, nbytes: int) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"could not pin {nbytes / 2**20:.1f} MiB of host memory (page-locked memory is limited here, e.g. WSL "
                "or a container); streaming still works, but copies will not overlap compute", stacklevel=4,
            )
