"""fp16 without overflow, fp8 weight storage, attention backends and compile, on the official tiny fixtures."""
import copy
import importlib.util

import pytest
import torch

from pyramid_core import PyramidFlowPipeline
from pyramid_core.loading import load_dit, save_single_file
from pyramid_core.models.attention import AttentionSpec, TokenLayout, joint_attention, masked_attention, sdpa
from pyramid_core.models.layers import mixed_precision_linear
from pyramid_core.precision import (
    Fp8Linear,
    apply_fp8_storage,
    compile_blocks,
    configure_dit,
    configure_dit_precision,
    fp8_dequantize,
    fp8_quantize,
    has_fp8_weights,
    quantize_linear_fp8,
    register_attention_backend,
    set_attention_backend,
    wrap_fp8_checkpoint,
)
from tests.reference import assert_matches, case, model_dir, tensors
from tests.helpers import build_tiny

MODELS = ["miniflux_tiny", "sd3_tiny"]
CASE = "{}/dit/t2v_unit2_stage2_step1"  # two history clips at two resolutions + current clip
FP16_MAX = 65504.0


@pytest.fixture(scope="module")
def tiny_models():
    return {name: build_tiny(name) for name in MODELS}


def forward(dit, model, dtype=torch.float32):
    """The fixture DiT call with inputs in `dtype`; fp32 output."""
    entry, t = case(CASE.format(model)), tensors(CASE.format(model))
    clips = [t[n].to(dtype) for n in entry["inputs"]["sample"][0]]
    with torch.no_grad():
        out = dit(clips, t["timestep_ratio"], t["encoder_hidden_states"].to(dtype), t["encoder_attention_mask"],
                  t["pooled_projections"].to(dtype))
    return out.float()


def rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ------------------------------------------------------------------ fp16


@pytest.mark.parametrize("model", MODELS)
def test_fp16_and_bf16_forward_close_to_official_fp32(tiny_models, model):
    expected = tensors(CASE.format(model))["output.0"]
    fp16 = forward(configure_dit_precision(copy.deepcopy(tiny_models[model]), torch.float16), model, torch.float16)
    bf16 = forward(configure_dit_precision(copy.deepcopy(tiny_models[model]), torch.bfloat16), model, torch.bfloat16)
    assert torch.isfinite(fp16).all() and torch.isfinite(bf16).all()
    assert rel_err(fp16, expected) < 2e-3  # measured 0.9e-3 (flux) / 0.6e-3 (sd3)
    assert rel_err(bf16, expected) < 2e-2  # measured 7.9e-3 / 6.1e-3: fp16 has 3 more mantissa bits


def _stress(dit, kind: str, amount: float):
    """Random weights pushed so fp32 activations exceed fp16 range while every weight stays fp16-representable.

    gates: adaLN gate biases (residual += gate * branch) -> residual streams grow past 65504;
    ff_hidden: adaLN scale_mlp biases -> FeedForward hidden activations past 65504.
    """
    with torch.no_grad():
        for name, module in dit.named_modules():
            if not name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear")):
                continue
            dim = module.weight.shape[1]
            chunks = module.bias.shape[0] // dim  # 6: shift, scale, gate (attn), shift, scale, gate (mlp); 3: single
            index = {6: 5, 3: 2}.get(chunks) if kind == "gates" else {6: 4}.get(chunks)
            if index is None:  # MMDiT's last text norm has no gate / FeedForward
                continue
            module.bias[index * dim : (index + 1) * dim] += amount
    return dit


def _peak(dit, model, modules):
    peaks = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: peaks.append(max(
        t.abs().max().item() for t in (o if isinstance(o, tuple) else (o,)) if t is not None))) for m in modules]
    out = forward(dit, model)
    for h in hooks:
        h.remove()
    return out, max(peaks)


