"""Checkpoint loading: official folders, shards, .bin, single files (bf16 / fp8) and every bad input."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pyramid_core import loading as L
from pyramid_core.loading import CheckpointError
from pyramid_core.loading import checkpoint as reading
from tests.reference import FIXTURES, model_dir

FAMILY_MODEL = {"flux": "miniflux_tiny", "mmdit": "sd3_tiny"}
VARIANT = "diffusion_transformer_384p"
KEY_TABLES = FIXTURES.parents[1] / "reference"
EXECUTED_MARK: list[str] = []


def _dit_dir(family: str) -> Path:
    return model_dir(FAMILY_MODEL[family]) / VARIANT


def _vae_dir() -> Path:
    return model_dir("miniflux_tiny") / "causal_video_vae"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def _expected_config(folder: Path, family: str) -> dict:
    """config.json minus private keys plus the loader-only extras (what the official pipeline builds)."""
    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
    config.update(L.loader_extras(family))
    return config


def _assert_model_equals(model: nn.Module, expected: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    """Every model tensor is exactly the expected tensor cast to dtype; nothing on meta, no grads."""
    state = model.state_dict()
    assert set(state) == set(expected), set(state) ^ set(expected)
    for name, value in state.items():
        want = expected[name] if dtype is None else expected[name].to(dtype)
        assert not value.is_meta, name
        assert value.dtype == want.dtype, (name, value.dtype, want.dtype)
        assert torch.equal(value.view(torch.uint8), want.contiguous().view(torch.uint8)), f"{name} differs"
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------- official folders


@pytest.mark.parametrize("family", ["flux", "mmdit"])
def test_official_folder_loads_dit_and_vae_strictly(family):
    root = model_dir(FAMILY_MODEL[family])
    folder = L.resolve_model_folder(root)
    assert folder.family == family
    assert list(folder.dit_variants) == [VARIANT]
    assert folder.vae == root / "causal_video_vae"
    n_text = 2 if family == "flux" else 3
    assert list(folder.text_encoders) == ["text_encoder", "text_encoder_2", "text_encoder_3"][:n_text]
    assert list(folder.tokenizers) == ["tokenizer", "tokenizer_2", "tokenizer_3"][:n_text]

    dit = L.load_dit(root, dtype=torch.float32)
    assert (dit.family, dit.variant) == (family, VARIANT)
    assert dit.config == _expected_config(root / VARIANT, family)
    for key, value in L.loader_extras(family).items():
        assert dit.config[key] == value
    assert dit.source == root / VARIANT / "diffusion_pytorch_model.safetensors"
    assert dit.source_dtypes == {torch.float32}
    _assert_model_equals(dit.model, _weights(root / VARIANT), torch.float32)
    assert not dit.model.training

    vae = L.load_vae(root)  # default dtype bf16: per-tensor round-to-nearest of the fp32 file
    assert (vae.family, vae.variant) == ("vae", None)
    assert vae.config == _expected_config(root / "causal_video_vae", "vae")
    assert vae.config["interpolate"] is False
    _assert_model_equals(vae.model, _weights(root / "causal_video_vae"), torch.bfloat16)


def test_dit_from_variant_folder_alias_and_bf16():
    root = model_dir("miniflux_tiny")
    by_alias = L.load_dit(root, "384p")
    direct = L.load_dit(root / VARIANT)
    assert by_alias.variant == direct.variant == VARIANT
    _assert_model_equals(direct.model, _weights(root / VARIANT), torch.bfloat16)
    with pytest.raises(CheckpointError, match="diffusion_transformer_384p folder but variant diffusion_transformer_768p"):
        L.load_dit(root / VARIANT, "768p")


def test_vae_from_its_folder():
    vae = L.load_vae(_vae_dir(), dtype=None)
    assert vae.source_dtypes == {torch.float32}
    _assert_model_equals(vae.model, _weights(_vae_dir()), None)


def test_variant_selection(tmp_path):
    root = tmp_path / "pyramid-flow-miniflux"
    root.mkdir()
    for variant in ("diffusion_transformer_384p", "diffusion_transformer_768p"):
        (root / variant).symlink_to(_dit_dir("flux"), target_is_directory=True)
    with pytest.raises(CheckpointError, match="several DiT variants.*384p.*768p"):
        L.load_dit(root)
    assert L.load_dit(root, "768p").variant == "diffusion_transformer_768p"
    with pytest.raises(CheckpointError, match="variant diffusion_transformer_image is not in .*available: "
                                              "diffusion_transformer_384p, diffusion_transformer_768p"):
        L.load_dit(root, "image")
    with pytest.raises(CheckpointError, match="unknown DiT variant '1080p'.*aliases 384p, 768p, image"):
        L.load_dit(root, "1080p")
    with pytest.raises(CheckpointError, match="has no causal_video_vae/ subfolder"):
        L.load_vae(root)


def test_family_falls_back_to_keys_without_class_name(tmp_path):
    root = tmp_path / "root"
    variant = root / VARIANT
    variant.mkdir(parents=True)
    shutil.copy(_dit_dir("mmdit") / "diffusion_pytorch_model.safetensors", variant)
    config = json.loads((_dit_dir("mmdit") / "config.json").read_text())
    del config["_class_name"]
    (variant / "config.json").write_text(json.dumps(config))
    assert L.resolve_model_folder(root).family == "mmdit"
    assert L.load_dit(root).family == "mmdit"


# ---------------------------------------------------------------------------------------- shards and .bin


@pytest.mark.parametrize("model,folder", [("miniflux_tiny", "text_encoder_2"), ("sd3_tiny", "text_encoder_3")])
def test_open_checkpoint_sharded_t5(model, folder):
    path = model_dir(model) / folder
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shards = {name: load_file(str(path / name)) for name in sorted(set(index.values()))}
    with L.open_checkpoint(path) as reader:
        assert reader.source == path / "model.safetensors.index.json"
        assert [p.name for p in reader.files] == sorted(shards)
        assert sorted(reader.keys()) == sorted(index)
        for key, shard in index.items():
            stored = shards[shard][key]
            assert reader.shape(key) == tuple(stored.shape) and reader.dtype(key) == stored.dtype
            assert torch.equal(reader.get_tensor(key), stored)
    with L.open_checkpoint(path / "model.safetensors.index.json") as reader:
        assert len(reader) == len(index)


def test_missing_shard_is_named(tmp_path):
    folder = tmp_path / "text_encoder_2"
    shutil.copytree(model_dir("miniflux_tiny") / "text_encoder_2", folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002\.safetensors listed in .*"
                                              r"text_encoder_2/model\.safetensors\.index\.json is missing"):
        L.open_checkpoint(folder)


def test_bin_is_loaded_with_weights_only_and_mmap(tmp_path, monkeypatch):
    folder = tmp_path / "causal_video_vae"
    folder.mkdir()
    shutil.copy(_vae_dir() / "config.json", folder)
    weights = _weights(_vae_dir())
    torch.save(weights, folder / "diffusion_pytorch_model.bin")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    vae = L.load_vae(folder, dtype=torch.float32)
    assert calls and all(c["weights_only"] is True and c["map_location"] == "cpu" for c in calls)
    assert calls[0]["mmap"] is True
    assert vae.source == folder / "diffusion_pytorch_model.bin"
    _assert_model_equals(vae.model, weights, torch.float32)

    # Legacy (pre-zip) torch.save files cannot be memory-mapped; they are still read with weights_only.
    calls.clear()
    legacy = tmp_path / "legacy.bin"
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    with L.open_checkpoint(legacy) as reader:
        assert torch.equal(reader.get_tensor("quant_conv.conv.weight"), weights["quant_conv.conv.weight"])
    assert [c["weights_only"] for c in calls] == [True, True] and calls[0]["mmap"] is True


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("protocol", [2, 3])
def test_bin_is_read_without_torch_warnings(tmp_path, zipfile, protocol):
    weights = {"proj.weight": torch.arange(12.0).reshape(3, 4), "proj.steps": torch.tensor([1, 2, 3])}
    path = tmp_path / "weights.bin"
    # torch's weights-only unpickler warns "Detected pickle protocol 3 in the checkpoint" (several times for a
    # legacy file) when it reads protocol 3; the reader keeps that to itself
    torch.save(weights, path, pickle_protocol=protocol, _use_new_zipfile_serialization=zipfile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with L.open_checkpoint(path) as reader:
            assert reader.keys() == ["proj.weight", "proj.steps"]
            assert torch.equal(reader.get_tensor("proj.weight"), weights["proj.weight"])
            assert torch.equal(reader.get_tensor("proj.steps"), weights["proj.steps"])
            assert reader.dtype("proj.steps") == torch.int64
    assert [str(w.message) for w in caught] == []


def test_only_torch_load_noise_is_hidden(tmp_path, monkeypatch):
    path = tmp_path / "weights.bin"
    torch.save({"w": torch.ones(2)}, path)
    real_load = torch.load

    def noisy_load(*args, **kwargs):  # what older or newer torch versions print around a weights-only load
        warnings.warn("Detected pickle protocol 4 in the checkpoint, which was not the default", UserWarning)
        warnings.warn("TypedStorage is deprecated. It will be removed in the future", UserWarning)
        warnings.warn("You are using `torch.load` with `weights_only=False` (the current default value)", FutureWarning)
        warnings.warn("an unrelated warning", UserWarning)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", noisy_load)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with L.open_checkpoint(path) as reader:
            assert torch.equal(reader.get_tensor("w"), torch.ones(2))
    assert [(w.category, str(w.message)) for w in caught] == [(UserWarning, "an unrelated warning")]
    with warnings.catch_warnings(record=True) as caught:  # the filters end with the load
        warnings.simplefilter("always")
        warnings.warn("TypedStorage is deprecated. It will be removed in the future", UserWarning)
    assert len(caught) == 1


@pytest.mark.parametrize("protocol", [4, 5])
def test_bin_in_an_unreadable_pickle_protocol_is_explained(tmp_path, protocol):
    path = tmp_path / "new_protocol.bin"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=protocol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            reader = L.open_checkpoint(path)
        except CheckpointError as exc:  # torch 2.13's weights-only unpickler has no FRAME opcode (protocol 4+)
            assert str(exc) == (
                f"{path} was written with a pickle protocol that torch's safe (weights-only) loader cannot read; "
                "re-save its state dict with torch.save's default protocol, or convert it to .safetensors with a "
                "tool you trust"
            )
        else:  # a torch that learnt these protocols reads the file
            with reader:
                assert torch.equal(reader.get_tensor("w"), torch.ones(2))
    assert caught == []


def _mark_executed(tag: str) -> str:
    EXECUTED_MARK.append(tag)
    return tag


class _Payload:
    def __reduce__(self):
        return (_mark_executed, ("unpickled",))


def test_bin_with_python_objects_is_refused(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"weight": torch.zeros(2), "payload": _Payload()}, path)
    EXECUTED_MARK.clear()
    with pytest.raises(CheckpointError, match=r"evil\.bin contains Python code/objects.*Convert it to \.safetensors"):
        L.open_checkpoint(path)
    assert EXECUTED_MARK == []  # the pickle's code never ran


# ---------------------------------------------------------------------------------------- own aligned memory


def _mapped_ranges(files: list[Path]) -> list[tuple[int, int]]:
    """Address ranges where this process maps any of `files` (Linux /proc/self/maps; [] elsewhere)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    names = {str(f.resolve()) for f in files}
    ranges = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in names:
            low, high = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


