"""Checks of user-facing generation settings, with errors that say how to fix them.

One module for the command line, the pipeline and the nodes: every check here runs before anything is
loaded. Errors are `ValueError` (`FileNotFoundError` for a missing folder); each names the fix.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import TYPE_CHECKING, Sequence

from .settings import DEFAULTS, FPS, SIZE_MULTIPLE, VARIANTS

if TYPE_CHECKING:
    import torch

__all__ = [
    "FPS", "SIZE_MULTIPLE", "check_device", "check_fits", "check_fps", "check_guidance", "check_quality",
    "check_resolution", "check_seed", "check_steps", "check_temp", "device_capacity", "frames_for_temp",
    "guidance_note", "largest_fitting_size", "parse_steps", "temp_beyond_training", "temp_for_duration",
]


def nearest_valid_sizes(value: int) -> tuple[int, int]:
    """The multiples of 64 just below and just above `value` (below is at least 64)."""
    lower = max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
    upper = -(-value // SIZE_MULTIPLE) * SIZE_MULTIPLE
    return lower, max(upper, SIZE_MULTIPLE)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_resolution(width: int, height: int) -> None:
    """Width and height must be positive multiples of 64."""
    for name, value in (("width", width), ("height", height)):
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
        if value % SIZE_MULTIPLE:
            low, high = nearest_valid_sizes(value)
            raise ValueError(
                f"{name} {value} is not a multiple of {SIZE_MULTIPLE} (8 VAE x 4 pyramid x 2 patch); "
                f"use {low} or {high}"
            )


def temp_beyond_training(temp: int, variant: str | None) -> str | None:
    """The warning for a temp longer than `variant` was trained for; None within the limit (or unknown variant).

    The one rule, everywhere: going past the trained length is allowed (it runs, with degraded motion) and
    warned about, never refused.
    """
    known = VARIANTS.get(variant or "")
    if known is None or temp <= known.trained_temp:
        return None
    longer = [v for v in VARIANTS.values() if v.trained_temp >= temp]
    hint = f" Use the {longer[0].alias} model for up to temp {longer[0].trained_temp}." if longer else ""
    return (
        f"temp={temp} is beyond what {variant} was trained for (temp <= {known.trained_temp}, "
        f"{frames_for_temp(known.trained_temp)} frames); expect degraded motion.{hint}"
    )


def check_temp(temp: int, variant: str | None) -> None:
    """temp >= 1; warns above the variant's trained length (generation still runs)."""
    if not _is_int(temp) or temp < 1:
        raise ValueError(f"temp (latent frames; the video has 8*(temp-1)+1 frames) must be an integer >= 1, got {temp!r}")
    message = temp_beyond_training(temp, variant)
    if message is not None:
        warnings.warn(message, stacklevel=3)


def check_steps(steps: int | Sequence[int], name: str = "num_inference_steps") -> list[int]:
    """One step count for all three stages, or a list of three counts, each >= 1."""
    if _is_int(steps):
        steps = [steps] * 3
    steps = list(steps)
    if len(steps) != 3:
        raise ValueError(f"{name} needs one count per pyramid stage (3 values, e.g. [20, 20, 20]), got {steps}")
    for value in steps:
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} values must be integers >= 1, got {steps}")
    return steps


def parse_steps(text: str, name: str = "steps") -> list[int]:
    """'20,20,20' or '20' -> [20, 20, 20] (validated)."""
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"{name} must be integers separated by commas, like 20,20,20; got {text!r}") from None
    if not values:
        raise ValueError(f"{name} must be integers separated by commas, like 20,20,20; got {text!r}")
    return check_steps(values[0] if len(values) == 1 else values, name)


def frames_for_temp(temp: int) -> int:
    """Video frames produced by `temp` latent frames (causal VAE: 8 per latent after the first)."""
    return 8 * (temp - 1) + 1


def check_fps(fps: float, name: str = "fps") -> float:
    """A finite, positive frame rate."""
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"{name} must be a positive number of frames per second (e.g. {FPS}), got {fps!r}")
    return float(fps)


def temp_for_duration(seconds: float, fps: float = FPS, name: str = "duration") -> int:
    """Smallest temp whose video lasts at least `seconds` at `fps`."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {seconds!r}")
    frames = round(seconds * check_fps(fps))
    return max(1, -(-(frames - 1) // 8) + 1)


def check_guidance(value: float, name: str = "guidance") -> float:
    """Classifier-free guidance: a finite number >= 0 (0 turns guidance off)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0 (0 turns guidance off; {DEFAULTS.guidance:g} is the default), got {value!r}"
        )
    return float(value)


