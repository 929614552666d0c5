"""The interface a pipeline places its weights through (`MemoryPolicy`).

`MemoryManager` implements it with pyramid_core's own plans; inside ComfyUI the nodes implement it over
ComfyUI's model management (`nodes/managed.py`). The pipeline and the codec are typed against it, so the
two can differ in mechanism while the modes, estimates and out-of-memory advice come from this package.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class MemoryPolicy(Protocol):
    """Where the components of a pipeline run, and every move of their weights."""

    device: torch.device  # where the components compute

    def register(self, name: str, module: nn.Module | None) -> None:
        """Take a component ('dit', 'vae', 'text_encoder') under this policy (None: the pipeline has none)."""

    def prepare(self, width: int | None = None, height: int | None = None, temp: int | None = None, *,
                cfg: bool = True, dtype: torch.dtype | None = None) -> object:
        """Size the placements for one generation (called before any component is used)."""

    def use(self, name: str) -> AbstractContextManager[nn.Module]:
        """The component ready to compute on `device` for the block (moved back per the policy after it)."""

    def oom_guard(self, phase: str) -> AbstractContextManager[None]:
        """Turn a device out-of-memory error into torch's OOM type carrying advice on the settings to change."""

    def vae_decode_settings(self, save_memory: bool = True) -> tuple[int, int]:
        """(temporal window, tile size) of a VAE decode that fits."""

    def offload_all(self) -> None:
        """Every component back to its offload device."""
