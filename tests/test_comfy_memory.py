"""ComfyUI owns the models' memory (against the double, with ComfyUI 0.33.0's comfy.ops / ModelPatcher signatures):
our layers are ComfyUI's ops, a partial load computes the latents of a full load, an idle text encoder is evicted
before sampling, OOM reaches ComfyUI as torch's OOM type, and every compatibility fallback works."""
import dataclasses

import pytest
import torch

import nodes
from nodes import comfy as gateway
from pyramid_core.memory import DeviceOutOfMemoryError
from pyramid_core.text import DEFAULT_NEGATIVE_PROMPT
from tests import comfy_double
from tests.helpers import make_base
from tests.reference import assert_matches, case, tensors

M = nodes.NODE_CLASS_MAPPINGS
PROMPT = "a cat walking on the beach at sunset"


def load(offload="auto"):
    return M["PyramidFlowCoreModelLoader"]().load("pyramid-flow-miniflux", "384p", "fp32", offload, 0.0, 0, "segmented")


def encode(text_encoder, keep_loaded=False):
    node = M["PyramidFlowCoreTextEncode"]()
    return node.encode(PROMPT, DEFAULT_NEGATIVE_PROMPT, True, keep_loaded, text_encoder, None)[0]


def sample(model, cond, seed=7, temp=2):
    node = M["PyramidFlowCoreSampler"]()
    return node.sample(model, cond, 64, 64, temp, 0.0, "1, 1, 1", "1, 1, 1", 7.0, 5.0, seed)[0]["samples"]


def with_offload(model, offload):
    """The loader's output with another offload mode (same weights: no reload)."""
    return dataclasses.replace(model, offload=offload)


def _rebind():
    assert gateway.bind()


@pytest.fixture(scope="module")
def comfy_state(tmp_path_factory):
    """The double installed once for the module; the tiny models loaded once through the nodes."""
    comfy_double.install(make_base(tmp_path_factory.mktemp("comfy_memory")))
    import comfy.model_management as mm

    model, vae, text_encoder = load()
    cond = encode(text_encoder)
    reference = sample(model, cond)  # loaded whole (the double's memory is ample)
    yield mm, model, vae, text_encoder, cond, reference
    comfy_double.uninstall()


@pytest.fixture
def comfy(comfy_state, monkeypatch):
    """Per test: nothing loaded, no events, the double's memory size restored, fallbacks undone afterwards."""
    import comfy.ops as ops

    mm = comfy_state[0]
    saved = mm.TOTAL_MEMORY
    mm.unload_all_models()
    mm.EVENTS.clear()
    ops.CASTS.clear()
    yield mm
    monkeypatch.undo()  # before re-binding: the gateway reads the restored modules
    mm.TOTAL_MEMORY = saved
    _rebind()


def test_layers_are_comfyui_ops_and_parity_holds_through_them(comfy_state, comfy, monkeypatch):
    import comfy.ops as ops

    _, model, vae, text_encoder, cond, _ = comfy_state
    for module, kinds in ((model.dit.module, ("Linear",)), (vae.vae.module, ("Linear", "Conv3d"))):
        for kind in kinds:  # every layer of these kinds, diffusers' timestep embedder and the VAE attention included
            layers = [m for m in module.modules() if isinstance(m, getattr(torch.nn, kind))]
            assert layers and all(isinstance(m, getattr(ops.disable_weight_init, kind)) for m in layers), kind
            assert all(type(m).__module__ == "nodes.comfy" for m in layers)

    expected, entry = tensors("miniflux_tiny/e2e/t2v"), case("miniflux_tiny/e2e/t2v")
    monkeypatch.setattr("pyramid_core.pipeline.RandomStreams.from_seed", classmethod(
        lambda cls, seed: cls(torch.Generator("cpu").manual_seed(1234), None)))
    torch.manual_seed(4321)
    latent = M["PyramidFlowCoreSampler"]().sample(model, cond, 64, 64, 3, 0.0, "2, 2, 2", "2, 2, 2", 7.0, 5.0, 0)[0]
    assert_matches(latent["samples"], expected["latents"], entry["tolerance"]["latents"], "latents through comfy.ops")


def partial_run(comfy, comfy_state):
    """Sample with ComfyUI's memory set so only about half the DiT's weights load; check it really was partial."""
    import comfy.ops as ops

    _, model, _, _, cond, _ = comfy_state
    comfy.TOTAL_MEMORY = model.dit.patcher.model_size() // 2 + 1
    latents = sample(model, cond)
    events = [e for e in comfy.EVENTS if e[0] == "partial"]
    assert events and events[0][1] == "PyramidFluxTransformer" and events[0][3] > 0, comfy.EVENTS
    assert ops.CASTS, "offloaded layers must be cast by ComfyUI's path on every call"
    return latents


def test_partial_load_computes_the_latents_of_a_full_load(comfy_state, comfy):
    torch.testing.assert_close(partial_run(comfy, comfy_state), comfy_state[-1], rtol=0, atol=0)