def guidance_note(guidance: float, video_guidance: float) -> str | None:
    """What guidance 0 means, said once; None when both guidances are on."""
    off = [name for name, value in (("first-frame", guidance), ("video", video_guidance)) if value == 0]
    if not off:
        return None
    return f"{' and '.join(off)} guidance 0: classifier-free guidance is off there (faster, follows the prompt less)"


def check_seed(seed: int, name: str = "seed") -> int:
    """A seed in [0, 2**64): larger or negative seeds are an error, never wrapped."""
    if not _is_int(seed) or not 0 <= seed < DEFAULTS.seed_limit:
        raise ValueError(f"{name} must be an integer in 0..{DEFAULTS.seed_limit - 1} (2**64 - 1), got {seed!r}")
    return seed


def check_quality(quality: int) -> int:
    """Writer quality 0..100."""
    if not _is_int(quality) or not 0 <= quality <= 100:
        raise ValueError(f"quality must be an integer 0..100 (higher = better and larger), got {quality!r}")
    return quality


# --------------------------------------------------------------------------------------------
# the device and what it can hold


def check_device(name: str | None, flag: str = "device") -> torch.device:
    """The device to run on: `name` (cuda, cuda:N, cpu, mps), or CUDA when available, else CPU.

    A device PyTorch cannot use here is an error naming what works.
    """
    import torch

    if name is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown {flag} {name!r}; use cuda, cuda:N or cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {name}, but PyTorch sees no CUDA GPU here; use cpu (slow) or fix the CUDA install")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise ValueError(f"{flag} {name}, but this PyTorch build has no usable Apple GPU (MPS); use cpu")
    elif device.type != "cpu":
        raise ValueError(f"{flag} {name!r} is not supported; use cuda or cpu")
    return device


def device_capacity(device: torch.device) -> int | None:
    """Bytes the device holds in all: a GPU's total memory, or the host's physical memory for the CPU."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _dit_bytes(width: int, height: int, temp: int, hidden: int, cfg: bool, act_bytes: int) -> int:
    from .memory.estimates import Workload, dit_working_memory

    return dit_working_memory(Workload(width, height, temp, cfg, act_bytes), hidden)


def largest_fitting_size(width: int, height: int, temp: int, hidden: int, capacity: int, *, cfg: bool = True,
                         act_bytes: int = 2) -> tuple[int, int] | None:
    """The largest multiple-of-64 size with about the aspect of width x height whose DiT working memory fits
    `capacity` bytes at `temp`; None when not even 64 pixels fit."""
    longer = max(width, height)
    for side in range(longer - longer % SIZE_MULTIPLE, 0, -SIZE_MULTIPLE):
        other = max(SIZE_MULTIPLE, round(min(width, height) * side / longer / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        size = (side, other) if width >= height else (other, side)
        if _dit_bytes(*size, temp, hidden, cfg, act_bytes) <= capacity:
            return size
    return None


def check_fits(width: int, height: int, temp: int, *, hidden: int, capacity: int | None, cfg: bool = True,
               act_bytes: int = 2, where: str = "the device") -> None:
    """Refuse a size whose DiT working memory alone (one forward, no weights: the least any memory plan
    needs) exceeds what the device holds; the error gives the largest size (and temp) that fits."""
    if capacity is None:
        return
    need = _dit_bytes(width, height, temp, hidden, cfg, act_bytes)
    if need <= capacity:
        return
    fits = largest_fitting_size(width, height, temp, hidden, capacity, cfg=cfg, act_bytes=act_bytes)
    advice = f"the largest size that fits at temp {temp} is about {fits[0]}x{fits[1]}" if fits else (
        f"not even 64x64 fits at temp {temp}")
    longest = next((t for t in range(temp - 1, 0, -1) if _dit_bytes(width, height, t, hidden, cfg, act_bytes) <= capacity), None)
    if longest is not None:
        advice += f", or keep {width}x{height} with temp <= {longest}"
    raise ValueError(
        f"{width}x{height} with temp {temp} needs about {need / 2**30:.1f} GiB of working memory, more than "
        f"{where} holds ({capacity / 2**30:.1f} GiB in all); {advice}"
    )
