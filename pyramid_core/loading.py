"""Checkpoint loading for Pyramid Flow: official folders, Kijai-style single files, sharded and `.bin` files.

Models are built on the meta device and filled one tensor at a time, cast per tensor, so peak host memory
stays near one copy of the model in the target dtype. Every tensor handed out lives in its own fresh CPU
allocation (64-byte aligned by torch's allocator), never in a view of a file's memory mapping: such views
start at arbitrary addresses, and CPU kernels may sum in another order on unaligned data (last-ulp
differences seen on AMD CPUs), so a run on mapped weights need not match the same weights copied anywhere.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

__all__ = [
    "DIT_VARIANTS",
    "VARIANT_ALIASES",
    "DEFAULT_VARIANT",
    "CheckpointError",
    "CheckpointReader",
    "LoadedModel",
    "ModelFolder",
    "derive_config",
    "detect_family",
    "fill_meta_model",
    "load_dit",
    "load_vae",
    "loader_extras",
    "model_class",
    "open_checkpoint",
    "resolve_model_folder",
    "resolve_variant",
    "save_single_file",
]

DIT_VARIANTS = ("diffusion_transformer_384p", "diffusion_transformer_768p", "diffusion_transformer_image")
VARIANT_ALIASES = {"384p": DIT_VARIANTS[0], "768p": DIT_VARIANTS[1], "image": DIT_VARIANTS[2]}
DEFAULT_VARIANT = DIT_VARIANTS[0]
VAE_FOLDER = "causal_video_vae"
FAMILIES = ("flux", "mmdit", "vae")
FAMILY_NAMES = {"flux": "miniFLUX DiT", "mmdit": "SD3-style MMDiT DiT", "vae": "causal video VAE"}
DIT_CLASS_NAMES = {"PyramidFluxTransformer": "flux", "PyramidDiffusionMMDiT": "mmdit"}
VAE_CLASS_NAME = "CausalVideoVAE"

# Weight file names a component folder may hold, in order of preference.
SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
BIN_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
_STAGING_BYTES = 16 * 2**20  # chunk size of a cast while reading (the extra host memory of a cast load)

# Official config.json values (FACTS 1.4); shape-derived keys overwrite them for single files.
OFFICIAL_FLUX_CONFIG: dict[str, Any] = {
    "attention_head_dim": 64,
    "axes_dims_rope": [16, 24, 24],
    "in_channels": 64,
    "interp_condition_pos": True,
    "joint_attention_dim": 4096,
    "num_attention_heads": 30,
    "num_layers": 8,
    "num_single_layers": 16,
    "patch_size": 1,
    "pooled_projection_dim": 768,
    "use_flash_attn": False,
    "use_gradient_checkpointing": False,
    "use_temporal_causal": True,
}
OFFICIAL_MMDIT_CONFIG: dict[str, Any] = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "max_num_frames": 200,
    "num_attention_heads": 24,
    "num_layers": 24,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "pos_embed_type": "sincos",
    "qk_norm": "rms_norm",
    "sample_size": 128,
    "use_flash_attn": False,
    "use_gradient_checkpointing": False,
    "use_temporal_causal": True,
}
OFFICIAL_VAE_CONFIG: dict[str, Any] = {
    "add_post_quant_conv": True,
    "decoder_act_fn": "silu",
    "decoder_block_dropout": [0.0, 0.0, 0.0, 0.0],
    "decoder_block_out_channels": [128, 256, 512, 512],
    "decoder_in_channels": 16,
    "decoder_layers_per_block": [3, 3, 3, 3],
    "decoder_norm_num_groups": 32,
    "decoder_out_channels": 3,
    "decoder_spatial_up_sample": [True, True, True, False],
    "decoder_temporal_up_sample": [True, True, True, False],
    "decoder_type": "causal_vae_conv",
    "decoder_up_block_types": ["UpDecoderBlockCausal3D"] * 4,
    "downsample_scale": 8,
    "encoder_act_fn": "silu",
    "encoder_block_dropout": [0.0, 0.0, 0.0, 0.0],
    "encoder_block_out_channels": [128, 256, 512, 512],
    "encoder_double_z": True,
    "encoder_down_block_types": ["DownEncoderBlockCausal3D"] * 4,
    "encoder_in_channels": 3,
    "encoder_layers_per_block": [2, 2, 2, 2],
    "encoder_norm_num_groups": 32,
    "encoder_out_channels": 16,
    "encoder_spatial_down_sample": [True, True, True, False],
    "encoder_temporal_down_sample": [True, True, True, False],
    "encoder_type": "causal_vae_conv",
    "interpolate": False,
    "sample_size": 256,
    "scaling_factor": 0.13025,
}

# Constructor arguments the official pipeline passes that are not in config.json (FACTS 1.4).
_LOADER_EXTRAS: dict[str, dict[str, Any]] = {
    "flux": {
        "axes_dims_rope": [16, 24, 24],
        "interp_condition_pos": True,
        "use_temporal_causal": True,
        "use_flash_attn": False,
        "use_gradient_checkpointing": False,
    },
    "mmdit": {
        "use_t5_mask": True,
        "add_temp_pos_embed": True,
        "temp_pos_embed_type": "rope",
        "use_temporal_causal": True,
        "interp_condition_pos": True,
        "use_flash_attn": False,
        "use_gradient_checkpointing": False,
    },
    "vae": {"interpolate": False},
}

# File keys that are dropped when the model has no such tensor (FACTS 1.5).
_IGNORABLE_KEYS = {"mmdit": ("pos_embed.temp_pos_embed",), "flux": (), "vae": ()}

# Deprecated diffusers attention names that older VAE checkpoints may use (FACTS 1.5).
_VAE_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_MODEL_CLASSES = {
    "flux": ("pyramid_core.models.flux", "PyramidFluxTransformer"),
    "mmdit": ("pyramid_core.models.mmdit", "PyramidMMDiT"),
    "vae": ("pyramid_core.models.vae", "CausalVideoVAE"),
}


class CheckpointError(ValueError):
    """A checkpoint file or folder cannot be used; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# dtypes


