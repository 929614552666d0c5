"""Every user-facing setting table, defined once: model families, DiT variants, precisions and dtype names,
memory plans, attention choices, generation defaults, and the policies they imply.

The command line, the pipeline, the ComfyUI node widgets and validation all read these tables (a test checks
that they agree). This module imports nothing heavy (no torch): `python -m pyramid_core --help` reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

__all__ = [
    "ATTENTION_CHOICES",
    "ATTENTION_KERNELS",
    "ATTENTION_MODES",
    "CFG_PARALLEL_CHOICES",
    "COMPUTE_DTYPES",
    "DIST_TIMEOUT_S",
    "DEFAULTS",
    "DEFAULT_VARIANT",
    "DTYPE_NAMES",
    "FAMILIES",
    "FP8_GRANULARITIES",
    "FPS",
    "GenerationDefaults",
    "ModelFamily",
    "PLACEMENTS",
    "PLANS",
    "PRECISIONS",
    "Precision",
    "SIZE_MULTIPLE",
    "VARIANTS",
    "VIDEO_FORMATS",
    "IMAGE_FORMAT",
    "Variant",
    "dtype_name",
    "family_name",
    "precision",
    "torch_dtype_name",
    "variant",
    "variant_name",
]

FPS = 24  # the frame rate every released model was trained at
SIZE_MULTIPLE = 64  # pixels: 8 (VAE) x 4 (pyramid) x 2 (patch)


# --------------------------------------------------------------------------------------------
# model families


@dataclass(frozen=True)
class ModelFamily:
    """A DiT family: its key in code, its display name and the names users and checkpoints call it."""

    key: str  # "flux" | "mmdit"
    title: str  # for people: "miniFLUX" | "SD3"
    aliases: tuple[str, ...]  # accepted spellings (lower case), the key included
    repo: str  # the official Hugging Face repository


FAMILIES: Mapping[str, ModelFamily] = MappingProxyType({
    "flux": ModelFamily("flux", "miniFLUX", ("flux", "miniflux", "pyramid_flux"), "rain1011/pyramid-flow-miniflux"),
    "mmdit": ModelFamily("mmdit", "SD3", ("mmdit", "sd3", "pyramid_mmdit"), "rain1011/pyramid-flow-sd3"),
})


def family_name(name: str) -> str:
    """The family key ("flux" | "mmdit") of a name or alias ("miniflux", "sd3", ...); ValueError otherwise."""
    key = str(name).strip().lower()
    for family in FAMILIES.values():
        if key in family.aliases:
            return family.key
    spellings = ", ".join(alias for family in FAMILIES.values() for alias in family.aliases)
    raise ValueError(f"unknown model family {name!r}; use one of {spellings}")


# --------------------------------------------------------------------------------------------
# DiT variants


@dataclass(frozen=True)
class Variant:
    """A released DiT variant: its folder, its short name, the size it makes and the length it was trained for."""

    folder: str  # the subfolder of the official repository: "diffusion_transformer_384p"
    alias: str  # what users type: "384p"
    width: int  # default size (the official README examples)
    height: int
    default_temp: int  # latent frames by default (16 = 121 frames = 5 s at 24 fps)
    trained_temp: int  # the longest temp it was trained for (official README / app sliders)

    @property
    def makes_video(self) -> bool:
        return self.trained_temp > 1


VARIANTS: Mapping[str, Variant] = MappingProxyType({
    v.folder: v for v in (
        Variant("diffusion_transformer_384p", "384p", 640, 384, 16, 16),
        Variant("diffusion_transformer_768p", "768p", 1280, 768, 16, 31),
        Variant("diffusion_transformer_image", "image", 1024, 1024, 1, 1),
    )
})
DEFAULT_VARIANT = "diffusion_transformer_384p"
VARIANT_PREFIX = "diffusion_transformer_"


def variant_name(name: str) -> str:
    """The folder name of a variant name or alias ("384p" -> "diffusion_transformer_384p"); other
    `diffusion_transformer_*` folder names pass unchanged. ValueError for anything else."""
    key = str(name).strip().lower()
    for known in VARIANTS.values():
        if key in (known.alias, known.folder):
            return known.folder
    if key.startswith(VARIANT_PREFIX) and key != VARIANT_PREFIX:
        return key
    raise ValueError(
        f"unknown DiT variant {name!r}; use one of {', '.join(VARIANTS)} or the aliases "
        f"{', '.join(v.alias for v in VARIANTS.values())}"
    )


def variant(name: str) -> Variant | None:
    """The released variant of a name or alias; None for another `diffusion_transformer_*` folder."""
    return VARIANTS.get(variant_name(name))


# --------------------------------------------------------------------------------------------
# precisions and dtype names

# short name -> torch attribute; the short names are the ones users type
DTYPE_NAMES: Mapping[str, str] = MappingProxyType({
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
    "fp8": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
})
# other spellings accepted wherever a dtype is given by name
_DTYPE_SPELLINGS: Mapping[str, str] = MappingProxyType({
    **{attr: name for name, attr in DTYPE_NAMES.items()},
    "half": "fp16", "float": "fp32", "fp8_e4m3fn": "fp8",
})
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")  # what the models compute in


def dtype_name(name: str) -> str:
    """The short dtype name ("bf16", "fp16", "fp32", "fp8", "fp8_e5m2") of any accepted spelling
    ("bfloat16", "torch.float16", "half", ...); ValueError otherwise."""
    key = str(name).strip().lower().removeprefix("torch.")
    key = _DTYPE_SPELLINGS.get(key, key)
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}")
    return key


def torch_dtype_name(name: str) -> str:
    """The torch attribute ("bfloat16", ...) of any accepted dtype spelling."""
    return DTYPE_NAMES[dtype_name(name)]


@dataclass(frozen=True)
class Precision:
    """A load precision: the compute dtype, and whether the DiT's Linear weights are stored in float8."""

    name: str
    compute: str  # one of COMPUTE_DTYPES
    fp8_storage: bool = False


