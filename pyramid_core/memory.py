"""Where model weights live, and every move of them between host and execution device.

The models and the sampler never move weights: a pipeline registers its components here and wraps
each use in ``manager.use(name)``. Plans (fastest first):

  none        everything resident on the execution device.
  model       each component on the device only while it runs (the official ``cpu_offloading``).
  block_swap  while a component runs, its small non-block weights and K transformer blocks are
              resident; the other blocks are copied from pinned host memory on a side CUDA stream,
              ``prefetch`` blocks at a time in execution order (wrapping round to the next forward),
              and the compute stream waits on a CUDA event only right before a block runs.
  sequential  each module's own weights on the device only for that module's forward (the floor).
  auto        the fastest placement per component that fits a VRAM budget (default: free device
              memory minus a margin), from the real weight sizes and an activation estimate for the
              requested resolution and temp; the VAE's decode tile and chunk come from the same budget.

Components without transformer blocks (the VAE) move whole under block_swap and sequential, as in the
official sequential offload. While a component is offloaded its host copies ("masters") are the source
of truth: releasing a weight drops its device copy instead of copying it back, so weights must not be
modified in place while they are on the device (change them under plan 'none' or after
``offload_all()``, then ``register`` the component again).
"""
from __future__ import annotations

import contextlib
import logging
import math
import traceback
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

PLANS = ("none", "model", "block_swap", "sequential", "auto")
PLACEMENTS = ("none", "model", "block_swap", "sequential")  # what one component can get, fastest first
GiB = 1 << 30
DEFAULT_PREFETCH = 2
DEFAULT_MARGIN_GB = 0.75  # allocator fragmentation and kernels' workspaces
TEXT_TOKENS = 128  # T5 tokens of every DiT forward (FACTS 2.4)
BLOCK_LIST_NAMES = ("blocks", "block", "layers", "transformer_blocks", "single_transformer_blocks")
# (window, tile) of a VAE decode, fastest first; window = latent frames per chunk, tile = pixels per side
VAE_DECODE_OPTIONS = ((2, 512), (1, 512), (2, 256), (1, 256), (1, 128))
ASSUMED_HOST_TO_DEVICE_BYTES_PER_S = 20e9  # pinned PCIe 4.0 x16; only for reported estimates

_OOM = getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", RuntimeError))


class DeviceOutOfMemoryError(_OOM):  # type: ignore[misc, valid-type]
    """The device ran out of memory; the message names the plan and budget to use instead.

    A subclass of ``torch.OutOfMemoryError``, so code that handles OOM (ComfyUI) still recognises it.
    """


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (CPU for a module without parameters)."""
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


def is_device_oom(exc: BaseException) -> bool:
    """Whether an exception is an accelerator out-of-memory error."""
    if isinstance(exc, _OOM):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _normalize(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / (1 << 20):.1f} MiB"


def _budget_gb(nbytes: int, up: bool) -> str:
    """`nbytes` as a budget_gb value rounded to 3 significant digits (up: at least nbytes; else at most)."""
    gb = max(nbytes, 1) / GiB
    step = 10 ** (math.floor(math.log10(gb)) - 2)
    steps = math.ceil(gb / step - 1e-9) if up else math.floor(gb / step + 1e-9)
    return f"{steps * step:.{max(0, -int(math.floor(math.log10(step))))}f}"


# --------------------------------------------------------------------------------------------
# weights: slots, groups, transfers


class _Slot:
    """One parameter or buffer of one module, re-pointable at another tensor."""

    __slots__ = ("owner", "name", "is_param")

    def __init__(self, owner: nn.Module, name: str, is_param: bool):
        self.owner, self.name, self.is_param = owner, name, is_param

    def data(self) -> torch.Tensor:
        if self.is_param:
            return self.owner._parameters[self.name].data
        return self.owner._buffers[self.name]

    def key(self) -> int:
        return id(self.owner._parameters[self.name]) if self.is_param else id(self.owner._buffers[self.name])

    def set(self, tensor: torch.Tensor) -> None:
        if not self.is_param:
            self.owner._buffers[self.name] = tensor
            return
        param = self.owner._parameters[self.name]
        try:
            param.data = tensor
        except RuntimeError:  # no shallow copy between some device kinds (cpu <-> meta): swap the objects
            torch.utils.swap_tensors(param, nn.Parameter(tensor, requires_grad=param.requires_grad))


def _own_slots(module: nn.Module) -> list[_Slot]:
    slots = [_Slot(module, n, True) for n, p in module._parameters.items() if p is not None]
    return slots + [_Slot(module, n, False) for n, b in module._buffers.items() if b is not None]


def _slots(modules: Sequence[nn.Module], seen: set[int]) -> list[_Slot]:
    """Own parameters and buffers of `modules`, skipping tensors already in `seen` (tied weights)."""
    out = []
    for module in modules:
        for slot in _own_slots(module):
            if slot.key() not in seen:
                seen.add(slot.key())
                out.append(slot)
    return out


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def find_stream_blocks(module: nn.Module) -> list[nn.Module]:
    """Transformer blocks in execution order: a DiT's ``.blocks``, else the block lists of its encoders.

    Lists named like ``layers`` / ``block`` (CLIP, T5) are taken in registration order, which is the
    order the text encoders run in. Empty for modules without such lists (the VAE).
    """
    blocks = getattr(module, "blocks", None)
    if isinstance(blocks, (list, tuple, nn.ModuleList)) and all(isinstance(b, nn.Module) for b in blocks):
        return list(blocks)
    found: list[nn.Module] = []
    taken: set[int] = set()
    for name, child in module.named_modules():
        if id(child) in taken or not isinstance(child, nn.ModuleList):
            continue
        if name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES and len(child) and all(
            any(True for _ in b.parameters()) for b in child
        ):
            found.extend(child)
            taken.update(id(m) for m in child.modules())
    return found


class _Transfer:
    """Copies host tensors to the execution device: a side CUDA stream plus events there, plain copies elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._stream = None

    @property
    def stream(self):
        if self._stream is None and self.cuda:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def copy(self, masters: Sequence[torch.Tensor], side_stream: bool) -> tuple[list[torch.Tensor], Any]:
        """Device copies of `masters` and a ticket to `wait` on before using them (None: usable at once)."""
        if not self.cuda:
            return [m.to(self.device, copy=True) for m in masters], None
        compute = torch.cuda.current_stream(self.device)
        if not side_stream:
            return [m.to(self.device, non_blocking=m.is_pinned()) for m in masters], None
        with torch.cuda.stream(self.stream):
            copies = [m.to(self.device, non_blocking=True) for m in masters]
            for c in copies:
                c.record_stream(compute)  # freed blocks stay reserved until compute has used them
            event = torch.cuda.Event()
            event.record(self.stream)
        return copies, event

    def wait(self, ticket: Any) -> None:
        if ticket is not None:
            torch.cuda.current_stream(self.device).wait_event(ticket)

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()


