"""Models owned by ComfyUI's model management, and the memory policy the pipeline runs under there.

The DiT and the VAE are built from ComfyUI's layers (`comfy.ops`, through `comfy.operations`) and wrapped in
the patcher ComfyUI uses for its own models, so its loader places them: `load_models_gpu` loads them whole
or partially ("loaded partially; X MB offloaded"), dynamic VRAM faults their weights in where ComfyUI runs
with it, and "Unload models" or `/free` push them out. `ComfyMemory` is the pipeline's
`pyramid_core.memory.MemoryPolicy` over that loader: the modes are pyramid_core's plan names, the working-memory
estimates, decode settings and out-of-memory advice are pyramid_core's, and the explicit streaming modes
(block_swap, sequential) run pyramid_core's engine. Nothing here keeps a global reference to a model: the node
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

from pyramid_core.memory import (
    DEFAULT_MARGIN_GB,
    GiB,
    MemoryManager,
    Workload,
    check_plan,
    component_demands,
    converted_oom,
    measure_component,
    oom_advice,
    vae_decode_choice,
)
from pyramid_core.schedules import PromptSchedule, is_schedule_text
from pyramid_core.settings import PLACEMENTS

from . import comfy as host

logger = logging.getLogger(__name__)

OFFLOAD_MODES = ("auto", *PLACEMENTS)  # pyramid_core's plan names; the widget lists auto (ComfyUI's loader) first
STREAMED = ("block_swap", "sequential")  # run by pyramid_core's engine, after ComfyUI freed room for it
FAMILY_KEY = "pyramidflow_family"  # LATENT dict key: which DiT family's latent factors apply


def comfy_layers(compute: torch.dtype) -> dict[str, type]:
    """The layer classes to build each component from inside ComfyUI (`load_components(operations=...)`): ComfyUI's
    `comfy.ops` for the DiT (in the compute dtype) and the VAE (fp32 under fp16 compute, see
    `pyramid_core.loading.component_dtypes`); empty standalone (pyramid_core's own layers). Our fp8 storage
    replaces the DiT's Linears by `pyramid_core.precision.Fp8Linear` after loading: those ComfyUI loads whole."""
    from pyramid_core.loading import component_dtypes

    dtypes = component_dtypes(compute)
    layers = {"dit": host.operations(dtypes.dit, dtypes.dit, host.torch_device()),
              "vae": host.operations(dtypes.vae, dtypes.vae, host.vae_devices()[0])}
    return {name: ops for name, ops in layers.items() if ops is not None}


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
        """Hand a model loaded on the host to ComfyUI (it moves the weights from then on)."""
        module.requires_grad_(False).eval()
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


class ComfyMemory:
    """The pipeline's memory policy inside ComfyUI (`pyramid_core.memory.MemoryPolicy`).

    DiT placement by `offload`: auto = ComfyUI's loader decides (whole when it fits, else partially, or dynamic
    VRAM); none = whole, left loaded as ComfyUI does with its own models; model = whole, unloaded after each
    use (the official cpu_offloading); block_swap / sequential = pyramid_core's streaming engine, after ComfyUI
    unloaded the DiT and freed its full demand. The VAE and the text encoder go through ComfyUI's loader
    (unloaded after use under 'model'). Every load asks ComfyUI for the component's working memory for this
    workload on top of its weights, so an idle text encoder is evicted before the DiT runs.
    """

    def __init__(self, parts: Mapping[str, ManagedModel | None], offload: str = "auto", *,
                 vram_budget_gb: float = 0.0, resident_blocks: int = 0):
        check_plan(offload)
        self.parts = {k: v for k, v in parts.items() if v is not None}
        self.offload = offload
        self.vram_budget_gb = vram_budget_gb
        self.resident_blocks = resident_blocks
        self.device = host.torch_device()
        self.workload = Workload()
        self.dtype: torch.dtype | None = None  # the generation's compute dtype (`prepare`)
        self._decode: tuple[int, int] | None = None  # the (window, tile) last chosen for a decode

    def register(self, name: str, module: nn.Module | None) -> None:
        """Called by the pipeline; the modules must be the managed ones."""
        managed = self.parts.get(name)
        if module is not None and (managed is None or managed.module is not module):
            raise ValueError(f"{name} is not managed by this plan")

    def prepare(self, width: int | None = None, height: int | None = None, temp: int | None = None, *,
                cfg: bool = True, dtype: torch.dtype | None = None) -> Workload:
        """Remember the generation's workload (what the estimates are for)."""
        self.workload = Workload.for_generation(width or self.workload.width, height or self.workload.height,
                                                temp or self.workload.temp, cfg, dtype)
        self.dtype = dtype
        return self.workload

    def placement(self, name: str) -> str:
        """The mode `name` runs under: the DiT's as set; the others ComfyUI's loader ('model': unloaded after use)."""
        if name == "dit":
            return self.offload
        return "model" if self.offload == "model" else "auto"

    def working_memory(self, name: str) -> int:
        """Device memory `name` needs besides its weights for this workload (pyramid_core's own estimate)."""
        module = self.parts[name].module
        decode = getattr(module, "decode_working_memory_bytes", None)
        if decode is not None and self._decode is not None:
            return int(decode(self.workload, *self._decode))
        return component_demands({name: module}, self.workload)[name].activation

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[nn.Module]:
        """The component on its load device for the block, placed by ComfyUI (or streamed, see the class)."""
        managed = self.parts[name]
        mode = self.placement(name)
        if mode in STREAMED:
            with self._streamed(name, managed, mode) as module:
                yield module
            return
        host.load_models([managed.patcher], memory_required=self.working_memory(name), force_full_load=mode != "auto")
        try:
            yield managed.module
        finally:
            if mode == "model":  # one component on the device at a time
                host.unload_model(managed.patcher)

    @contextlib.contextmanager
    def _streamed(self, name: str, managed: ManagedModel, mode: str) -> Iterator[nn.Module]:
        host.unload_model(managed.patcher)  # ComfyUI's copy off the device first: the engine owns it meanwhile
        demand = component_demands({name: managed.module}, self.workload)[name]
        budget = self.vram_budget_gb or None
        host.free_memory(max(int((budget or 0) * GiB), demand.sizes.total + demand.activation), self.device)
        engine = MemoryManager(plan=mode, device=self.device, offload_device=managed.patcher.offload_device,
                               budget_gb=budget, resident_blocks=self.resident_blocks or None)
        engine.register(name, managed.module)
        try:
            engine.prepare(self.workload.width, self.workload.height, self.workload.temp, cfg=self.workload.cfg,
                           dtype=self.dtype)
            with engine.use(name) as module:
                yield module
        finally:
            engine.close()  # weights back on the offload device, hooks removed: nothing hidden stays on the GPU
            host.soft_empty_cache()

    @contextlib.contextmanager
    def oom_guard(self, phase: str) -> Iterator[None]:
        """A device OOM inside the block reaches ComfyUI as torch's OOM type (so it unloads its models and shows
        its OOM help), carrying pyramid_core's advice on the loader settings to change."""
        with converted_oom(lambda failure: self.oom_message(phase, failure)):
            yield

    def oom_message(self, phase: str, failure: str) -> str:
        modules = {name: managed.module for name, managed in self.parts.items()}
        budget = int(self.vram_budget_gb * GiB) if self.vram_budget_gb else host.total_memory(self.device) or None
        margin = int(DEFAULT_MARGIN_GB * GiB)
        advice = oom_advice(self.offload, component_demands(modules, self.workload),
                            None if budget is None else budget - margin, self.workload, margin=margin,
                            budget_name="vram_budget_gb")
        return (f"out of device memory while {phase} with offload={self.offload!r} at {self.workload.describe()}. "
                f"{advice} [{failure[:200]}]")

    def vae_decode_settings(self, save_memory: bool = True) -> tuple[int, int]:
        """(window, tile) of a decode: the official pair when it fits the device with the VAE's weights (ComfyUI
        evicts what it must when the VAE loads), else the largest smaller one (pyramid_core's rule)."""
        vae = self.parts.get("vae")
        total = host.total_memory(self.device) if self.device.type != "cpu" else 0
        if self.vram_budget_gb:
            total = min(total, int(self.vram_budget_gb * GiB)) if total else int(self.vram_budget_gb * GiB)
        estimate = getattr(vae.module, "decode_working_memory_bytes", None) if vae is not None else None
        if not total or estimate is None:
            self._decode = vae_decode_choice(None, None, save_memory)
        else:
            available = total - int(DEFAULT_MARGIN_GB * GiB) - measure_component(vae.module).total
            self._decode = vae_decode_choice(estimate, available, save_memory, self.workload)
        return self._decode

    def offload_all(self) -> None:
        for managed in self.parts.values():
            host.unload_model(managed.patcher)
