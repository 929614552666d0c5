"""Pyramidal flow matching, autoregressive over latent frames (the paper's sampling algorithm).

    for unit u (one latent frame each; unit 0 is the first frame / image):
        history = clean pyramid of frames 0..u-1 (compressed: older frames at lower resolution)
        x = stage-0 noise of frame u                        (1/4 of the latent size per side)
        for stage s in 0, 1, 2:
            if s > 0: x = alpha_s * up2(x) + beta_s * block_noise      (renoising jump)
            for each Euler step of the stage:
                v = DiT(history_s + [x], t)  with classifier-free guidance
                x = x + (sigma_next - sigma) * v
        append x (full latent size) to the generated frames

All numerics follow the official implementation; see the scheduler module for the tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .models.attention import HostTextMask
from .models.layers import host_to_device
from .scheduler import (
    PyramidFlowScheduler,
    downsample_2x,
    euler_delta,
    euler_update,
    model_timestep,
    nearest_upsample_2x,
    sample_block_noise,
)
from .text import TextEmbeddings

if TYPE_CHECKING:
    from .parallel.guidance import CfgParallel

NUM_STAGES = 3


class GenerationCancelled(RuntimeError):
    """Raised (or re-raised) when a step callback stops a generation."""


@dataclass(frozen=True)
class StepInfo:
    """Where a denoising step sits in the whole run (for progress bars and cancellation)."""

    unit: int
    num_units: int
    stage: int
    step: int
    steps_in_stage: int
    completed: int  # steps finished in the whole run, this one included
    total: int  # steps in the whole run


StepCallback = Callable[[StepInfo], None]
UnitCallback = Callable[[int, int, torch.Tensor], None]  # (unit, num_units, newest clean latent)
TextSource = TextEmbeddings | Callable[[int], TextEmbeddings]  # one for every unit, or unit -> embeddings


def stage0_noise(noise: torch.Tensor) -> torch.Tensor:
    """Full-resolution noise [B,C,T,h,w] -> stage-0 start noise: bilinear halving x2, times 2 each time."""
    for _ in range(NUM_STAGES - 1):
        noise = downsample_2x(noise, scale=2.0)
    return noise


def clean_pyramid(latents: torch.Tensor) -> list[torch.Tensor]:
    """Generated frames [B,C,u,h,w] at every stage resolution, lowest first (bilinear, no rescale)."""
    levels = [latents]
    for _ in range(NUM_STAGES - 1):
        levels.append(downsample_2x(levels[-1]))
    return levels[::-1]


def history_levels(num_past: int, stage: int) -> list[int]:
    """Pyramid level (0..2) of each past frame as the DiT sees it at `stage`, oldest first (shapes only).

    The previous frame at the stage's own level, the one before it a level lower (while that level
    is >= 1), and all older frames at level 0.
    """
    if num_past <= 0:
        return []
    newest_first = [stage]
    while len(newest_first) < num_past and newest_first[-1] > 1:
        newest_first.append(newest_first[-1] - 1)
    newest_first += [0] * (num_past - len(newest_first))
    return newest_first[::-1]


def history_for_stage(pyramid: list[torch.Tensor], stage: int) -> list[torch.Tensor]:
    """The compressed history the DiT sees at `stage`, oldest first (levels from `history_levels`).

    Clips as official: the frames older than the previous one that sit at level 0 form one clip, every
    other frame is a clip of its own.
    """
    levels = history_levels(pyramid[0].shape[2], stage)
    newest = len(levels) - 1
    clips, start = [], 0
    for end in range(1, len(levels) + 1):
        continues_old_block = end < newest and levels[start] == levels[end] == 0
        if not continues_old_block:
            clips.append(pyramid[levels[start]][:, :, start:end])
            start = end
    return clips


def guided_velocity(velocity: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on a [negative; positive] batch: u + g * (c - u)."""
    uncond, cond = velocity.chunk(2)
    return uncond + scale * (cond - uncond)


