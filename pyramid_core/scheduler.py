"""Pyramidal flow-matching Euler scheduler, stage-jump block noise and the pyramid resamplers.

Pure tensor math reproducing the official Pyramid Flow numerics (float64 schedules, bf16 Euler
rounding, bit-exact block-noise draws). No model code lives here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BLOCK_NOISE_SCALE_TRIL",
    "PyramidFlowScheduler",
    "StageSchedule",
    "StageStep",
    "block_noise_covariance",
    "block_noise_scale_tril",
    "downsample_2x",
    "euler_delta",
    "euler_step",
    "euler_update",
    "model_timestep",
    "nearest_upsample_2x",
    "numpy_linspace",
    "sample_block_noise",
]


def numpy_linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """float64 ``numpy.linspace(start, stop, num)`` reproduced bit for bit (``i*step + start``, last = stop)."""
    if num < 1:
        raise ValueError(f"linspace needs num >= 1, got {num}")
    start, stop = float(start), float(stop)
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    values = torch.arange(num, dtype=torch.float64) * step + start
    values[-1] = stop
    return values


class StageStep(NamedTuple):
    """One Euler step of a stage: model timestep and the local sigma interval (0-dim float64 tensors)."""

    index: int
    timestep: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor


@dataclass(frozen=True, eq=False)
class StageSchedule:
    """The sampling schedule of one pyramid stage.

    ``timesteps`` (float64 [n]) are the global model timesteps; ``sigmas`` (float64 [n+1]) the local
    flow positions from 1.0 down to 0.001 plus a trailing 0. Iterating yields :class:`StageStep`.
    """

    stage: int
    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def __iter__(self) -> Iterator[StageStep]:
        for i in range(len(self)):
            yield StageStep(i, self.timesteps[i], self.sigmas[i], self.sigmas[i + 1])


def euler_delta(sigma: float | torch.Tensor, sigma_next: float | torch.Tensor, dtype: torch.dtype) -> float:
    """``sigma_next - sigma`` in float64, rounded to ``dtype`` on the host: the scalar of the official Euler step.

    Official promotion casts the float64 difference to the model output's dtype before the product (bf16:
    rounded to bf16). A Python float holding that rounded value multiplies a tensor bit for bit like the 0-dim
    ``dtype`` tensor (kernels compute in fp32 opmath either way), with no copy to the device.
    """
    delta = torch.as_tensor(sigma_next, dtype=torch.float64, device="cpu") - torch.as_tensor(
        sigma, dtype=torch.float64, device="cpu"
    )
    if delta.dim() != 0:
        raise ValueError(f"sigma and sigma_next must be scalars, got a difference of shape {tuple(delta.shape)}")
    return delta.to(dtype).item()


def model_timestep(timestep: float | torch.Tensor, dtype: torch.dtype) -> float:
    """The timestep as the DiT receives it: the float64 value rounded to ``dtype`` on the host (bf16: 986.54 -> 988)."""
    return torch.as_tensor(timestep, dtype=torch.float64, device="cpu").to(dtype).item()


def euler_update(sample: torch.Tensor, model_output: torch.Tensor, delta: float) -> torch.Tensor:
    """``dtype(fp32(sample) + delta * model_output)`` with ``delta`` from :func:`euler_delta` (no device sync)."""
    prev = sample.to(torch.float32) + delta * model_output
    return prev.to(model_output.dtype)


def euler_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
) -> torch.Tensor:
    """Official flow-matching Euler step ``fp32(sample) + (sigma_next - sigma) * model_output``.

    The sigma difference is a float64 scalar that type promotion casts to ``model_output.dtype``
    before the product (bf16: the difference is rounded to bf16 and the product done in bf16);
    the sum is float32 and the result is cast back to ``model_output.dtype``. Host sigmas (floats or
    CPU tensors) make no device copy.
    """
    return euler_update(sample, model_output, euler_delta(sigma, sigma_next, model_output.dtype))


class PyramidFlowScheduler:
    """Pyramidal flow-matching Euler scheduler (official ``PyramidFlowMatchEulerDiscreteScheduler`` numerics).

    Stage ``k`` covers the global sigma interval ``stage_range[k] .. stage_range[k+1]``; inside a stage the
    local sigma runs 1 -> 0 while the model sees the global timestep. Per-stage tables are float64.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        stages: int = 3,
        stage_range: Sequence[float] = (0, 1 / 3, 2 / 3, 1),
        gamma: float = 1 / 3,
    ) -> None:
        if int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
        stage_range = tuple(float(r) for r in stage_range)
        if len(stage_range) != stages + 1:
            raise ValueError(f"stage_range needs stages + 1 = {stages + 1} boundaries, got {len(stage_range)}")
        if stage_range[0] != 0 or stage_range[-1] != 1 or any(a >= b for a, b in zip(stage_range, stage_range[1:])):
            raise ValueError(f"stage_range must rise strictly from 0 to 1, got {stage_range}")
        if not 0 < gamma:
            raise ValueError(f"gamma must be positive, got {gamma}")
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.stages = int(stages)
        self.stage_range = stage_range
        self.gamma = float(gamma)
        self._init_global_table()
        self._init_stages()

    def _init_global_table(self) -> None:
        n = self.num_train_timesteps
        # float32 throughout, as the official table (integers n..1, then /n, shift, *n).
        t = torch.arange(n, 0, -1, dtype=torch.float32)
        sigmas = t / n
        sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        self.train_sigmas = sigmas
        self.train_timesteps = sigmas * n

    def _init_stages(self) -> None:
        n = self.num_train_timesteps
        ori_starts, starts, ends, distances = [], [], [], []
        for k in range(self.stages):
            first = max(int(self.stage_range[k] * n), 0)
            last = min(int(self.stage_range[k + 1] * n), n)
            start = self.train_sigmas[first].item()
            end = self.train_sigmas[last].item() if last < n else 0.0
            ori_starts.append(start)
            if k != 0:
                signal = 1 - start
                corrected = (1 / (math.sqrt(1 + (1 / self.gamma)) * (1 - signal) + signal)) * signal
                start = 1 - corrected
            starts.append(start)
            ends.append(end)
            distances.append(start - end)
        total = sum(distances)
        ratios = []
        for k in range(self.stages):
            lo = 0.0 if k == 0 else sum(distances[:k]) / total
            hi = 1.0 if k == self.stages - 1 else sum(distances[: k + 1]) / total
            ratios.append((lo, hi))
        timestep_tables, sigma_tables = [], []
        for lo, hi in ratios:
            t_max = self.train_timesteps[int(lo * n)].item()
            t_min = self.train_timesteps[min(int(hi * n), n - 1)].item()
            timestep_tables.append(numpy_linspace(t_max, t_min, n + 1)[:-1])
            sigma_tables.append(numpy_linspace(1.0, 0.0, n + 1)[:-1])
        self.ori_start_sigmas: tuple[float, ...] = tuple(ori_starts)
        self.start_sigmas: tuple[float, ...] = tuple(starts)
        self.end_sigmas: tuple[float, ...] = tuple(ends)
        self.timestep_ratios: tuple[tuple[float, float], ...] = tuple(ratios)
        self.timesteps_per_stage: tuple[torch.Tensor, ...] = tuple(timestep_tables)
        self.sigmas_per_stage: tuple[torch.Tensor, ...] = tuple(sigma_tables)

    def _check_stage(self, stage: int) -> None:
        if isinstance(stage, bool) or not isinstance(stage, (int, np.integer)) or not 0 <= stage < self.stages:
            raise ValueError(f"stage must be an integer in [0, {self.stages - 1}], got {stage!r}")

    def stage_schedule(self, num_steps: int, stage: int) -> StageSchedule:
        """Timesteps (float64 [n]) and sigmas (float64 [n+1], trailing 0) for ``num_steps`` steps of ``stage``."""
        self._check_stage(stage)
        stage = int(stage)
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        num_steps = int(num_steps)
        table_t = self.timesteps_per_stage[stage]
        table_s = self.sigmas_per_stage[stage]
        timesteps = numpy_linspace(table_t[0].item(), table_t[-1].item(), num_steps)
        sigmas = numpy_linspace(table_s[0].item(), table_s[-1].item(), num_steps)
        sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
        return StageSchedule(stage, timesteps, sigmas)

    def stage_jump_coefficients(self, stage: int) -> tuple[float, float]:
        """``(alpha, beta)`` of the jump into ``stage`` (>= 1): ``x = alpha * up2(x) + beta * block_noise``."""
        self._check_stage(stage)
        stage = int(stage)
        if stage == 0:
            raise ValueError("stage 0 has no stage jump; coefficients exist for stages 1..%d" % (self.stages - 1))
        signal = 1 - self.ori_start_sigmas[stage]
        alpha = 1 / (math.sqrt(1 + (1 / self.gamma)) * (1 - signal) + signal)
        beta = alpha * (1 - signal) / math.sqrt(self.gamma)
        return alpha, beta

    euler_step = staticmethod(euler_step)