def _float8_supported() -> bool:
    """Whether this torch has the float8 dtypes (added in torch 2.1)."""
    return hasattr(torch, "float8_e4m3fn") and hasattr(torch, "float8_e5m2")


_SAFETENSORS_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_FLOAT8_CODES = ("F8_E4M3", "F8_E5M2")

_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3fn": "float8_e4m3fn",
    "float8_e4m3fn": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "float8_e5m2": "float8_e5m2",
}


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).lower().removeprefix("torch."))
    if name is None or not hasattr(torch, name):
        raise CheckpointError(f"unknown dtype {dtype!r}; use a torch.dtype or one of {sorted(_DTYPE_ALIASES)}")
    return getattr(torch, name)


@lru_cache(maxsize=None)
def _itemsize(dtype: torch.dtype) -> int:
    # torch.dtype.itemsize only exists from torch 2.1; this works on older versions too.
    return torch.empty((), dtype=dtype).element_size()


def _float8_missing_error(path: Path, codes: Iterable[str]) -> CheckpointError:
    return CheckpointError(
        f"{path} stores float8 tensors ({', '.join(sorted(set(codes)))}), but torch {torch.__version__} has no "
        "float8 dtypes; float8 checkpoints need torch 2.1 or newer (upgrade torch, or use a bf16/fp32 file)"
    )


# --------------------------------------------------------------------------------------------
# per-file backends


class _SafetensorsFile:
    """One safetensors file: header parsed and validated up front, each tensor read on request into its own
    fresh allocation (plain file reads: no memory mapping stays resident, nothing aliases the file)."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.metadata: dict[str, str] = {}
        self._offsets: dict[str, int] = {}  # absolute file offset of each tensor's bytes
        self._handle = None
        self._staging: torch.Tensor | None = None  # bytes read before a cast, reused tensor after tensor
        self._parse_header()

    def _fail(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a usable safetensors file: {why}")

    def _parse_header(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._fail(f"truncated (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            first = f.read(1)
            if header_len > _MAX_HEADER_BYTES or first not in (b"{", b""):
                if _looks_like_torch_file(head + first):
                    raise self._fail("it is a PyTorch pickle/zip checkpoint; rename it to .bin so it is read as one")
                raise self._fail("not a safetensors file (no JSON header at the start)")
            if 8 + header_len > size:
                raise self._fail(f"truncated inside its header ({size} bytes, header needs {8 + header_len})")
            raw = first + f.read(header_len - 1)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._fail(f"not a safetensors file (header is not JSON: {exc})") from None
        if not isinstance(header, dict):
            raise self._fail("not a safetensors file (header is not a JSON object)")
        self.metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        data_size = size - 8 - header_len
        float8 = []
        for name, info in header.items():
            try:
                code, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"header entry {name!r} is malformed") from None
            if code in _FLOAT8_CODES and not _float8_supported():
                float8.append(code)
                continue
            dtype_name = _SAFETENSORS_DTYPE_NAMES.get(code)
            if dtype_name is None or not hasattr(torch, dtype_name):
                raise self._fail(f"tensor {name!r} has dtype {code}, which this torch {torch.__version__} cannot hold")
            dtype = getattr(torch, dtype_name)
            if end > data_size:
                raise self._fail(
                    f"truncated: tensor {name!r} ends at byte {end} of the data but the file holds {data_size} "
                    "(re-download or re-save the file)"
                )
            if end - begin != math.prod(shape) * _itemsize(dtype):
                raise self._fail(f"header entry {name!r} has a byte range that does not match its shape and dtype")
            self.entries[name] = (shape, dtype)
            self._offsets[name] = 8 + header_len + begin
        if float8:
            raise _float8_missing_error(self.path, float8)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in `dtype` (default: stored), read straight into a fresh allocation; a cast goes through a
        small reused staging buffer, so no full-size copy in the stored dtype is ever made."""
        shape, stored = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype or stored)  # torch's CPU allocator: 64-byte aligned
        if tensor.numel() == 0:
            return tensor
        if self._handle is None:
            self._handle = open(self.path, "rb", buffering=0)
        self._handle.seek(self._offsets[name])
        if tensor.dtype == stored:
            self._read_into(tensor.reshape(-1))
        else:
            self._read_cast_into(tensor.reshape(-1), stored)
        return tensor

    def _read_into(self, flat: torch.Tensor) -> None:
        _read_exactly(self._handle, flat.view(torch.uint8).numpy(), self.path)
        _from_little_endian(flat)

    def _read_cast_into(self, flat: torch.Tensor, stored: torch.dtype) -> None:
        """Read `flat.numel()` values stored as `stored` and cast them into `flat`, one staging chunk at a time."""
        if self._staging is None:  # one buffer for the whole file: its largest tensor, at most _STAGING_BYTES
            largest = max(math.prod(size) * _itemsize(kind) for size, kind in self.entries.values())
            self._staging = torch.empty(min(_STAGING_BYTES, largest), dtype=torch.uint8)
        step = self._staging.numel() // _itemsize(stored)
        for start in range(0, flat.numel(), step):
            count = min(step, flat.numel() - start)
            chunk = self._staging[: count * _itemsize(stored)].view(stored)
            self._read_into(chunk)
            flat[start : start + count].copy_(chunk)  # the same rounding as Tensor.to

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._staging = None


