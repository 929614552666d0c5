"""What the host CPU can do fast: native bf16 matmul detection for the CPU dtype default.

bf16 convolutions and matmuls on a CPU without native bf16 instructions run through conversions to fp32
(measured ~100x slower conv3d, ~8x slower matmul than fp32 on an AVX2 CPU); with AVX512-BF16 or AMX-BF16
oneDNN runs them natively, so bf16 (as trained, half the memory) is the better default there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

__all__ = ["BF16_FEATURES", "cpu_bf16_feature", "cpu_flags"]

# cpuinfo / /proc/cpuinfo flag -> the name a note prints; the first one present wins (fastest first)
BF16_FEATURES: Mapping[str, str] = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags of this host: torch's cpuinfo probe where present, else Linux /proc/cpuinfo."""
    flags: set[str] = set()
    try:
        import torch

        probe = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.9
        if probe is not None:
            flags |= {name for name, value in probe().items() if value is True}
    except Exception:  # an unknown architecture or an old torch: fall back to the kernel's list
        pass
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                flags |= set(line.partition(":")[2].split())
                break
    except OSError:
        pass
    return flags


def cpu_bf16_feature(flags: Iterable[str] | None = None) -> str | None:
    """The native bf16 matmul feature of this CPU ('AMX-BF16' or 'AVX512-BF16'), or None without one.

    `flags`: feature flags to decide from (default: `cpu_flags()` of this host).
    """
    present = set(cpu_flags() if flags is None else flags)
    return next((label for flag, label in BF16_FEATURES.items() if flag in present), None)
