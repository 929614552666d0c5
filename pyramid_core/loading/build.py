"""Building models on the meta device and filling them from a checkpoint one tensor at a time, cast per tensor
(peak host memory stays near one copy of the model in the target dtype); writing single files."""
from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..settings import torch_dtype_name
from .checkpoint import CheckpointError, CheckpointReader
from .configs import family_spec

__all__ = ["LoadedModel", "as_dtype", "build_and_fill", "fill_meta_model", "model_class", "save_single_file"]

# Deprecated diffusers attention names that older VAE checkpoints may use (FACTS 1.5).
_VAE_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)(\.(?:weight|bias))$")


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or a name (`"bf16"`, `"float16"`, `"fp8"`, ...); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, torch_dtype_name(str(dtype)))
    except ValueError as exc:
        raise CheckpointError(f"{exc} (or a torch.dtype)") from None


def model_class(family: str) -> type[nn.Module]:
    """The pyramid_core model class for a family (imported lazily)."""
    module_name, class_name = family_spec(family).model
    return getattr(importlib.import_module(module_name), class_name)


def _build_on_meta(family: str, config: Mapping[str, Any], source: object, operations: type | None = None) -> nn.Module:
    cls = model_class(family)
    layers = {} if operations is None else {"operations": operations}  # None: the model's own (torch) layers
    try:
        with torch.device("meta"):
            return cls(**config, **layers)
    except (TypeError, ValueError, AssertionError) as exc:
        raise CheckpointError(f"cannot build {cls.__name__} from the config of {source}: {exc}") from exc


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _legacy_vae_name(key: str) -> str:
    match = _LEGACY_ATTENTION_KEY.match(key)
    if match is None:
        return key
    return match.group(1) + _VAE_LEGACY_ATTENTION[match.group(2)] + match.group(3)