def _read_exactly(handle, buffer, path: Path) -> None:
    """Fill `buffer` (a writable byte array) from the file's current position; a short file is an error."""
    view = memoryview(buffer).cast("B")
    filled = 0
    while filled < len(view):
        count = handle.readinto(view[filled:])
        if not count:
            raise CheckpointError(f"{path} ended early while reading tensor data (re-download or re-save the file)")
        filled += count


def _from_little_endian(flat: torch.Tensor) -> None:
    """safetensors stores little-endian bytes; swap them in place (a 1-D tensor) on a big-endian host."""
    if sys.byteorder == "little" or flat.element_size() == 1:
        return
    raw = flat.view(torch.uint8).view(-1, flat.element_size())
    raw.copy_(raw.flip(1))


class _PickleFile:
    """A torch `.bin`/`.pt` file, opened with weights_only (never full unpickling) and memory-mapped; each tensor
    is handed out as its own copy (legacy non-zip files, read fully into memory, hand over aligned tensors)."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata: dict[str, str] = {}
        self._mapped = True
        state = self._load()
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if not self._tensors:
            raise CheckpointError(f"{path} holds no tensors (expected a state dict of name -> tensor)")
        self.entries = {k: (tuple(v.shape), v.dtype) for k, v in self._tensors.items()}

    def _load(self) -> Mapping[str, Any]:
        try:
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap can only be used" not in str(exc):
                    raise
                # Legacy (non-zip) torch.save format: mmap is impossible, weights_only still applies.
                obj = torch.load(self.path, map_location="cpu", weights_only=True)
                self._mapped = False
        except pickle.UnpicklingError as exc:
            if "weights only" in str(exc).lower():
                raise CheckpointError(
                    f"{self.path} contains Python code/objects besides tensors, and loading it would execute "
                    "arbitrary code; it is refused. Convert it to .safetensors with a tool you trust "
                    "(or re-save just its state dict)"
                ) from None
            raise CheckpointError(f"{self.path} is truncated or not a PyTorch checkpoint ({exc})") from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise CheckpointError(f"{self.path} is truncated or not a PyTorch checkpoint ({exc})") from None
        if isinstance(obj, Mapping):
            for wrapper in ("state_dict", "model"):
                inner = obj.get(wrapper)
                if isinstance(inner, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                    obj = inner
                    break
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{self.path} holds a {type(obj).__name__}, not a state dict of name -> tensor")
        return obj

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in `dtype` (default: stored) in its own memory: a cast or a copy, never a view of the file."""
        tensor = self._tensors[name]
        if dtype is not None and dtype != tensor.dtype:
            return tensor.to(dtype, memory_format=torch.contiguous_format)
        if not self._mapped and _owns_aligned_storage(tensor):
            return tensor  # already private memory: a copy would only raise the peak
        return tensor.clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        self._tensors = {}


def _owns_aligned_storage(tensor: torch.Tensor) -> bool:
    """The tensor is contiguous, starts 64-byte aligned and spans its whole storage."""
    storage = tensor.untyped_storage()
    return (
        tensor.is_contiguous()
        and tensor.data_ptr() % 64 == 0
        and tensor.storage_offset() == 0
        and storage.nbytes() == tensor.numel() * tensor.element_size()
    )


