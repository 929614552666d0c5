"""Loading one DiT or the VAE from an official root folder, a component folder or a single file."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .build import LoadedModel, build_and_fill
from .checkpoint import CheckpointError, describe_dir, open_checkpoint
from .configs import derive_config, detect_family, family_from_class_name, family_spec, finish_config, read_config_json
from .folders import (
    DEFAULT_VARIANT, VAE_FOLDER, VARIANT_PREFIX, has_dit_variants, is_component_dir, resolve_model_folder,
    resolve_variant,
)

__all__ = ["dit_config", "load_dit", "load_vae"]


def _wrong_kind_error(path: Path, found: str, wanted: str) -> CheckpointError:
    use = "load_vae" if found == "vae" else "load_dit"
    return CheckpointError(f"{path} is a {family_spec(found).title}, not a {wanted}; load it with {use}")


def _component_config(path: Path, reader, want_vae: bool) -> tuple[str, dict]:
    """(family, constructor config) of a component folder or single file, checked to be the wanted kind."""
    wanted = family_spec("vae").title if want_vae else "DiT"
    config_path = path / "config.json" if path.is_dir() else None
    folder_config = read_config_json(config_path) if config_path and config_path.is_file() else None
    class_family = family_from_class_name(folder_config) if folder_config else None
    if class_family is not None and (class_family == "vae") != want_vae:
        raise _wrong_kind_error(path, class_family, wanted)
    family = detect_family(reader)
    if (family == "vae") != want_vae:
        raise _wrong_kind_error(reader.source, family, wanted)
    if class_family is not None and class_family != family:
        raise CheckpointError(
            f"{config_path} says {folder_config.get('_class_name')} but {reader.source} holds a "
            f"{family_spec(family).title}"
        )
    if folder_config is not None:
        return family, finish_config(family, folder_config, config_path)
    return family, derive_config(family, reader)


def _load_component(
    path: Path, *, want_vae: bool, variant: str | None, dtype: torch.dtype | str | None,
    device: str | torch.device, strict: bool, keep_float8: bool = False, operations: type | None = None,
) -> LoadedModel:
    """Load from a component folder (config.json + weights) or a single file."""
    with open_checkpoint(path) as reader:
        family, config = _component_config(path, reader, want_vae)
        return build_and_fill(
            reader, family, config, variant=variant, dtype=dtype, device=device, strict=strict, keep_float8=keep_float8,
            operations=operations,
        )


def _dit_source(path: Path, variant: str | None) -> tuple[Path, str]:
    """The DiT component folder or file of `path` and its variant label."""
    if path.is_dir() and not is_component_dir(path):
        dit_dir = resolve_model_folder(path).dit_path(variant)
        return dit_dir, dit_dir.name
    label = resolve_variant(variant)
    if path.is_dir() and path.name.startswith(VARIANT_PREFIX):
        if label is not None and label != path.name:
            raise CheckpointError(f"{path} is the {path.name} folder but variant {label} was requested")
        label = path.name
    return path, label or DEFAULT_VARIANT


def dit_config(path: str | os.PathLike, variant: str | None = None) -> tuple[str, dict]:
    """(family, constructor config) of the DiT `load_dit(path, variant)` would load, reading only headers."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"DiT checkpoint not found: {path}")
    source, _ = _dit_source(path, variant)
    with open_checkpoint(source) as reader:
        return _component_config(source, reader, want_vae=False)


def load_dit(
    path: str | os.PathLike,
    variant: str | None = None,
    *,
    dtype: torch.dtype | str | None = torch.bfloat16,
    device: str | torch.device = "cpu",
    strict: bool = True,
    keep_float8: bool = False,
    operations: type | None = None,
) -> LoadedModel:
    """Load a Pyramid Flow DiT from an official root folder, a variant subfolder, or a single file.

    `variant` picks the folder in a root (optional when only one is present); for a single file it is only a
    label (default `diffusion_transformer_384p`, the variant cannot be read from the weights).
    `keep_float8`: float8 tensors (Kijai's fp8 files) stay float8 while the rest is cast to `dtype`.
    `operations`: the layer classes (`pyramid_core.models.operations`; None: pyramid_core's torch layers).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"DiT checkpoint not found: {path}")
    source, label = _dit_source(path, variant)
    return _load_component(
        source, want_vae=False, variant=label, dtype=dtype, device=device, strict=strict, keep_float8=keep_float8,
        operations=operations,
    )


def load_vae(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = torch.bfloat16,
    device: str | torch.device = "cpu",
    strict: bool = True,
    operations: type | None = None,
) -> LoadedModel:
    """Load the causal video VAE from an official root folder, its `causal_video_vae/` folder, or a single file.

    `operations`: the layer classes (`pyramid_core.models.operations`; None: pyramid_core's torch layers)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"VAE checkpoint not found: {path}")
    if path.is_dir() and (path / VAE_FOLDER).is_dir():
        path = path / VAE_FOLDER
    elif path.is_dir() and not is_component_dir(path) and has_dit_variants(path):
        raise CheckpointError(f"{path} has no {VAE_FOLDER}/ subfolder; found {describe_dir(path)}")
    return _load_component(path, want_vae=True, variant=None, dtype=dtype, device=device, strict=strict,
                           operations=operations)