PRECISIONS: Mapping[str, Precision] = MappingProxyType({
    p.name: p for p in (
        Precision("bf16", "bf16"),
        Precision("fp16", "fp16"),
        Precision("fp32", "fp32"),
        Precision("fp8", "bf16", fp8_storage=True),
    )
})
FP8_GRANULARITIES = ("row", "tensor")  # float8 scales: one per output row, or one per tensor


def precision(name: str) -> Precision:
    """The precision of a name; ValueError naming the choices otherwise."""
    try:
        return PRECISIONS[str(name).strip().lower()]
    except KeyError:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}") from None


# --------------------------------------------------------------------------------------------
# memory plans and attention

PLACEMENTS = ("none", "model", "block_swap", "sequential")  # what one component can get, fastest first
PLANS = (*PLACEMENTS, "auto")  # "auto": the fastest placements that fit the budget
PLAN_HELP: Mapping[str, str] = MappingProxyType({
    "none": "everything stays on the device",
    "model": "each model on the device only while it runs",
    "block_swap": "the DiT's blocks streamed from host memory, some kept resident",
    "sequential": "every layer streamed (the least memory, the slowest)",
    "auto": "the fastest plan that fits the memory budget",
})
# frame-causal attention: per-frame pieces (default), the official dense mask, or one FlexAttention call (torch >= 2.5)
ATTENTION_MODES = ("segmented", "masked", "flex")
ATTENTION_KERNELS = ("sdpa", "sage", "flash")  # kernels of the segmented path (sage/flash: their pip package)
ATTENTION_CHOICES = (*ATTENTION_KERNELS, "flex")  # the CLI's --attention: a segmented-path kernel, or flex

# --------------------------------------------------------------------------------------------
# several processes (torchrun): world size = CFG-parallel degree x sequence-parallel degree

CFG_PARALLEL_CHOICES = ("auto", "1", "2")  # --cfg-parallel; auto: 2 when guidance is on and the world size is even
DIST_TIMEOUT_S = 900.0  # --dist-timeout: seconds a collective waits for the other ranks before failing

# --------------------------------------------------------------------------------------------
# outputs and generation defaults

VIDEO_FORMATS = ("mp4", "webm", "webp", "gif")
IMAGE_FORMAT = "png"


@dataclass(frozen=True)
class GenerationDefaults:
    """Defaults of one generation (the official pipeline's and README's)."""

    steps: tuple[int, int, int] = (20, 20, 20)  # first frame, per pyramid stage
    video_steps: tuple[int, int, int] = (10, 10, 10)  # later frames (every frame in image-to-video)
    guidance: float = 7.0  # first frame
    video_guidance: float = 5.0
    i2v_video_guidance: float = 4.0  # the official generate_i2v default
    fps: int = FPS
    quality: int = 80  # 0-100 for the video writer
    seed_limit: int = 2**64  # seeds are in [0, seed_limit)


DEFAULTS = GenerationDefaults()