def _looks_like_torch_file(head: bytes) -> bool:
    """Zip (torch.save) or pickle magic, and no safetensors JSON header where one would start (byte 8)."""
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[8:9] != b"{")


def _open_file(path: Path) -> _SafetensorsFile | _PickleFile:
    suffix = path.suffix.lower()
    if suffix in _PICKLE_SUFFIXES:
        return _PickleFile(path)
    if suffix in _SAFETENSORS_SUFFIXES:
        return _SafetensorsFile(path)
    with open(path, "rb") as f:
        head = f.read(9)
    # Unknown extension: sniff the content.
    return _PickleFile(path) if _looks_like_torch_file(head) else _SafetensorsFile(path)


# --------------------------------------------------------------------------------------------
# CheckpointReader


class CheckpointReader:
    """Names, shapes and dtypes of a checkpoint (from headers only) and its tensors, one at a time.

    Use as a context manager or call `close()`; built by `open_checkpoint`.
    """

    def __init__(self, source: Path, files: list[_SafetensorsFile | _PickleFile], key_to_file: dict[str, int]):
        self.source = source
        self._files = files
        self._key_to_file = key_to_file
        self.files: tuple[Path, ...] = tuple(f.path for f in files)
        self.metadata: dict[str, str] = {}
        for f in files:
            self.metadata.update(f.metadata)

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files:
            f.close()

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def __iter__(self) -> Iterator[str]:
        return iter(self._key_to_file)

    def __len__(self) -> int:
        return len(self._key_to_file)

    def __contains__(self, key: object) -> bool:
        return key in self._key_to_file

    def _entry(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        try:
            return self._files[self._key_to_file[key]].entries[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in {self.source}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of one tensor, from the header (no data read)."""
        return self._entry(key)[0]

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of one tensor, from the header (no data read)."""
        return self._entry(key)[1]

    def dtypes(self) -> set[torch.dtype]:
        """The set of stored dtypes."""
        return {self.dtype(k) for k in self._key_to_file}

    def get_tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor in `dtype` (default: its stored dtype) on the CPU, in its own 64-byte aligned memory (never
        a view of the file); a cast is made while reading, without a full copy in the stored dtype."""
        self._entry(key)
        return self._files[self._key_to_file[key]].get(key, dtype)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs, read one at a time."""
        for key in self._key_to_file:
            yield key, self.get_tensor(key)

    def embedded_config(self) -> dict[str, Any] | None:
        """The JSON `config` entry of the safetensors metadata, if the file carries one."""
        raw = self.metadata.get("config")
        if raw is None:
            return None
        try:
            config = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{self.source}: embedded config metadata is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.source}: embedded config metadata is not a JSON object")
        return config


def _describe_dir(path: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:30]) + (f", ... ({len(names)} entries)" if len(names) > 30 else "") if names else "nothing"


def _open_index(index_path: Path) -> CheckpointReader:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid shard index (needs a 'weight_map'): {exc}") from None
    shard_names = list(dict.fromkeys(weight_map.values()))
    missing = [name for name in shard_names if not (index_path.parent / name).is_file()]
    if missing:
        raise CheckpointError(
            f"shard {missing[0]} listed in {index_path} is missing"
            + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else "")
            + "; download the complete folder"
        )
    files = [_open_file(index_path.parent / name) for name in shard_names]
    position = {name: i for i, name in enumerate(shard_names)}
    key_to_file = {}
    for key, shard in weight_map.items():
        i = position[shard]
        if key not in files[i].entries:
            raise CheckpointError(f"{index_path} says {key!r} is in shard {shard}, but that shard does not hold it")
        key_to_file[key] = i
    return CheckpointReader(index_path, files, key_to_file)


