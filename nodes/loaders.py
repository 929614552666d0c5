"""Loader nodes: an official model folder (or a single-file DiT) and single-file VAEs."""
from __future__ import annotations

from pathlib import Path

from pyramid_core import settings

from . import comfy as host
from . import preview
from .managed import OFFLOAD_MODES, ManagedModel, PyramidFlowModel, PyramidFlowTextEncoder, PyramidFlowVAE, comfy_layers

CATEGORY = "PyramidFlow"
SINGLE_FILE_PREFIX = "diffusion_models/"
NO_MODEL = (
    "(none found) put an official folder such as pyramid-flow-miniflux in models/pyramidflow/, "
    "or a single-file DiT in models/diffusion_models/"
)
NO_VAE = "(none found) put pyramid_flow_vae_bf16.safetensors in models/vae/"
VARIANTS = tuple(v.alias for v in settings.VARIANTS.values())
PRECISIONS = tuple(settings.PRECISIONS)
# segmented = fused per-frame SDPA; sage / flash = the same path on those kernels; flex = one FlexAttention call;
# masked = official dense mask (pyramid_core.models.attention.attention_keywords maps a name to the DiT settings)
ATTENTION_BACKENDS = (*settings.ATTENTION_MODES, *(k for k in settings.ATTENTION_KERNELS if k != "sdpa"))
VAE_PRECISIONS = ("bf16", "fp32")  # fp16 compute keeps the VAE in fp32 anyway (loading.component_dtypes)
FAMILY_CHOICES = {family.title.lower(): key for key, family in settings.FAMILIES.items()}  # miniflux, sd3


def _model_folders() -> dict[str, Path]:
    """Official root folders (those holding a diffusion_transformer_* subfolder) by name."""
    found: dict[str, Path] = {}
    for base in host.folder_paths_for(host.MODEL_FOLDER):
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            if entry.is_dir() and any(p.is_dir() and p.name.startswith("diffusion_transformer_") for p in entry.iterdir()):
                found.setdefault(entry.name, entry)
    return found


def model_choices() -> list[str]:
    """Loader list: official folders, then single files; a hint entry when there is nothing."""
    files = [SINGLE_FILE_PREFIX + name for name in host.list_files(host.DIFFUSION_MODELS)]
    return list(_model_folders()) + files or [NO_MODEL]


def vae_choices() -> list[str]:
    return host.list_files(host.VAE_FOLDER) or [NO_VAE]


def _where(kind: str) -> str:
    return ", ".join(str(p) for p in host.folder_paths_for(kind)) or f"models/{kind}"


def resolve_model(choice: str) -> Path:
    """The folder or file a loader entry names (clear error for the hint entry or a vanished one)."""
    if choice == NO_MODEL:
        raise FileNotFoundError(
            f"no model installed: put an official Pyramid Flow folder (e.g. pyramid-flow-miniflux) in "
            f"{_where(host.MODEL_FOLDER)}, or a single-file DiT in {_where(host.DIFFUSION_MODELS)}, then refresh"
        )
    if choice.startswith(SINGLE_FILE_PREFIX):
        path = host.full_path(host.DIFFUSION_MODELS, choice[len(SINGLE_FILE_PREFIX):])
    else:
        path = _model_folders().get(choice)
    if path is None:
        raise FileNotFoundError(
            f"model {choice!r} not found. Put an official Pyramid Flow folder (e.g. rain1011/pyramid-flow-miniflux) "
            f"in {_where(host.MODEL_FOLDER)}, or a single-file DiT (e.g. Kijai's pyramid_flow_miniflux_bf16_v2."
            f"safetensors) in {_where(host.DIFFUSION_MODELS)}, then refresh the node list"
        )
    return path


