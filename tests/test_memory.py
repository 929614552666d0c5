"""Memory plans.

What CPU can prove: every plan gives the latents of 'none' (and of the official run) on the tiny fixture
models, with every copy, wait and weight read checked by the stream model (`SimulatedStreams`: it fails
on a read before the copy's event was waited on, an overwrite before compute released a slot, a weight
read from host memory, or more live slots than `prefetch`), which also measures the device bytes and the
pinned host bytes. Placement is also checked on a second real device, `meta` (a CPU weight meeting a meta
activation raises), where block swap must hold at most K + prefetch blocks and sequential only the running
modules' weights; the plan chooser on real-size shapes; OOM recovery; bad input; on a real CPU device every
plan runs as 'none' (no host-to-host copies) with one note. Real CUDA streams, events and pinned memory only
run in bench/gpu_check.py.
"""
import re
import warnings

import pytest
import torch
from torch import nn

from pyramid_core import PyramidFlowPipeline
from pyramid_core.loading import load_dit
from pyramid_core.memory import (
    GiB,
    DeviceOutOfMemoryError,
    DirectCopies,
    MemoryManager,
    SimulatedStreams,
    StreamOrderError,
    Workload,
    component_demands,
    is_device_oom,
    minimum_budget,
    plan_memory,
    text_working_memory,
    vae_decode_choice,
)
from pyramid_core.text import TextEmbeddings
from tests.reference import assert_frames_match, assert_matches, case, model_dir, tensors

PROMPT = "a cat walking on the beach at sunset"
MODELS = ["miniflux_tiny", "sd3_tiny"]
FP32 = Workload(64, 64, 3, True, 4)  # the tiny runs below
# Plans compute on copies of the weights at other addresses than 'none'; CPU GEMM kernels may sum in
# another order for other alignments, so plans are compared with a tolerance a few float32 ulps wide.
PLAN_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def t2v(pipe):
    """Three units, so stage 2 sees the full compressed history (two past frames at two resolutions)."""
    return pipe.generate(prompt=PROMPT, height=64, width=64, temp=3, num_inference_steps=[1, 1, 1],
                         video_num_inference_steps=[1, 1, 1], video_guidance_scale=5.0, output_type="latent", seed=7)


def i2v(pipe):
    image = tensors("sd3_tiny/e2e/i2v")["input_image"].numpy()
    return pipe.generate_i2v(prompt=PROMPT, input_image=image, temp=3, num_inference_steps=[1, 1, 1],
                             guidance_scale=7.0, video_guidance_scale=5.0, output_type="latent", seed=11)


def tensor_ptrs(*modules):
    return {id(t): t.data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}


def plain_pipeline(model):
    return PyramidFlowPipeline.from_pretrained(model_dir(model), dtype=torch.float32, device="cpu")


def simulated_pipeline(model, plan, streams, **kwargs):
    """The tiny model under `plan`, with the stream model as the device backend and every weight read watched."""
    base = plain_pipeline(model)
    memory = MemoryManager(plan, device="cpu", backend=streams, pin_memory=True, **kwargs)
    pipe = PyramidFlowPipeline(base.dit, base.vae, base.text_encoder, base.family, base.variant, torch.float32, memory)
    for component in filter(None, (pipe.text_encoder, pipe.dit, pipe.vae)):
        streams.watch(component)
    return pipe


@pytest.fixture(scope="module")
def none_latents():
    return {(m, run.__name__): run(plain_pipeline(m)) for m in MODELS for run in (t2v, i2v)}


# ------------------------------------------------------------------------------------------ parity + stream model

PLAN_CASES = [  # (plan, settings, runs): i2v adds the VAE encode under the plan
    ("model", {}, ("t2v", "i2v")),
    ("block_swap", dict(resident_blocks=1, prefetch=1), ("t2v",)),
    ("block_swap", dict(resident_blocks=0, prefetch=2), ("t2v", "i2v")),
    ("sequential", dict(prefetch=1), ("t2v",)),
    ("sequential", dict(prefetch=2), ("t2v", "i2v")),
    ("auto", dict(prefetch=1), ("t2v", "i2v")),  # one slot: the tiny DiTs have few blocks
]
RUNS = {"t2v": t2v, "i2v": i2v}


