"""The one place that touches ComfyUI (`comfy.*`, `folder_paths`, `latent_preview`, `comfy_api`).

Every other module calls the functions here. Without ComfyUI (tests, the command line, a plain
Python session) each function falls back to a small standalone equivalent, so the nodes import
and run anywhere. `bind()` (re)reads the environment; tests call it after installing a double.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from pyramid_core.models.operations import conv3d_onednn, mixed_precision_linear

MODEL_FOLDER = "pyramidflow"  # models/pyramidflow: official Hugging Face folders
DIFFUSION_MODELS = "diffusion_models"  # single-file DiTs (Kijai's repacks)
VAE_FOLDER = "vae"  # single-file VAEs
MODEL_EXTENSIONS = {".safetensors", ".sft", ".bin", ".pt", ".pth", ".ckpt", ".json"}
STANDALONE_MODELS_ENV = "PYRAMID_FLOW_MODELS_DIR"  # standalone: where models/ lives (default ./models)
STANDALONE_OUTPUT_ENV = "PYRAMID_FLOW_OUTPUT_DIR"  # standalone: where videos go (default ./output)

MINIMUM_COMFYUI = "0.1 (August 2024)"  # the oldest ComfyUI with every call `REQUIRED` names
REQUIRED = {  # module -> attributes the pack cannot run without (each newer call has a fallback below)
    "comfy.model_management": ("load_models_gpu", "free_memory", "get_torch_device", "current_loaded_models"),
    "comfy.model_patcher": ("ModelPatcher",),
    "comfy.ops": ("disable_weight_init", "manual_cast", "cast_bias_weight"),
}

HAVE_COMFY = False
MISSING: list[str] = []  # REQUIRED calls this ComfyUI lacks (reported at first use by `require`)
_mm: Any = None  # comfy.model_management
_patcher_mod: Any = None  # comfy.model_patcher
_ops: Any = None  # comfy.ops
_utils: Any = None  # comfy.utils
_args: Any = None  # comfy.cli_args.args
_preview_none: Any = None  # comfy.cli_args.LatentPreviewMethod.NoPreviews
_folder_paths: Any = None
_latent_preview: Any = None
_video_api: Any = None  # comfy_api.latest (InputImpl, Types), absent on ComfyUI before mid-2025


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def bind() -> bool:
    """Import ComfyUI's modules if they are importable; returns whether ComfyUI is present."""
    global HAVE_COMFY, _mm, _patcher_mod, _utils, _args, _preview_none, _folder_paths, _latent_preview, _video_api
    global _ops, MISSING
    mm = _optional("comfy.model_management")
    patcher = _optional("comfy.model_patcher")
    folder_paths = _optional("folder_paths")
    if mm is None or patcher is None or folder_paths is None:
        HAVE_COMFY, _mm, _patcher_mod, _utils, _args, _preview_none = False, None, None, None, None, None
        _folder_paths = _latent_preview = _video_api = _ops = None
        MISSING = []
        return False
    HAVE_COMFY = True
    _ops = _optional("comfy.ops")
    modules = {"comfy.model_management": mm, "comfy.model_patcher": patcher, "comfy.ops": _ops}
    MISSING = [f"{name}.{attr}" for name, attrs in REQUIRED.items() for attr in attrs
               if not hasattr(modules[name], attr)]
    _mm, _patcher_mod, _folder_paths = mm, patcher, folder_paths
    _utils = _optional("comfy.utils")
    cli_args = _optional("comfy.cli_args")
    _args = getattr(cli_args, "args", None)
    _preview_none = getattr(getattr(cli_args, "LatentPreviewMethod", None), "NoPreviews", None)
    _latent_preview = _optional("latent_preview")
    _video_api = _optional("comfy_api.latest")
    register_model_folders()
    return True


# ----------------------------------------------------------------------------------------- devices


def _standalone_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def torch_device() -> torch.device:
    """Where models compute."""
    return _mm.get_torch_device() if HAVE_COMFY else _standalone_device()


def dit_offload_device() -> torch.device:
    return _mm.unet_offload_device() if HAVE_COMFY else torch.device("cpu")