class WeightGroup:
    """Tensors that move together (a block, a module's own weights, a whole component)."""

    def __init__(self, label: str, slots: list[_Slot]):
        self.label = label
        self.slots = slots
        self.masters: list[torch.Tensor] = []
        self.loaded = False
        self.ticket: Any = None
        self.nbytes = _nbytes([s.data() for s in slots])

    def capture(self, offload_device: torch.device, pin: bool) -> None:
        """Make host copies the source of truth (pinned for streaming); the module points at them."""
        self.masters = []
        for slot in self.slots:
            tensor = slot.data()
            if not _same_device(tensor.device, offload_device):
                tensor = tensor.to(offload_device)
            if pin and tensor.device.type == "cpu" and not tensor.is_pinned():
                tensor = _pin(tensor)
            slot.set(tensor)
            self.masters.append(tensor)
        self.loaded = False

    def load(self, transfer: _Transfer, side_stream: bool) -> None:
        copies, self.ticket = transfer.copy(self.masters, side_stream)
        for slot, copy in zip(self.slots, copies):
            slot.set(copy)
        self.loaded = True

    def release(self) -> None:
        for slot, master in zip(self.slots, self.masters):
            slot.set(master)
        self.loaded = False
        self.ticket = None


_PIN_WARNED = False


def _pin(tensor: torch.Tensor) -> torch.Tensor:
    global _PIN_WARNED
    try:
        return tensor.pin_memory()
    except RuntimeError as exc:  # page-locked memory is limited on some systems (WSL, containers)
        if not _PIN_WARNED:
            _PIN_WARNED = True
            warnings.warn(f"could not pin host memory ({exc}); streaming copies will not overlap compute", stacklevel=3)
        return tensor


