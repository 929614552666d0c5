"""Reading checkpoints: safetensors files, torch `.bin` files (weights only), shard indexes, component folders.

Every tensor handed out lives in its own fresh CPU allocation (64-byte aligned by torch's allocator), never in
a view of a file's memory mapping: such views start at arbitrary addresses, and CPU kernels may sum in another
order on unaligned data (last-ulp differences seen on AMD CPUs), so a run on mapped weights need not match the
same weights copied anywhere. That is why safetensors files are read here with plain file reads (the header
gives each tensor's byte range) instead of through `safe_open`, which hands out views of its mapping.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import struct
import sys
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import torch

__all__ = ["BIN_NAMES", "SAFETENSORS_NAMES", "CheckpointError", "CheckpointReader", "describe_dir", "open_checkpoint"]

# Weight file names a component folder may hold, in order of preference.
SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
BIN_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
_STAGING_BYTES = 16 * 2**20  # chunk size of a cast while reading (the extra host memory of a cast load)

# safetensors dtype code -> torch dtype (the unsigned 16/32/64-bit dtypes exist from torch 2.3 on)
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, name)
}


class CheckpointError(ValueError):
    """A checkpoint file or folder cannot be used; the message says why and what to do."""


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
        self._handle: BinaryIO | None = None
        self._staging: torch.Tensor | None = None  # bytes read before a cast, reused tensor after tensor
        self._parse_header()

    def _fail(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a usable safetensors file: {why}")

    def _read_header(self) -> tuple[dict[str, Any], int, int]:
        """(header JSON object, header length, file size)."""
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._fail(f"truncated (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            first = f.read(1)
            if header_len > _MAX_HEADER_BYTES or first not in (b"{", b""):
                if looks_like_torch_file(head + first):
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
        return header, header_len, size

    def _parse_header(self) -> None:
        header, header_len, size = self._read_header()
        self.metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        data_size = size - 8 - header_len
        for name, info in header.items():
            try:
                code, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"header entry {name!r} is malformed") from None
            dtype = _SAFETENSORS_DTYPES.get(code)
            if dtype is None:
                raise self._fail(f"tensor {name!r} has dtype {code}, which this loader cannot read with torch "
                                 f"{torch.__version__} (it reads {', '.join(_SAFETENSORS_DTYPES)})")
            if end > data_size:
                raise self._fail(
                    f"truncated: tensor {name!r} ends at byte {end} of the data but the file holds {data_size} "
                    "(re-download or re-save the file)"
                )
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise self._fail(f"header entry {name!r} has a byte range that does not match its shape and dtype")
            self.entries[name] = (shape, dtype)
            self._offsets[name] = 8 + header_len + begin

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
            largest = max(math.prod(size) * kind.itemsize for size, kind in self.entries.values())
            self._staging = torch.empty(min(_STAGING_BYTES, largest), dtype=torch.uint8)
        step = self._staging.numel() // stored.itemsize
        for start in range(0, flat.numel(), step):
            count = min(step, flat.numel() - start)
            chunk = self._staging[: count * stored.itemsize].view(stored)
            self._read_into(chunk)
            flat[start : start + count].copy_(chunk)  # the same rounding as Tensor.to

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._staging = None


def _read_exactly(handle: BinaryIO, buffer: Any, path: Path) -> None:
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


# Warnings torch may print while loading a plain state dict with weights_only: notes about how the file was
# written (pickle protocol, legacy storages, the weights_only default change, a TorchScript archive, which then
# fails with a clear error) that a user can do nothing about. Each is (category, start of the message).
_TORCH_LOAD_NOISE: tuple[tuple[type[Warning], str], ...] = (
    (UserWarning, r"Detected pickle protocol \d+ in the checkpoint"),
    (UserWarning, r"TypedStorage is deprecated"),
    (UserWarning, r"'torch\.load' received a zip file that looks like a TorchScript archive"),
    (FutureWarning, r"You are using `torch\.load` with `weights_only=False`"),
)


@contextlib.contextmanager
def _quiet_torch_load() -> Iterator[None]:
    """Hide only torch's `_TORCH_LOAD_NOISE` warnings for the duration of the block; any other warning shows."""
    with warnings.catch_warnings():
        for category, message in _TORCH_LOAD_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


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
            with _quiet_torch_load():
                try:
                    obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap can only be used" not in str(exc):
                        raise
                    # Legacy (non-zip) torch.save format: mmap is impossible, weights_only still applies.
                    obj = torch.load(self.path, map_location="cpu", weights_only=True)
                    self._mapped = False
        except pickle.UnpicklingError as exc:
            if "unsupported operand" in str(exc).lower():
                raise CheckpointError(
                    f"{self.path} was written with a pickle protocol that torch's safe (weights-only) loader cannot "
                    "read; re-save its state dict with torch.save's default protocol, or convert it to "
                    ".safetensors with a tool you trust"
                ) from None
            if "weights only" in str(exc).lower():
                raise CheckpointError(
                    f"{self.path} contains Python code/objects besides tensors, and loading it would execute "
                    "arbitrary code; it is refused. Convert it to .safetensors with a tool you trust "
                    "(or re-save just its state dict)"
                ) from None
            raise CheckpointError(f"{self.path} is truncated or not a PyTorch checkpoint ({exc})") from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise CheckpointError(f"{self.path} is truncated or not a PyTorch checkpoint ({exc})") from None
        return self._state_dict(obj)

    def _state_dict(self, obj: Any) -> Mapping[str, Any]:
        """The name -> tensor mapping, unwrapped from a {"state_dict": ...} or {"model": ...} container."""
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


def looks_like_torch_file(head: bytes) -> bool:
    """Zip (torch.save) or pickle magic, and no safetensors JSON header where one would start (byte 8)."""
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[8:9] != b"{")


def _open_file(path: Path) -> _SafetensorsFile | _PickleFile:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return _PickleFile(path)
    if suffix in SAFETENSORS_SUFFIXES:
        return _SafetensorsFile(path)
    with open(path, "rb") as f:
        head = f.read(9)
    # Unknown extension: sniff the content.
    return _PickleFile(path) if looks_like_torch_file(head) else _SafetensorsFile(path)


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


# --------------------------------------------------------------------------------------------
# opening files, shard indexes and component folders


def describe_dir(path: Path) -> str:
    """What a folder holds, for error messages (at most 30 names)."""
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
    """The weights file (or shard index) of a component folder, in the diffusers / transformers order."""
    for name in SAFETENSORS_NAMES:
        if (folder / name).is_file():
            return folder / name
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    preferred = [p for p in indexes if p.name in {n + ".index.json" for n in SAFETENSORS_NAMES}]
    if preferred or indexes:
        return (preferred or indexes)[0]
    singles = sorted(p for p in folder.iterdir() if p.suffix.lower() in SAFETENSORS_SUFFIXES and p.is_file())
    if len(singles) == 1:
        return singles[0]
    for name in BIN_NAMES:
        if (folder / name).is_file():
            return folder / name
    bin_indexes = sorted(folder.glob("*.bin.index.json"))
    if bin_indexes:
        return bin_indexes[0]
    hint = ""
    if any(p.is_dir() and (p / "config.json").is_file() for p in folder.iterdir()):
        hint = " This looks like a model root folder: use load_dit/load_vae, or point at one of its subfolders."
    raise CheckpointError(
        f"no weights found in {folder}: looked for {', '.join(SAFETENSORS_NAMES + BIN_NAMES)}, a "
        f"*.safetensors.index.json with its shards, or a single .safetensors file; found {describe_dir(folder)}.{hint}"
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