@pytest.mark.parametrize("kind", ["gates", "ff_hidden"])
@pytest.mark.parametrize("model", MODELS)
def test_fp16_overflow_stress_official_flow_breaks_ours_stays_close(tiny_models, model, kind):
    stressed = _stress(copy.deepcopy(tiny_models[model]), kind, 6e4)
    watched = stressed.blocks if kind == "gates" else [b.ff.net[0] for b in stressed.blocks if hasattr(b, "ff")]
    reference, peak = _peak(stressed, model, watched)
    assert peak > 2 * FP16_MAX, f"the stress must exceed fp16 range in fp32 (peak {peak:.3g})"
    assert torch.isfinite(reference).all()

    official = configure_dit_precision(copy.deepcopy(stressed), torch.float16, residual_dtype=torch.float16)
    assert not torch.isfinite(forward(official, model, torch.float16)).all()  # NaN: the black video

    ours = forward(configure_dit_precision(copy.deepcopy(stressed), torch.float16), model, torch.float16)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, reference) < 3e-3  # measured 1.0e-3 .. 1.5e-3, as without stress


def test_mixed_precision_linear_keeps_huge_rows_finite():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=gen) / 16
    x = torch.randn(5, 256, generator=gen)
    x[0] *= 1e6  # a massive-activation token
    x[1, 3] = 3e5  # one massive channel
    exact = x.double() @ weight.double().T
    naive = torch.nn.functional.linear(x.clamp(-FP16_MAX, FP16_MAX).half(), weight.half()).float()
    assert not torch.isfinite(naive).all()
    out = mixed_precision_linear(x, weight.half())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    row_err = ((out.double() - exact).abs().amax(1) / exact.abs().amax(1)).max().item()
    assert row_err < 2e-3, row_err


def test_fp16_attention_rescales_values_beyond_fp16_range():
    gen = torch.Generator().manual_seed(1)
    layout = TokenLayout(torch.tensor([[True, True, False]]), torch.tensor([0, 0, 1, 1]))
    q, k = (torch.randn(1, 2, 7, 16, generator=gen) for _ in range(2))
    v = torch.randn(1, 2, 7, 16, generator=gen) * 3e5
    reference = masked_attention(q, k, v, layout)
    out = joint_attention(q, k, v, AttentionSpec(layout, compute_dtype=torch.float16, residual_dtype=torch.float32))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    real = [0, 1, 3, 4, 5, 6]
    assert rel_err(out[:, :, real], reference[:, :, real]) < 2e-3


def test_fp16_end_to_end_pipeline_is_finite_and_close():
    """Whole pipeline in fp16 (text encoders, DiT, VAE) vs the official fp32 run."""
    model = "miniflux_tiny"
    expected = tensors(f"{model}/e2e/t2v")
    pipe = PyramidFlowPipeline.from_pretrained(model_dir(model), dtype=torch.float16, device="cpu")
    torch.manual_seed(4321)
    frames = pipe.generate(
        prompt="a cat walking on the beach at sunset", height=64, width=64, temp=3, num_inference_steps=[2, 2, 2],
        video_num_inference_steps=[2, 2, 2], guidance_scale=7.0, video_guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(1234), output_type="pt",
    )
    diff = (frames.int() - expected["frames"].int()).abs()
    assert diff.max().item() <= 2, diff.max().item()  # measured 1 (0.07 mean)
    assert diff.float().mean().item() < 0.2


# ------------------------------------------------------------------ fp8