def _move_inputs(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value if _same_device(value.device, device) else value.to(device)
    if isinstance(value, list):
        return [_move_inputs(v, device) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_move_inputs(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move_inputs(v, device) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# placements of one component


class _Placement:
    """How one registered component is placed; `enter`/`exit` bracket each use."""

    kind = "none"

    def __init__(self, manager: "MemoryManager", name: str, module: nn.Module):
        self.manager, self.name, self.module = manager, name, module
        self.hooks: list[Any] = []
        self.groups: list[WeightGroup] = []
        self.active = False

    @property
    def spec(self) -> tuple:
        return (self.kind,)

    def attach(self) -> None: ...

    def enter(self) -> None:
        self.active = True

    def exit(self) -> None:
        self.active = False
        self.offload()

    def offload(self) -> None:
        for group in self.groups:
            if group.loaded:
                self._release(group)

    def detach(self) -> None:
        self.active = False
        self.offload()
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()

    def _load(self, group: WeightGroup, side_stream: bool = False) -> None:
        group.load(self.manager._transfer, side_stream)
        self.manager._account(group.nbytes, copied=True)

    def _release(self, group: WeightGroup) -> None:
        group.release()
        self.manager._account(-group.nbytes)

    def loaded_blocks(self) -> list[int]:
        return []


class _Resident(_Placement):
    """Plan 'none': weights live on the execution device (no host copies kept)."""

    kind = "none"

    def attach(self) -> None:
        self.slots = _slots(list(self.module.modules()), set())
        self.nbytes = _nbytes([s.data() for s in self.slots])
        self.on_device = False
        self._move(self.manager.device)

    def enter(self) -> None:
        super().enter()
        self._move(self.manager.device)

    def exit(self) -> None:
        self.active = False

    def offload(self) -> None:
        self._move(self.manager.offload_device)

    def detach(self) -> None:
        self.active = False  # resident weights stay put: a new placement takes them from wherever they are

    def _move(self, device: torch.device) -> None:
        to_device = _same_device(device, self.manager.device)
        if to_device == self.on_device and self.slots:
            return
        for slot in self.slots:
            tensor = slot.data()
            if not _same_device(tensor.device, device):
                slot.set(tensor.to(device))
        if to_device != self.on_device:
            self.manager._account(self.nbytes if to_device else -self.nbytes, copied=to_device)
        self.on_device = to_device


class _WholeSwap(_Placement):
    """Plan 'model': the whole component on the device while it runs."""

    kind = "model"

    def attach(self) -> None:
        group = WeightGroup(self.name, _slots(list(self.module.modules()), set()))
        group.capture(self.manager.offload_device, pin=False)
        self.groups = [group]

    def enter(self) -> None:
        super().enter()
        if not self.groups[0].loaded:
            self._load(self.groups[0])


class _BlockStream(_Placement):
    """Plan 'block_swap': non-block weights and K blocks resident, the rest streamed `prefetch` at a time."""

    kind = "block_swap"

    def __init__(self, manager, name, module, resident_blocks: int, prefetch: int):
        super().__init__(manager, name, module)
        self.requested = resident_blocks
        self.prefetch = prefetch

    @property
    def spec(self) -> tuple:
        return (self.kind, self.requested, self.prefetch)

    def attach(self) -> None:
        blocks = find_stream_blocks(self.module)
        if not blocks:
            raise ValueError(f"component {self.name!r} has no transformer blocks to swap; use plan 'model' for it")
        k = self.requested
        if k > len(blocks):
            warnings.warn(
                f"resident_blocks={k} is more than the {len(blocks)} transformer blocks of {self.name!r}; "
                f"keeping all {len(blocks)} resident",
                stacklevel=4,
            )
            k = len(blocks)
        self.resident_blocks = k
        inside = {id(m) for b in blocks for m in b.modules()}
        seen: set[int] = set()
        outside = [m for m in self.module.modules() if id(m) not in inside]
        self.rest = WeightGroup(f"{self.name}.rest", _slots(outside, seen))
        self.blocks = [WeightGroup(f"{self.name}.block{i}", _slots(list(b.modules()), seen))
                       for i, b in enumerate(blocks)]
        resident = resident_block_indices([g.nbytes for g in self.blocks], k)
        self.streamed = [i for i in range(len(blocks)) if i not in resident]
        self.position = {index: pos for pos, index in enumerate(self.streamed)}
        pin = self.manager._pin_streamed
        self.rest.capture(self.manager.offload_device, pin=False)
        for i, group in enumerate(self.blocks):
            group.capture(self.manager.offload_device, pin=pin and i in self.position)
        self.groups = [self.rest, *self.blocks]
        for i, block in enumerate(blocks):
            if i in self.position:
                self.hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: self._before(i)))
                self.hooks.append(block.register_forward_hook(lambda m, a, o, i=i: self._after(i)))

    def enter(self) -> None:
        super().enter()
        for i, group in enumerate([self.rest, *self.blocks]):
            if group.loaded or (i > 0 and i - 1 in self.position):
                continue
            self._load(group)
        for index in self.streamed[: self.prefetch]:
            self._load(self.blocks[index], side_stream=True)
        self._note_peak()

    def _streamed_loaded(self) -> list[int]:
        return [i for i in self.streamed if self.blocks[i].loaded]

    def _before(self, index: int) -> None:
        if not self.active:
            return
        group = self.blocks[index]
        if not group.loaded:  # called out of the expected order: make room, then fetch it now
            for other in self._streamed_loaded():
                self._release(self.blocks[other])
            self._load(group, side_stream=True)
            self.manager.stats.sync_loads += 1
            self._note_peak()
        self.manager._transfer.wait(group.ticket)
        group.ticket = None

    def _after(self, index: int) -> None:
        if not self.active or len(self.streamed) <= self.prefetch:
            return  # every streamed block fits in the prefetch slots: they stay until exit
        self._release(self.blocks[index])
        pos = self.position[index]
        for step in range(1, self.prefetch + 1):
            nxt = self.blocks[self.streamed[(pos + step) % len(self.streamed)]]
            if not nxt.loaded and len(self._streamed_loaded()) < self.prefetch:
                self._load(nxt, side_stream=True)
        self._note_peak()

    def _note_peak(self) -> None:
        peaks = self.manager.stats.peak_blocks_on_device
        peaks[self.name] = max(peaks.get(self.name, 0), len(self.loaded_blocks()))

    def loaded_blocks(self) -> list[int]:
        return [i for i, g in enumerate(self.blocks) if g.loaded]


class _LeafStream(_Placement):
    """Plan 'sequential': each module's own weights on the device only during its own forward.

    Every module also moves its tensor inputs to the execution device (as accelerate's offload hooks do):
    with no weight on the device, callers such as the text encoders place their inputs on the host.
    """

    kind = "sequential"

    def attach(self) -> None:
        pin = self.manager._pin_streamed
        seen_slots: dict[int, _Slot] = {}
        for module in self.module.modules():
            group = None
            slots = _own_slots(module)
            if slots:
                group = WeightGroup(f"{self.name}.{type(module).__name__}", [])
                for slot in slots:  # tied tensors: one slot object per tensor, shared by its owners' groups
                    group.slots.append(seen_slots.setdefault(slot.key(), slot))
                group.nbytes = _nbytes([s.data() for s in group.slots])
                group.capture(self.manager.offload_device, pin=pin)
                self.groups.append(group)
                self.hooks.append(module.register_forward_hook(lambda m, a, o, g=group: self._after(g)))
            self.hooks.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, g=group: self._before(g, args, kwargs), with_kwargs=True))

    def _before(self, group: WeightGroup | None, args, kwargs):
        if not self.active:
            return None
        if group is not None and not group.loaded:
            self._load(group)
        device = self.manager.device
        return _move_inputs(args, device), _move_inputs(kwargs, device)

    def _after(self, group: WeightGroup) -> None:
        if self.active and group.loaded:
            self._release(group)


