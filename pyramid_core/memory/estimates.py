"""Sizes and working-memory estimates: what a component needs on the device while it runs.

Weight sizes are measured from the module (shapes and dtypes only: meta models work). Working memory
comes from the component itself: a module may define

    working_memory_bytes(workload) -> int                           (DiT, text encoder)
    decode_working_memory_bytes(workload, window, tile) -> int      (VAE)

The formulas those methods use live here, so the coefficients are in one place and the planner never
reads a model's internals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from torch import nn

if TYPE_CHECKING:
    import torch

from .placements import find_stream_blocks
from .weights import collect_refs, own_refs, packed_offsets

GiB = 1 << 30
TEXT_TOKENS = 128  # T5 tokens of every DiT forward (FACTS 2.4)
# (window, tile) of a VAE decode, fastest first; window = latent frames per chunk, tile = pixels per side
VAE_DECODE_OPTIONS = ((2, 512), (1, 512), (2, 256), (1, 256), (1, 128))
OFFICIAL_VAE_DECODE = VAE_DECODE_OPTIONS[3]  # save_memory=True


@dataclass(frozen=True)
class Workload:
    """What a generation asks of the device: pixel size, latent frames, CFG batch, activation bytes."""

    width: int = 640
    height: int = 384
    temp: int = 16
    cfg: bool = True
    act_bytes: int = 2

    @classmethod
    def for_generation(cls, width: int, height: int, temp: int, cfg: bool = True,
                       dtype: torch.dtype | None = None) -> Workload:
        """The workload of one generation in a compute dtype (fp16 keeps fp32 residual streams: 4 bytes)."""
        import torch

        act_bytes = 4 if dtype in (torch.float32, torch.float16) else 2
        return cls(int(width), int(height), int(temp), bool(cfg), act_bytes)

    @property
    def batch(self) -> int:
        return 2 if self.cfg else 1

    def describe(self) -> str:
        return f"{self.width}x{self.height}, temp {self.temp}"


@dataclass(frozen=True)
class ComponentSizes:
    """Weight bytes of one component as the placements see them."""

    total: int  # sizes are packed: aligned as one device buffer holds them
    rest: int = 0  # outside the transformer blocks (resident under block_swap)
    blocks: tuple[int, ...] = ()  # per transformer block (packed, as streamed), execution order
    largest_group: int = 0  # largest single module's own weights, packed (a sequential slot)
    nesting: int = 1  # most weight-owning modules nested inside one another (sequential slots in use)

    @property
    def streamable(self) -> bool:
        return bool(self.blocks)


def measure_component(module: nn.Module) -> ComponentSizes:
    """Weight bytes of a module: total, outside its transformer blocks, per block, largest module, nesting."""
    blocks = find_stream_blocks(module)
    inside = {id(m) for b in blocks for m in b.modules()}
    seen: set[int] = set()
    rest = packed_offsets([r.get() for r in collect_refs([m for m in module.modules() if id(m) not in inside], seen)])[1]
    per_block = tuple(packed_offsets([r.get() for r in collect_refs(list(b.modules()), seen)])[1] for b in blocks)
    total = packed_offsets([r.get() for r in collect_refs(list(module.modules()), set())])[1]  # as one device buffer
    largest = max((packed_offsets([r.get() for r in own_refs(m)])[1] for m in module.modules()), default=0)
    return ComponentSizes(total, rest, per_block, largest, max(1, _owner_depth(module)))


def _owner_depth(module: nn.Module) -> int:
    own = 1 if own_refs(module) else 0
    return own + max((_owner_depth(c) for c in module.children()), default=0)


@dataclass(frozen=True)
class Demand:
    """What one component needs while it runs: its weights and its working memory."""

    sizes: ComponentSizes
    activation: int
    min_activation: int | None = None  # lowest working memory after tuning (the VAE's smallest tile)

    @property
    def floor_activation(self) -> int:
        return self.activation if self.min_activation is None else self.min_activation


def component_demands(components: Mapping[str, nn.Module], workload: Workload = Workload()) -> dict[str, Demand]:
    """Weight sizes and working memory of components for a workload (each component estimates its own)."""
    demands = {}
    for name, module in components.items():
        sizes = measure_component(module)
        decode = getattr(module, "decode_working_memory_bytes", None)
        if decode is not None:
            demands[name] = Demand(sizes, decode(workload, *OFFICIAL_VAE_DECODE), decode(workload, *VAE_DECODE_OPTIONS[-1]))
            continue
        estimate = getattr(module, "working_memory_bytes", None)
        demands[name] = Demand(sizes, int(estimate(workload)) if estimate is not None else 0)
    return demands


# --------------------------------------------------------------------------------------------
# the formulas behind the components' estimates


def dit_tokens(width: int, height: int, temp: int, patch: int = 2) -> int:
    """Most video tokens of one DiT forward: the largest (unit, stage) under the sampler's history rule."""
    from ..sampling import NUM_STAGES, history_levels

    h, w = height // 8, width // 8
    per_level = [(h >> (NUM_STAGES - 1 - s)) // patch * ((w >> (NUM_STAGES - 1 - s)) // patch) for s in range(NUM_STAGES)]
    unit = temp - 1  # the last unit has the longest history
    return max(per_level[s] + sum(per_level[level] for level in history_levels(unit, s)) for s in range(NUM_STAGES))


def dit_working_memory(workload: Workload, hidden: int, patch: int = 2, dense_mask: bool = False) -> int:
    """Working memory of one DiT forward at the largest unit (no weights).

    About 14 activation-dtype and 4 fp32 copies of [batch, tokens, hidden] are alive at the worst point
    of a block (modulated LayerNorm in fp32, q/k/v, RoPE in fp32, the 4x-wide MLP); the official dense
    mask adds a [batch, L, L] boolean mask and its additive form.
    """
    tokens = dit_tokens(workload.width, workload.height, workload.temp, patch) + TEXT_TOKENS
    nbytes = workload.batch * tokens * hidden * (14 * workload.act_bytes + 16)
    if dense_mask:
        nbytes += workload.batch * tokens * tokens * (2 + workload.act_bytes)
    return int(nbytes)


def vae_decode_working_memory(workload: Workload, window: int, tile: int, channels: Sequence[int]) -> int:
    """Working memory of one tiled, chunked VAE decode step (no weights).

    The full-resolution up block dominates: `channels` = (its input, its output) width, 8*window+1
    frames of tile x tile pixels (less for a smaller video), about four live copies, plus the fp32
    GroupNorm slices (at most 2**25 elements each).
    """
    frames = min(8 * window + 1, 8 * (workload.temp - 1) + 1)
    height, width = min(tile, workload.height), min(tile, workload.width)
    c_in, c_out = channels
    pixels = frames * height * width
    return int((c_in + 3 * c_out) * pixels * workload.act_bytes + 2 * min(1 << 25, c_out * pixels) * 4)


def text_working_memory(workload: Workload, width: int, ff: int, heads: int) -> int:
    """Working memory of a T5 forward on one prompt (128 tokens; small next to the weights)."""
    return int(TEXT_TOKENS * (24 * width + 4 * ff) * workload.act_bytes + 3 * heads * TEXT_TOKENS**2 * 4)
