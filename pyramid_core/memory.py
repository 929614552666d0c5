"""Where model weights live, and every move of them between host and execution device.

The models and the sampler never move weights; they compute on whatever device the plan puts
them on. A pipeline registers its components here and wraps each use in `manager.use(name)`.

Plans:
  none   - everything resident on the execution device.
  model  - each component on the device only while it runs (the official cpu_offloading).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

PLANS = ("none", "model")


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (CPU for a module without parameters)."""
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


@dataclass
class MemoryManager:
    """Owns the placement of registered components under one plan."""

    plan: str = "none"
    device: torch.device = field(default_factory=default_device)
    offload_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    components: dict[str, nn.Module] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.plan not in PLANS:
            raise ValueError(f"unknown memory plan {self.plan!r}; choose one of {', '.join(PLANS)}")
        self.device = torch.device(self.device)
        self.offload_device = torch.device(self.offload_device)

    def register(self, name: str, module: nn.Module | None) -> None:
        """Take ownership of a component's placement (None unregisters it)."""
        if module is None:
            self.components.pop(name, None)
            return
        self.components[name] = module
        target = self.device if self.plan == "none" else self.offload_device
        self._move(module, target)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[nn.Module]:
        """The component, on the execution device for the duration of the block."""
        module = self.components[name]
        if self.plan == "model":
            self._move(module, self.device)
        try:
            yield module
        finally:
            if self.plan == "model":
                self._move(module, self.offload_device)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def offload_all(self) -> None:
        """Move every component to the offload device (e.g. before another program needs the GPU)."""
        for module in self.components.values():
            self._move(module, self.offload_device)

    @staticmethod
    def _move(module: nn.Module, device: torch.device) -> None:
        if module_device(module) != device:
            module.to(device)
