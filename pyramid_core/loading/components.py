"""The one loading entry: the components a pipeline needs (DiT, VAE, text encoders), under one precision policy.

`PyramidFlowPipeline.from_pretrained` (and so the command line) and the ComfyUI loader nodes all load through
`load_components`; `component_dtypes` is the only place that decides which dtype each component gets.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import settings
from .build import LoadedModel
from .checkpoint import CheckpointError
from .dit_vae import load_dit, load_vae
from .folders import is_component_dir, resolve_model_folder

if TYPE_CHECKING:
    from ..text import PyramidTextEncoder

__all__ = [
    "COMPONENTS",
    "ComponentDtypes",
    "LoadedComponents",
    "component_dtypes",
    "load_components",
    "precision_settings",
]

COMPONENTS = ("dit", "vae", "text_encoder")
COMPUTE_DTYPES = tuple(getattr(torch, settings.torch_dtype_name(name)) for name in settings.COMPUTE_DTYPES)
Source = str | os.PathLike | Mapping[str, str | os.PathLike]  # a folder or file, or component -> path


@dataclass(frozen=True)
class ComponentDtypes:
    """The dtype each component is loaded in."""

    dit: torch.dtype  # the compute dtype (fp8 storage keeps the DiT's Linear weights in float8 besides)
    vae: torch.dtype
    text_encoder: torch.dtype


def component_dtypes(compute: torch.dtype) -> ComponentDtypes:
    """The precision policy: each component's dtype for a compute dtype (bf16, fp16 or fp32).

    DiT: the compute dtype (fp16 keeps its residual streams in fp32, see `pyramid_core.precision`).
    Text encoders: the compute dtype as well, as in the official code; under fp16, transformers keeps T5's
    feed-forward output projections (`wo`) in fp32, and fp16 halves T5's memory on the GPUs without bf16
    that fp16 is for. VAE: fp32 under fp16 compute (its activation range is unchecked in fp16), else the
    compute dtype.
    """
    if compute not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be bf16, fp16 or fp32, got {compute}")
    vae = torch.float32 if compute == torch.float16 else compute
    return ComponentDtypes(dit=compute, vae=vae, text_encoder=compute)


def precision_settings(precision: str, fp8_granularity: str = "row") -> tuple[torch.dtype, str | None]:
    """(compute dtype, fp8 granularity or None) of a precision name (`settings.PRECISIONS`): bf16, fp16, fp32,
    or fp8 (bf16 compute with the DiT's Linear weights stored in float8, scaled per `fp8_granularity`)."""
    chosen = settings.precision(precision)
    return getattr(torch, settings.torch_dtype_name(chosen.compute)), fp8_granularity if chosen.fp8_storage else None


@dataclass
class LoadedComponents:
    """What `load_components` loaded; a component not asked for is None."""

    dit: LoadedModel | None
    vae: LoadedModel | None
    text_encoder: PyramidTextEncoder | None
    family: str | None  # the DiT family ("flux" | "mmdit"); None when neither a DiT nor text encoders are loaded
    variant: str | None  # the DiT variant; None without a DiT
    dtypes: ComponentDtypes  # the policy's dtypes, also for components not loaded here
    text_encoder_root: Path | None = None  # the folder the text encoders come from

    @property
    def sources(self) -> dict[str, Path]:
        """Where each loaded component came from: weights file (or shard index), or the text encoders' folder."""
        found = {"dit": self.dit.source if self.dit is not None else None,
                 "vae": self.vae.source if self.vae is not None else None,
                 "text_encoder": self.text_encoder_root if self.text_encoder is not None else None}
        return {name: path for name, path in found.items() if path is not None}


def _component_paths(source: Source, components: tuple[str, ...]) -> dict[str, Path]:
    """The folder or file each requested component is loaded from."""
    if isinstance(source, Mapping):
        missing = [name for name in components if name not in source]
        if missing:
            raise CheckpointError(f"no path given for {', '.join(missing)} (paths given for: {', '.join(source)})")
        return {name: Path(source[name]).expanduser() for name in components}
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.is_dir() and not is_component_dir(path):  # an official root folder holds every component
        return {name: path for name in components}
    if len(components) == 1 and components[0] != "text_encoder":
        return {components[0]: path}
    raise CheckpointError(
        f"{path} holds one model (a DiT or a VAE), not {' + '.join(components)}: load it with components=('dit',) "
        "or ('vae',), pass an official model folder, or a mapping of component name -> path"
    )


def _check_components(components: Iterable[str]) -> tuple[str, ...]:
    wanted = tuple(dict.fromkeys(components))
    if not wanted or any(name not in COMPONENTS for name in wanted):
        raise ValueError(f"components must be some of {COMPONENTS}, got {wanted}")
    return wanted


def _prepare_dit(loaded: LoadedModel, compute: torch.dtype, fp8: str | None, attention_backend: str,
                 compile_blocks: bool) -> None:
    """Precision, attention and compilation of a freshly loaded DiT, in place.

    `attention_backend`: a segmented-path kernel ('sdpa', 'sage', 'flash', registered) or an attention mode
    ('flex', 'masked', 'segmented'), as `models.attention.attention_keywords` maps it.
    """
    from .. import precision
    from ..models.attention import attention_keywords

    stored_fp8 = precision.has_fp8_weights(loaded.model)  # Kijai's fp8 files stay fp8 whatever `fp8` says
    precision.configure_dit_precision(loaded.model, compute, fp8=None if stored_fp8 else fp8)
    precision.configure_dit(loaded.model, **attention_keywords(attention_backend))
    if compile_blocks:
        precision.compile_blocks(loaded.model)


def load_components(
    source: Source,
    variant: str | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    fp8: str | None = None,
    attention_backend: str = "sdpa",
    compile_blocks: bool = False,
    components: Iterable[str] = COMPONENTS,
    operations: Mapping[str, type] | None = None,
) -> LoadedComponents:
    """Load the requested components in the dtypes of `component_dtypes(dtype)`, the DiT ready to run.

    `source`: an official root folder (every component), a single file or component folder (one DiT or one
    VAE: ask for that one alone), or a mapping component name -> path (the text encoders' path is a root
    folder). `variant` picks the DiT variant folder of a root (a label for a single file). `dtype`: the
    compute dtype; `fp8`: 'row' or 'tensor' stores the DiT's Linear weights in float8 with such scales
    (float8 files stay float8 either way, never upcast to a full-size copy). `attention_backend`: 'sdpa',
    'sage', 'flash' or a registered kernel, or the attention mode 'flex' (or 'masked'); `compile_blocks`:
    torch.compile each DiT block. Weights are loaded on the host; a memory plan places them afterwards.
    `operations`: component name ('dit', 'vae') -> the layer classes to build it from (a host's, e.g.
    ComfyUI's; see `pyramid_core.models.operations`); missing names use pyramid_core's torch layers.
    """
    operations = operations or {}
    wanted = _check_components(components)
    dtypes = component_dtypes(dtype)
    paths = _component_paths(source, wanted)
    dit = vae = text_encoder = None
    family = None
    if "dit" in wanted:
        dit = load_dit(paths["dit"], variant, dtype=dtypes.dit, keep_float8=True, operations=operations.get("dit"))
        _prepare_dit(dit, dtypes.dit, fp8, attention_backend, compile_blocks)
        family = dit.family
    if "vae" in wanted:
        vae = load_vae(paths["vae"], dtype=dtypes.vae, operations=operations.get("vae"))
    root = paths.get("text_encoder")
    if root is not None:
        from ..text import PyramidTextEncoder

        family = family or resolve_model_folder(root).family
        text_encoder = PyramidTextEncoder.from_folder(root, family, dtype=dtypes.text_encoder)
    return LoadedComponents(dit, vae, text_encoder, family, dit.variant if dit else None, dtypes, root)