def test_fp8_quantize_error_bounds_row_and_tensor():
    gen = torch.Generator().manual_seed(2)
    row_scales = torch.logspace(-5, 0, 32)[:, None]  # rows of very different magnitude
    weight = torch.randn(32, 128, generator=gen) * row_scales
    for granularity, shape in [("row", (32, 1)), ("tensor", ())]:
        q, scale = fp8_quantize(weight, granularity)
        assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and tuple(scale.shape) == shape
        err = (fp8_dequantize(q, scale, torch.float32) - weight).abs()
        # e4m3: 3 mantissa bits (half-ulp 2^-4 relative), subnormal spacing 2^-9 below 2^-6
        bound = weight.abs() * 2**-4 + scale.expand_as(weight) * 2**-10 + 1e-12
        assert (err <= bound).all(), granularity
    def worst_per_row(granularity):
        error = fp8_dequantize(*fp8_quantize(weight, granularity), torch.float32) - weight
        return error.abs().amax(1) / weight.abs().amax(1)

    row_err, tensor_err = worst_per_row("row"), worst_per_row("tensor")
    assert row_err.max() < 0.05  # every row keeps ~3 significant bits (measured 3.6 %)
    assert tensor_err[:2].min() > 0.1  # 1e-5-scale rows lose them under one scale per tensor (measured 13-17 %)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_fp8_model_forward_close_to_bf16(tiny_models, model, granularity):
    bf16 = forward(configure_dit_precision(copy.deepcopy(tiny_models[model]), torch.bfloat16), model, torch.bfloat16)
    dit = configure_dit_precision(copy.deepcopy(tiny_models[model]), torch.bfloat16, fp8=granularity)
    linears = [m for m in dit.modules() if isinstance(m, Fp8Linear)]
    assert len(linears) > 10 and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert type(dit.proj_out).__name__ == "Linear" and dit.proj_out.weight.dtype == torch.bfloat16  # kept
    out = forward(dit, model, torch.bfloat16)
    assert torch.isfinite(out).all()
    assert rel_err(out, bf16) < 3e-2  # measured 0.6e-2 .. 1.3e-2


def test_fp8_state_dict_round_trip_and_device_moves(tiny_models):
    source = configure_dit_precision(copy.deepcopy(tiny_models["miniflux_tiny"]), torch.bfloat16, fp8="row")
    state = source.state_dict()
    assert state["transformer_blocks.0.attn.to_q.weight"].dtype == torch.float8_e4m3fn  # official name, fp8
    assert state["transformer_blocks.0.attn.to_q.weight_scale"].shape == (128, 1)
    fresh = apply_fp8_storage(build_tiny("miniflux_tiny"), "row", compute_dtype=torch.bfloat16)
    fresh.load_state_dict(state, strict=True)
    reloaded, original = (forward(m, "miniflux_tiny", torch.bfloat16) for m in (fresh, source))
    assert torch.equal(reloaded, original)
    fresh.to("meta")  # what the memory plans do with .to(device): scale buffers travel with the weights
    layer = fresh.transformer_blocks[0].attn.to_q
    assert layer.weight.is_meta and layer.weight_scale.is_meta and layer.weight.dtype == torch.float8_e4m3fn


def test_kijai_unscaled_fp8_file_loads_and_runs(tiny_models, tmp_path):
    folder = model_dir("miniflux_tiny") / "diffusion_transformer_384p"
    path = save_single_file(load_dit(folder, dtype=torch.float32), tmp_path / "dit_fp8_e4m3fn.safetensors",
                            dtype=torch.float8_e4m3fn)
    raw = load_dit(path, dtype=None).model
    assert has_fp8_weights(raw)
    dit = wrap_fp8_checkpoint(raw, torch.bfloat16)
    assert isinstance(dit.transformer_blocks[0].attn.to_q, Fp8Linear)
    assert dit.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn  # no upcast copy
    assert dit.transformer_blocks[0].attn.norm_q.weight.dtype == torch.bfloat16
    out = forward(dit, "miniflux_tiny", torch.bfloat16)
    upcast = forward(load_dit(path, dtype=torch.bfloat16).model, "miniflux_tiny", torch.bfloat16)
    assert torch.isfinite(out).all()
    assert torch.equal(out, upcast)  # unit scale: exactly the fp8 values