def _find_weights_in_dir(folder: Path) -> Path:
    for name in SAFETENSORS_NAMES:
        if (folder / name).is_file():
            return folder / name
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    preferred = [p for p in indexes if p.name in {n + ".index.json" for n in SAFETENSORS_NAMES}]
    if preferred or indexes:
        return (preferred or indexes)[0]
    singles = sorted(p for p in folder.iterdir() if p.suffix.lower() in _SAFETENSORS_SUFFIXES and p.is_file())
    if len(singles) == 1:
        return singles[0]
    for name in BIN_NAMES:
        if (folder / name).is_file():
            return folder / name
    bin_indexes = sorted(folder.glob("*.bin.index.json"))
    if bin_indexes:
        return bin_indexes[0]
    hint = ""
    if any((folder / v).is_dir() for v in (*DIT_VARIANTS, VAE_FOLDER)):
        hint = " This looks like a model root folder: use load_dit/load_vae, or point at one of its subfolders."
    raise CheckpointError(
        f"no weights found in {folder}: looked for {', '.join(SAFETENSORS_NAMES + BIN_NAMES)}, a "
        f"*.safetensors.index.json with its shards, or a single .safetensors file; found {_describe_dir(folder)}.{hint}"
    )


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """Open a checkpoint for reading: a `.safetensors` file, a `.bin` (weights_only), a shard index, or a folder
    holding one of those (diffusers / transformers layout)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        path = _find_weights_in_dir(path)
    if path.name.endswith(".index.json"):
        return _open_index(path)
    backend = _open_file(path)
    return CheckpointReader(path, [backend], {k: 0 for k in backend.entries})


# --------------------------------------------------------------------------------------------
# family detection and config derivation


def _keys_with_prefix(keys: Iterable[str], prefix: str) -> list[str]:
    return [k for k in keys if k.startswith(prefix)]


def detect_family(reader: CheckpointReader) -> str:
    """`"flux"`, `"mmdit"` or `"vae"` from the tensor names (and the MMDiT patch-embed shape)."""
    keys = reader.keys()
    if any(k.startswith(("encoder.conv_in.conv.", "decoder.conv_out.conv.", "post_quant_conv.conv.")) for k in keys):
        return "vae"
    if "x_embedder.weight" in reader or _keys_with_prefix(keys, "single_transformer_blocks."):
        return "flux"
    if "pos_embed.proj.weight" in reader and len(reader.shape("pos_embed.proj.weight")) == 4:
        return "mmdit"
    hint = ""
    if "shared.weight" in reader or _keys_with_prefix(keys, "encoder.block."):
        hint = " It looks like a T5 text encoder."
    elif _keys_with_prefix(keys, "text_model."):
        hint = " It looks like a CLIP text encoder."
    else:
        prefixed = [k for k in keys if re.search(r"(^|\.)(x_embedder|pos_embed\.proj|encoder\.conv_in\.conv)\.", k)]
        if prefixed:
            prefix = re.split(r"(x_embedder|pos_embed\.proj|encoder\.conv_in\.conv)\.", prefixed[0])[0]
            hint = f" Its keys carry the prefix {prefix!r}; re-save it without the prefix (save_single_file)."
    sample = ", ".join(keys[:5])
    raise CheckpointError(
        f"{reader.source} is not a Pyramid Flow DiT or VAE checkpoint (keys start with: {sample}).{hint}"
    )


def _count_indices(keys: Iterable[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if found and found != set(range(len(found))):
        raise CheckpointError(f"{prefix}N blocks are not numbered 0..{len(found) - 1}: {sorted(found)}")
    return len(found)


def _require(reader: CheckpointReader, key: str, family: str) -> tuple[int, ...]:
    if key not in reader:
        raise CheckpointError(
            f"{reader.source}: cannot derive the {FAMILY_NAMES[family]} config, tensor {key!r} is missing"
        )
    return reader.shape(key)


def _derive_flux(reader: CheckpointReader) -> dict[str, Any]:
    keys = reader.keys()
    hidden, in_channels = _require(reader, "x_embedder.weight", "flux")
    head_dim = _require(reader, "transformer_blocks.0.attn.norm_q.weight", "flux")[0] if (
        "transformer_blocks.0.attn.norm_q.weight" in reader
    ) else _require(reader, "single_transformer_blocks.0.attn.norm_q.weight", "flux")[0]
    if hidden % head_dim:
        raise CheckpointError(f"{reader.source}: hidden size {hidden} is not a multiple of head dim {head_dim}")
    config = dict(OFFICIAL_FLUX_CONFIG)
    config.update(
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        in_channels=in_channels,
        joint_attention_dim=_require(reader, "context_embedder.weight", "flux")[1],
        pooled_projection_dim=_require(reader, "time_text_embed.text_embedder.linear_1.weight", "flux")[1],
        num_layers=_count_indices(keys, "transformer_blocks."),
        num_single_layers=_count_indices(keys, "single_transformer_blocks."),
    )
    return config


def _derive_mmdit(reader: CheckpointReader) -> dict[str, Any]:
    proj = _require(reader, "pos_embed.proj.weight", "mmdit")
    hidden, in_channels, patch = proj[0], proj[1], proj[2]
    head_dim = _require(reader, "transformer_blocks.0.attn.norm_q.weight", "mmdit")[0]
    if hidden % head_dim:
        raise CheckpointError(f"{reader.source}: hidden size {hidden} is not a multiple of head dim {head_dim}")
    config = dict(OFFICIAL_MMDIT_CONFIG)
    context = _require(reader, "context_embedder.weight", "mmdit")
    config.update(
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        in_channels=in_channels,
        patch_size=patch,
        caption_projection_dim=context[0],
        joint_attention_dim=context[1],
        pooled_projection_dim=_require(reader, "time_text_embed.text_embedder.linear_1.weight", "mmdit")[1],
        num_layers=_count_indices(reader.keys(), "transformer_blocks."),
    )
    if "pos_embed.pos_embed" in reader:
        positions = reader.shape("pos_embed.pos_embed")[1]
        side = math.isqrt(positions)
        if side * side != positions:
            raise CheckpointError(f"{reader.source}: pos_embed.pos_embed has {positions} positions, not a square grid")
        config["pos_embed_max_size"] = side
    return config


def _derive_vae(reader: CheckpointReader) -> dict[str, Any]:
    keys = reader.keys()
    config = dict(OFFICIAL_VAE_CONFIG)
    n_down = _count_indices(keys, "encoder.down_blocks.")
    n_up = _count_indices(keys, "decoder.up_blocks.")
    if not n_down or not n_up:
        raise CheckpointError(
            f"{reader.source}: a VAE checkpoint needs both encoder.down_blocks.* and decoder.up_blocks.* tensors "
            f"(found {n_down} encoder and {n_up} decoder blocks)"
        )

    def block(prefix: str, i: int) -> dict[str, Any]:
        resnets = _count_indices(keys, f"{prefix}.{i}.resnets.")
        out = _require(reader, f"{prefix}.{i}.resnets.{resnets - 1}.conv2.conv.weight", "vae")[0]
        sampler = "downsamplers" if prefix.startswith("encoder") else "upsamplers"
        return {
            "out": out,
            "layers": resnets,
            "spatial": bool(_keys_with_prefix(keys, f"{prefix}.{i}.{sampler}.")),
            "temporal": bool(_keys_with_prefix(keys, f"{prefix}.{i}.temporal_{sampler}.")),
        }

    down = [block("encoder.down_blocks", i) for i in range(n_down)]
    up = [block("decoder.up_blocks", i) for i in range(n_up)]
    latent = _require(reader, "decoder.conv_in.conv.weight", "vae")[1]
    moments = _require(reader, "encoder.conv_out.conv.weight", "vae")[0]
    double_z = moments == 2 * latent
    config.update(
        encoder_in_channels=_require(reader, "encoder.conv_in.conv.weight", "vae")[1],
        encoder_out_channels=moments // 2 if double_z else moments,
        encoder_double_z=double_z,
        encoder_block_out_channels=[b["out"] for b in down],
        encoder_layers_per_block=[b["layers"] for b in down],
        encoder_spatial_down_sample=[b["spatial"] for b in down],
        encoder_temporal_down_sample=[b["temporal"] for b in down],
        encoder_down_block_types=["DownEncoderBlockCausal3D"] * n_down,
        encoder_block_dropout=[0.0] * n_down,
        decoder_in_channels=latent,
        decoder_out_channels=_require(reader, "decoder.conv_out.conv.weight", "vae")[0],
        # The decoder walks its block_out_channels in reverse, so up block i has channels[-1 - i].
        decoder_block_out_channels=[b["out"] for b in reversed(up)],
        decoder_layers_per_block=[b["layers"] for b in up],
        decoder_spatial_up_sample=[b["spatial"] for b in up],
        decoder_temporal_up_sample=[b["temporal"] for b in up],
        decoder_up_block_types=["UpDecoderBlockCausal3D"] * n_up,
        decoder_block_dropout=[0.0] * n_up,
        add_post_quant_conv="post_quant_conv.conv.weight" in reader,
    )
    channels = set(config["encoder_block_out_channels"]) | set(config["decoder_block_out_channels"])
    groups = OFFICIAL_VAE_CONFIG["encoder_norm_num_groups"]
    if any(c % groups for c in channels):
        raise CheckpointError(
            f"{reader.source}: VAE channels {sorted(channels)} are not multiples of the official {groups} norm "
            "groups and the group count cannot be read from tensor shapes; load the VAE from its folder "
            "(with config.json) or re-save it with save_single_file(..., config=<its config.json>)"
        )
    return config


_DERIVERS = {"flux": _derive_flux, "mmdit": _derive_mmdit, "vae": _derive_vae}


def loader_extras(family: str) -> dict[str, Any]:
    """Constructor arguments the official pipeline adds to config.json for this family."""
    _check_family(family)
    return json.loads(json.dumps(_LOADER_EXTRAS[family]))


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def _finish_config(family: str, config: Mapping[str, Any], source: object) -> dict[str, Any]:
    """Drop `_`-private keys, add the loader-only extras, and check what the extras require."""
    finished = {k: v for k, v in config.items() if not k.startswith("_")}
    finished.update(loader_extras(family))
    if family == "flux" and finished.get("attention_head_dim") != sum(finished["axes_dims_rope"]):
        raise CheckpointError(
            f"{source}: miniFLUX RoPE axes {finished['axes_dims_rope']} need attention_head_dim "
            f"{sum(finished['axes_dims_rope'])}, but the checkpoint has {finished.get('attention_head_dim')}"
        )
    return finished


def derive_config(family: str, reader: CheckpointReader) -> dict[str, Any]:
    """Constructor config for a single file: its embedded JSON `config` metadata if present, else derived from
    tensor shapes (non-derivable keys take the official values); loader-only extras always added."""
    _check_family(family)
    embedded = reader.embedded_config()
    config = embedded if embedded is not None else _DERIVERS[family](reader)
    return _finish_config(family, config, reader.source)


# --------------------------------------------------------------------------------------------
# folders and variants


def resolve_variant(variant: str | None, default: str | None = None) -> str | None:
    """Full variant folder name for a name or alias (`"384p"`, `"768p"`, `"image"`); None gives `default`."""
    if variant is None:
        return default
    name = str(variant).strip().lower()
    name = VARIANT_ALIASES.get(name, name)
    if name in DIT_VARIANTS or (name.startswith("diffusion_transformer_") and name != "diffusion_transformer_"):
        return name
    raise CheckpointError(
        f"unknown DiT variant {variant!r}; use one of {', '.join(DIT_VARIANTS)} or the aliases "
        f"{', '.join(VARIANT_ALIASES)}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _family_from_class_name(config: Mapping[str, Any]) -> str | None:
    name = config.get("_class_name")
    if name == VAE_CLASS_NAME:
        return "vae"
    return DIT_CLASS_NAMES.get(name)


def _component_family(folder: Path) -> str:
    """Family of a component folder: config.json `_class_name`, falling back to the tensor names."""
    config_path = folder / "config.json"
    if config_path.is_file():
        family = _family_from_class_name(_read_json(config_path))
        if family is not None:
            return family
    with open_checkpoint(folder) as reader:
        return detect_family(reader)


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
        or root.name.startswith(("text_encoder", "tokenizer", "diffusion_transformer_"))
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
    variants.update({p.name: p for p in subdirs if p.name.startswith("diffusion_transformer_") and p.name not in variants})
    if not variants:
        found = ", ".join(p.name + "/" for p in subdirs) or "no subfolders"
        raise CheckpointError(
            f"{root} has no DiT variant folder: looked for {', '.join(DIT_VARIANTS)}; found {found}."
            + _subfolder_hint(root)
        )
    families = {name: _component_family(path) for name, path in variants.items()}
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


# --------------------------------------------------------------------------------------------
# building and filling


def model_class(family: str) -> type[nn.Module]:
    """The pyramid_core model class for a family (imported lazily)."""
    import importlib

    _check_family(family)
    module_name, class_name = _MODEL_CLASSES[family]
    return getattr(importlib.import_module(module_name), class_name)


def _build_on_meta(family: str, config: Mapping[str, Any], source: object) -> nn.Module:
    cls = model_class(family)
    try:
        with torch.device("meta"):
            model = cls(**config)
    except (TypeError, ValueError, AssertionError) as exc:
        raise CheckpointError(f"cannot build {cls.__name__} from the config of {source}: {exc}") from exc
    return model


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


_LEGACY_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)(\.(?:weight|bias))$")


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
        for name in module._parameters:
            if module._parameters[name] is not None:
                targets[prefix + name] = (module, name, True)
        for name in module._buffers:
            if module._buffers[name] is not None and name not in module._non_persistent_buffers_set:
                targets[prefix + name] = (module, name, False)
    return targets


def _is_float8(dtype: torch.dtype) -> bool:
    return "float8" in str(dtype)


def _target_dtype(stored: torch.dtype, dtype: torch.dtype | None, keep_float8: bool) -> torch.dtype:
    """`dtype` for floating tensors (float8 ones stay as stored with `keep_float8`); anything else as stored."""
    cast = dtype is not None and stored.is_floating_point and not (keep_float8 and _is_float8(stored))
    return dtype if cast else stored


def _read_converted(
    reader: CheckpointReader, key: str, dtype: torch.dtype | None, device: torch.device, keep_float8: bool = False
) -> torch.Tensor:
    """One checkpoint tensor in its target dtype on `device`, in memory of its own."""
    stored = reader.dtype(key)
    target = _target_dtype(stored, dtype, keep_float8)
    if device.type == "cpu" or _itemsize(target) <= _itemsize(stored):
        return reader.get_tensor(key, target).to(device=device)  # narrow before moving: less to transfer
    return reader.get_tensor(key).to(device=device).to(dtype=target)  # widen after moving


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

    `dtype=None` keeps stored dtypes; floating tensors only are cast; `keep_float8` leaves float8 tensors as stored. `ignore` lists file keys to drop when the
    model lacks them; `rename` maps file key -> model key. Strict: missing, unexpected and mis-shaped keys are
    reported together. Parameters end with requires_grad=False; an error is raised if anything stays on meta.
    """
    dtype = _as_dtype(dtype)
    device = torch.device(device)
    rename = dict(rename or {})
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
    config: dict[str, Any]  # constructor kwargs used (config + loader extras)
    source: Path  # weights file (or shard index) the tensors came from
    source_dtypes: set[torch.dtype] = field(default_factory=set)


