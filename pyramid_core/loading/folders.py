"""The official folder layout (`rain1011/pyramid-flow-miniflux` / `-sd3`): DiT variants, VAE, text encoders."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from ..settings import DEFAULT_VARIANT, VARIANT_PREFIX, VARIANTS, variant_name
from .checkpoint import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, CheckpointError, open_checkpoint
from .configs import detect_family, family_from_class_name, read_config_json

__all__ = [
    "DEFAULT_VARIANT",
    "DIT_VARIANTS",
    "VAE_FOLDER",
    "VARIANT_ALIASES",
    "ModelFolder",
    "is_component_dir",
    "resolve_model_folder",
    "resolve_variant",
]

DIT_VARIANTS = tuple(VARIANTS)  # the released variant folders, in settings order
VARIANT_ALIASES: Mapping[str, str] = MappingProxyType({v.alias: v.folder for v in VARIANTS.values()})
VAE_FOLDER = "causal_video_vae"


def resolve_variant(variant: str | None, default: str | None = None) -> str | None:
    """Full variant folder name for a name or alias (`"384p"`, `"768p"`, `"image"`); None gives `default`."""
    if variant is None:
        return default
    try:
        return variant_name(variant)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def component_family(folder: Path) -> str:
    """Family of a component folder: config.json `_class_name`, falling back to the tensor names."""
    config_path = folder / "config.json"
    if config_path.is_file():
        family = family_from_class_name(read_config_json(config_path))
        if family is not None:
            return family
    with open_checkpoint(folder) as reader:
        return detect_family(reader)


def is_component_dir(path: Path) -> bool:
    """A folder holding one model (config.json and/or weight files), not a root with model subfolders."""
    if any((path / v).is_dir() for v in (*DIT_VARIANTS, VAE_FOLDER)):
        return False
    weight_suffixes = (*SAFETENSORS_SUFFIXES, *PICKLE_SUFFIXES)
    return (path / "config.json").is_file() or any(
        p.is_file() and (p.suffix.lower() in weight_suffixes or p.name.endswith(".index.json")) for p in path.iterdir()
    )


def has_dit_variants(path: Path) -> bool:
    """Whether `path` holds one of the known DiT variant folders."""
    return any((path / v).is_dir() for v in DIT_VARIANTS)


@dataclass(frozen=True)
class ModelFolder:
    """What an official Pyramid Flow root folder holds."""

    root: Path
    family: str  # "flux" | "mmdit"
    dit_variants: dict[str, Path]  # variant folder name -> path, known variants first
    vae: Path | None = None
    text_encoders: dict[str, Path] = field(default_factory=dict)  # "text_encoder", "text_encoder_2", ...
    tokenizers: dict[str, Path] = field(default_factory=dict)

    def dit_path(self, variant: str | None = None) -> Path:
        """Folder of one DiT variant; `variant` may be omitted when only one is present."""
        if variant is None:
            if len(self.dit_variants) == 1:
                return next(iter(self.dit_variants.values()))
            raise CheckpointError(
                f"{self.root} holds several DiT variants ({', '.join(self.dit_variants)}); choose one"
            )
        name = resolve_variant(variant)
        if name not in self.dit_variants:
            raise CheckpointError(
                f"variant {name} is not in {self.root}; available: {', '.join(self.dit_variants)}"
            )
        return self.dit_variants[name]


def _subfolder_hint(root: Path) -> str:
    component = (
        root.name in DIT_VARIANTS
        or root.name == VAE_FOLDER
        or root.name.startswith(("text_encoder", "tokenizer", VARIANT_PREFIX))
        or (root / "config.json").is_file()
    )
    if component:
        return f" {root} looks like a component subfolder; point at its parent folder {root.parent}."
    return ""


def resolve_model_folder(root: str | os.PathLike) -> ModelFolder:
    """Describe an official root folder (e.g. `pyramid-flow-miniflux/`): DiT variants, VAE, text encoders,
    tokenizers and the DiT family."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"model folder not found: {root}")
    if root.is_file():
        raise CheckpointError(
            f"{root} is a file, not a model folder; single-file checkpoints are loaded with load_dit / load_vae"
        )
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    variants = {v: root / v for v in DIT_VARIANTS if (root / v).is_dir()}
    # Unlisted diffusion_transformer_* folders (future variants) are accepted after the known ones.
    variants.update({p.name: p for p in subdirs if p.name.startswith(VARIANT_PREFIX) and p.name not in variants})
    if not variants:
        found = ", ".join(p.name + "/" for p in subdirs) or "no subfolders"
        raise CheckpointError(
            f"{root} has no DiT variant folder: looked for {', '.join(DIT_VARIANTS)}; found {found}."
            + _subfolder_hint(root)
        )
    families = {name: component_family(path) for name, path in variants.items()}
    if any(f == "vae" for f in families.values()) or len(set(families.values())) > 1:
        raise CheckpointError(f"{root}: DiT variant folders hold mixed or non-DiT models: {families}")
    vae = root / VAE_FOLDER
    return ModelFolder(
        root=root,
        family=next(iter(families.values())),
        dit_variants=variants,
        vae=vae if vae.is_dir() else None,
        text_encoders={p.name: p for p in subdirs if p.name.startswith("text_encoder")},
        tokenizers={p.name: p for p in subdirs if p.name.startswith("tokenizer")},
    )
