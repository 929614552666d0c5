"""Models owned by ComfyUI's model management, and the memory plan the pipeline runs under.

Each loaded model is wrapped in a `ModelPatcher` (honest size, load and offload devices) and is
put on the GPU only through `load_models_gpu`, so "Unload models", `/free` and other nodes'
memory requests can push ours out. Nothing here keeps a global reference to a model: the node
outputs (held by ComfyUI's cache) own them.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from pyramid_core.schedules import PromptSchedule, is_schedule_text
from pyramid_core.settings import PLACEMENTS

from . import comfy as host

logger = logging.getLogger(__name__)

OFFLOAD_MODES = ("auto", *PLACEMENTS)  # the widget lists auto first: it is the default
GIB = 1024**3
AUTO_HEADROOM = 1.5 * GIB  # kept free for activations when "auto" decides whether the DiT fits
FAMILY_KEY = "pyramidflow_family"  # LATENT dict key: which DiT family's latent factors apply


class ModelHolder(nn.Module):
    """The module a ModelPatcher wraps. ModelPatcher writes bookkeeping attributes (`device`, ...)
    onto it, which the pyramid_core models (read-only `device` properties) must not receive."""

    def __init__(self, inner: nn.Module, compute_dtype: torch.dtype):
        super().__init__()
        self.inner = inner
        self.compute_dtype = compute_dtype

    def get_dtype(self) -> torch.dtype:
        return self.compute_dtype


@dataclass(eq=False)
class ManagedModel:
    """One model under ComfyUI's management."""

    patcher: Any

    @classmethod
    def wrap(cls, module: nn.Module, dtype: torch.dtype, load_device: torch.device, offload_device: torch.device) -> "ManagedModel":
        module.requires_grad_(False).eval().to(offload_device)
        return cls(host.make_patcher(ModelHolder(module, dtype), load_device, offload_device))

    @property
    def module(self) -> nn.Module:
        return self.patcher.model.inner

    def size_bytes(self) -> int:
        return int(self.patcher.model_size())


@dataclass(eq=False)
class PyramidFlowModel:
    """Value of the PYRAMIDFLOW_MODEL type: the DiT and how to run it."""

    dit: ManagedModel
    family: str  # "flux" (miniFLUX) | "mmdit" (SD3)
    variant: str  # diffusion_transformer_384p / _768p / _image
    dtype: torch.dtype  # compute dtype
    offload: str = "auto"
    vram_budget_gb: float = 0.0
    resident_blocks: int = 0
    source: str = ""


@dataclass(eq=False)
class PyramidFlowVAE:
    """Value of the PYRAMIDFLOW_VAE type. `family` picks the first-frame latent factors."""

    vae: ManagedModel
    family: str
    dtype: torch.dtype


@dataclass(eq=False)
class PyramidFlowTextEncoder:
    """Value of the PYRAMIDFLOW_TEXT_ENCODER type: the folder's own CLIP + T5, loaded on first use."""

    folder: Path
    family: str
    dtype: torch.dtype
    _managed: ManagedModel | None = field(default=None, repr=False)

    def managed(self) -> ManagedModel:
        if self._managed is None:
            from pyramid_core.text import PyramidTextEncoder

            encoder = PyramidTextEncoder.from_folder(self.folder, self.family, dtype=self.dtype)
            load_device, offload_device = host.text_encoder_devices()
            self._managed = ManagedModel.wrap(encoder, self.dtype, load_device, offload_device)
        return self._managed


Pair = tuple[str, str]  # (prompt, negative prompt) as written, before any quality suffix