class PyramidFlowCoreModelLoader:
    DESCRIPTION = (
        "Loads a Pyramid Flow DiT from models/pyramidflow (official folder: also gives its VAE and text "
        "encoder) or a single file from models/diffusion_models. ComfyUI manages its memory."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("PYRAMIDFLOW_MODEL", "PYRAMIDFLOW_VAE", "PYRAMIDFLOW_TEXT_ENCODER")
    RETURN_NAMES = ("model", "vae", "text_encoder")
    OUTPUT_TOOLTIPS = (
        "the DiT",
        "the folder's causal video VAE (None for a single file: use the VAE loader)",
        "the folder's CLIP + T5 (None for a single file: use a CLIP loader)",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (model_choices(), {"tooltip": "official folder in models/pyramidflow, or diffusion_models/<file>"}),
                "variant": (list(VARIANTS), {"default": settings.VARIANTS[settings.DEFAULT_VARIANT].alias, "tooltip": "DiT variant folder (a label for single files)"}),
                "precision": (list(PRECISIONS), {"default": "bf16",
                              "tooltip": "bf16 = official; fp16 for GPUs without bf16 (residual streams kept in fp32); fp32; fp8 halves DiT memory"}),
                "offload": (list(OFFLOAD_MODES), {"default": "auto",
                            "tooltip": "auto: whole model when it fits, else block swap; none: keep on GPU; model: swap "
                                       "whole models; block_swap: stream DiT blocks; sequential: stream every layer (least VRAM)"}),
                "vram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 256.0, "step": 0.5,
                                   "tooltip": "block_swap/sequential: GPU memory to use (0 = what is free)"}),
                "resident_blocks": ("INT", {"default": 0, "min": 0, "max": 64,
                                    "tooltip": "block_swap: DiT blocks kept on the GPU (0 = from the budget)"}),
                "attention": (list(ATTENTION_BACKENDS), {"default": "segmented",
                              "tooltip": "segmented: fused SDPA kernels per frame (fast, low memory); sage / flash: the same on SageAttention / flash-attn (pip install sageattention / flash-attn); flex: one compiled FlexAttention call per block (CUDA, torch >= 2.5; first steps compile); masked: the official dense mask"}),
            }
        }

    def load(self, model, variant, precision, offload, vram_budget_gb=0.0, resident_blocks=0, attention="segmented"):
        from pyramid_core.loading import load_components, precision_settings, resolve_model_folder
        from pyramid_core.models.attention import attention_keywords
        from pyramid_core.precision import configure_dit

        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention!r}")
        attention_settings = attention_keywords(attention)  # before loading: flex on old torch fails here
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        path = resolve_model(model)
        compute, fp8 = precision_settings(precision)
        folder = resolve_model_folder(path) if path.is_dir() else None  # else a single-file DiT
        wanted = ("dit", "vae") if folder is not None and folder.vae is not None else ("dit",)
        parts = load_components(path, variant, dtype=compute, fp8=fp8, components=wanted,
                                operations=comfy_layers(compute))  # ComfyUI's layers: its loader places them
        loaded, dtypes = parts.dit, parts.dtypes
        configure_dit(loaded.model, **attention_settings)
        dit = ManagedModel.wrap(loaded.model, compute, host.torch_device(), host.dit_offload_device())
        result = PyramidFlowModel(dit, loaded.family, loaded.variant, compute, offload, float(vram_budget_gb),
                                  int(resident_blocks), str(path))
        vae = text_encoder = None
        if parts.vae is not None:
            vae = PyramidFlowVAE(ManagedModel.wrap(parts.vae.model, dtypes.vae, *host.vae_devices()), loaded.family,
                                 dtypes.vae)
            preview.attach(result, vae)  # colour previews without a vae wire
            preview.remember(vae, offload)
        if folder is not None and folder.text_encoders:  # loaded on first use, in the policy's dtype
            text_encoder = PyramidFlowTextEncoder(folder.root, loaded.family, dtypes.text_encoder)
        return (result, vae, text_encoder)


class PyramidFlowCoreVAELoader:
    DESCRIPTION = "Loads a single-file Pyramid Flow causal video VAE from models/vae (e.g. Kijai's pyramid_flow_vae_bf16)."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("PYRAMIDFLOW_VAE",)
    RETURN_NAMES = ("vae",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (vae_choices(), {"tooltip": "file in models/vae"}),
                "precision": (list(VAE_PRECISIONS), {"default": "bf16",
                              "tooltip": "bf16 = official, half the memory; fp32 for GPUs without bf16"}),
                "latent_family": (list(FAMILY_CHOICES), {"default": "miniflux",
                                  "tooltip": "which DiT the latents belong to (first-frame latent factors differ)"}),
            }
        }

    def load(self, vae, precision, latent_family):
        from pyramid_core.loading import load_components, precision_settings

        if vae == NO_VAE:
            raise FileNotFoundError(
                f"no VAE installed: put pyramid_flow_vae_bf16.safetensors (Kijai/pyramid-flow-comfy) in "
                f"{_where(host.VAE_FOLDER)}, then refresh"
            )
        path = host.full_path(host.VAE_FOLDER, vae)
        if path is None:
            raise FileNotFoundError(
                f"VAE {vae!r} not found. Put pyramid_flow_vae_bf16.safetensors (Kijai/pyramid-flow-comfy) in "
                f"{_where(host.VAE_FOLDER)}, then refresh the node list"
            )
        if latent_family not in FAMILY_CHOICES:
            raise ValueError(f"latent_family must be one of {', '.join(FAMILY_CHOICES)}, got {latent_family!r}")
        compute = precision_settings(precision)[0]
        parts = load_components(path, dtype=compute, components=("vae",), operations=comfy_layers(compute))
        dtype = parts.dtypes.vae
        result = PyramidFlowVAE(ManagedModel.wrap(parts.vae.model, dtype, *host.vae_devices()), FAMILY_CHOICES[latent_family],
                                dtype)
        preview.remember(result)
        return (result,)