def test_idle_text_encoder_is_evicted_before_sampling(comfy_state, comfy):
    _, model, _, text_encoder, _, _ = comfy_state
    cond = encode(text_encoder, keep_loaded=True)
    managed = text_encoder.managed()
    assert managed.patcher in comfy.loaded_models()
    comfy.TOTAL_MEMORY = model.dit.patcher.model_size() + managed.patcher.model_size() // 2  # DiT fits only alone
    comfy.EVENTS.clear()
    sample(model, cond)
    assert ("unload", "PyramidTextEncoder") in comfy.EVENTS
    loads = [e for e in comfy.EVENTS if e[0] == "load"]
    assert loads[0][:2] == ("load", "PyramidFluxTransformer") and loads[0][2] > 0, "working memory is asked for"
    assert managed.patcher not in comfy.loaded_models()


def test_out_of_memory_reaches_comfyui_as_torchs_oom_type(comfy_state, comfy, monkeypatch):
    _, model, _, _, cond, _ = comfy_state

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(model.dit.module), "forward", fail)
    with pytest.raises(torch.OutOfMemoryError) as caught:  # what ComfyUI's execution checks (OOM_EXCEPTION)
        sample(model, cond)
    assert isinstance(caught.value, DeviceOutOfMemoryError)
    message = str(caught.value)
    assert message.startswith("out of device memory while sampling with offload='auto' at 64x64, temp 2. ")
    assert "Tried to allocate" in message and "offload=" in message.split(". ", 1)[1], message


@pytest.mark.parametrize("offload, whole, stays", [("auto", False, True), ("none", True, True), ("model", True, False)])
def test_every_loader_mode_loads_through_comfyui(comfy_state, comfy, offload, whole, stays):
    from nodes.managed import ComfyMemory

    model = with_offload(comfy_state[1], offload)
    memory = ComfyMemory({"dit": model.dit}, model.offload)
    memory.prepare(640, 384, 16, cfg=True, dtype=torch.float32)
    with memory.use("dit") as dit:
        assert dit is model.dit.module
    (event,) = [e for e in comfy.EVENTS if e[0] == "load"]
    working = model.dit.module.working_memory_bytes(memory.workload)
    assert event == ("load", "PyramidFluxTransformer", working, whole)
    assert (model.dit.patcher in comfy.loaded_models()) == stays


# ------------------------------------------------------------------- compatibility fallbacks


def test_patcher_is_core_model_patcher_where_present_else_model_patcher(comfy, monkeypatch):
    import comfy.model_patcher as mp

    class Dynamic(mp.ModelPatcher):
        pass

    monkeypatch.setattr(mp, "CoreModelPatcher", Dynamic)  # what main.py does when dynamic VRAM is on
    assert type(gateway.make_patcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))) is Dynamic
    monkeypatch.delattr(mp, "CoreModelPatcher")  # ComfyUI before CoreModelPatcher
    _rebind()
    assert type(gateway.make_patcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))) is mp.ModelPatcher


@pytest.mark.parametrize("shape", ["offloadable", "two_values"])
def test_weight_cast_shapes_of_older_comfyui_give_the_same_latents(comfy_state, comfy, monkeypatch, shape):
    import comfy.ops as ops

    monkeypatch.delattr(ops, "CastBiasWeightContext")  # 2025: cast_bias_weight(offloadable=True) + uncast
    if shape == "two_values":
        modern = ops.cast_bias_weight

        def cast_bias_weight(s, input=None, dtype=None, device=None, bias_dtype=None):  # before 2025
            return modern(s, input, dtype, device, bias_dtype)

        monkeypatch.setattr(ops, "cast_bias_weight", cast_bias_weight)
        monkeypatch.delattr(ops, "uncast_bias_weight")
    _rebind()
    torch.testing.assert_close(partial_run(comfy, comfy_state), comfy_state[-1], rtol=0, atol=0)


def test_unload_without_unload_model_and_clones(comfy_state, comfy, monkeypatch):
    monkeypatch.delattr(comfy, "unload_model_and_clones")  # added in 2026: older versions lack it
    _rebind()
    model = comfy_state[1]
    gateway.load_models([model.dit.patcher])
    assert model.dit.patcher in comfy.loaded_models()
    gateway.unload_model(model.dit.patcher)
    assert ("unload", "PyramidFluxTransformer") in comfy.EVENTS and comfy.loaded_models() == []


def test_load_without_force_full_load_and_without_pick_operations(comfy, monkeypatch):
    import comfy.ops as ops

    original = comfy.load_models_gpu
    calls = []

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None):
        calls.append(memory_required)
        return original(models, memory_required, force_patch_weights, minimum_memory_required)

    monkeypatch.setattr(comfy, "load_models_gpu", load_models_gpu)  # before 2024-08
    monkeypatch.delattr(ops, "pick_operations")
    _rebind()
    layers = gateway.operations(torch.float32, torch.float32, torch.device("cpu"))
    assert issubclass(layers.Linear, ops.disable_weight_init.Linear) and layers.base is ops.disable_weight_init
    assert gateway.operations(torch.float8_e4m3fn, torch.bfloat16, torch.device("cpu")).base is ops.manual_cast
    patcher = gateway.make_patcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    gateway.load_models([patcher], memory_required=5, force_full_load=True)
    assert calls == [5] and patcher in comfy.loaded_models()


def test_a_comfyui_too_old_gets_one_clear_error(comfy, monkeypatch):
    import comfy.ops as ops

    monkeypatch.delattr(ops, "cast_bias_weight")
    _rebind()
    with pytest.raises(RuntimeError, match=r"needs ComfyUI 0\.1 .*or newer.*comfy\.ops\.cast_bias_weight"):
        load()