def _in_mapping(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    start = tensor.untyped_storage().data_ptr()
    end = start + max(1, tensor.untyped_storage().nbytes())
    return any(low < end and start < high for low, high in ranges)


def _assert_own_aligned_memory(model: nn.Module, files: list[Path]) -> None:
    """Every parameter/buffer is a 64-byte aligned CPU tensor outside any mapping of the checkpoint files."""
    ranges = _mapped_ranges(files)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.device.type == "cpu" and not tensor.is_meta, name
        assert tensor.data_ptr() % 64 == 0, f"{name} starts at {tensor.data_ptr() % 64} mod 64"
        assert not _in_mapping(tensor, ranges), f"{name} is a view of the file mapping"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_mapping_check_sees_a_safetensors_view():
    """Control for the checks below: safetensors' own reader hands out views of its file mapping."""
    from safetensors import safe_open

    path = _dit_dir("flux") / "diffusion_pytorch_model.safetensors"
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        views = [handle.get_tensor(key) for key in handle.keys()]
    ranges = _mapped_ranges([path])
    assert ranges and all(_in_mapping(view, ranges) for view in views)
    assert any(view.data_ptr() % 64 for view in views)  # the misalignment the loader avoids


def _official_folder(tmp_path: Path) -> tuple[list[nn.Module], list[Path]]:
    root = model_dir("miniflux_tiny")
    models = [L.load_dit(root, dtype=torch.float32).model, L.load_vae(root, dtype=None).model]  # fp32 files: no cast
    files = [root / VARIANT / "diffusion_pytorch_model.safetensors", root / "causal_video_vae" / "diffusion_pytorch_model.safetensors"]
    return models, files


def _single_file(tmp_path: Path) -> tuple[list[nn.Module], list[Path]]:
    path = L.save_single_file(_weights(_dit_dir("mmdit")), tmp_path / "mmdit.safetensors")
    return [L.load_dit(path, dtype=None).model], [path]


def _bf16_file_as_bf16(tmp_path: Path) -> tuple[list[nn.Module], list[Path]]:
    path = L.save_single_file(_weights(_dit_dir("flux")), tmp_path / "flux_bf16.safetensors", dtype=torch.bfloat16)
    return [L.load_dit(path, dtype=torch.bfloat16).model], [path]


def _bin_file(tmp_path: Path) -> tuple[list[nn.Module], list[Path]]:
    folder = tmp_path / "causal_video_vae"
    folder.mkdir()
    shutil.copy(_vae_dir() / "config.json", folder)
    torch.save(_weights(_vae_dir()), folder / "diffusion_pytorch_model.bin")  # read with mmap=True
    return [L.load_vae(folder, dtype=torch.float32).model], [folder / "diffusion_pytorch_model.bin"]


def _legacy_bin_file(tmp_path: Path) -> tuple[list[nn.Module], list[Path]]:
    folder = tmp_path / "causal_video_vae"
    folder.mkdir()
    shutil.copy(_vae_dir() / "config.json", folder)
    torch.save(_weights(_vae_dir()), folder / "diffusion_pytorch_model.bin", _use_new_zipfile_serialization=False)
    return [L.load_vae(folder, dtype=None).model], [folder / "diffusion_pytorch_model.bin"]


@pytest.mark.parametrize("load", [_official_folder, _single_file, _bf16_file_as_bf16, _bin_file, _legacy_bin_file],
                         ids=lambda f: f.__name__.strip("_"))
def test_loaded_tensors_own_aligned_memory(tmp_path, load):
    models, files = load(tmp_path)
    for model in models:
        _assert_own_aligned_memory(model, files)


@pytest.mark.parametrize("stored", [torch.float32, torch.float8_e4m3fn])
def test_cast_while_reading_in_small_chunks_matches_tensor_to(tmp_path, monkeypatch, stored):
    monkeypatch.setattr(reading, "_STAGING_BYTES", 100)  # chunk ends fall mid-row (25 fp32 / 100 fp8 values)
    source = {k: v.to(stored) for k, v in _weights(_dit_dir("flux")).items()}
    path = L.save_single_file(source, tmp_path / "flux.safetensors")
    loaded = L.load_dit(path, dtype=torch.bfloat16)
    _assert_model_equals(loaded.model, source, torch.bfloat16)
    _assert_own_aligned_memory(loaded.model, [path])


def test_reader_tensors_are_private_copies(tmp_path):
    path = L.save_single_file(_weights(_dit_dir("flux")), tmp_path / "flux_bf16.safetensors", dtype=torch.bfloat16)
    expected = load_file(str(path))
    with L.open_checkpoint(path) as reader:
        first = reader.get_tensor("proj_out.weight")
        again = reader.get_tensor("proj_out.weight")
        assert torch.equal(first, expected["proj_out.weight"]) and first.data_ptr() != again.data_ptr()
        assert first.data_ptr() % 64 == 0 and not _in_mapping(first, _mapped_ranges([path]))
        scalar_shapes = [key for key in reader.keys() if reader.shape(key) == ()]
        for key in scalar_shapes:
            assert torch.equal(reader.get_tensor(key), expected[key])


# ---------------------------------------------------------------------------------------- single files


def _relevant(config: dict, family: str) -> dict:
    # sample_size only seeds the MMDiT pos_embed table, which the file overwrites; no shape records it.
    return {k: v for k, v in config.items() if not (family == "mmdit" and k == "sample_size")}


@pytest.mark.parametrize("family", ["flux", "mmdit"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_dit_single_file(tmp_path, family, dtype):
    source = _weights(_dit_dir(family))
    path = L.save_single_file(source, tmp_path / f"{family}.safetensors", dtype=dtype)
    with L.open_checkpoint(path) as reader:
        assert reader.embedded_config() is None
        assert reader.dtypes() == {dtype}
        assert L.detect_family(reader) == family
        derived = L.derive_config(family, reader)
    expected = _expected_config(_dit_dir(family), family)
    assert _relevant(derived, family) == _relevant(expected, family)

    stored = L.load_dit(path, dtype=None)
    assert (stored.family, stored.variant, stored.source_dtypes) == (family, VARIANT, {dtype})
    _assert_model_equals(stored.model, {k: v.to(dtype) for k, v in source.items()}, None)
    upcast = L.load_dit(path, "image", dtype=torch.bfloat16)  # fp8 upcast per tensor
    assert upcast.variant == "diffusion_transformer_image"
    _assert_model_equals(upcast.model, {k: v.to(dtype) for k, v in source.items()}, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_vae_single_file_with_embedded_config(tmp_path, dtype):
    source = _weights(_vae_dir())
    config = json.loads((_vae_dir() / "config.json").read_text())
    path = L.save_single_file(source, tmp_path / "vae.safetensors", dtype=dtype, config=config)
    with L.open_checkpoint(path) as reader:
        assert L.detect_family(reader) == "vae"
        assert L.derive_config("vae", reader) == _expected_config(_vae_dir(), "vae")
    vae = L.load_vae(path, dtype=torch.float32)
    assert vae.source_dtypes == {dtype}
    _assert_model_equals(vae.model, {k: v.to(dtype) for k, v in source.items()}, torch.float32)


def test_vae_single_file_without_config_needs_official_groups(tmp_path):
    path = L.save_single_file(_weights(_vae_dir()), tmp_path / "vae.safetensors", dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: VAE channels \[8, 16\] are not multiples of the "
                                              r"official 32 norm groups.*save_single_file"):
        L.load_vae(path)


def test_loaded_model_round_trips_through_save(tmp_path):
    loaded = L.load_dit(_dit_dir("mmdit"), dtype=torch.float32)
    path = L.save_single_file(loaded, tmp_path / "mmdit.safetensors")
    with L.open_checkpoint(path) as reader:
        assert reader.embedded_config() == loaded.config
    again = L.load_dit(path, dtype=torch.float32)
    assert again.config == loaded.config  # sample_size survives through the embedded config
    _assert_model_equals(again.model, _weights(_dit_dir("mmdit")), torch.float32)


class _ShapeTable:
    """A reader stand-in holding only names and shapes (the official full-size key tables)."""

    def __init__(self, family: str):
        self.source = KEY_TABLES / f"pyramid_flow_keys_{family}.tsv"
        self._shapes = {}
        for line in self.source.read_text().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, shape = line.split("\t")
            self._shapes[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())

    def keys(self):
        return list(self._shapes)

    def __contains__(self, key):
        return key in self._shapes

    def shape(self, key):
        return self._shapes[key]

    def embedded_config(self):
        return None


@pytest.mark.parametrize("family", ["flux", "mmdit", "vae"])
def test_config_derived_from_official_key_tables(family):
    official = {"flux": L.OFFICIAL_FLUX_CONFIG, "mmdit": L.OFFICIAL_MMDIT_CONFIG, "vae": L.OFFICIAL_VAE_CONFIG}
    table = _ShapeTable(family)
    assert L.detect_family(table) == family
    derived = L.derive_config(family, table)
    assert derived == {**official[family], **L.loader_extras(family)}
    # The shape-derived values, spelled out from FACTS 1.4.
    if family == "flux":
        assert (derived["num_layers"], derived["num_single_layers"], derived["num_attention_heads"]) == (8, 16, 30)
        assert (derived["in_channels"], derived["joint_attention_dim"], derived["pooled_projection_dim"]) == (64, 4096, 768)
    elif family == "mmdit":
        assert (derived["num_layers"], derived["num_attention_heads"], derived["attention_head_dim"]) == (24, 24, 64)
        assert (derived["pos_embed_max_size"], derived["caption_projection_dim"], derived["pooled_projection_dim"]) == (
            192, 1536, 2048)
    else:
        assert derived["encoder_block_out_channels"] == derived["decoder_block_out_channels"] == [128, 256, 512, 512]
        assert (derived["encoder_layers_per_block"], derived["decoder_layers_per_block"]) == ([2] * 4, [3] * 4)
        assert derived["decoder_spatial_up_sample"] == derived["encoder_temporal_down_sample"] == [True, True, True, False]


# ---------------------------------------------------------------------------------------- bad inputs


def test_folder_without_dit_variant_lists_what_it_found(tmp_path):
    root = tmp_path / "downloads"
    for name in ("causal_video_vae", "text_encoder", "tokenizer"):
        (root / name).mkdir(parents=True)
    with pytest.raises(CheckpointError) as info:
        L.resolve_model_folder(root)
    message = str(info.value)
    assert all(v in message for v in L.DIT_VARIANTS)
    assert "found causal_video_vae/, text_encoder/, tokenizer/" in message
    with pytest.raises(CheckpointError, match="looks like a component subfolder; point at its parent folder"):
        L.resolve_model_folder(_dit_dir("flux"))
    with pytest.raises(CheckpointError, match="is a file, not a model folder.*load_dit / load_vae"):
        L.resolve_model_folder(_dit_dir("flux") / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="no DiT variant folder"):
        L.load_dit(root)


def test_truncated_file_is_reported(tmp_path):
    data = (_dit_dir("flux") / "diffusion_pytorch_model.safetensors").read_bytes()
    cut_data = tmp_path / "cut_data.safetensors"
    cut_data.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut_data\.safetensors is not a usable safetensors file: truncated"):
        L.open_checkpoint(cut_data)
    cut_header = tmp_path / "cut_header.safetensors"
    cut_header.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"cut_header\.safetensors .*truncated inside its header"):
        L.load_dit(cut_header)


def test_non_safetensors_file_is_reported(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights, just a text file saved with the wrong name\n")
    with pytest.raises(CheckpointError, match=r"notes\.safetensors is not a usable safetensors file: not a safetensors"):
        L.load_dit(text)
    pickled = tmp_path / "renamed.safetensors"
    torch.save({"w": torch.zeros(3)}, pickled)
    with pytest.raises(CheckpointError, match=r"renamed\.safetensors .*PyTorch pickle/zip checkpoint; rename it to \.bin"):
        L.open_checkpoint(pickled)


def test_vae_given_as_dit_and_dit_given_as_vae(tmp_path):
    vae_file = L.save_single_file(_weights(_vae_dir()), tmp_path / "vae_bf16.safetensors", dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match="vae_bf16.safetensors is a causal video VAE, not a DiT; "
                                              "load it with load_vae"):
        L.load_dit(vae_file)
    with pytest.raises(CheckpointError, match="is a causal video VAE, not a DiT"):
        L.load_dit(_vae_dir())
    dit_file = L.save_single_file(_weights(_dit_dir("flux")), tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="dit.safetensors is a miniFLUX DiT, not a causal video VAE; "
                                              "load it with load_dit"):
        L.load_vae(dit_file)
    with pytest.raises(CheckpointError, match="is a SD3-style MMDiT DiT, not a causal video VAE"):
        L.load_vae(_dit_dir("mmdit"))


def test_text_encoder_file_is_named_as_such():
    with L.open_checkpoint(model_dir("miniflux_tiny") / "text_encoder") as reader:
        with pytest.raises(CheckpointError, match="not a Pyramid Flow DiT or VAE checkpoint.*CLIP text encoder"):
            L.detect_family(reader)


def test_tensor_dtype_the_loader_cannot_read_is_named(tmp_path):
    path = L.save_single_file(_weights(_dit_dir("flux")), tmp_path / "dit_fp8.safetensors", dtype=torch.float8_e4m3fn)
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + header_len].replace(b'"F8_E4M3"', b'"F8_E8M0"', 1)  # same size: byte ranges still hold
    path.write_bytes(data[:8] + header + data[8 + header_len :])
    with pytest.raises(CheckpointError, match=r"dit_fp8\.safetensors is not a usable safetensors file: tensor '.+' has "
                                              r"dtype F8_E8M0, which this loader cannot read"):
        L.load_dit(path)


def test_strict_key_errors_name_every_problem(tmp_path):
    weights = _weights(_dit_dir("flux"))
    del weights["proj_out.bias"]
    weights["x_embedder.weight"] = torch.zeros(128, 32)
    weights["transformer_blocks.0.attn.extra.weight"] = torch.zeros(4)
    folder = tmp_path / VARIANT  # config.json fixes the shapes, so the mis-shaped tensor cannot re-derive them
    folder.mkdir()
    shutil.copy(_dit_dir("flux") / "config.json", folder)
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        L.load_dit(folder)
    message = str(info.value)
    assert f"{VARIANT}/diffusion_pytorch_model.safetensors does not match the miniFLUX DiT" in message
    assert "missing in the file (1): proj_out.bias" in message
    assert "unexpected in the file (1): transformer_blocks.0.attn.extra.weight" in message
    assert "wrong shape (1): x_embedder.weight: file (128, 32) vs model (128, 64)" in message


def test_non_strict_tolerates_extra_keys_but_not_missing_ones(tmp_path):
    weights = _weights(_dit_dir("flux"))
    extra = dict(weights, **{"some.training.state": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected in the file"):
        L.load_dit(tmp_path / "extra.safetensors")
    loaded = L.load_dit(tmp_path / "extra.safetensors", strict=False, dtype=torch.float32)
    _assert_model_equals(loaded.model, weights, torch.float32)
    del weights["proj_out.bias"]
    save_file(weights, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="still on the meta device.*proj_out.bias"):
        L.load_dit(tmp_path / "missing.safetensors", strict=False)


def test_mmdit_temp_pos_embed_is_ignored(tmp_path):
    weights = _weights(_dit_dir("mmdit"))
    save_file(dict(weights, **{"pos_embed.temp_pos_embed": torch.zeros(1, 200, 64)}), str(tmp_path / "sd3.safetensors"))
    loaded = L.load_dit(tmp_path / "sd3.safetensors", dtype=torch.float32)
    _assert_model_equals(loaded.model, weights, torch.float32)


def test_vae_legacy_attention_names_are_mapped(tmp_path):
    weights = _weights(_vae_dir())
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in weights.items():
        for new, old in legacy.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in renamed
    config = json.loads((_vae_dir() / "config.json").read_text())
    path = L.save_single_file(renamed, tmp_path / "legacy.safetensors", config=config)
    _assert_model_equals(L.load_vae(path, dtype=None).model, weights, None)


class _WithScratch(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def test_fill_leaves_nothing_on_meta(tmp_path):
    path = L.save_single_file(nn.Linear(3, 2).state_dict(), tmp_path / "linear.safetensors")
    with torch.device("meta"):
        model = _WithScratch()
    with L.open_checkpoint(path) as reader:
        renamed = {"weight": "linear.weight", "bias": "linear.bias"}
        with pytest.raises(CheckpointError, match="still on the meta device.*scratch"):
            L.fill_meta_model(model, reader, rename=renamed)
        with torch.device("meta"):
            plain = nn.Sequential(nn.Linear(3, 2))
        L.fill_meta_model(plain, reader, dtype=torch.float16, rename={"weight": "0.weight", "bias": "0.bias"})
        assert plain[0].weight.dtype == torch.float16 and not plain[0].weight.is_meta
        assert torch.equal(plain[0].bias, reader.get_tensor("bias").to(torch.float16))


def test_weights_folder_without_config_derives_it(tmp_path):
    folder = tmp_path / "my_dit"
    folder.mkdir()
    shutil.copy(_dit_dir("flux") / "diffusion_pytorch_model.safetensors", folder)
    loaded = L.load_dit(folder, dtype=torch.float32)
    assert (loaded.variant, loaded.config) == (VARIANT, _expected_config(_dit_dir("flux"), "flux"))
    with pytest.raises(CheckpointError, match="looks like a model root folder: use load_dit/load_vae"):
        L.open_checkpoint(model_dir("miniflux_tiny"))


def test_header_length_byte_like_pickle_magic_is_still_safetensors(tmp_path):
    tensors = {"w": torch.arange(4.0)}
    path = tmp_path / "odd.weights"  # unknown extension: the content decides
    for pad in range(300):
        save_file(tensors, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("could not make a header length whose low byte is 0x80")
    with L.open_checkpoint(path) as reader:
        assert torch.equal(reader.get_tensor("w"), tensors["w"])