# --------------------------------------------------------------------------------------------
# sizes, activation estimates and the plan chooser


@dataclass(frozen=True)
class ComponentSizes:
    """Weight bytes of one component as placement sees them."""

    total: int
    rest: int = 0  # outside the transformer blocks (resident under block_swap)
    blocks: tuple[int, ...] = ()  # per transformer block, execution order
    largest_groups: tuple[int, int] = (0, 0)  # two largest single-module weight sets (sequential)

    @property
    def streamable(self) -> bool:
        return bool(self.blocks)


def measure_component(module: nn.Module) -> ComponentSizes:
    """Weight bytes of a module: total, outside its transformer blocks, per block, largest modules."""
    blocks = find_stream_blocks(module)
    inside = {id(m) for b in blocks for m in b.modules()}
    seen: set[int] = set()
    rest = _nbytes([s.data() for s in _slots([m for m in module.modules() if id(m) not in inside], seen)])
    per_block = tuple(_nbytes([s.data() for s in _slots(list(b.modules()), seen)]) for b in blocks)
    own = sorted((_nbytes([s.data() for s in _own_slots(m)]) for m in module.modules()), reverse=True) + [0, 0]
    return ComponentSizes(rest + sum(per_block), rest, per_block, (own[0], own[1]))


@dataclass(frozen=True)
class Workload:
    """What a generation asks of the device: pixel size, latent frames, CFG batch, activation bytes."""

    width: int = 640
    height: int = 384
    temp: int = 16
    cfg: bool = True
    act_bytes: int = 2

    @property
    def batch(self) -> int:
        return 2 if self.cfg else 1

    def describe(self) -> str:
        return f"{self.width}x{self.height}, temp {self.temp}"


def _history_tokens(num_past: int, stage: int, per_frame: Sequence[int]) -> int:
    """Tokens of the compressed history at `stage` (the rule of `sampling.history_for_stage`)."""
    if num_past == 0:
        return 0
    total, used, level = per_frame[stage], 1, stage
    while used < num_past and level > 1:
        level -= 1
        used += 1
        total += per_frame[level]
    return total + (num_past - used) * per_frame[0]


