"""One process group as a `Channel`: the collectives the parallel modes use, timed on request, failures named.

A collective that fails (a peer rank crashed, hung past the process group's timeout, or its connection broke)
raises `PeerFailure` saying which ranks were involved and where to look, instead of a backend traceback.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = ["Channel", "CommStats", "PeerFailure"]


class PeerFailure(RuntimeError):
    """A collective failed: another rank crashed, stopped answering within the timeout, or its connection broke."""


@dataclass
class CommStats:
    """Wall time spent in collectives, per kind. Off by default: timing a CUDA collective synchronises the device."""

    enabled: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


@dataclass(frozen=True, eq=False)
class Channel:
    """A process group and this process's place in it.

    group: the torch.distributed group (None: the default, every rank). ranks: global ranks in group order.
    rank: this process's index in `ranks`. timeout_s: the group's timeout (named in failure messages).
    """

    name: str
    group: Any
    ranks: tuple[int, ...]
    rank: int
    timeout_s: float
    stats: CommStats = field(default_factory=CommStats)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` [size, ...]: chunk i goes to rank i; returns [size, ...] where chunk i came from rank i."""
        tensor = tensor.contiguous()
        out = torch.empty_like(tensor)
        with self._collective("all-to-all", tensor.device):
            dist.all_to_all_single(out, tensor, group=self.group)
        return out

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape and dtype everywhere), in rank order."""
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        with self._collective("all-gather", tensor.device):
            dist.all_gather(parts, tensor, group=self.group)
        return parts

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `tensor` (same shape and dtype on every rank), in place."""
        with self._collective("broadcast", tensor.device):
            dist.broadcast(tensor, self.ranks[src], group=self.group)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s picklable `obj` (CPU tensors inside stay on the CPU)."""
        box = [obj if self.rank == src else None]
        with self._collective("broadcast", None):
            dist.broadcast_object_list(box, self.ranks[src], group=self.group)
        return box[0]

    @contextlib.contextmanager
    def _collective(self, kind: str, device: torch.device | None) -> Iterator[None]:
        timed = self.stats.enabled
        if timed:
            _sync(device)
            start = time.perf_counter()
        try:
            yield
            if timed:
                _sync(device)
        except RuntimeError as exc:  # DistBackendError and the gloo errors are RuntimeErrors
            raise PeerFailure(self._failure(kind, exc)) from exc
        if timed:
            self.stats.seconds[kind] = self.stats.seconds.get(kind, 0.0) + time.perf_counter() - start
            self.stats.calls[kind] = self.stats.calls.get(kind, 0) + 1

    def _failure(self, kind: str, exc: BaseException) -> str:
        text = " ".join(str(exc).split())
        where = (f"rank {self.ranks[self.rank]}: the {kind} of the {self.name} group (ranks "
                 f"{', '.join(map(str, self.ranks))})")
        if "timed out" in text.lower() or "timeout" in text.lower():
            what = (f"timed out: another rank stopped answering within {self.timeout_s:g} s (--dist-timeout), or "
                    "failed; its own error is in its output")
        else:
            what = "lost its connection: another rank failed; its own error is in its output"
        return f"{where} {what}. Backend said: {text[:200]}"


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