@pytest.mark.parametrize("model,plan,kwargs,run", [
    pytest.param(m, p, k, RUNS[r], id=f"{m}-{p}-{'-'.join(map(str, k.values()))}-{r}")
    for m in MODELS for p, k, runs in PLAN_CASES for r in runs
])
def test_every_plan_gives_the_latents_of_none_through_the_stream_model(none_latents, model, plan, kwargs, run):
    prefetch = kwargs.get("prefetch", 2)
    streams = SimulatedStreams(max_slots=prefetch if plan == "block_swap" else None)  # auto may stream T5 per module
    pipe = simulated_pipeline(model, plan, streams, **kwargs)
    if plan == "auto":  # a budget just below the DiT's whole size: auto must stream its blocks
        if run is t2v:
            pipe.memory.register("vae", None)  # latents only; the tiny VAE's decode would set the floor
            pipe.vae = None
        pipe.memory.margin_gb = 0
        demands = pipe.memory.demands(FP32)
        need = demands["dit"].sizes.total + demands["dit"].activation - 1
        if pipe.vae is not None:  # i2v encodes with the VAE, which moves whole: it must fit
            need = max(need, demands["vae"].sizes.total + demands["vae"].floor_activation)
        pipe.memory.budget_gb = need / GiB

    latents = run(pipe)

    torch.testing.assert_close(latents, none_latents[(model, run.__name__)], **PLAN_TOLERANCE)
    stats, plan_made = pipe.memory.stats, pipe.memory.last_plan
    assert stats.device_bytes == 0 and streams.device_bytes == 0, "nothing stays on the device"
    for component in filter(None, (pipe.text_encoder, pipe.dit, pipe.vae)):
        assert not any(streams.holds(t) for t in [*component.parameters(), *component.buffers()])
    assert streams.reads > 0
    if any(c.placement == "sequential" for c in plan_made.components.values()):
        # the order is learned from first calls; a module called again within its parent (per clip) can miss
        assert stats.sync_loads <= 0.02 * stats.loads, "nearly every group arrived in prefetch order"
    else:
        assert stats.sync_loads == 0, "every streamed block arrived in prefetch order"
    # device bytes measured by the stream model: weights of the largest component plan, never more
    weights = max(c.peak_bytes - plan_made.demands[n].activation for n, c in plan_made.components.items())
    assert streams.peak_device_bytes <= weights
    if plan_made.chosen == "block_swap":
        dit = plan_made.components["dit"]
        assert 0 < stats.peak_blocks_on_device["dit"] <= dit.resident_blocks + dit.prefetch
    if plan in ("block_swap", "sequential", "auto"):
        assert streams.peak_pinned_bytes <= 1.05 * _streamed_while_attached(pipe), "one flat pinned buffer per group"
    if plan == "auto" and run is t2v:
        assert plan_made.chosen == "block_swap"


def _streamed_while_attached(pipe):
    return pipe.memory.stats.streamed_bytes


def test_model_plan_decodes_the_official_frames():
    streams = SimulatedStreams()
    pipe = simulated_pipeline("miniflux_tiny", "model", streams)
    expected = tensors("miniflux_tiny/e2e/t2v")
    assert_frames_match(pipe.decode(expected["latents"], output_type="pt"), expected["frames"], "frames")
    assert streams.peak_device_bytes > 0 and streams.device_bytes == 0


def test_i2v_under_block_swap_matches_the_official_run():
    model = "sd3_tiny"
    entry, expected = case(f"{model}/e2e/i2v"), tensors(f"{model}/e2e/i2v")
    pipe = simulated_pipeline(model, "block_swap", SimulatedStreams(max_slots=1), prefetch=1)
    torch.manual_seed(5432)
    latents = pipe.generate_i2v(
        prompt=PROMPT, input_image=expected["input_image"].numpy(), temp=3, num_inference_steps=[2, 2, 2],
        guidance_scale=7.0, video_guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(2345),
        output_type="latent",
    )
    assert_matches(latents, expected["latents"], entry["tolerance"]["latents"], "latents")
    assert pipe.memory.placement("dit") == "block_swap" and pipe.memory.placement("vae") == "model"
    assert pipe.memory.stats.device_bytes == 0


