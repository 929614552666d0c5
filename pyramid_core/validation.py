"""Checks of user-facing generation settings, with errors that say how to fix them."""
from __future__ import annotations

import warnings
from typing import Sequence

SIZE_MULTIPLE = 64  # 8 (VAE) x 4 (pyramid) x 2 (patch)
FPS = 24
# longest temp each released DiT was trained for (official README / app sliders)
TRAINED_TEMP_LIMITS = {
    "diffusion_transformer_384p": 16,
    "diffusion_transformer_768p": 31,
    "diffusion_transformer_image": 1,
}


def nearest_valid_sizes(value: int) -> tuple[int, int]:
    """The multiples of 64 just below and just above `value` (below is at least 64)."""
    lower = max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
    upper = -(-value // SIZE_MULTIPLE) * SIZE_MULTIPLE
    return lower, max(upper, SIZE_MULTIPLE)


def check_resolution(width: int, height: int) -> None:
    """Width and height must be positive multiples of 64."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
        if value % SIZE_MULTIPLE:
            low, high = nearest_valid_sizes(value)
            raise ValueError(
                f"{name} {value} is not a multiple of {SIZE_MULTIPLE} (8 VAE x 4 pyramid x 2 patch); "
                f"use {low} or {high}"
            )


def check_temp(temp: int, variant: str | None) -> None:
    """temp >= 1; warns above the variant's trained length (generation still runs)."""
    if not isinstance(temp, int) or isinstance(temp, bool) or temp < 1:
        raise ValueError(f"temp (latent frames; the video has 8*(temp-1)+1 frames) must be an integer >= 1, got {temp!r}")
    limit = TRAINED_TEMP_LIMITS.get(variant or "")
    if limit is not None and temp > limit:
        warnings.warn(
            f"temp={temp} is beyond what {variant} was trained for (temp <= {limit}, "
            f"{frames_for_temp(limit)} frames); expect degraded motion. "
            + ("Use the 768p model for up to 31." if limit == 16 else ""),
            stacklevel=3,
        )


def check_steps(steps: int | Sequence[int], name: str = "num_inference_steps") -> list[int]:
    """One step count for all three stages, or a list of three counts, each >= 1."""
    if isinstance(steps, int) and not isinstance(steps, bool):
        steps = [steps] * 3
    steps = list(steps)
    if len(steps) != 3:
        raise ValueError(f"{name} needs one count per pyramid stage (3 values, e.g. [20, 20, 20]), got {steps}")
    for value in steps:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} values must be integers >= 1, got {steps}")
    return steps


def parse_steps(text: str, name: str = "steps") -> list[int]:
    """'20,20,20' or '20' -> [20, 20, 20] (validated)."""
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"{name} must be integers separated by commas, like 20,20,20; got {text!r}") from None
    return check_steps(values[0] if len(values) == 1 else values, name)


def frames_for_temp(temp: int) -> int:
    """Video frames produced by `temp` latent frames (causal VAE: 8 per latent after the first)."""
    return 8 * (temp - 1) + 1


def temp_for_duration(seconds: float, fps: int = FPS) -> int:
    """Smallest temp whose video lasts at least `seconds` at `fps`."""
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {seconds}")
    frames = round(seconds * fps)
    return max(1, -(-(frames - 1) // 8) + 1)