# ---------------------------------------------------------------------------------------------
# Block noise


def block_noise_covariance(gamma: float = 1 / 3) -> torch.Tensor:
    """float32 covariance of one 2x2 block, ``(1+gamma) I - gamma 11^T`` (singular for gamma = 1/3)."""
    return torch.eye(4, dtype=torch.float32) * (1 + gamma) - torch.ones(4, 4, dtype=torch.float32) * gamma


def block_noise_scale_tril(gamma: float = 1 / 3) -> torch.Tensor:
    """float32 Cholesky factor of :func:`block_noise_covariance` as the reference LAPACK computed it.

    Unblocked column Cholesky in float32 (sequential updates, column scaled by the pivot's reciprocal);
    for gamma = 1/3 the singular last pivot rounds to 2**-24, so ``L[3,3] = 2**-12`` exactly as the
    official (torch 2.1.2) factor. Newer torch refuses this matrix, hence the hand-rolled loop.
    """
    a = block_noise_covariance(gamma)
    n = a.shape[0]
    low = torch.zeros_like(a)
    for j in range(n):
        pivot = a[j, j].clone()
        for k in range(j):
            pivot = pivot - low[j, k] * low[j, k]
        if pivot.item() <= 0:
            raise ValueError(f"block-noise covariance for gamma={gamma} is not positive definite (pivot {pivot.item()})")
        low[j, j] = torch.sqrt(pivot)
        inv = 1 / low[j, j]
        for i in range(j + 1, n):
            acc = a[i, j].clone()
            for k in range(j):
                acc = acc - low[j, k] * low[i, k]
            low[i, j] = acc * inv
    return low