@pytest.mark.parametrize("broken", ["compute_wait", "side_wait"])
def test_the_stream_model_catches_a_missing_wait(monkeypatch, broken):
    """The checks can fail: drop one kind of wait from the engine and the run is stopped."""
    streams = SimulatedStreams()
    pipe = simulated_pipeline("miniflux_tiny", "block_swap", streams, resident_blocks=0, prefetch=2)
    monkeypatch.setattr(streams, broken, lambda event: None)
    expected = "read before compute waited" if broken == "compute_wait" else "overwritten on the side stream before"
    with pytest.raises(StreamOrderError, match=expected):
        t2v(pipe)


def test_the_stream_model_catches_too_many_slots_and_host_reads():
    streams = SimulatedStreams(max_slots=1)
    with pytest.raises(StreamOrderError, match="2 streaming slots live, more than the 1 allowed"):
        t2v(simulated_pipeline("miniflux_tiny", "block_swap", streams, resident_blocks=0, prefetch=2))
    streams = SimulatedStreams()
    pipe = simulated_pipeline("miniflux_tiny", "model", streams)
    pipe.dit.proj_out.register_buffer("added_later", torch.ones(4))  # the manager never moves it
    with pytest.raises(StreamOrderError, match=r"weight proj_out\.added_later is not in device memory"):
        t2v(pipe)


def test_pinning_failure_warns_once_and_still_runs(none_latents):
    streams = SimulatedStreams(pin_fails=True)
    with pytest.warns(UserWarning, match="could not pin") as record:
        pipe = simulated_pipeline("miniflux_tiny", "sequential", streams)
        latents = t2v(pipe)
    assert len([w for w in record if "could not pin" in str(w.message)]) == 1
    torch.testing.assert_close(latents, none_latents[("miniflux_tiny", "t2v")], **PLAN_TOLERANCE)
    assert streams.peak_pinned_bytes == 0


def test_pinned_memory_is_returned_when_the_model_is_unloaded():
    streams = SimulatedStreams()
    pipe = simulated_pipeline("sd3_tiny", "block_swap", streams, resident_blocks=1, prefetch=1)
    t2v(pipe)
    assert streams.pinned_bytes > 0 and pipe.memory.stats.pinned_bytes == streams.pinned_bytes
    pipe.memory.close()
    assert streams.pinned_bytes == 0 and pipe.memory.stats.pinned_bytes == 0


def test_compile_is_refused_for_sequential():
    memory = MemoryManager("sequential", device="meta", offload_device="cpu")
    toy = ToyDiT()
    toy.compiled_blocks = {"backend": "inductor"}
    with pytest.raises(ValueError, match="use offload 'none', 'model' or 'block_swap' with compile"):
        memory.register("dit", toy)


# ------------------------------------------------------------------------------------------ second device


def meta_pipeline(model, plan, **kwargs):
    loaded = load_dit(model_dir(model), "diffusion_transformer_384p", dtype=torch.float32)
    dit = loaded.model.eval()
    memory = MemoryManager(plan, device="meta", offload_device="cpu", **kwargs)
    return PyramidFlowPipeline(dit, None, None, loaded.family, loaded.variant, torch.float32, memory)


def meta_generate(pipe, temp=2):
    dit = pipe.dit
    width, pooled = dit.context_embedder.in_features, dit.time_text_embed.text_embedder.linear_1.in_features
    text = TextEmbeddings(torch.randn(2, 128, width), torch.ones(2, 128, dtype=torch.long), torch.randn(2, pooled))
    return pipe.generate(prompt_embeds=text, height=64, width=64, temp=temp, num_inference_steps=[1, 1, 1],
                         video_num_inference_steps=[1, 1, 1], output_type="latent", seed=0)