@dataclass(eq=False)
class PyramidFlowConditioning:
    """Value of the PYRAMIDFLOW_CONDITIONING type: CFG batches [negative, positive] on the CPU.

    Plain prompts: `embeddings` conditions every latent frame (the format before prompt schedules).
    Prompt schedules (`pyramid_core.schedules`): `prompt_schedule` / `negative_schedule` say which
    (prompt, negative prompt) pair is in force at each latent frame, and `scheduled` holds one CFG batch
    per distinct pair; `embeddings` is then latent frame 0's batch, so code reading only it keeps working.
    """

    embeddings: Any  # pyramid_core.text.TextEmbeddings
    family: str
    prompt_schedule: PromptSchedule | None = None
    negative_schedule: PromptSchedule | None = None
    scheduled: Mapping[Pair, Any] = field(default_factory=dict)

    @staticmethod
    def schedules(prompt: str, negative_prompt: str) -> tuple[PromptSchedule, PromptSchedule] | None:
        """Both texts as schedules when either is written in the schedule form ("0: a cat | 8: a dog"),
        else None (plain prompts). Malformed schedules raise, quoting the entry."""
        if not (is_schedule_text(prompt) or is_schedule_text(negative_prompt)):
            return None
        return PromptSchedule.parse(prompt), PromptSchedule.parse(negative_prompt)

    @staticmethod
    def pairs(prompt_schedule: PromptSchedule, negative_schedule: PromptSchedule) -> list[Pair]:
        """The distinct (prompt, negative prompt) pairs of two schedules, in order of first use."""
        starts = sorted({start for start, _ in prompt_schedule.entries + negative_schedule.entries})
        return list(dict.fromkeys((prompt_schedule.at(s), negative_schedule.at(s)) for s in starts))

    @classmethod
    def from_schedules(cls, prompt_schedule: PromptSchedule, negative_schedule: PromptSchedule, family: str,
                       encoded: Mapping[Pair, Any]) -> "PyramidFlowConditioning":
        """Scheduled conditioning from the CFG batch of every pair `pairs` lists."""
        missing = [p for p in cls.pairs(prompt_schedule, negative_schedule) if p not in encoded]
        if missing:
            raise ValueError(f"no embeddings for the scheduled prompt pairs {missing}")
        first = (prompt_schedule.at(0), negative_schedule.at(0))
        return cls(encoded[first], family, prompt_schedule, negative_schedule, dict(encoded))

    @property
    def is_scheduled(self) -> bool:
        return self.prompt_schedule is not None

    def at(self, unit: int) -> Any:
        """The CFG batch that conditions latent frame `unit`."""
        if not self.is_scheduled:
            return self.embeddings
        return self.scheduled[(self.prompt_schedule.at(unit), self.negative_schedule.at(unit))]

    def for_units(self, num_units: int, cfg: bool = True) -> Any:
        """What the pipeline's `prompt_embeds` takes for a video of `num_units` latent frames: the embeddings
        (plain prompts) or a function unit -> embeddings (schedules; the same object for units sharing a
        pair). `cfg=False`: positive halves only. A schedule entry starting past the video raises, quoting it."""
        if not self.is_scheduled:
            return self.embeddings if cfg else self.embeddings.chunk_cfg()[1]
        for schedule in (self.prompt_schedule, self.negative_schedule):
            schedule.check_length(num_units)
        batches = {pair: emb if cfg else emb.chunk_cfg()[1] for pair, emb in self.scheduled.items()}
        prompt, negative = self.prompt_schedule, self.negative_schedule
        return lambda unit: batches[(prompt.at(unit), negative.at(unit))]