def _load(
    reader: CheckpointReader,
    family: str,
    config: dict[str, Any],
    *,
    variant: str | None,
    dtype: torch.dtype | str | None,
    device: str | torch.device,
    strict: bool,
    keep_float8: bool = False,
) -> LoadedModel:
    model = _build_on_meta(family, config, reader.source)
    rename = None
    if family == "vae":
        rename = {k: _legacy_vae_name(k) for k in reader.keys() if _legacy_vae_name(k) != k}
    fill_meta_model(
        model,
        reader,
        dtype=dtype,
        device=device,
        strict=strict,
        ignore=_IGNORABLE_KEYS[family],
        rename=rename,
        description=f"{FAMILY_NAMES[family]} ({type(model).__name__})",
        keep_float8=keep_float8,
    )
    return LoadedModel(model, family, variant, config, reader.source, reader.dtypes())


def _wrong_kind_error(path: Path, found: str, wanted: str) -> CheckpointError:
    use = "load_vae" if found == "vae" else "load_dit"
    return CheckpointError(f"{path} is a {FAMILY_NAMES[found]}, not a {wanted}; load it with {use}")


def _load_component(
    path: Path, *, want_vae: bool, variant: str | None, dtype, device, strict: bool, keep_float8: bool = False
) -> LoadedModel:
    """Load from a component folder (config.json + weights) or a single file."""
    wanted = FAMILY_NAMES["vae"] if want_vae else "DiT"
    config_path = path / "config.json" if path.is_dir() else None
    folder_config = _read_json(config_path) if config_path and config_path.is_file() else None
    class_family = _family_from_class_name(folder_config) if folder_config else None
    if class_family is not None and (class_family == "vae") != want_vae:
        raise _wrong_kind_error(path, class_family, wanted)
    with open_checkpoint(path) as reader:
        family = detect_family(reader)
        if (family == "vae") != want_vae:
            raise _wrong_kind_error(reader.source, family, wanted)
        if class_family is not None and class_family != family:
            raise CheckpointError(
                f"{config_path} says {folder_config.get('_class_name')} but {reader.source} holds a "
                f"{FAMILY_NAMES[family]}"
            )
        if folder_config is not None:
            config = _finish_config(family, folder_config, config_path)
        else:
            config = derive_config(family, reader)
        return _load(
            reader, family, config, variant=variant, dtype=dtype, device=device, strict=strict, keep_float8=keep_float8
        )