def devices(module, recurse=True):
    return {t.device.type for t in [*module.parameters(recurse), *module.buffers(recurse)]}


def forbid_module_moves(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"something other than the memory manager moved {type(self).__name__}")

    monkeypatch.setattr(nn.Module, "_apply", refuse)  # behind .to(), .cuda(), .cpu(), .half()...


@pytest.mark.parametrize("model,resident,prefetch", [
    ("miniflux_tiny", 0, 1), ("miniflux_tiny", 1, 1), ("miniflux_tiny", 0, 2), ("sd3_tiny", 0, 1), ("sd3_tiny", 1, 1),
])
def test_block_swap_holds_at_most_k_plus_prefetch_blocks_on_the_device(monkeypatch, model, resident, prefetch):
    pipe = meta_pipeline(model, "block_swap", resident_blocks=resident, prefetch=prefetch)
    blocks = pipe.dit.blocks
    ptrs = tensor_ptrs(pipe.dit)
    seen = []

    def check(index):
        assert devices(blocks[index]) == {"meta"}, "the running block is on the device"
        assert devices(pipe.dit.proj_out) == {"meta"}, "non-block weights stay resident while the DiT runs"
        on_device = []
        for i, block in enumerate(blocks):
            assert len(devices(block)) == 1, f"block {i} is half moved"
            if devices(block) == {"meta"}:
                on_device.append(i)
        assert on_device == pipe.memory.loaded_blocks("dit"), "inspection agrees with the manager's accounting"
        assert len(on_device) <= resident + prefetch
        seen.append(len(on_device))

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: check(i))
    forbid_module_moves(monkeypatch)

    latents = meta_generate(pipe)

    assert latents.device.type == "meta" and latents.shape == (1, 16, 2, 8, 8)
    streamed = len(blocks) - resident
    assert max(seen) == resident + min(prefetch, streamed)
    assert pipe.memory.stats.sync_loads == 0
    assert devices(pipe.dit) == {"cpu"} and tensor_ptrs(pipe.dit) == ptrs, "everything returns to its host copy"
    assert pipe.memory.stats.device_bytes == 0


@pytest.mark.parametrize("model,prefetch", [("miniflux_tiny", 1), ("miniflux_tiny", 2), ("sd3_tiny", 2)])
def test_sequential_holds_the_running_modules_and_at_most_prefetch_more(monkeypatch, model, prefetch):
    pipe = meta_pipeline(model, "sequential", prefetch=prefetch)
    owners = [m for m in pipe.dit.modules() if devices(m, recurse=False)]
    ptrs = tensor_ptrs(pipe.dit)
    sizes = pipe.memory.demands()["dit"].sizes
    slots = sizes.nesting + prefetch - 1
    running: list[nn.Module] = []
    calls = []

    def before(module, args):
        loaded = [m for m in owners if devices(m, recurse=False) == {"meta"}]
        assert devices(module, recurse=False) == {"meta"}, "a module runs with its own weights on the device"
        assert len(loaded) <= slots, "only the slots (running chain + prefetch - 1) hold device weights"
        running.append(module)
        calls.append(module)

    def after(module, args, output):
        running.pop()

    for module in owners:
        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)
    forbid_module_moves(monkeypatch)

    meta_generate(pipe)

    assert {id(m) for m in calls} == {id(m) for m in owners}
    assert pipe.memory.stats.slots_allocated == min(slots, len(owners)), "slots allocated once per use"
    assert devices(pipe.dit) == {"cpu"} and tensor_ptrs(pipe.dit) == ptrs


