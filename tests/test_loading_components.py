"""The one loading entry, `load_components`: its precision policy, and that every way in (the pipeline, the
command line, the ComfyUI loader node) goes through it and gets the same dtypes per component."""
import json
import shutil

import pytest
import torch

import nodes
from pyramid_core import PyramidFlowPipeline, cli
from pyramid_core import loading
from pyramid_core.loading import CheckpointError, component_dtypes, load_components, precision_settings
from pyramid_core.precision import has_fp8_weights
from tests import comfy_double
from tests.helpers import make_base
from tests.reference import model_dir

MODEL = model_dir("miniflux_tiny")
PRECISIONS = ("bf16", "fp16", "fp32", "fp8")
# precision -> (DiT compute, VAE, text encoders): the policy of `component_dtypes`
POLICY = {
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float32, torch.float16),
    "fp32": (torch.float32, torch.float32, torch.float32),
    "fp8": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
}
CLI_FLAGS = {"bf16": ["--dtype", "bf16"], "fp16": ["--dtype", "fp16"], "fp32": ["--dtype", "fp32"],
             "fp8": ["--dtype", "bf16", "--fp8", "row"]}


def stored_dtypes(module: torch.nn.Module) -> tuple[str, ...]:
    """The dtypes of every floating tensor a module stores (float8 weights and fp32 scales included)."""
    return tuple(sorted({str(t.dtype) for t in module.state_dict().values() if t.is_floating_point()}))


def per_component(dit, vae, text_encoder) -> dict[str, tuple[str, ...]]:
    return {"dit": stored_dtypes(dit), "vae": stored_dtypes(vae), "text_encoder": stored_dtypes(text_encoder)}


@pytest.fixture
def entry_calls(monkeypatch):
    """Every `load_components` result, in call order."""
    results = []
    real = loading.load_components

    def recording(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(loading, "load_components", recording)
    return results


@pytest.fixture(scope="module")
def comfy_base(tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("entry_base"))
    comfy_double.install(base)
    yield base
    comfy_double.uninstall()


def through_pipeline(precision: str, calls: list) -> dict[str, tuple[str, ...]]:
    compute, fp8 = precision_settings(precision)
    pipe = PyramidFlowPipeline.from_pretrained(MODEL, dtype=compute, device="cpu", fp8=fp8)
    assert calls[-1].dit.model is pipe.dit and calls[-1].text_encoder is pipe.text_encoder
    return per_component(pipe.dit, pipe.vae, pipe.text_encoder)


def through_cli(precision: str, calls: list, monkeypatch, tmp_path) -> dict[str, tuple[str, ...]]:
    recording = loading.load_components

    def load_then_stop(*args, **kwargs):
        recording(*args, **kwargs)
        raise cli.UsageError("stopped after loading")

    monkeypatch.setattr(loading, "load_components", load_then_stop)
    status = cli.main(["generate", "--model", str(MODEL), "--prompt", "a cat", "--device", "cpu",
                       *CLI_FLAGS[precision], "--out", str(tmp_path / f"{precision}.mp4")])
    assert status == cli.EXIT_USAGE
    parts = calls[-1]
    return per_component(parts.dit.model, parts.vae.model, parts.text_encoder)


def through_node(precision: str, calls: list) -> dict[str, tuple[str, ...]]:
    loader = nodes.NODE_CLASS_MAPPINGS["PyramidFlowCoreModelLoader"]()
    model, vae, text_encoder = loader.load("pyramid-flow-miniflux", "384p", precision, "none", 0.0, 0, "segmented")
    assert calls[-1].dit.model is model.dit.module and calls[-1].vae.model is vae.vae.module
    assert text_encoder.dtype == calls[-1].dtypes.text_encoder  # loaded on first use, in the policy's dtype
    return per_component(model.dit.module, vae.vae.module, text_encoder.managed().module)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_pipeline_cli_and_node_load_the_same_dtypes_through_the_entry(
    precision, entry_calls, comfy_base, monkeypatch, tmp_path
):
    by_pipeline = through_pipeline(precision, entry_calls)
    by_node = through_node(precision, entry_calls)
    by_cli = through_cli(precision, entry_calls, monkeypatch, tmp_path)
    assert len(entry_calls) == 3
    assert by_pipeline == by_cli == by_node
    dit, vae, text = POLICY[precision]
    assert all(parts.dtypes == component_dtypes(dit) for parts in entry_calls)
    assert all((parts.dtypes.vae, parts.dtypes.text_encoder) == (vae, text) for parts in entry_calls)
    assert by_pipeline["vae"] == (str(vae),)
    assert str(text) in by_pipeline["text_encoder"]  # (fp16 T5 keeps its `wo` projections in fp32)
    assert str(dit) in by_pipeline["dit"]
    assert ("torch.float8_e4m3fn" in by_pipeline["dit"]) == (precision == "fp8")
    assert all(has_fp8_weights(parts.dit.model) == (precision == "fp8") for parts in entry_calls)


def test_policy_and_precision_names():
    assert precision_settings("fp8") == (torch.bfloat16, "row")
    assert precision_settings("fp8", "tensor") == (torch.bfloat16, "tensor")
    assert precision_settings("fp16") == (torch.float16, None)
    with pytest.raises(ValueError, match="precision must be one of"):
        precision_settings("int4")
    with pytest.raises(ValueError, match="compute dtype must be bf16, fp16 or fp32"):
        component_dtypes(torch.float8_e4m3fn)


def test_single_files_and_mappings(tmp_path):
    dit_file = loading.save_single_file(loading.load_dit(MODEL, dtype=None), tmp_path / "dit.safetensors")
    vae_file = loading.save_single_file(loading.load_vae(MODEL, dtype=None), tmp_path / "vae.safetensors")
    dit_only = load_components(dit_file, "768p", dtype=torch.float32, components=("dit",))
    assert (dit_only.family, dit_only.variant, dit_only.vae, dit_only.text_encoder) == (
        "flux", "diffusion_transformer_768p", None, None)
    assert dit_only.sources == {"dit": dit_file}
    vae_only = load_components(vae_file, dtype=torch.float16, components=("vae",))
    assert vae_only.family is None and stored_dtypes(vae_only.vae.model) == ("torch.float32",)
    both = load_components({"dit": dit_file, "vae": vae_file}, dtype=torch.float32, components=("dit", "vae"))
    assert both.sources == {"dit": dit_file, "vae": vae_file}
    with pytest.raises(CheckpointError, match="holds one model .* load it with components=\\('dit',\\)"):
        load_components(dit_file)
    with pytest.raises(CheckpointError, match="no path given for text_encoder"):
        load_components({"dit": dit_file}, components=("dit", "text_encoder"))
    with pytest.raises(ValueError, match="components must be some of"):
        load_components(MODEL, components=("unet",))


def test_config_keys_the_model_does_not_take_are_dropped_with_a_warning(tmp_path):
    folder = tmp_path / "diffusion_transformer_384p"
    shutil.copytree(MODEL / "diffusion_transformer_384p", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "guidance_embeds": True}))
    with pytest.warns(UserWarning, match="config keys guidance_embeds are not arguments of the miniFLUX DiT"):
        loaded = loading.load_dit(folder, dtype=torch.float32)
    assert "guidance_embeds" not in loaded.config
    assert loaded.config == loading.load_dit(MODEL, dtype=torch.float32).config