def test_scaled_mm_flag_falls_back_off_cuda():
    linear = torch.nn.Linear(32, 16).bfloat16()
    fast = quantize_linear_fp8(linear, "row", use_scaled_mm=True)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert torch.equal(fast(x), quantize_linear_fp8(linear, "row")(x))


# ------------------------------------------------------------------ attention backends, compile


def test_attention_backend_selection_errors(tiny_models):
    dit = copy.deepcopy(tiny_models["miniflux_tiny"])
    with pytest.raises(ValueError, match="sdpa"):
        set_attention_backend(dit, "xformers")
    for name, package in [("sage", "sageattention"), ("flash", "flash-attn")]:
        if importlib.util.find_spec(package.replace("-", "_")) is None:
            with pytest.raises(ImportError, match=f"pip install {package}"):
                set_attention_backend(dit, name)
    register_attention_backend("test-sdpa", sdpa)
    configure_dit(dit, attention_mode="masked")
    with pytest.raises(ValueError, match="segmented"):
        set_attention_backend(dit, "test-sdpa")


@pytest.mark.parametrize("model", MODELS)
def test_sdpa_and_plugged_backend_run_the_segmented_path(tiny_models, model):
    entry = case(CASE.format(model))
    expected = tensors(CASE.format(model))["output.0"]
    dit = copy.deepcopy(tiny_models[model])
    set_attention_backend(dit, "sdpa")
    assert_matches(forward(dit, model), expected, entry["tolerance"], "sdpa")

    calls = []

    def fake(q, k, v):
        calls.append((q.shape, k.shape))
        return sdpa(q, k, v)

    register_attention_backend("fake", fake)
    set_attention_backend(dit, "fake")
    assert_matches(forward(dit, model), expected, entry["tolerance"], "fake backend")
    assert calls and any(q[2] != k[2] for q, k in calls)  # frame prefixes: Lq != Lk
    assert len(calls) >= len(dit.blocks) * 3  # 3 frames -> >= 3 kernel calls per block


def _is_compiled_forward(block) -> bool:
    """`block.forward` is the instance-bound torch.compile wrapper of its class's forward."""
    bound = vars(block).get("forward")
    original = getattr(getattr(bound, "__func__", None), "_torchdynamo_orig_callable", None)
    return bound is not None and bound.__self__ is block and original is type(block).forward


def test_compile_blocks_keeps_names_and_parity(tiny_models):
    model = "miniflux_tiny"
    entry, expected = case(CASE.format(model)), tensors(CASE.format(model))["output.0"]
    dit = copy.deepcopy(tiny_models[model])
    keys = list(dit.state_dict())
    compile_blocks(dit, backend="eager", dynamic=False)  # dynamo capture; inductor codegen is too slow for CI
    assert all(_is_compiled_forward(block) for block in dit.blocks)
    assert dit.compiled_blocks == {"backend": "eager", "mode": None, "dynamic": False}
    assert list(dit.state_dict()) == keys
    assert_matches(forward(dit, model), expected, entry["tolerance"], "compiled")
    copied = copy.deepcopy(dit)  # the bound forward follows the copy, not the original block
    assert all(_is_compiled_forward(block) for block in copied.blocks)
    torch._dynamo.reset()


class _SwapHooks:
    """Block-swap style hooks: at rest a block's parameters point at zeros; a forward pre-hook points them
    at the real weights (`param.data = ...`, as the memory manager does) and a forward hook points them back."""

    def __init__(self, blocks):
        self.calls = {"pre": 0, "post": 0}
        self.weights = {}
        for block in blocks:
            for param in block.parameters():
                self.weights[param] = param.data
                param.data = torch.zeros_like(param.data)
            block.register_forward_pre_hook(self.swap_in_weights)
            block.register_forward_hook(self.swap_out_weights)

    def swap_in_weights(self, block, args):
        self.calls["pre"] += 1
        for param in block.parameters():
            param.data = self.weights[param]

    def swap_out_weights(self, block, args, output):
        self.calls["post"] += 1
        for param in block.parameters():
            param.data = torch.zeros_like(param.data)