class ScaledLinear(nn.Module):
    """fp8 storage as the precision module does it: a float8 weight and a scale buffer."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim).to(torch.float8_e4m3fn), requires_grad=False)
        self.register_buffer("weight_scale", torch.full((dim, 1), 0.5))

    def forward(self, x):
        return x @ (self.weight.to(x.dtype) * self.weight_scale).T


class ToyDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(8, 8)
        self.transformer_blocks = nn.ModuleList(ScaledLinear(8) for _ in range(4))

    @property
    def blocks(self):
        return list(self.transformer_blocks)

    def working_memory_bytes(self, workload):
        return workload.width * workload.height * 512  # 2 MiB at 64x64

    def forward(self, x):
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
        return x


class MaskedEncoder(nn.Module):
    """Mixes a host input with a layer's output before any weight-owning module sees it (as T5 does with
    its attention mask): under 'sequential' the entry module itself must move its inputs."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    def forward(self, x, mask):
        for layer in self.layers:
            x = layer(x) * mask[..., None]
        return x


def test_sequential_moves_host_inputs_at_the_entry_module():
    memory = MemoryManager("sequential", device="meta", offload_device="cpu")
    memory.register("text_encoder", MaskedEncoder())
    with torch.no_grad(), memory.use("text_encoder") as encoder:
        out = encoder(torch.randn(2, 3, 8), mask=torch.ones(2, 3))  # host tensors, as a text encoder passes them
    assert out.device.type == "meta"


@pytest.mark.parametrize("plan", ["block_swap", "sequential", "model"])
def test_buffers_move_with_their_weights(plan):
    memory = MemoryManager(plan, device="meta", offload_device="cpu", resident_blocks=1, prefetch=1)
    toy = ToyDiT()
    memory.register("dit", toy)
    with memory.use("dit") as dit:
        assert dit(torch.randn(2, 8, device="meta")).device.type == "meta"  # a host scale would raise
    assert devices(toy) == {"cpu"} and toy.transformer_blocks[0].weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("plan", ["model", "block_swap", "sequential"])
def test_placement_is_idempotent_and_reversible(plan):
    memory = MemoryManager(plan, device="meta", offload_device="cpu", resident_blocks=1, prefetch=1)
    toy = ToyDiT()
    memory.register("dit", toy)
    memory.register("dit", toy)
    ptrs = tensor_ptrs(toy)  # streamed weights were packed into flat host buffers once, at registration
    for _ in range(2):
        with memory.use("dit") as dit:
            dit(torch.randn(2, 8, device="meta"))
        memory.offload_all()
        memory.offload_all()
        assert devices(toy) == {"cpu"} and tensor_ptrs(toy) == ptrs and memory.stats.device_bytes == 0


def test_plan_none_moves_weights_to_the_device_and_back():
    memory = MemoryManager("none", device="meta", offload_device="cpu")
    toy = ToyDiT()
    memory.register("dit", toy)
    assert devices(toy) == {"meta"} and memory.stats.device_bytes == sum(t.nbytes for t in toy.state_dict().values())
    with memory.use("dit"):
        assert devices(toy) == {"meta"}
    assert devices(toy) == {"meta"}, "resident between uses"
    memory.register("dit", None)  # unregistering leaves resident weights where they are
    assert devices(toy) == {"meta"} and memory.components == {}


def test_reregistering_replaces_hooks_and_k_is_clamped_with_a_warning():
    memory = MemoryManager("block_swap", device="meta", offload_device="cpu", resident_blocks=9, prefetch=1)
    toy = ToyDiT()
    with pytest.warns(UserWarning, match="resident_blocks=9 is more than the 4 transformer blocks"):
        memory.register("dit", toy)
        memory.register("dit", toy)
    assert all(len(b._forward_pre_hooks) == 0 for b in toy.blocks), "all blocks resident: nothing to stream"
    with memory.use("dit"):
        assert memory.loaded_blocks("dit") == [0, 1, 2, 3]
    memory.resident_blocks = 1
    memory.register("dit", toy)
    assert sorted(len(b._forward_pre_hooks) for b in toy.blocks) == [0, 1, 1, 1]
    memory.close()
    assert all(len(b._forward_pre_hooks) == 0 for b in toy.blocks) and devices(toy) == {"cpu"}


# ------------------------------------------------------------------------------------------ plan chooser