@dataclass
class RandomStreams:
    """The two random streams of a generation.

    noise: the initial-noise generator (None = global RNG of the execution device, official).
    global_: draws the official code takes from the global RNG (i2v posterior sample, stage-jump
    block noise); None = the CPU global RNG itself, a CPU generator = a private stream.
    """

    noise: torch.Generator | None = None
    global_: torch.Generator | None = None

    @classmethod
    def from_seed(cls, seed: int) -> "RandomStreams":
        """Both streams seeded from one number, never touching global RNG state.

        Equivalent to the official call after `torch.manual_seed(seed)` with
        `generator=torch.Generator("cpu").manual_seed(seed)` on a CPU run.
        """
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        seed %= 2**64
        return cls(torch.Generator("cpu").manual_seed(seed), torch.Generator("cpu").manual_seed(seed))


@dataclass
class PyramidSampler:
    """Runs the pyramid stages and the autoregressive unit loop for one DiT.

    `block_noise_generator`: None draws the stage-jump noise from the CPU global RNG (official);
    a CPU torch.Generator makes the run independent of global RNG state.
    `cfg_parallel`: with guidance on, this process runs the DiT on one branch of the CFG batch and gets the
    other branch's velocity from its partner rank (`pyramid_core.parallel`); None: both branches here.
    """

    dit: Callable[..., torch.Tensor]
    scheduler: PyramidFlowScheduler
    device: torch.device
    dtype: torch.dtype
    block_noise_generator: torch.Generator | None = None
    step_callback: StepCallback | None = None
    unit_callback: UnitCallback | None = None
    unit_start_callback: Callable[[int, int], None] | None = None  # official `callback(unit, num_units)`
    cfg_parallel: CfgParallel | None = None

    def denoise_unit(
        self,
        noise: torch.Tensor,
        history: list[list[torch.Tensor]],
        text: TextEmbeddings,
        steps: Sequence[int],
        guidance_scale: float,
        do_cfg: bool,
        progress: "_Progress",
        text_mask: HostTextMask | None = None,
    ) -> list[torch.Tensor]:
        """Denoise one unit through the three stages; returns the latent after each stage.

        `text_mask`: `text.attention_mask` held on the host (None: made here from it).
        """
        if text_mask is None:
            text_mask = HostTextMask.from_mask(text.attention_mask)
        split = self.cfg_parallel if do_cfg else None  # CFG-parallel: this rank's branch only
        if split is not None:
            text, text_mask = split.branch_text(text, text_mask)
        doubled = do_cfg and split is None
        x = noise
        outputs = []
        for stage in range(NUM_STAGES):
            schedule = self.scheduler.stage_schedule(int(steps[stage]), stage)
            if stage > 0:
                x = self._stage_jump(x, stage)
            clips = [torch.cat([clip, clip]) if doubled else clip for clip in history[stage]]
            for step in schedule:
                model_input = torch.cat([x, x]) if doubled else x
                # scalars stay on the host (Python floats): no copy to the device and no sync per step
                timestep = torch.full(
                    (model_input.shape[0],), model_timestep(step.timestep, model_input.dtype),
                    dtype=model_input.dtype, device=model_input.device,
                )
                velocity = self.dit(
                    clips + [model_input], timestep, text.prompt_embeds, text_mask, text.pooled
                )
                if do_cfg:
                    if split is not None:
                        velocity = split.gather(velocity)  # [negative; positive], the same on both ranks
                    velocity = guided_velocity(velocity, guidance_scale)
                x = euler_update(x, velocity, euler_delta(step.sigma, step.sigma_next, velocity.dtype))
                progress.advance(stage, step.index, len(schedule))
            outputs.append(x)
        return outputs

    def _stage_jump(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Renoise into `stage`: alpha * up2(x) + beta * block noise (drawn on the CPU, bit-exact as official)."""
        alpha, beta = self.scheduler.stage_jump_coefficients(stage)
        x = nearest_upsample_2x(x)
        b, c, t, h, w = x.shape
        block_noise = sample_block_noise(b, c, t, h, w, generator=self.block_noise_generator)
        block_noise = host_to_device(block_noise, self.device).to(self.dtype)  # async copy, cast on the device
        return alpha * x + beta * block_noise

    def sample(
        self,
        noise: torch.Tensor,
        text: TextSource,
        *,
        first_frame_steps: Sequence[int],
        video_steps: Sequence[int],
        guidance_scale: float,
        video_guidance_scale: float,
        history: torch.Tensor | None = None,
        unit_guidance: Sequence[float] | None = None,
        history_frames: int | None = None,
    ) -> torch.Tensor:
        """Generate latent frames after `history`. Returns the whole clip, DiT-space latents [B,C,k+T,h,w].

        noise: the full-resolution initial noise of the new units [B,C,T,h,w] (one draw, as official).
        history: clean latents [B,C,k,h,w] the new units continue (an i2v start frame is k = 1: units
        1..T are then generated from noise frames 0..T-1, the official offset); unit u >= 1 uses video
        steps and guidance, so a continued run equals the same units of a full run.
        text: the embeddings of every unit, or a function unit -> embeddings (a prompt schedule).
        unit_guidance: per-unit guidance scales (indexed by absolute unit) overriding both scales.
        history_frames: keep only the newest N frames as history (None: all, official); bounds the cost of
        long videos.
        """
        do_cfg = guidance_scale > 0  # the first-frame scale switches CFG for the whole run
        if history_frames is not None and history_frames < 1:
            raise ValueError(f"history_frames must be >= 1 (or None for the whole history), got {history_frames}")
        texts = _UnitTexts(text)
        start_noise = stage0_noise(host_to_device(noise, self.device).to(self.dtype))
        generated = [] if history is None else list(host_to_device(history, self.device).to(self.dtype).split(1, dim=2))
        first_unit = len(generated)
        num_units = first_unit + noise.shape[2]
        progress = _Progress(self, num_units, first_unit, first_frame_steps, video_steps)
        for unit in range(first_unit, num_units):
            progress.unit = unit
            if self.unit_start_callback is not None:
                self.unit_start_callback(unit, num_units)
            is_first_frame = unit == 0
            kept = generated if history_frames is None else generated[-history_frames:]
            if kept:
                pyramid = clean_pyramid(torch.cat(kept, dim=2))
                stage_history = [history_for_stage(pyramid, stage) for stage in range(NUM_STAGES)]
            else:
                stage_history = [[] for _ in range(NUM_STAGES)]
            if unit_guidance is not None:
                scale = unit_guidance[unit]
            else:
                scale = guidance_scale if is_first_frame else video_guidance_scale
            steps = first_frame_steps if is_first_frame else video_steps
            unit_text, text_mask = texts(unit)
            unit_noise = start_noise[:, :, unit - first_unit : unit - first_unit + 1]
            stage_outputs = self.denoise_unit(unit_noise, stage_history, unit_text, steps, scale, do_cfg, progress, text_mask)
            generated.append(stage_outputs[-1])
            if self.unit_callback is not None:
                self.unit_callback(unit, num_units, stage_outputs[-1])
        return torch.cat(generated, dim=2)


class _UnitTexts:
    """The text embeddings of each unit and their host-side masks, each mask made once per embedding."""

    def __init__(self, text: TextSource):
        self.text = text
        self.masks: dict[int, HostTextMask] = {}

    def __call__(self, unit: int) -> tuple[TextEmbeddings, HostTextMask]:
        embeddings = self.text(unit) if callable(self.text) else self.text
        key = id(embeddings.attention_mask)
        if key not in self.masks:
            self.masks[key] = HostTextMask.from_mask(embeddings.attention_mask)  # read on the host: no device sync
        return embeddings, self.masks[key]


class _Progress:
    """Counts steps over all units and stages and forwards them to the step callback."""

    def __init__(self, sampler: PyramidSampler, num_units: int, first_unit: int, first_steps, video_steps):
        self.callback = sampler.step_callback
        self.num_units = num_units
        self.unit = first_unit
        units = range(first_unit, num_units)
        self.total = sum(sum(first_steps if u == 0 else video_steps) for u in units)
        self.completed = 0

    def advance(self, stage: int, step: int, steps_in_stage: int) -> None:
        self.completed += 1
        if self.callback is not None:
            self.callback(StepInfo(self.unit, self.num_units, stage, step, steps_in_stage, self.completed, self.total))


def linear_guidance_scales(guidance_scale: float, min_guidance_scale: float, slope: float, count: int) -> list[float]:
    """Official linear guidance: unit u uses max(guidance_scale - slope * u, min_guidance_scale)."""
    return [max(guidance_scale - slope * u, min_guidance_scale) for u in range(count)]