def dit_tokens(width: int, height: int, temp: int) -> int:
    """Most video tokens of one DiT forward (last unit, stage 2 for temp >= 2; FACTS 2.4)."""
    h, w = height // 8, width // 8
    per_frame = [(h >> (2 - s)) // 2 * ((w >> (2 - s)) // 2) for s in range(3)]
    return max(per_frame[s] + _history_tokens(temp - 1, s, per_frame) for s in range(3))


def dit_activation_bytes(workload: Workload, hidden: int, attention_mode: str = "segmented") -> int:
    """Working memory of one DiT forward at the largest unit (no weights).

    About 14 activation-dtype and 4 fp32 copies of [batch, tokens, hidden] are alive at the worst point
    of a block (modulated LayerNorm in fp32, q/k/v, RoPE in fp32, the 4x-wide MLP); the official dense
    mask ('masked') adds a [batch, L, L] boolean mask and its additive form.
    """
    tokens = dit_tokens(workload.width, workload.height, workload.temp) + TEXT_TOKENS
    per_element = 14 * workload.act_bytes + 16
    nbytes = workload.batch * tokens * hidden * per_element
    if attention_mode == "masked":
        nbytes += workload.batch * tokens * tokens * (2 + workload.act_bytes)
    return int(nbytes)


def vae_decode_bytes(
    window: int, tile: int, act_bytes: int = 2, channels: tuple[int, int] = (256, 128),
    workload: Workload | None = None,
) -> int:
    """Working memory of one tiled, chunked VAE decode step (no weights).

    The full-resolution up block dominates: `channels` = (its input, its output) width, 8*window+1
    frames of tile x tile pixels (less for a smaller video), about four live copies, plus the fp32
    GroupNorm slices (at most 2**25 elements each).
    """
    frames, height, width = 8 * window + 1, tile, tile
    if workload is not None:
        frames = min(frames, 8 * (workload.temp - 1) + 1)
        height, width = min(tile, workload.height), min(tile, workload.width)
    c_in, c_out = channels
    pixels = frames * height * width
    return int((c_in + 3 * c_out) * pixels * act_bytes + 2 * min(1 << 25, c_out * pixels) * 4)


def text_activation_bytes(module: nn.Module | None, act_bytes: int = 2) -> int:
    """Working memory of a text encoder forward on one prompt (128 T5 tokens; small next to the weights)."""
    config = getattr(getattr(module, "t5_encoder", None), "config", None)
    width = getattr(config, "d_model", 4096)
    ff = getattr(config, "d_ff", 10240)
    heads = getattr(config, "num_heads", 64)
    return int(TEXT_TOKENS * (24 * width + 4 * ff) * act_bytes + 3 * heads * TEXT_TOKENS**2 * 4)


@dataclass(frozen=True)
class Demand:
    """What one component needs while it runs: its weights and its working memory."""

    sizes: ComponentSizes
    activation: int
    min_activation: int | None = None  # lowest working memory after tuning (the VAE's smallest tile)

    @property
    def floor_activation(self) -> int:
        return self.activation if self.min_activation is None else self.min_activation


@dataclass(frozen=True)
class ComponentPlan:
    """Placement of one component and its device estimate."""

    placement: str  # none | model | block_swap | sequential
    peak_bytes: int  # weights on the device plus working memory while it runs
    resident_blocks: int | None = None  # block_swap: K
    prefetch: int = DEFAULT_PREFETCH
    streamed_bytes: int = 0  # weight bytes copied per forward

    def describe(self, sizes: ComponentSizes | None = None) -> str:
        text = self.placement
        if self.placement == "block_swap":
            total = f"/{len(sizes.blocks)}" if sizes is not None else ""
            k = self.resident_blocks if sizes is None else min(self.resident_blocks or 0, len(sizes.blocks))
            text += f" K={k}{total} prefetch {self.prefetch}"
        return f"{text} ({_gib(self.peak_bytes)})"


@dataclass(frozen=True)
class MemoryPlan:
    """A plan resolved for one workload: per-component placements and the estimated device peak."""

    name: str  # the requested plan ('auto' included)
    chosen: str  # what it resolved to: the DiT's placement ('none' when everything stays resident)
    components: Mapping[str, ComponentPlan]
    peak_bytes: int
    budget_bytes: int | None
    workload: Workload
    demands: Mapping[str, Demand] = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        parts = ", ".join(f"{n} {p.describe(self.demands[n].sizes if n in self.demands else None)}"
                          for n, p in self.components.items())
        budget = f" within a budget of {_gib(self.budget_bytes)}" if self.budget_bytes is not None else ""
        head = f"memory plan {self.name!r}" + (f" -> {self.chosen!r}" if self.name != self.chosen else "")
        return f"{head} for {self.workload.describe()}: {parts}; estimated peak {_gib(self.peak_bytes)}{budget}"

    def seconds_of_transfer_per_forward(self, name: str = "dit") -> float:
        """Weight-copy time of one forward at the assumed host-to-device bandwidth (an estimate)."""
        plan = self.components.get(name)
        return 0.0 if plan is None else plan.streamed_bytes / ASSUMED_HOST_TO_DEVICE_BYTES_PER_S


def resident_block_indices(block_bytes: Sequence[int], count: int) -> set[int]:
    """Which `count` blocks stay resident: the largest first, evenly spread within equal sizes.

    Keeping large blocks resident makes the streamed ones (and so the prefetch slots) small; spreading
    them gives every streamed copy resident compute to hide behind.
    """
    count = max(0, min(count, len(block_bytes)))
    chosen: list[int] = []
    for size in sorted(set(block_bytes), reverse=True):
        members = [i for i, b in enumerate(block_bytes) if b == size]
        take = min(len(members), count - len(chosen))
        chosen += [members[int((j + 0.5) * len(members) / take)] for j in range(take)] if take else []
    return set(chosen)


def _block_swap_plan(demand: Demand, resident: int, prefetch: int) -> ComponentPlan:
    sizes = demand.sizes
    keep = resident_block_indices(sizes.blocks, resident)
    streamed = [b for i, b in enumerate(sizes.blocks) if i not in keep]
    slots = sum(sorted(streamed, reverse=True)[:prefetch])
    peak = sizes.rest + sum(sizes.blocks[i] for i in keep) + slots + demand.activation
    return ComponentPlan("block_swap", peak, resident, prefetch, sum(streamed))  # K as asked: attach clamps and warns


def _placement(demand: Demand, placement: str, prefetch: int, resident: int | None = None) -> ComponentPlan:
    sizes = demand.sizes
    if placement in ("none", "model") or not sizes.streamable:
        return ComponentPlan("model" if placement != "none" else "none", sizes.total + demand.activation)
    if placement == "block_swap":
        return _block_swap_plan(demand, resident or 0, prefetch)
    return ComponentPlan("sequential", sum(sizes.largest_groups) + demand.activation, streamed_bytes=sizes.total)


def _fastest_fit(demand: Demand, budget: int, prefetch: int) -> ComponentPlan | None:
    """model, else block_swap with the most resident blocks, else sequential - the first that fits."""
    floor = Demand(demand.sizes, demand.floor_activation)
    for candidate in (_placement(demand, "model", prefetch), _placement(floor, "model", prefetch)):
        if candidate.peak_bytes <= budget:
            return candidate
    if not demand.sizes.streamable:
        return None
    for k in range(len(demand.sizes.blocks) - 1, -1, -1):
        candidate = _block_swap_plan(floor, k, prefetch)
        if candidate.peak_bytes <= budget:
            return candidate
    last = _placement(floor, "sequential", prefetch)
    return last if last.peak_bytes <= budget else None


def minimum_budget(demands: Mapping[str, Demand], prefetch: int = DEFAULT_PREFETCH) -> int:
    """Smallest device budget (bytes) any plan runs in: every component at its floor."""
    floors = [_placement(Demand(d.sizes, d.floor_activation), "sequential", prefetch) for d in demands.values()]
    return max((f.peak_bytes for f in floors), default=0)


def plan_memory(
    plan: str,
    demands: Mapping[str, Demand],
    budget: int | None,
    workload: Workload = Workload(),
    *,
    resident_blocks: int | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    margin: int = 0,
) -> MemoryPlan:
    """Resolve `plan` for these components. `budget` (bytes, margin already taken off) bounds 'auto'
    and the K of 'block_swap' when `resident_blocks` is None; None means unlimited.

    Raises ValueError for 'auto' when even the floor (sequential) does not fit; the message names
    the smallest workable budget (`margin` added back, so it is what to pass as budget_gb).
    """
    if plan not in PLANS:
        raise ValueError(f"unknown memory plan {plan!r}; choose one of {', '.join(PLANS)}")
    everything = sum(d.sizes.total for d in demands.values()) + max((d.activation for d in demands.values()), default=0)
    if plan == "none" or (plan == "auto" and (budget is None or everything <= budget)):
        components = {n: ComponentPlan("none", everything) for n in demands}
        return MemoryPlan(plan, "none", components, everything, budget, workload, dict(demands))
    components: dict[str, ComponentPlan] = {}
    for name, demand in demands.items():
        if plan == "auto":
            choice = _fastest_fit(demand, budget, prefetch)  # type: ignore[arg-type]
            if choice is None:
                floor = minimum_budget(demands, prefetch) + margin
                with_margin = f" with the {_gib(margin)} safety margin" if margin else ""
                raise ValueError(
                    f"a budget of {_gib(budget + margin)} is below what the smallest plan needs for "  # type: ignore
                    f"{workload.describe()}: offload='sequential' needs about {_gib(floor)}{with_margin}; pass "
                    f"budget_gb >= {_budget_gb(floor, up=True)}, or lower the resolution or temp"
                )
        elif plan == "block_swap" and demand.sizes.streamable:
            k = resident_blocks if name == "dit" else None  # K is the DiT's; encoders fit the budget
            if k is None and budget is not None:
                fit = [_block_swap_plan(demand, n, prefetch) for n in range(len(demand.sizes.blocks), -1, -1)]
                choice = next((c for c in fit if c.peak_bytes <= budget), fit[-1])
            else:
                choice = _block_swap_plan(demand, k or 0, prefetch)
        else:
            choice = _placement(demand, plan, prefetch, resident_blocks)
        components[name] = choice
    chosen = components["dit"].placement if "dit" in components else plan
    peak = max((c.peak_bytes for c in components.values()), default=0)
    return MemoryPlan(plan, chosen, components, peak, budget, workload, dict(demands))


def component_demands(components: Mapping[str, nn.Module], workload: Workload = Workload()) -> dict[str, Demand]:
    """Weight sizes and working memory of pipeline components ('text_encoder', 'dit', 'vae') for a workload.

    Works on meta-device models too (sizes come from shapes and dtypes only).
    """
    demands = {}
    for name, module in components.items():
        sizes = measure_component(module)
        if name == "dit":
            hidden = getattr(getattr(module, "context_embedder", None), "out_features", 1920)
            mode = getattr(module, "attention_mode", "segmented")
            demands[name] = Demand(sizes, dit_activation_bytes(workload, hidden, mode))
        elif name == "vae":
            channels = _vae_channels(module)
            demands[name] = Demand(
                sizes, vae_decode_bytes(*VAE_DECODE_OPTIONS[3], workload.act_bytes, channels, workload),  # official
                vae_decode_bytes(*VAE_DECODE_OPTIONS[-1], workload.act_bytes, channels, workload),
            )
        else:
            demands[name] = Demand(sizes, text_activation_bytes(module, workload.act_bytes))
    return demands


def vae_decode_choice(
    vae: nn.Module | None, available: int | None, save_memory: bool = True, workload: Workload = Workload()
) -> tuple[int, int]:
    """(window_size, tile_sample_min_size) for a decode with `available` bytes of working memory: the
    official pair for `save_memory` ((1, 256) or (2, 512)) when it fits, else the largest smaller one
    (tiling changes pixels slightly, so the official pair is kept whenever possible)."""
    official = VAE_DECODE_OPTIONS[3] if save_memory else VAE_DECODE_OPTIONS[0]
    if vae is None or available is None:
        return official
    channels = _vae_channels(vae)
    options = [o for o in VAE_DECODE_OPTIONS if o[0] <= official[0] and o[1] <= official[1]]
    for window, tile in options:
        if vae_decode_bytes(window, tile, workload.act_bytes, channels, workload) <= available:
            return window, tile
    return options[-1]


# --------------------------------------------------------------------------------------------
# the manager


@dataclass
class MemoryStats:
    """This manager's own accounting of weights on the execution device."""

    device_bytes: int = 0
    peak_device_bytes: int = 0
    bytes_copied: int = 0  # host -> device weight traffic
    loads: int = 0  # weight-group copies
    sync_loads: int = 0  # streamed blocks fetched on demand (called out of the prefetch order)
    peak_blocks_on_device: dict[str, int] = field(default_factory=dict)


class MemoryManager:
    """Owns the placement of registered components under one plan (see the module docstring).

    resident_blocks: K for 'block_swap' (None: the most that fit the budget, 0 without one).
    prefetch: streamed blocks on the device at once, the running one included (2 = one copies while
    one runs). budget_gb: device budget for 'auto' (and K); default free device memory minus
    `margin_gb`. pin_memory: pin streamed host copies (default: when the device is CUDA).
    """

    def __init__(
        self,
        plan: str = "none",
        device: torch.device | str | None = None,
        offload_device: torch.device | str = "cpu",
        *,
        resident_blocks: int | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        budget_gb: float | None = None,
        margin_gb: float = DEFAULT_MARGIN_GB,
        pin_memory: bool | None = None,
    ):
        if plan not in PLANS:
            raise ValueError(f"unknown memory plan {plan!r}; choose one of {', '.join(PLANS)}")
        if resident_blocks is not None and (not isinstance(resident_blocks, int) or resident_blocks < 0):
            raise ValueError(
                f"resident_blocks must be an integer >= 0 (or None to fit the budget), got {resident_blocks!r}")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an integer >= 1 (blocks on the device at once), got {prefetch!r}")
        if budget_gb is not None and not budget_gb > 0:
            raise ValueError(
                f"budget_gb must be a positive number of GiB (or None for free device memory), got {budget_gb!r}")
        if margin_gb < 0:
            raise ValueError(f"margin_gb must be >= 0, got {margin_gb!r}")
        self.plan = plan
        self.device = _normalize(device if device is not None else default_device())
        self.offload_device = _normalize(offload_device)
        self.resident_blocks = resident_blocks
        self.prefetch = prefetch
        self.budget_gb = budget_gb
        self.margin_gb = margin_gb
        self._pin_streamed = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self._components: dict[str, nn.Module] = {}
        self._placements: dict[str, _Placement] = {}
        self._transfer = _Transfer(self.device)
        self.stats = MemoryStats()
        self.last_plan: MemoryPlan | None = None
        self.workload = Workload()

    # ---------------------------------------------------------------- registration and use
    @property
    def components(self) -> Mapping[str, nn.Module]:
        """Registered components by name (read-only)."""
        return MappingProxyType(self._components)

    def register(self, name: str, module: nn.Module | None) -> None:
        """Take ownership of a component's placement. None unregisters it: streamed weights go back to
        their host copies, resident ones (plan 'none') stay where they are."""
        old = self._placements.get(name)
        if old is not None and old.active:
            raise RuntimeError(f"cannot register {name!r} while it is in use")
        if old is not None:
            old.detach()
            del self._placements[name]
        if module is None:
            self._components.pop(name, None)
            return
        self._components[name] = module
        self._placements[name] = self._attach(name, module, self._initial_placement(name, module))

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[nn.Module]:
        """The component, placed for running on the execution device for the duration of the block."""
        if name not in self._components:
            raise KeyError(f"no component {name!r} registered; have {sorted(self._components)}")
        if self.plan == "auto" and self.last_plan is None:
            self.prepare()
        placement = self._placements[name]
        try:
            placement.enter()
            yield self._components[name]
        finally:
            placement.exit()
            if self.device.type == "cuda" and placement.kind != "none":
                torch.cuda.empty_cache()

    def offload_all(self) -> None:
        """Move every component to the offload device (e.g. before another program needs the GPU)."""
        for placement in self._placements.values():
            placement.offload()
        self._transfer.synchronize()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Offload and unregister everything, removing this manager's hooks from the models."""
        self.offload_all()
        for name in list(self._components):
            self.register(name, None)
        self._transfer.synchronize()

    def loaded_blocks(self, name: str) -> list[int]:
        """Indices of the component's transformer blocks on the execution device now (block_swap)."""
        return self._placements[name].loaded_blocks()

    def placement(self, name: str) -> str:
        """The placement a component has now: none, model, block_swap or sequential."""
        return self._placements[name].kind

    def reset_stats(self) -> None:
        """Zero the counters and peaks (keeps the current device bytes)."""
        self.stats = MemoryStats(device_bytes=self.stats.device_bytes, peak_device_bytes=self.stats.device_bytes)

    # ---------------------------------------------------------------- planning
    def budget_bytes(self) -> int | None:
        """The usable device budget in bytes (margin taken off), or None where there is no limit to read."""
        margin = int(self.margin_gb * GiB)
        if self.budget_gb is not None:
            return int(self.budget_gb * GiB) - margin  # may be negative: then nothing fits and 'auto' says so
        if self.device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        allowed = free
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if fraction is not None:  # a per-process cap (set_per_process_memory_fraction) binds before free memory
            allowed = min(free, int(fraction(self.device) * total) - torch.cuda.memory_reserved(self.device))
        return max(0, allowed + self.stats.device_bytes - margin)

    def demands(self, workload: Workload | None = None) -> dict[str, Demand]:
        """Weight sizes and working memory of every registered component for a workload."""
        return component_demands(self._components, workload or self.workload)

    def estimate(self, workload: Workload | None = None) -> MemoryPlan:
        """Resolve this manager's plan for a workload without moving anything."""
        workload = workload or self.workload
        return plan_memory(
            self.plan, self.demands(workload), self.budget_bytes(), workload,
            resident_blocks=self.resident_blocks, prefetch=self.prefetch, margin=int(self.margin_gb * GiB),
        )

    def prepare(
        self,
        width: int | None = None,
        height: int | None = None,
        temp: int | None = None,
        *,
        cfg: bool = True,
        dtype: torch.dtype | None = None,
    ) -> MemoryPlan:
        """Resolve the plan for a generation and place the components accordingly; returns the plan.

        'auto' raises ValueError when the budget is below the smallest workable one (named in the
        message); an explicit plan whose estimate exceeds the budget only warns.
        """
        act_bytes = 4 if dtype in (torch.float32, torch.float16) else 2  # fp16 keeps fp32 residual streams
        self.workload = Workload(
            width or self.workload.width, height or self.workload.height, temp or self.workload.temp, cfg, act_bytes
        )
        plan = self.estimate(self.workload)
        budget = plan.budget_bytes
        if self.plan != "auto" and budget is not None and plan.peak_bytes > budget:
            warnings.warn(
                f"offload={self.plan!r} needs about {_gib(plan.peak_bytes)} for {self.workload.describe()}, more than "
                f"the {_gib(budget)} budget; offload='auto' picks a plan that fits", stacklevel=2,
            )
        for name, component_plan in plan.components.items():
            wanted = self._spec(component_plan)
            current = self._placements[name]
            if current.spec != wanted:
                if current.active:
                    raise RuntimeError(f"cannot change the placement of {name!r} while it is in use")
                current.detach()
                self._placements[name] = self._attach(name, self._components[name], component_plan)
        self.last_plan = plan
        logger.info("%s", plan.describe())
        return plan

    def vae_decode_settings(self, save_memory: bool = True) -> tuple[int, int]:
        """(window_size, tile_sample_min_size) for a VAE decode: the official pair for `save_memory`
        ((1, 256) or (2, 512)) when it fits the budget, else the largest smaller pair that does."""
        vae = self._components.get("vae")
        budget = self.budget_bytes()
        if vae is None or budget is None:
            return vae_decode_choice(None, 0, save_memory)
        # under 'none' every resident weight shares the device with the decode
        weights = self.stats.device_bytes if self._placements["vae"].kind == "none" else measure_component(vae).total
        return vae_decode_choice(vae, budget - weights, save_memory, self.workload)

    # ---------------------------------------------------------------- out of memory
    @contextlib.contextmanager
    def oom_guard(self, phase: str) -> Iterator[None]:
        """Turn a device out-of-memory error inside the block into a `DeviceOutOfMemoryError` that names the
        plan and budget to use instead, after moving every weight back to the offload device (once: an
        already converted error passes through)."""
        failure = None
        try:
            yield
        except DeviceOutOfMemoryError:
            raise
        except Exception as exc:
            if not is_device_oom(exc):
                raise
            traceback.clear_frames(exc.__traceback__)  # drop the activations the failed frames still hold
            failure = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if failure is not None:
            self.recover()  # first, so the advice reads the memory that is really free
            raise DeviceOutOfMemoryError(self._oom_message(phase, failure)) from None

    def recover(self) -> None:
        """After a failure: wait for copies in flight, put every weight back on the offload device, free the cache."""
        self._transfer.synchronize()
        for placement in self._placements.values():
            placement.active = False
            placement.offload()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _oom_message(self, phase: str, failure: str) -> str:
        plan = self.last_plan
        head = f"out of device memory while {phase} with offload={self.plan!r}"
        if plan is not None:
            chosen = f" (chose {plan.chosen!r})" if self.plan == "auto" else ""
            head += f"{chosen} at {plan.workload.describe()}, estimated peak {_gib(plan.peak_bytes)}"
        head += f". All weights are back on {self.offload_device}; the models are usable. "
        advice = self._oom_advice()
        return f"{head}{advice} [{failure[:200]}]"

    def _oom_advice(self) -> str:
        margin = int(self.margin_gb * GiB)
        budget = self.budget_bytes()
        failed = self.last_plan.peak_bytes if self.last_plan is not None else None
        if failed is not None and (budget is None or failed <= budget):
            budget = int(failed * 0.8)  # the plan was estimated to fit and did not: aim below its estimate
        if budget is None:
            order = PLACEMENTS.index(self.plan) if self.plan in PLACEMENTS else len(PLACEMENTS) - 1
            lower = PLACEMENTS[min(order + 1, len(PLACEMENTS) - 1)]
            return f"Use offload={lower!r}, or offload='auto' with budget_gb below your free device memory."
        try:
            plan = plan_memory("auto", self.demands(), budget, self.workload, prefetch=self.prefetch, margin=margin)
        except ValueError as err:
            return str(err)[0].upper() + str(err)[1:]
        detail = plan.components.get("dit")
        k = f" with resident_blocks={detail.resident_blocks}" if detail and detail.placement == "block_swap" else ""
        return (f"Use offload={plan.chosen!r}{k} (estimated peak {_gib(plan.peak_bytes)}), or offload='auto' with "
                f"budget_gb={_budget_gb(budget + margin, up=False)} to choose automatically.")

    # ---------------------------------------------------------------- internals
    def _account(self, delta: int, copied: bool = False) -> None:
        stats = self.stats
        stats.device_bytes += delta
        stats.peak_device_bytes = max(stats.peak_device_bytes, stats.device_bytes)
        if copied and delta > 0:
            stats.bytes_copied += delta
            stats.loads += 1

    def _initial_placement(self, name: str, module: nn.Module) -> ComponentPlan:
        if self.last_plan is not None and name in self.last_plan.components and self.plan != "auto":
            return self.last_plan.components[name]
        placement = {"auto": "model"}.get(self.plan, self.plan)  # auto: host until the first prepare()
        if placement in ("block_swap", "sequential") and not find_stream_blocks(module):
            placement = "model"
        resident = (self.resident_blocks or 0) if name == "dit" else 0
        return ComponentPlan(placement, 0, resident, self.prefetch)

    @staticmethod
    def _spec(plan: ComponentPlan) -> tuple:
        if plan.placement == "block_swap":
            return (plan.placement, plan.resident_blocks or 0, plan.prefetch)
        return (plan.placement,)

    def _attach(self, name: str, module: nn.Module, plan: ComponentPlan) -> _Placement:
        kind = plan.placement
        if kind in ("block_swap", "sequential") and not find_stream_blocks(module):
            kind = "model"
        if kind == "none":
            placement: _Placement = _Resident(self, name, module)
        elif kind == "model":
            placement = _WholeSwap(self, name, module)
        elif kind == "block_swap":
            placement = _BlockStream(self, name, module, plan.resident_blocks or 0, plan.prefetch)
        else:
            placement = _LeafStream(self, name, module)
        placement.attach()
        return placement


def _vae_channels(vae: nn.Module) -> tuple[int, int]:
    """(input, output) width of the VAE decoder's full-resolution up block, (256, 128) when unknown."""
    try:
        last = vae.decoder.up_blocks[-1].resnets[0]  # type: ignore[union-attr, index]
        return int(last.conv1.conv.in_channels), int(vae.decoder.conv_out.conv.in_channels)  # type: ignore[union-attr]
    except (AttributeError, IndexError, TypeError):
        return 256, 128
