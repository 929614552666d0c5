"""Checkpoint loading for Pyramid Flow: official folders, Kijai-style single files, sharded and `.bin` files.

One entry loads what a pipeline needs under one precision policy: `load_components` (the pipeline, the command
line and the ComfyUI loader nodes all use it). Below it, one job per module:

  checkpoint   reading: safetensors into fresh aligned memory, `.bin` with weights_only, shard indexes
  configs      families, the released configs as typed dataclasses, detection, config derivation
  folders      the official folder layout and DiT variants
  build        meta-device build + per-tensor fill, writing single files
  dit_vae      one DiT or the VAE from a folder or a file (`load_dit`, `load_vae`)
  components   `load_components` and the precision policy (`component_dtypes`)
"""
from __future__ import annotations

from .build import LoadedModel, fill_meta_model, model_class, save_single_file
from .checkpoint import CheckpointError, CheckpointReader, open_checkpoint
from .components import (
    COMPONENTS,
    ComponentDtypes,
    LoadedComponents,
    component_dtypes,
    load_components,
    precision_settings,
)
from .configs import (
    FAMILIES,
    FamilySpec,
    FluxConfig,
    MMDiTConfig,
    VAEConfig,
    derive_config,
    detect_family,
    loader_extras,
    official_config,
)
from .dit_vae import dit_config, load_dit, load_vae
from .folders import (
    DEFAULT_VARIANT,
    DIT_VARIANTS,
    VAE_FOLDER,
    VARIANT_ALIASES,
    ModelFolder,
    resolve_model_folder,
    resolve_variant,
)

__all__ = [
    "COMPONENTS",
    "DEFAULT_VARIANT",
    "DIT_VARIANTS",
    "FAMILIES",
    "OFFICIAL_FLUX_CONFIG",
    "OFFICIAL_MMDIT_CONFIG",
    "OFFICIAL_VAE_CONFIG",
    "VAE_FOLDER",
    "VARIANT_ALIASES",
    "CheckpointError",
    "CheckpointReader",
    "ComponentDtypes",
    "FamilySpec",
    "FluxConfig",
    "LoadedComponents",
    "LoadedModel",
    "MMDiTConfig",
    "ModelFolder",
    "VAEConfig",
    "component_dtypes",
    "derive_config",
    "dit_config",
    "detect_family",
    "fill_meta_model",
    "load_components",
    "load_dit",
    "load_vae",
    "loader_extras",
    "model_class",
    "official_config",
    "open_checkpoint",
    "precision_settings",
    "resolve_model_folder",
    "resolve_variant",
    "save_single_file",
]

# The released config.json values (FACTS 1.4), as plain dicts (fresh copies of the typed defaults).
OFFICIAL_FLUX_CONFIG = official_config("flux")
OFFICIAL_MMDIT_CONFIG = official_config("mmdit")
OFFICIAL_VAE_CONFIG = official_config("vae")