def resolve_offload(mode: str, model_bytes: int, device: torch.device) -> str:
    """The concrete mode: `auto` is the whole model under ComfyUI when it fits, else pyramid_core's own
    'auto' planner (which picks block swap or sequential streaming from the real sizes)."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload mode {mode!r}; choose one of {', '.join(OFFLOAD_MODES)}")
    if mode != "auto" or device.type == "cpu":
        return "none" if mode == "auto" else mode
    total = host.total_memory(device)
    return "none" if total == 0 or model_bytes + AUTO_HEADROOM <= total else "auto"


class ComfyMemory:
    """The memory plan object `PyramidFlowPipeline` runs under, going through ComfyUI's model management.

    none (and auto when the DiT fits): `load_models_gpu` of the whole model, left loaded as ComfyUI does
    with its own models; model: the same, unloaded after each use (the official cpu_offloading);
    block_swap / sequential / auto that does not fit: the DiT streams through pyramid_core's planner
    after ComfyUI freed room for it, and is back on the offload device when the block ends.
    Implements the interface the pipeline calls: register, device, prepare, oom_guard, use,
    vae_decode_settings, offload_all.
    """

    def __init__(self, parts: dict[str, ManagedModel | None], offload: str = "auto", *,
                 memory_required: int = 0, vram_budget_gb: float = 0.0, resident_blocks: int = 0):
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"unknown offload mode {offload!r}; choose one of {', '.join(OFFLOAD_MODES)}")
        self.parts = {k: v for k, v in parts.items() if v is not None}
        self.offload = offload
        self.memory_required = memory_required
        self.vram_budget_gb = vram_budget_gb
        self.resident_blocks = resident_blocks
        self.device = host.torch_device()
        self._workload: tuple | None = None

    def register(self, name: str, module: nn.Module | None) -> None:
        """Called by the pipeline; the modules must be the managed ones."""
        managed = self.parts.get(name)
        if module is not None and (managed is None or managed.module is not module):
            raise ValueError(f"{name} is not managed by this plan")

    def prepare(self, width: int | None = None, height: int | None = None, temp: int | None = None, *,
                cfg: bool = True, dtype: torch.dtype | None = None) -> None:
        """Remember the generation size; a streaming planner sizes itself from it."""
        self._workload = (width, height, temp, cfg, dtype)

    @contextlib.contextmanager
    def oom_guard(self, phase: str) -> Iterator[None]:
        """Out of GPU memory: say which setting helps (ComfyUI shows the message)."""
        try:
            yield
        except Exception as exc:
            if not _is_oom(exc):
                raise
            raise RuntimeError(
                f"out of GPU memory while {phase}: set the model loader's offload to block_swap (or sequential, "
                f"the least VRAM) with a vram_budget_gb below your card's size, or use a smaller width/height/temp"
            ) from exc

    def vae_decode_settings(self, save_memory: bool = True) -> tuple[int, int]:
        """(temporal window, tile size) of a decode: the official pairs."""
        return (1, 256) if save_memory else (2, 512)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[nn.Module]:
        """The model on its load device for the block."""
        managed = self.parts[name]
        if name == "dit":
            mode = resolve_offload(self.offload, managed.size_bytes(), self.device)
        else:
            mode = "model" if self.offload == "model" else "none"
        if mode not in ("none", "model"):
            with self._streamed(name, managed, mode) as module:
                yield module
            return
        host.load_models([managed.patcher], memory_required=self.memory_required if name == "dit" else 0,
                         force_full_load=True)  # plain torch layers: ComfyUI's partial loading would skip them
        try:
            yield managed.module
        finally:
            if mode == "model":  # one component on the GPU at a time
                host.unload_model(managed.patcher)

    @contextlib.contextmanager
    def _streamed(self, name: str, managed: ManagedModel, mode: str) -> Iterator[nn.Module]:
        from pyramid_core.memory import MemoryManager

        host.unload_model(managed.patcher)  # ComfyUI's copy goes to the offload device first
        budget = self.vram_budget_gb or None
        host.free_memory(max(int((budget or 0) * GIB), self.memory_required), self.device)
        planner = MemoryManager(plan=mode, device=self.device, offload_device=managed.patcher.offload_device,
                                budget_gb=budget, resident_blocks=self.resident_blocks or None)
        planner.register(name, managed.module)
        try:
            if self._workload is not None:
                width, height, temp, cfg, dtype = self._workload
                planner.prepare(width, height, temp, cfg=cfg, dtype=dtype)
            with planner.use(name) as module:
                yield module
        finally:
            planner.close()  # weights back on the offload device, hooks removed: nothing hidden stays on the GPU
            host.soft_empty_cache()

    def offload_all(self) -> None:
        for managed in self.parts.values():
            host.unload_model(managed.patcher)


def _is_oom(exc: BaseException) -> bool:
    from pyramid_core.memory import is_device_oom

    return is_device_oom(exc)


def inference_bytes(width: int, height: int, temp: int, dtype: torch.dtype) -> int:
    """Rough activation memory of one DiT call at the longest history (for `load_models_gpu`)."""
    per_frame = (height // 16) * (width // 16)  # tokens after VAE /8 and patch /2
    # current + previous frame at full size, older frames at 1/16, text; CFG doubles the batch
    tokens = per_frame * 2.5 + per_frame / 16 * temp + 128
    hidden_width, activations_per_token = 2048, 24
    return int(2 * tokens * hidden_width * activations_per_token * torch.empty((), dtype=dtype).element_size())