def test_compiled_blocks_run_their_hooks_eagerly_outside_the_graphs(tiny_models):
    model = "miniflux_tiny"
    eager = forward(tiny_models[model], model)
    dit = copy.deepcopy(tiny_models[model])
    hooks = _SwapHooks(dit.blocks)
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward  # run the captured graph as is (no inductor: fast)

    compile_blocks(dit, backend=capture, dynamic=False)
    first, second = forward(dit, model), forward(dit, model)  # second call: cached graphs
    torch._dynamo.reset()
    assert graphs, "the block forwards were not captured"
    assert hooks.calls == {"pre": 2 * len(dit.blocks), "post": 2 * len(dit.blocks)}  # every call, in eager
    assert torch.equal(first, eager) and torch.equal(second, eager)  # the hooks' weights reached the graphs
    assert all(not param.data.any() for param in hooks.weights)  # swapped back out after the last call
    for graph in graphs:
        code = graph.code
        assert "set_" not in code and "zeros_like" not in code, code
        traces = "".join(str(node.meta.get("stack_trace", "")) for node in graph.graph.nodes)
        assert "swap_in_weights" not in traces and "swap_out_weights" not in traces


# ------------------------------------------------------------------ loading for a precision


def load_dit_for_precision(path, precision: str):
    from pyramid_core.loading import load_components, precision_settings

    compute, fp8 = precision_settings(precision)
    return load_components(path, dtype=compute, fp8=fp8, components=("dit",)).dit, compute


def test_loading_for_a_precision_keeps_fp8_files_fp8_and_quantises_on_request(tmp_path):

    folder = model_dir("miniflux_tiny") / "diffusion_transformer_384p"
    fp8_file = save_single_file(load_dit(folder, dtype=torch.float32), tmp_path / "dit_fp8.safetensors",
                                dtype=torch.float8_e4m3fn)
    for precision in ("bf16", "fp8"):  # a Kijai fp8 file is never upcast to a full-size copy
        loaded, compute = load_dit_for_precision(fp8_file, precision=precision)
        to_q = loaded.model.transformer_blocks[0].attn.to_q
        assert compute == torch.bfloat16 and isinstance(to_q, Fp8Linear)
        assert to_q.weight.dtype == torch.float8_e4m3fn and float(to_q.weight_scale.max()) == 1.0
    loaded, _ = load_dit_for_precision(folder, precision="fp8")  # bf16 file, quantised per row
    to_q = loaded.model.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, Fp8Linear) and to_q.weight_scale.numel() == to_q.weight.shape[0]
    assert torch.isfinite(forward(loaded.model, "miniflux_tiny", torch.bfloat16)).all()
    loaded, compute = load_dit_for_precision(folder, precision="fp16")
    assert compute == torch.float16 and not has_fp8_weights(loaded.model)
    with pytest.raises(ValueError, match="precision must be one of"):
        load_dit_for_precision(folder, precision="int4")


@pytest.mark.parametrize("fp8", [None, "row"])
def test_pipeline_runs_fp16_and_fp8_end_to_end(fp8):
    dtype = torch.float16 if fp8 is None else torch.bfloat16
    pipe = PyramidFlowPipeline.from_pretrained(model_dir("sd3_tiny"), dtype=dtype, device="cpu", fp8=fp8)
    assert next(pipe.vae.parameters()).dtype == (torch.float32 if dtype == torch.float16 else dtype)
    assert has_fp8_weights(pipe.dit) == (fp8 is not None)
    frames = pipe.generate("a cat", height=64, width=64, temp=2, num_inference_steps=1, video_num_inference_steps=1,
                           seed=1, output_type="float")
    assert frames.shape == (9, 64, 64, 3) and torch.isfinite(frames).all()