def _is_component_dir(path: Path) -> bool:
    """A folder holding one model (config.json and/or weight files), not a root with model subfolders."""
    if any((path / v).is_dir() for v in (*DIT_VARIANTS, VAE_FOLDER)):
        return False
    weight_suffixes = (*_SAFETENSORS_SUFFIXES, *_PICKLE_SUFFIXES)
    return (path / "config.json").is_file() or any(
        p.is_file() and (p.suffix.lower() in weight_suffixes or p.name.endswith(".index.json")) for p in path.iterdir()
    )


def load_dit(
    path: str | os.PathLike,
    variant: str | None = None,
    *,
    dtype: torch.dtype | str | None = torch.bfloat16,
    device: str | torch.device = "cpu",
    strict: bool = True,
    keep_float8: bool = False,
) -> LoadedModel:
    """Load a Pyramid Flow DiT from an official root folder, a variant subfolder, or a single file.

    `variant` picks the folder in a root (optional when only one is present); for a single file it is only a
    label (default `diffusion_transformer_384p`, the variant cannot be read from the weights).
    `keep_float8`: float8 tensors (Kijai's fp8 files) stay float8 while the rest is cast to `dtype`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"DiT checkpoint not found: {path}")
    if path.is_dir() and not _is_component_dir(path):
        folder = resolve_model_folder(path)
        dit_dir = folder.dit_path(variant)
        return _load_component(
            dit_dir, want_vae=False, variant=dit_dir.name, dtype=dtype, device=device, strict=strict,
            keep_float8=keep_float8,
        )
    label = resolve_variant(variant)
    if path.is_dir() and path.name.startswith("diffusion_transformer_"):
        if label is not None and label != path.name:
            raise CheckpointError(f"{path} is the {path.name} folder but variant {label} was requested")
        label = path.name
    return _load_component(
        path, want_vae=False, variant=label or DEFAULT_VARIANT, dtype=dtype, device=device, strict=strict,
        keep_float8=keep_float8,
    )


def load_vae(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = torch.bfloat16,
    device: str | torch.device = "cpu",
    strict: bool = True,
) -> LoadedModel:
    """Load the causal video VAE from an official root folder, its `causal_video_vae/` folder, or a single file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"VAE checkpoint not found: {path}")
    if path.is_dir() and (path / VAE_FOLDER).is_dir():
        path = path / VAE_FOLDER
    elif path.is_dir() and not _is_component_dir(path) and any((path / v).is_dir() for v in DIT_VARIANTS):
        raise CheckpointError(f"{path} has no {VAE_FOLDER}/ subfolder; found {_describe_dir(path)}")
    return _load_component(path, want_vae=True, variant=None, dtype=dtype, device=device, strict=strict)


# --------------------------------------------------------------------------------------------
# writing


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
    dtype = _as_dtype(dtype)
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