BLOCK_NOISE_SCALE_TRIL: torch.Tensor = block_noise_scale_tril(1 / 3)


def sample_block_noise(
    batch: int,
    channels: int,
    frames: int,
    height: int,
    width: int,
    *,
    generator: torch.Generator | None = None,
    scale_tril: torch.Tensor | None = None,
) -> torch.Tensor:
    """Correlated 2x2 block noise ``[B,C,T,H,W]`` (float32, CPU), bit-identical to the official per-block loop.

    Every aligned 2x2 block gets ``L @ eps`` with ``eps`` four standard normals; blocks are drawn in
    ``(b c t h w)`` order, values inside a block in ``(row, column)`` order. ``generator=None`` uses the
    CPU global RNG (official); a CPU ``torch.Generator`` draws from that stream instead.
    """
    dims = {"batch": batch, "channels": channels, "frames": frames, "height": height, "width": width}
    for name, value in dims.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if height % 2 or width % 2:
        raise ValueError(f"height and width are the upsampled grid and must be even, got {height}x{width}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"block noise is drawn on the CPU; pass a CPU torch.Generator (got one on {generator.device})")
    tril = BLOCK_NOISE_SCALE_TRIL if scale_tril is None else scale_tril.to(device="cpu", dtype=torch.float32)
    if tuple(tril.shape) != (4, 4):
        raise ValueError(f"scale_tril must be 4x4, got {tuple(tril.shape)}")
    bh, bw = height // 2, width // 2
    blocks = batch * channels * frames * bh * bw
    # CPU normal_ fills non-contiguous tensors with the serial scalar sampler, the same path as
    # one tiny contiguous draw per block, so a strided view reproduces the per-block stream exactly.
    eps = torch.empty(2 * 4 * blocks, dtype=torch.float32)[::2]
    eps.normal_(generator=generator)
    eps = eps.reshape(blocks, 4)
    # Left-to-right float32 sum of separately rounded products = the official 4x4 mat-vec, bit for bit.
    noise = eps[:, 0:1] * tril[:, 0]
    for j in range(1, 4):
        noise = noise + eps[:, j : j + 1] * tril[:, j]
    noise = noise.view(batch, channels, frames, bh, bw, 2, 2)
    return noise.permute(0, 1, 2, 3, 5, 4, 6).reshape(batch, channels, frames, height, width)


# ---------------------------------------------------------------------------------------------
# Pyramid resampling (per frame, as the official 2-D interpolation on (b t) c h w)


def _check_video(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} expects a [B,C,T,H,W] tensor, got {shape}")


def _per_frame(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    b, c, t, _, _ = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, x.shape[3], x.shape[4])
    frames = F.interpolate(frames, size=size, mode=mode)
    return frames.reshape(b, t, c, size[0], size[1]).permute(0, 2, 1, 3, 4).contiguous()


def nearest_upsample_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x spatial upsampling of ``[B,C,T,H,W]`` (per frame; the stage jump)."""
    _check_video(x, "nearest_upsample_2x")
    return _per_frame(x, (2 * x.shape[3], 2 * x.shape[4]), "nearest")


def downsample_2x(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Bilinear 2x spatial downsampling of ``[B,C,T,H,W]`` (per frame, align_corners=False, no antialias), times ``scale``.

    ``scale=2`` builds the initial-noise pyramid, ``scale=1`` the clean history pyramid.
    """
    _check_video(x, "downsample_2x")
    h, w = x.shape[3] // 2, x.shape[4] // 2
    if h < 1 or w < 1:
        raise ValueError(f"downsample_2x needs height and width >= 2, got {x.shape[3]}x{x.shape[4]}")
    out = _per_frame(x, (h, w), "bilinear")
    return out if scale == 1.0 else out * scale
