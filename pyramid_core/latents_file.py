"""Kept latents: a generation's latents in a safetensors file, so a video can be written from them later.

When writing the video fails after a long generation (disk full, no permission), the latents are saved
here, to the output folder or, when that is not writable, to the system's temporary folder, and the video
can be decoded from them later without generating again.

File layout: one tensor ``"latents"`` (dtype and shape as generated) and string metadata in the safetensors
header, marked with ``"pyramid_flow_latents": "1"``.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import struct
import tempfile
from pathlib import Path
from typing import Mapping, Union

import torch

from .outputs import check_writable, output_path, write_atomically

__all__ = ["FORMAT_KEY", "FORMAT_VERSION", "METADATA_TYPES", "fallback_latents_path", "load_latents", "save_latents"]

FORMAT_KEY = "pyramid_flow_latents"
FORMAT_VERSION = "1"
TENSOR_KEY = "latents"
SUFFIX = ".safetensors"
# Known metadata keys and the type load_latents returns them as; other keys come back as strings.
METADATA_TYPES: dict[str, type] = {
    "family": str, "variant": str, "prompt": str, "fps": float, "seed": int, "width": int, "height": int, "temp": int,
}

MetadataValue = Union[str, int, float]
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def save_latents(latents: torch.Tensor, path: str | os.PathLike, metadata: Mapping[str, MetadataValue]) -> Path:
    """Write ``latents`` and ``metadata`` to a safetensors file at ``path`` and return the path written.

    The tensor is stored bit-exactly (any dtype, moved to the CPU). Metadata values are ``str``/``int``/``float``
    (stored as strings; known keys, see ``METADATA_TYPES``, must convert to their type). A name without the
    ``.safetensors`` suffix gets it. Never overwrites: an existing name gets a numbered sibling
    (``clip.safetensors`` -> ``clip_00001.safetensors``). The folder must exist (``FileNotFoundError``); OS failures
    raise :class:`~pyramid_core.outputs.WriteError`.
    """
    if not isinstance(latents, torch.Tensor):
        raise ValueError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    header = {FORMAT_KEY: FORMAT_VERSION, **_encode_metadata(metadata)}
    target = output_path(path, example="latents.safetensors")
    if target.suffix.lower() != SUFFIX:
        target = target.with_name(target.name + SUFFIX)
    tensor = latents.detach().to("cpu").contiguous()

    def write(tmp: Path) -> None:
        from safetensors.torch import save

        data = save({TENSOR_KEY: tensor}, metadata=header)  # bytes first: OS errors then keep their errno
        with open(tmp, "wb") as handle:
            handle.write(data)

    return write_atomically(target, write, what="latents")


def load_latents(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, MetadataValue]]:
    """Read a file written by :func:`save_latents`: ``(latents, metadata)``.

    The tensor is a fresh CPU allocation (no memory mapping); metadata holds the known keys as their types
    (``fps`` float, ``seed``/``width``/``height``/``temp`` int, the rest str), other keys as strings, and not the
    format marker. ``FileNotFoundError`` when ``path`` is missing; ``ValueError`` naming the problem when it is not
    a Pyramid Flow latents file.
    """
    path = Path(path).expanduser()
    data = path.read_bytes()
    stored = _read_metadata(path, data)
    marker = stored.pop(FORMAT_KEY, None)
    if marker is None:
        raise ValueError(f"{path} is a safetensors file but not Pyramid Flow latents (no {FORMAT_KEY!r} marker in its "
                         f"metadata); pass the .safetensors file that was kept when writing a video failed")
    if marker != FORMAT_VERSION:
        raise ValueError(f"{path} holds Pyramid Flow latents in format version {marker!r}, but this version reads "
                         f"only {FORMAT_VERSION!r}; update ComfyUI-PyramidFlow")
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # SafetensorError: a damaged or truncated file
        raise ValueError(f"{path} is not a readable Pyramid Flow latents file ({exc}); it may be truncated") from None
    if set(tensors) != {TENSOR_KEY}:
        raise ValueError(f"{path} should hold exactly one tensor {TENSOR_KEY!r}, found {sorted(tensors)}")
    latents = tensors[TENSOR_KEY].clone()  # own aligned memory, not a view into the file's bytes
    metadata: dict[str, MetadataValue] = {}
    for key, text in stored.items():
        kind = METADATA_TYPES.get(key, str)
        try:
            metadata[key] = kind(text)
        except ValueError:
            raise ValueError(f"{path}: metadata {key!r} should be {kind.__name__}, got {text!r}") from None
    return latents, metadata


def fallback_latents_path(preferred_dir: str | os.PathLike, stem: str) -> Path:
    """Where to keep latents: ``preferred_dir/<stem>.safetensors`` when that folder is writable, else the same
    name in the system's temporary folder (``tempfile.gettempdir()``). Nothing is left behind by the check."""
    if stem in ("", ".", "..") or Path(stem).name != stem:
        raise ValueError(f"stem must be a plain file name without folders, got {stem!r}")
    name = stem + SUFFIX
    preferred = Path(preferred_dir).expanduser() / name
    try:
        check_writable(preferred)
        return output_path(preferred)
    except (OSError, ValueError):  # WriteError, FileNotFoundError, or a folder where the file would go
        return Path(tempfile.gettempdir()).resolve() / name


# ---------------------------------------------------------------------------------------------


def _encode_metadata(metadata: Mapping[str, MetadataValue]) -> dict[str, str]:
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a dict of str -> str/int/float, got {type(metadata).__name__}")
    encoded: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metadata keys must be non-empty strings, got {key!r}")
        if key == FORMAT_KEY:
            raise ValueError(f"metadata key {FORMAT_KEY!r} is reserved for the format marker")
        if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
            raise ValueError(f"metadata {key!r} must be a str, int or float, got {type(value).__name__} {value!r}")
        kind = METADATA_TYPES.get(key)
        if kind is int and not isinstance(value, numbers.Integral):
            raise ValueError(f"metadata {key!r} must be an int, got {value!r}")
        if kind is float and (isinstance(value, str) or not math.isfinite(value)):
            raise ValueError(f"metadata {key!r} must be a finite number, got {value!r}")
        if isinstance(value, str):
            encoded[key] = value
        elif isinstance(value, numbers.Integral) and kind is not float:
            encoded[key] = str(int(value))
        else:
            encoded[key] = repr(float(value))  # repr round-trips every float exactly
    return encoded


def _read_metadata(path: Path, data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes; ValueError when they are not a safetensors file."""
    not_latents = f"{path} is not a Pyramid Flow latents file"
    if len(data) < 8:
        raise ValueError(f"{not_latents} (only {len(data)} bytes); pass the .safetensors file the generator kept")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(_MAX_HEADER_BYTES, len(data) - 8) or data[8:9] != b"{":
        raise ValueError(f"{not_latents} (not a safetensors file); pass the .safetensors file the generator kept")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{not_latents} (its safetensors header is not valid JSON)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{not_latents} (its safetensors metadata is not a string table)")
    return dict(metadata)