def _target_tensors(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """state-dict name -> (owning module, attribute name, is_parameter)."""
    targets: dict[str, tuple[nn.Module, str, bool]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for name, param in module._parameters.items():
            if param is not None:
                targets[prefix + name] = (module, name, True)
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                targets[prefix + name] = (module, name, False)
    return targets


def _target_dtype(stored: torch.dtype, dtype: torch.dtype | None, keep_float8: bool) -> torch.dtype:
    """`dtype` for floating tensors (float8 ones stay as stored with `keep_float8`); anything else as stored."""
    cast = dtype is not None and stored.is_floating_point and not (keep_float8 and "float8" in str(stored))
    return dtype if cast else stored


def _read_converted(
    reader: CheckpointReader, key: str, dtype: torch.dtype | None, device: torch.device, keep_float8: bool = False
) -> torch.Tensor:
    """One checkpoint tensor in its target dtype on `device`, in memory of its own."""
    stored = reader.dtype(key)
    target = _target_dtype(stored, dtype, keep_float8)
    if device.type == "cpu" or target.itemsize <= stored.itemsize:
        return reader.get_tensor(key, target).to(device=device)  # narrow before moving: less to transfer
    return reader.get_tensor(key).to(device=device).to(dtype=target)  # widen after moving


def _match_keys(
    model: nn.Module, reader: CheckpointReader, ignore: Iterable[str], rename: Mapping[str, str]
) -> tuple[dict[str, tuple[nn.Module, str, bool]], dict[str, str], list[str]]:
    """(model targets, model name -> file key, file keys the model does not take and `ignore` does not list)."""
    targets = _target_tensors(model)
    file_for_model: dict[str, str] = {}
    unexpected: list[str] = []
    ignored = set(ignore)
    for key in reader.keys():
        name = rename.get(key, key)
        if name in targets:
            file_for_model[name] = key
        elif key not in ignored:
            unexpected.append(key)
    return targets, file_for_model, unexpected


def fill_meta_model(
    model: nn.Module,
    reader: CheckpointReader,
    *,
    dtype: torch.dtype | str | None = torch.bfloat16,
    device: str | torch.device = "cpu",
    strict: bool = True,
    ignore: Iterable[str] = (),
    rename: Mapping[str, str] | None = None,
    description: str = "model",
    keep_float8: bool = False,
) -> nn.Module:
    """Replace every parameter/buffer of a (meta-device) model by the checkpoint's tensor, cast per tensor.

    `dtype=None` keeps stored dtypes; floating tensors only are cast; `keep_float8` leaves float8 tensors as
    stored. `ignore` lists file keys to drop when the model lacks them; `rename` maps file key -> model key.
    Strict: missing, unexpected and mis-shaped keys are reported together. Parameters end with
    requires_grad=False; an error is raised if anything stays on meta.
    """
    dtype = as_dtype(dtype)
    device = torch.device(device)
    targets, file_for_model, unexpected = _match_keys(model, reader, ignore, dict(rename or {}))
    missing = [name for name in targets if name not in file_for_model]
    wrong_shape = []
    for name, key in file_for_model.items():
        module, attr, is_param = targets[name]
        expected = tuple((module._parameters if is_param else module._buffers)[attr].shape)
        if tuple(reader.shape(key)) != expected:
            wrong_shape.append(f"{key}: file {tuple(reader.shape(key))} vs model {expected}")
    if (strict and (missing or unexpected)) or wrong_shape:
        lines = [f"{reader.source} does not match the {description}:"]
        if missing:
            lines.append(f"  missing in the file ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected in the file ({len(unexpected)}): {_listing(unexpected)}")
        if wrong_shape:
            lines.append(f"  wrong shape ({len(wrong_shape)}): {_listing(wrong_shape, 6)}")
        lines.append("Check that the file is the right model/variant and that its config matches its tensors.")
        raise CheckpointError("\n".join(lines))

    for name, key in file_for_model.items():
        module, attr, is_param = targets[name]
        value = _read_converted(reader, key, dtype, device, keep_float8)
        if is_param:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value

    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(
            f"{description} from {reader.source}: still on the meta device after loading (not in the file, or "
            f"non-persistent buffers the loader cannot fill): {_listing(left)}"
        )
    model.requires_grad_(False)
    return model.eval()


@dataclass
class LoadedModel:
    """A loaded model plus where it came from."""

    model: nn.Module
    family: str  # "flux" | "mmdit" | "vae"
    variant: str | None  # DiT variant label; None for the VAE
    config: dict[str, Any]  # constructor kwargs used (config + the official pipeline's own values)
    source: Path  # weights file (or shard index) the tensors came from
    source_dtypes: set[torch.dtype] = field(default_factory=set)


def build_and_fill(
    reader: CheckpointReader,
    family: str,
    config: dict[str, Any],
    *,
    variant: str | None,
    dtype: torch.dtype | str | None,
    device: str | torch.device,
    strict: bool,
    keep_float8: bool = False,
    operations: type | None = None,
) -> LoadedModel:
    """Build the family's model from `config` on the meta device and fill it from `reader`.

    `operations`: the layer classes to build from (`pyramid_core.models.operations`; None: torch's)."""
    spec = family_spec(family)
    model = _build_on_meta(family, config, reader.source, operations)
    rename = None
    if family == "vae":
        rename = {k: _legacy_vae_name(k) for k in reader.keys() if _legacy_vae_name(k) != k}
    fill_meta_model(
        model, reader, dtype=dtype, device=device, strict=strict, ignore=spec.ignorable_keys, rename=rename,
        description=f"{spec.title} ({type(model).__name__})", keep_float8=keep_float8,
    )
    return LoadedModel(model, family, variant, config, reader.source, reader.dtypes())


def save_single_file(
    model_or_state_dict: nn.Module | LoadedModel | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a single `.safetensors` file with the official key names (no prefix), like Kijai's repacks.

    `dtype` casts floating tensors (e.g. bf16 or float8_e4m3fn); `config` is embedded as JSON metadata so
    `derive_config` reads it back (a `LoadedModel` embeds its own config unless one is given).
    """
    from safetensors.torch import save_file

    if isinstance(model_or_state_dict, LoadedModel):
        config = model_or_state_dict.config if config is None else config
        model_or_state_dict = model_or_state_dict.model
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    dtype = as_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in state.items():
        if tensor.is_meta:
            raise CheckpointError(f"cannot save {name!r}: it is on the meta device (load the weights first)")
        out = tensor.detach().to("cpu")
        if dtype is not None and out.is_floating_point():
            out = out.to(dtype)
        out = out.contiguous()
        # safetensors refuses tensors that share memory (tied weights): give each its own copy.
        ptr = out.untyped_storage().data_ptr()
        if ptr in seen_storage:
            out = out.clone()
        seen_storage.add(ptr)
        tensors[name] = out
    metadata = {"format": "pt"}
    if config is not None:
        metadata["config"] = json.dumps(dict(config), sort_keys=True)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path
