"""Kept latents: bit-exact round trips, metadata types, clear errors, never overwriting, safe failure."""
from __future__ import annotations

import errno
import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import pyramid_core.latents_file as latents_file
from pyramid_core.latents_file import FORMAT_KEY, fallback_latents_path, load_latents, save_latents
from pyramid_core.outputs import WriteError

METADATA = {
    "family": "flux", "variant": "768p", "prompt": "a cat — on a \"sofa\"\nsecond line", "fps": 23.976,
    "seed": 2**63 - 1, "width": 1280, "height": 768, "temp": 16, "sampler_note": "kept after ENOSPC",
}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def tricky_latents(dtype: torch.dtype) -> torch.Tensor:
    """[1,16,T,H,W] latents with the values a lossy path would change: tiny, huge, signed zeros, inf and nan."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 6, 10, generator=g) * 3
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30])
    return x.to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_round_trip_is_bit_exact_with_typed_metadata(tmp_path, dtype):
    latents = tricky_latents(dtype)
    out = save_latents(latents, tmp_path / "clip.safetensors", METADATA)
    assert out == (tmp_path / "clip.safetensors").resolve() and leftovers(tmp_path) == ["clip.safetensors"]
    loaded, metadata = load_latents(out)
    assert same_bits(loaded, latents)
    assert metadata == METADATA  # typed: fps float, seed/width/height/temp int, unknown keys as str
    assert type(metadata["fps"]) is float and type(metadata["seed"]) is int and FORMAT_KEY not in metadata
    # A fresh allocation, not a view into the file's bytes.
    assert loaded.untyped_storage().nbytes() == loaded.numel() * loaded.element_size()


def test_metadata_is_stored_as_strings_with_the_format_marker(tmp_path):
    out = save_latents(torch.zeros(1, 16, 1, 2, 2), tmp_path / "clip", {"fps": 24, "seed": 7, "extra": 0.1})
    assert out.name == "clip.safetensors"  # suffix added
    header_len = struct.unpack("<Q", out.read_bytes()[:8])[0]
    header = json.loads(out.read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"] == {FORMAT_KEY: "1", "fps": "24.0", "seed": "7", "extra": "0.1"}
    assert load_latents(out)[1] == {"fps": 24.0, "seed": 7, "extra": "0.1"}


def test_views_and_non_contiguous_latents(tmp_path):
    base = tricky_latents(torch.float32)
    view = base.transpose(3, 4)[..., 1:]  # non-contiguous view of a larger storage
    loaded, _ = load_latents(save_latents(view, tmp_path / "v.safetensors", {}))
    assert same_bits(loaded, view.contiguous())


def test_never_overwrites(tmp_path):
    target = tmp_path / "clip.safetensors"
    target.write_bytes(b"not mine to replace")
    first = save_latents(torch.ones(2, 3), target, {"seed": 1})
    second = save_latents(torch.ones(2, 3) * 2, target, {"seed": 2})
    assert (first.name, second.name) == ("clip_00001.safetensors", "clip_00002.safetensors")
    assert target.read_bytes() == b"not mine to replace"
    assert load_latents(second)[1] == {"seed": 2} and torch.equal(load_latents(first)[0], torch.ones(2, 3))
    assert leftovers(tmp_path) == ["clip.safetensors", "clip_00001.safetensors", "clip_00002.safetensors"]


def test_not_a_latents_file_is_a_clear_value_error(tmp_path):
    good = save_latents(torch.ones(1, 16, 1, 2, 2), tmp_path / "good.safetensors", {"seed": 3})
    png = tmp_path / "still.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    plain = tmp_path / "model.safetensors"
    save_file({"weight": torch.ones(2)}, str(plain))
    no_marker_meta = tmp_path / "other.safetensors"
    save_file({"latents": torch.ones(2)}, str(no_marker_meta), metadata={"seed": "1"})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    cases = {
        png: "not a Pyramid Flow latents file",
        empty: "not a Pyramid Flow latents file",
        plain: f"no '{FORMAT_KEY}' marker",
        no_marker_meta: f"no '{FORMAT_KEY}' marker",
        truncated: "truncated",
    }
    for path, phrase in cases.items():
        with pytest.raises(ValueError, match=phrase) as info:
            load_latents(path)
        assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError):
        load_latents(tmp_path / "missing.safetensors")


def test_marked_files_with_bad_contents(tmp_path):
    future = tmp_path / "future.safetensors"
    save_file({"latents": torch.ones(2)}, str(future), metadata={FORMAT_KEY: "2"})
    with pytest.raises(ValueError, match="update ComfyUI-PyramidFlow"):
        load_latents(future)
    two = tmp_path / "two.safetensors"
    save_file({"latents": torch.ones(2), "more": torch.ones(1)}, str(two), metadata={FORMAT_KEY: "1"})
    with pytest.raises(ValueError, match="exactly one tensor"):
        load_latents(two)
    bad_seed = tmp_path / "bad_seed.safetensors"
    save_file({"latents": torch.ones(2)}, str(bad_seed), metadata={FORMAT_KEY: "1", "seed": "abc"})
    with pytest.raises(ValueError, match="'seed' should be int"):
        load_latents(bad_seed)


@pytest.mark.parametrize(
    "metadata, phrase",
    [
        ({"seed": "5"}, "'seed' must be an int"),
        ({"seed": 1.5}, "'seed' must be an int"),
        ({"fps": float("nan")}, "finite"),
        ({"flag": True}, "str, int or float"),
        ({"sizes": [1, 2]}, "str, int or float"),
        ({FORMAT_KEY: "1"}, "reserved"),
        ({3: "x"}, "keys must be non-empty strings"),
    ],
)
def test_bad_metadata_fails_before_writing(tmp_path, metadata, phrase):
    with pytest.raises(ValueError, match=phrase):
        save_latents(torch.ones(2), tmp_path / "x.safetensors", metadata)
    assert leftovers(tmp_path) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="torch.Tensor"):
        save_latents([1.0, 2.0], tmp_path / "x.safetensors", {})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_latents(torch.ones(2), tmp_path / "missing" / "x.safetensors", {})
    with pytest.raises(ValueError, match="is a folder"):
        save_latents(torch.ones(2), tmp_path, {})
    assert leftovers(tmp_path) == []


class FailingFile:
    """``open`` stand-in: the file is created and receives some bytes, then writing fails with ``exc``."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        exc = self.exc

        class Handle:
            def __enter__(self):
                return self

            def __exit__(self, *info):
                handle.close()

            def write(self, data):
                handle.write(data[: len(data) // 2])
                raise exc

        return Handle()


def test_disk_full_is_a_write_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(latents_file, "open", FailingFile(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
                        raising=False)
    target = tmp_path / "clip.safetensors"
    with pytest.raises(WriteError) as info:
        save_latents(tricky_latents(torch.bfloat16), target, METADATA)
    message = str(info.value)
    assert message.startswith(f"cannot write {target.resolve()}: no space left on device; free some space"), message
    assert info.value.errno == errno.ENOSPC and info.value.__cause__.errno == errno.ENOSPC
    assert leftovers(tmp_path) == []


def test_keyboard_interrupt_mid_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(latents_file, "open", FailingFile(KeyboardInterrupt()), raising=False)
    with pytest.raises(KeyboardInterrupt):
        save_latents(tricky_latents(torch.float32), tmp_path / "clip.safetensors", METADATA)
    assert leftovers(tmp_path) == []


def test_unwritable_folder(unwritable_folder):
    with pytest.raises(WriteError, match="permission denied; choose a folder you can write to"):
        save_latents(torch.ones(2), unwritable_folder / "clip.safetensors", {})
    assert leftovers(unwritable_folder) == []


def test_fallback_latents_path(tmp_path, monkeypatch, unwritable_folder):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert fallback_latents_path(tmp_path, "clip") == (tmp_path / "clip.safetensors").resolve()
    assert fallback_latents_path(unwritable_folder, "clip") == temp.resolve() / "clip.safetensors"
    assert fallback_latents_path(tmp_path / "missing", "clip") == temp.resolve() / "clip.safetensors"
    assert leftovers(tmp_path) == ["locked", "temp"] and leftovers(temp) == [] and leftovers(unwritable_folder) == []
    for stem in ("", "a/b", ".."):
        with pytest.raises(ValueError, match="stem"):
            fallback_latents_path(tmp_path, stem)
    # The intended use: keep the latents there, write the video from them later.
    kept = save_latents(torch.ones(1, 16, 1, 2, 2), fallback_latents_path(unwritable_folder, "clip"), {"seed": 9})
    assert kept.parent == temp.resolve() and load_latents(kept)[1] == {"seed": 9}