@pytest.fixture(scope="module")
def full_size():
    """Real-size shapes (bf16, meta device): CLIP-L + T5-XXL, miniFLUX DiT, the causal VAE."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from pyramid_core.models.flux import PyramidFluxTransformer
    from pyramid_core.models.vae import CausalVideoVAE

    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            self.clip_encoders = nn.ModuleList([CLIPTextModel(CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, vocab_size=49408))])
            self.t5_encoder = T5EncoderModel(T5Config(
                d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                feed_forward_proj="gated-gelu"))

        def working_memory_bytes(self, workload):
            config = self.t5_encoder.config
            return text_working_memory(workload, config.d_model, config.d_ff, config.num_heads)

    with torch.device("meta"):
        return {"text_encoder": Text().to(torch.bfloat16), "dit": PyramidFluxTransformer().to(torch.bfloat16),
                "vae": CausalVideoVAE().to(torch.bfloat16)}


# (resolution, budget GiB) -> (chosen plan, text encoder placement)
TABLE = [
    ((1280, 768), 24, "none", "none"),
    ((1280, 768), 12, "model", "model"),
    ((1280, 768), 8, "model", "block_swap"),  # T5-XXL (9.1 GiB) streams; the DiT runs whole
    ((1280, 768), 4.5, "block_swap", "block_swap"),
    ((1280, 768), 2.2, "sequential", "block_swap"),
    ((640, 384), 24, "none", "none"),
    ((640, 384), 12, "model", "model"),
    ((640, 384), 5, "model", "block_swap"),
    ((640, 384), 3, "block_swap", "block_swap"),
]


@pytest.mark.parametrize("size,budget_gb,chosen,text", TABLE)
def test_auto_picks_the_fastest_plan_that_fits(full_size, size, budget_gb, chosen, text):
    workload = Workload(*size, temp=16)
    demands = component_demands(full_size, workload)
    assert 9.0 < demands["text_encoder"].sizes.total / GiB < 9.2 and len(demands["dit"].sizes.blocks) == 24
    plan = plan_memory("auto", demands, int(budget_gb * GiB), workload)
    assert (plan.chosen, plan.components["text_encoder"].placement) == (chosen, text), plan.describe()
    assert plan.peak_bytes <= budget_gb * GiB
    if chosen == "block_swap":
        assert 0 < plan.components["dit"].resident_blocks < 24


def test_more_budget_never_means_fewer_resident_blocks(full_size):
    workload = Workload(1280, 768, 16)
    demands = component_demands(full_size, workload)
    ks = [plan_memory("auto", demands, int(b * GiB), workload, prefetch=2).components["dit"]
          for b in (2.5, 3, 3.5, 4, 4.5, 5)]
    resident = [k.resident_blocks for k in ks]
    assert all(k.placement == "block_swap" for k in ks) and resident == sorted(resident) and resident[0] < resident[-1]
    streamed = [k.streamed_bytes for k in ks]
    assert streamed == sorted(streamed, reverse=True)


def test_a_budget_below_the_floor_names_the_smallest_workable_one(full_size):
    workload = Workload(1280, 768, 16)
    demands = component_demands(full_size, workload)
    with pytest.raises(ValueError, match="offload='sequential' needs about") as info:
        plan_memory("auto", demands, int(1.5 * GiB), workload)
    named = float(re.search(r"budget_gb >= ([\d.]+)", str(info.value)).group(1))
    assert 1.5 < named < 2.5
    assert named * GiB >= minimum_budget(demands)
    assert plan_memory("auto", demands, int(named * GiB), workload).chosen == "sequential"
    manager = MemoryManager("auto", device="meta", offload_device="cpu", budget_gb=0.01)
    manager.register("dit", load_dit(model_dir("sd3_tiny"), "diffusion_transformer_384p", dtype=torch.float32).model)
    with pytest.raises(ValueError, match=r"a budget of 10\.2 MiB .* with the 0\.75 GiB safety margin; pass budget_gb >= 0\.8"):
        manager.prepare(1280, 768, 16)


def test_vae_tile_and_chunk_follow_the_budget(full_size):
    vae, workload = full_size["vae"].decode_working_memory_bytes, Workload(1280, 768, 16)
    assert vae_decode_choice(vae, 8 * GiB, save_memory=False, workload=workload) == (2, 512)
    assert vae_decode_choice(vae, 3 * GiB, save_memory=False, workload=workload) == (2, 256)
    assert vae_decode_choice(vae, 8 * GiB, save_memory=True, workload=workload) == (1, 256)  # never above official
    assert vae_decode_choice(vae, GiB // 10, save_memory=True, workload=workload) == (1, 128)
    assert vae_decode_choice(vae, None, save_memory=False) == (2, 512)


# ------------------------------------------------------------------------------------------ out of memory


def explode_on_call(module, call):
    calls = []

    def hook(m, args):
        calls.append(1)
        if len(calls) == call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    return module.register_forward_pre_hook(hook)


def test_device_oom_while_sampling_is_reported_once_and_leaves_models_usable():
    plan = "block_swap"
    pipe = simulated_pipeline("miniflux_tiny", plan, SimulatedStreams(), resident_blocks=1, prefetch=1, budget_gb=0.02)
    pipe.memory.register("vae", None)
    pipe.memory.margin_gb = 0
    kwargs = dict(prompt=PROMPT, height=64, width=64, temp=2, num_inference_steps=[1, 1, 1],
                  video_num_inference_steps=[1, 1, 1], output_type="latent", seed=3)
    reference = pipe.generate(**kwargs)
    ptrs = tensor_ptrs(pipe.dit, pipe.text_encoder)
    handle = explode_on_call(pipe.dit.blocks[2], 3)
    with pytest.raises(DeviceOutOfMemoryError) as info:
        pipe.generate(**kwargs)
    handle.remove()

    message = str(info.value)
    assert isinstance(info.value, torch.OutOfMemoryError), "OOM handlers (ComfyUI) still recognise it"
    assert message.count("out of device memory") == 1
    assert f"while sampling with offload='{plan}' at 64x64, temp 2" in message
    assert re.search(r"Use offload='block_swap' with resident_blocks=0 \(estimated peak 5\.\d MiB\), or offload='auto' "
                     r"with budget_gb=0\.00\d+ ", message), message
    assert pipe.memory.stats.device_bytes == 0 and pipe.memory.loaded_blocks("dit") == []
    assert tensor_ptrs(pipe.dit, pipe.text_encoder) == ptrs
    assert torch.equal(pipe.generate(**kwargs), reference)


@pytest.mark.parametrize("plan", ["model", "block_swap", "sequential"])
def test_device_oom_puts_every_weight_back_on_the_host(plan):
    pipe = meta_pipeline("miniflux_tiny", plan, resident_blocks=1, prefetch=1)
    ptrs = tensor_ptrs(pipe.dit)
    handle = explode_on_call(pipe.dit.blocks[0], 4)
    with pytest.raises(DeviceOutOfMemoryError, match=f"offload='{plan}'"):
        meta_generate(pipe)
    handle.remove()
    assert devices(pipe.dit) == {"cpu"} and tensor_ptrs(pipe.dit) == ptrs, "no half-moved state"
    assert meta_generate(pipe).device.type == "meta"


def test_oom_guard_converts_once_and_lets_other_errors_through():
    memory = MemoryManager("model", device="meta", offload_device="cpu")
    with pytest.raises(DeviceOutOfMemoryError) as info:
        with memory.oom_guard("outer"):
            with memory.oom_guard("inner"):
                raise RuntimeError("CUDA error: out of memory")
    assert str(info.value).startswith("out of device memory while inner") and "outer" not in str(info.value)
    with pytest.raises(ValueError, match="unrelated"):
        with memory.oom_guard("x"):
            raise ValueError("unrelated")
    assert is_device_oom(torch.OutOfMemoryError("x")) and not is_device_oom(RuntimeError("shape mismatch"))


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(plan="fast"), "unknown memory plan 'fast'; choose one of none, model, block_swap, sequential, auto"),
    (dict(prefetch=0), "prefetch must be an integer >= 1"),
    (dict(resident_blocks=-1), "resident_blocks must be an integer >= 0"),
    (dict(budget_gb=0), "budget_gb must be a positive number of GiB"),
])
def test_bad_settings_get_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        MemoryManager(**{"device": "cpu", **kwargs})


def test_an_explicit_plan_over_its_budget_warns_and_still_runs():
    memory = MemoryManager("none", device="meta", offload_device="cpu", budget_gb=0.001, margin_gb=0)
    memory.register("dit", ToyDiT())
    with pytest.warns(UserWarning, match=r"offload='none' needs about .* more than the 1\.0 MiB budget; offload='auto'"):
        plan = memory.prepare(64, 64, 2)
    assert plan.chosen == "none"


def test_unknown_component_and_vae_fallbacks():
    memory = MemoryManager("block_swap", device="meta", offload_device="cpu")
    with pytest.raises(KeyError, match="no component 'dit' registered"):
        with memory.use("dit"):
            pass
    memory.register("vae", nn.Sequential(nn.Linear(2, 2)))  # no transformer blocks: moves whole
    assert memory.placement("vae") == "model"


# ------------------------------------------------------------------------------------------ a CPU device


def run_toy(memory, toy, x, uses=2):
    """Register, prepare and run a toy DiT `uses` times, then offload; returns the last output."""
    memory.register("dit", toy)
    memory.prepare(64, 64, 2, dtype=torch.float32)
    for _ in range(uses):
        with memory.use("dit") as dit:
            out = dit(x)
    memory.offload_all()
    return out


@pytest.mark.parametrize("plan", ["model", "block_swap", "sequential", "auto"])
def test_every_plan_on_a_cpu_device_runs_as_none_with_one_note(plan):
    x = torch.randn(2, 8)
    reference_toy = ToyDiT()
    reference = MemoryManager("none", device="cpu")
    expected = run_toy(reference, reference_toy, x)
    toy = ToyDiT()
    toy.load_state_dict(reference_toy.state_dict())
    ptrs = tensor_ptrs(toy)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        memory = MemoryManager(plan, device="cpu", resident_blocks=1, prefetch=1, budget_gb=0.001, margin_gb=0)
        out = run_toy(memory, toy, x)
        assert memory.estimate().chosen == "none"

    assert [str(w.message) for w in record] == [
        f"offload plans have no effect on a CPU device (its weights already live in host memory); "
        f"running as 'none' instead of '{plan}'"
    ], "one note, and no budget warning or floor error: a budget means nothing without device memory"
    assert (memory.requested_plan, memory.plan, memory.placement("dit")) == (plan, "none", "none")
    made = memory.last_plan
    assert (made.name, made.chosen, made.components["dit"].placement) == (plan, "none", "none")
    assert made.describe().startswith(f"memory plan '{plan}' -> 'none' for 64x64")
    assert tensor_ptrs(toy) == ptrs, "no weight was copied"
    assert memory.stats == reference.stats  # the same transfers, slots, pins and peaks as plan 'none'
    assert (memory.stats.slots_allocated, memory.stats.streamed_bytes, memory.stats.pinned_bytes) == (0, 0, 0)
    assert all(len(b._forward_pre_hooks) == 0 for b in toy.blocks), "nothing streams"
    assert torch.equal(out, expected)


def test_a_given_backend_on_the_cpu_runs_the_plan_as_asked():
    """Benches (`DirectCopies`) and the stream model (`SimulatedStreams`, above) model a device on the CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note for these, nor for plan 'none' on a CPU
        MemoryManager("none", device="cpu")
        memory = MemoryManager("block_swap", device="cpu", backend=DirectCopies(torch.device("cpu")),
                               resident_blocks=1, prefetch=1)
        toy = ToyDiT()
        run_toy(memory, toy, torch.randn(2, 8))
    assert memory.placement("dit") == "block_swap" and memory.last_plan.chosen == "block_swap"
    blocks = toy.blocks
    streamed = sum(t.numel() * t.element_size() for b in blocks[1:] for t in [*b.parameters(), *b.buffers()])
    assert memory.stats.streamed_bytes >= streamed and memory.stats.loads > 2 * 3  # 3 blocks streamed per use