def vae_devices() -> tuple[torch.device, torch.device]:
    """(load device, offload device) for VAEs."""
    if HAVE_COMFY:
        return _mm.vae_device(), _mm.vae_offload_device()
    return _standalone_device(), torch.device("cpu")


def text_encoder_devices() -> tuple[torch.device, torch.device]:
    """(load device, offload device) for text encoders."""
    if HAVE_COMFY:
        return _mm.text_encoder_device(), _mm.text_encoder_offload_device()
    return _standalone_device(), torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where node outputs (IMAGE, LATENT) live."""
    return _mm.intermediate_device() if HAVE_COMFY else torch.device("cpu")


def total_memory(device: torch.device) -> int:
    """Bytes of memory on `device` (0 when unknown)."""
    if HAVE_COMFY:
        return int(_mm.get_total_memory(device))
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return 0


# ------------------------------------------------------------------------------- model management


def require() -> None:
    """Raise one clear error when this ComfyUI lacks a call the pack needs (instead of an AttributeError)."""
    if MISSING:
        raise RuntimeError(
            f"ComfyUI-PyramidFlow needs ComfyUI {MINIMUM_COMFYUI} or newer; this ComfyUI lacks "
            f"{', '.join(MISSING)}. Update ComfyUI (git pull, or the Manager's 'Update ComfyUI')."
        )


class StandalonePatcher:
    """Without ComfyUI: the subset of `ModelPatcher` the nodes use (the model stays where it was loaded)."""

    def __init__(self, model: nn.Module, load_device: torch.device, offload_device: torch.device, size: int = 0):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.size = size or sum(t.nbytes for t in model.state_dict().values())

    def model_size(self) -> int:
        return self.size

    def detach(self, unpatch_all: bool = True) -> nn.Module:
        return self.model


def patcher_class() -> Any:
    """The patcher ComfyUI wraps its own models in: `CoreModelPatcher` (dynamic VRAM where it is on; read at
    use time, since ComfyUI's start-up rebinds it), else `ModelPatcher` on versions before it existed."""
    return getattr(_patcher_mod, "CoreModelPatcher", None) or _patcher_mod.ModelPatcher


def make_patcher(module: nn.Module, load_device: torch.device, offload_device: torch.device) -> Any:
    """Wrap a module so ComfyUI's model management owns its placement (size = its state dict bytes)."""
    size = sum(t.nbytes for t in module.state_dict().values())
    if HAVE_COMFY:
        require()
        return patcher_class()(module, load_device=load_device, offload_device=offload_device, size=size)
    return StandalonePatcher(module, load_device, offload_device, size)


def load_models(patchers: list[Any], memory_required: int = 0, force_full_load: bool = False) -> None:
    """Have ComfyUI put models on their load device: it evicts other models until the weights plus
    `memory_required` fit, and loads partially (comfy.ops layers) what does not; `force_full_load`: whole."""
    if not HAVE_COMFY:
        return  # standalone: models stay on the host they were loaded to
    require()
    load = _mm.load_models_gpu
    if _takes(load, "force_full_load"):
        load(patchers, memory_required=memory_required, force_full_load=force_full_load)
    else:  # before 2024-08: no such argument (and no partial loading of custom layers to refuse)
        load(patchers, memory_required=memory_required)


def unload_model(patcher: Any) -> None:
    """Move one model back to its offload device and out of ComfyUI's loaded list."""
    if not HAVE_COMFY:
        patcher.detach()
        return
    unload = getattr(_mm, "unload_model_and_clones", None)
    if unload is not None:
        unload(patcher)
        return
    for loaded in list(_mm.current_loaded_models):  # versions without it: the loaded entry of this patcher
        if loaded.model is patcher:
            loaded.model_unload()
            _mm.current_loaded_models.remove(loaded)


def free_memory(memory_required: int, device: torch.device) -> None:
    """Ask ComfyUI to unload other models until `memory_required` bytes are free on `device`."""
    if HAVE_COMFY and device.type != "cpu":
        _mm.free_memory(memory_required, device)


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory ComfyUI counts as free on `device` (torch's reserved-but-unused cache included); None on a CPU."""
    if device.type == "cpu":
        return None
    if HAVE_COMFY:
        return int(_mm.get_free_memory(device))
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return None


def soft_empty_cache() -> None:
    if HAVE_COMFY:
        _mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- layers (comfy.ops)


def operations(weight_dtype: torch.dtype, compute_dtype: torch.dtype, load_device: torch.device) -> type | None:
    """The layer classes a model is built from inside ComfyUI: `comfy.ops` as ComfyUI picks them for these
    dtypes (so its loader can partially load, cast and, with dynamic VRAM, fault weights in), with
    pyramid_core's call semantics; None without ComfyUI (pyramid_core's own torch layers)."""
    if not HAVE_COMFY:
        return None
    require()
    pick = getattr(_ops, "pick_operations", None)
    if pick is not None:
        base = pick(weight_dtype, compute_dtype, load_device=load_device)
    else:  # before 2024-08
        base = _ops.disable_weight_init if weight_dtype == compute_dtype else _ops.manual_cast
    return _layer_classes(base, compute_dtype)


@functools.lru_cache(maxsize=32)
def _takes(function: Any, keyword: str) -> bool:
    """Whether a ComfyUI function has a parameter (read once per function: the weight cast runs on every call)."""
    return keyword in inspect.signature(function).parameters


@contextlib.contextmanager
def cast_weights(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, Any]]:
    """(weight, bias) of a comfy.ops layer on x's device in `dtype`, for one call, as this ComfyUI casts them:
    `CastBiasWeightContext` (2026), `cast_bias_weight(offloadable=True)` + `uncast_bias_weight` (2025), or the
    plain two-value `cast_bias_weight` (older)."""
    context = getattr(_ops, "CastBiasWeightContext", None)
    if context is not None:
        with context(layer, x, dtype=dtype, offloadable=True) as (weight, bias):
            yield weight, bias
        return
    if _takes(_ops.cast_bias_weight, "offloadable"):
        weight, bias, stream = _ops.cast_bias_weight(layer, x, dtype=dtype, offloadable=True)
        try:
            yield weight, bias
        finally:
            _ops.uncast_bias_weight(layer, weight, bias, stream)
        return
    weight, bias = _ops.cast_bias_weight(layer, x, dtype=dtype)
    yield weight, bias


@functools.lru_cache(maxsize=None)
def _layer_classes(base: type, compute_dtype: torch.dtype) -> type:
    """pyramid_core's layers on ComfyUI's: `base` (a comfy.ops namespace) owns casting and offloading, ours the
    numerics (Linear: activations wider than the weights, `mixed_precision_linear`; Conv3d: oneDNN on CPU).
    Built once per (base, compute dtype)."""

    class Linear(base.Linear):
        # torch's own loader: ComfyUI's lazy (weightless) construction is for layers ComfyUI loads itself
        _load_from_state_dict = nn.Linear._load_from_state_dict

        def forward_comfy_cast_weights(self, x: torch.Tensor) -> torch.Tensor:
            with cast_weights(self, x, compute_dtype) as (weight, bias):
                return mixed_precision_linear(x, weight, bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.comfy_cast_weights or self.weight_function or self.bias_function:
                return super().forward(x)  # ComfyUI's: its per-op hook, then the cast above
            return mixed_precision_linear(x, self.weight, self.bias)

    class Conv3d(base.Conv3d):
        _load_from_state_dict = nn.Conv3d._load_from_state_dict

        def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = conv3d_onednn(self, x, weight, bias)
            return out if out is not None else super()._conv_forward(x, weight, bias, *args, **kwargs)

    class Conv2d(base.Conv2d):
        _load_from_state_dict = nn.Conv2d._load_from_state_dict

    return type(f"PyramidFlow_{getattr(base, '__name__', 'ops')}", (), {
        "Linear": Linear, "Conv3d": Conv3d, "Conv2d": Conv2d, "base": base, "compute_dtype": compute_dtype,
    })


# ------------------------------------------------------------------------ progress, cancel, preview


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (no-op standalone)."""
    if HAVE_COMFY:
        _mm.throw_exception_if_processing_interrupted()


class _SilentProgress:
    def __init__(self, total: int):
        self.total, self.current = total, 0

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        self.current = value


def progress_bar(total: int) -> Any:
    """A progress bar with `update_absolute(value, total=None, preview=None)`."""
    if HAVE_COMFY and _utils is not None:
        return _utils.ProgressBar(total)
    return _SilentProgress(total)


def previews_enabled() -> bool:
    """Whether the user asked for sampling previews (`--preview-method` or the UI setting)."""
    if not HAVE_COMFY or _args is None:
        return False
    method = getattr(_args, "preview_method", None)
    return method is not None and method != _preview_none and str(getattr(method, "value", method)) != "none"


def preview_payload(image: Any) -> Any:
    """A PIL image in the form ComfyUI's progress hook sends to the browser."""
    max_size = getattr(_latent_preview, "MAX_PREVIEW_RESOLUTION", 512) if _latent_preview else 512
    return ("JPEG", image, max_size)


# --------------------------------------------------------------------------------------- folders


def _standalone_models_dir() -> Path:
    return Path(os.environ.get(STANDALONE_MODELS_ENV, "models")).expanduser()


def register_model_folders() -> None:
    """Make `models/pyramidflow` a ComfyUI model folder (extra_model_paths.yaml entries are kept)."""
    if not HAVE_COMFY:
        return
    fp = _folder_paths
    fp.add_model_folder_path(MODEL_FOLDER, os.path.join(fp.models_dir, MODEL_FOLDER))
    paths, extensions = fp.folder_names_and_paths[MODEL_FOLDER]
    fp.folder_names_and_paths[MODEL_FOLDER] = (paths, set(extensions) | MODEL_EXTENSIONS)


def folder_paths_for(kind: str) -> list[Path]:
    """Every folder configured for a model kind (`pyramidflow`, `diffusion_models`, `vae`)."""
    if HAVE_COMFY:
        try:
            return [Path(p) for p in _folder_paths.get_folder_paths(kind)]
        except KeyError:
            return []
    return [_standalone_models_dir() / kind]


def list_files(kind: str) -> list[str]:
    """Model files of a kind, as relative names (ComfyUI's own listing when present)."""
    if HAVE_COMFY:
        try:
            return list(_folder_paths.get_filename_list(kind))
        except KeyError:
            return []
    names = []
    for folder in folder_paths_for(kind):
        if folder.is_dir():
            names += [str(p.relative_to(folder)) for p in sorted(folder.rglob("*"))
                      if p.is_file() and p.suffix.lower() in MODEL_EXTENSIONS - {".json"}]
    return names


def full_path(kind: str, name: str) -> Path | None:
    if HAVE_COMFY:
        found = _folder_paths.get_full_path(kind, name)
        return Path(found) if found else None
    for folder in folder_paths_for(kind):
        if (folder / name).exists():
            return folder / name
    return None


def output_directory() -> Path:
    if HAVE_COMFY:
        return Path(_folder_paths.get_output_directory())
    return Path(os.environ.get(STANDALONE_OUTPUT_ENV, "output")).expanduser()


def save_path(prefix: str, width: int, height: int) -> tuple[Path, str, int, str]:
    """(folder, file name stem, counter, subfolder) for a new output file, ComfyUI's numbering."""
    out = output_directory()
    if HAVE_COMFY:
        folder, stem, counter, subfolder, _ = _folder_paths.get_save_image_path(prefix, str(out), width, height)
        return Path(folder), stem, counter, subfolder
    subfolder, stem = os.path.split(os.path.normpath(prefix))
    folder = out / subfolder
    if not folder.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"filename_prefix {prefix!r} points outside the output folder {out}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder, stem, 1, subfolder


# ------------------------------------------------------------------------------------------ video


def native_video(images: torch.Tensor, fps: float) -> Any:
    """ComfyUI's VIDEO object for IMAGE frames, or None where this ComfyUI has no VIDEO type."""
    api = _video_api
    if api is None or not hasattr(api, "InputImpl") or not hasattr(api, "Types"):
        return None
    components = api.Types.VideoComponents(images=images, frame_rate=Fraction(fps).limit_denominator(1000))
    return api.InputImpl.VideoFromComponents(components)


# --------------------------------------------------------------------------------------- metadata


def metadata_enabled() -> bool:
    """Whether saved files may carry the prompt and workflow: not under `--disable-metadata` (standalone: yes)."""
    return not (HAVE_COMFY and bool(getattr(_args, "disable_metadata", False)))


bind()
