"""No host-device synchronisation inside the sampling step loop, with bit-identical numerics.

The guard runs the real sampler with the DiT and every activation on the `meta` device, a real second
device whose tensors hold no data: any read of a device value on the host (`.item()`, `.tolist()`,
`.cpu()`, `bool()`) fails there, and a dispatch mode records every op on the way. Inside `sample()` it
asserts no device-to-host read, no float64 tensor on the execution device (MPS has none), and only
asynchronous host-to-device copies, a fixed number per step:
  * 1 per DiT forward: the RoPE table (cos and sin stacked in one tensor, built on the host from shapes);
  * 1 at the first step of stages 1 and 2: that stage jump's block noise (drawn on the CPU, as official);
  * 1 more per DiT forward in the 'masked' reference mode: the token ids the dense mask is built from; in the
    'flex' mode: the block-mask tables and per-token ids, packed into one tensor.
Outside the step loop: the i2v first-frame latent (once per generation). Index tensors of a scattered
text mask (not a prefix of ones) are copied once per generation, at the first forward.

The parity tests check on CPU that the host-side scalars (Python floats rounded to the model dtype)
give the bits of the official tensor formulas in bf16, fp16 and fp32.
"""
from __future__ import annotations

from functools import cached_property

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pyramid_core.models.attention as attention
import pyramid_core.sampling as sampling
from pyramid_core import PyramidFlowPipeline
from pyramid_core.loading import load_dit
from pyramid_core.memory import MemoryManager
from pyramid_core.models.attention import HostTextMask, TokenLayout, masked_attention, segmented_attention
from pyramid_core.models.dit import configure_dit
from pyramid_core.models.layers import clip_positions, frame_token_counts
from pyramid_core.sampling import PyramidSampler, StepInfo, history_for_stage, history_levels
from pyramid_core.settings import ATTENTION_MODES
from pyramid_core.scheduler import PyramidFlowScheduler, euler_step, model_timestep
from pyramid_core.text import TextEmbeddings
from tests.reference import model_dir

MODELS = ["miniflux_tiny", "sd3_tiny"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
aten = torch.ops.aten

# ops whose result the host waits for (a value read, or a data-dependent output size)
SYNCING_OPS = {
    aten._local_scalar_dense.default, aten.equal.default, aten.nonzero.default, aten.masked_select.default,
    aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default, aten.repeat_interleave.Tensor,
}


class TransferGuard(TorchDispatchMode):
    """Records device-to-host reads, host-to-device copies and float64 tensors on `device_type`.

    Events are filed under the step that is running (`None` before the first unit starts).
    """

    def __init__(self, device_type: str = "meta"):
        super().__init__()
        self.device_type = device_type
        self.reads: list[str] = []
        self.copies: list[tuple[object, str, bool]] = []  # (step, kind, non_blocking)
        self.float64: list[str] = []
        self.step: int | None = None
        self.steps: list[StepInfo] = []

    # callbacks of the sampler
    def unit_started(self, unit: int, num_units: int) -> None:
        if self.step is None:
            self.step = 0

    def step_done(self, info: StepInfo) -> None:
        self.steps.append(info)
        self.step += 1

    def on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == self.device_type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING_OPS and any(self.on_device(a) for a in tree_leaves((args, kwargs))):
            self.reads.append(str(func))
        elif func is aten._to_copy.default:
            target = torch.device(kwargs.get("device") or args[0].device)
            self._transfer(func, args[0], target, kwargs.get("non_blocking", False))
        elif func is aten.copy_.default:
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            self._transfer(func, args[1], args[0].device, non_blocking)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if self.on_device(t) and t.dtype == torch.float64:
                self.float64.append(str(func))
        return out

    def _transfer(self, func, source: torch.Tensor, target: torch.device, non_blocking: bool) -> None:
        if self.on_device(source) and target.type == "cpu":
            self.reads.append(str(func))
        elif source.device.type == "cpu" and target.type == self.device_type:
            self.copies.append((self.step, copy_kind(source), bool(non_blocking)))


class HiddenCopyGuard(TorchFunctionMode):
    """`torch.tensor(data, device=...)` copies from Python data below the dispatcher: catch it here."""

    def __init__(self, guard: TransferGuard):
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]).type == self.guard.device_type:
                self.guard.reads.append(f"{func.__name__}(..., device={kwargs['device']}) blocks")
        return func(*args, **kwargs)


def copy_kind(t: torch.Tensor) -> str:
    if t.dim() == 5:
        return "latent"  # block noise in the loop; the i2v first frame before it
    if t.dim() == 3 and t.shape[0] == 2 and t.dtype == torch.float32:
        return "rope"
    if t.dim() in (1, 2) and t.dtype == torch.long:
        return "token ids"
    return f"other {tuple(t.shape)} {t.dtype}"


def guard_sampling(monkeypatch, guard: TransferGuard) -> None:
    """Run every `PyramidSampler.sample` call under the guard."""
    original = PyramidSampler.sample

    def guarded(self, *args, **kwargs):
        with guard, HiddenCopyGuard(guard):
            return original(self, *args, **kwargs)

    monkeypatch.setattr(PyramidSampler, "sample", guarded)


def meta_pipeline(model: str, dtype: torch.dtype, mode: str) -> PyramidFlowPipeline:
    loaded = load_dit(model_dir(model), "diffusion_transformer_384p", dtype=torch.float32)
    dit = loaded.model.eval()
    configure_dit(dit, attention_mode=mode)
    memory = MemoryManager("none", device="meta", offload_device="cpu")
    return PyramidFlowPipeline(dit, None, None, loaded.family, loaded.variant, dtype, memory)


def meta_flex_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """Stands in for flex_attention on `meta` (which it refuses): checks the block mask, returns q's shape."""
    blocks = -(-q.shape[2] // block_mask.BLOCK_SIZE[0])
    assert block_mask.kv_indices.device == q.device and block_mask.kv_indices.shape == (q.shape[0], 1, blocks, blocks)
    assert block_mask.kv_indices.dtype == torch.int32 and block_mask.shape[-2:] == (q.shape[2], k.shape[2])
    return torch.empty_like(q)


def cfg_text(dit, lengths=(23, 9)) -> TextEmbeddings:
    """[negative, positive] with unequal prompt lengths: two sample groups in every attention call."""
    width, pooled = dit.context_embedder.in_features, dit.time_text_embed.text_embedder.linear_1.in_features
    mask = torch.zeros(2, 128, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return TextEmbeddings(torch.randn(2, 128, width), mask, torch.randn(2, pooled))


def run(pipe: PyramidFlowPipeline, kind: str, guard: TransferGuard, text: TextEmbeddings) -> torch.Tensor:
    """Three units, so stage 2 sees a 2-frame history; several steps in some stages."""
    common = dict(prompt_embeds=text, temp=3, guidance_scale=7.0, video_guidance_scale=5.0, output_type="latent",
                  seed=0, step_callback=guard.step_done, callback=guard.unit_started)
    if kind == "t2v":
        return pipe.generate(height=64, width=64, num_inference_steps=[2, 1, 1], video_num_inference_steps=[1, 2, 1],
                             **common)
    return pipe.generate_i2v(image_latent=torch.randn(1, 16, 1, 8, 8), num_inference_steps=[1, 2, 1], **common)


def expected_copies(info: StepInfo, mode: str) -> list[str]:
    kinds = ["rope"] + (["token ids"] if mode in ("masked", "flex") else [])
    if info.stage > 0 and info.step == 0:
        kinds.append("latent")  # the stage jump's block noise
    return sorted(kinds)


# ------------------------------------------------------------------------------------------ the guard


@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("kind", ["t2v", "i2v"])
@pytest.mark.parametrize("model", MODELS)
def test_step_loop_never_waits_for_the_device(monkeypatch, model, kind, mode):
    if mode == "flex":  # FlexAttention refuses meta tensors: the block mask is built and copied, the kernel stubbed
        monkeypatch.setattr(attention, "_flex_function", lambda compiled: meta_flex_kernel)
    pipe = meta_pipeline(model, torch.float32, mode)
    guard = TransferGuard()
    guard_sampling(monkeypatch, guard)

    latents = run(pipe, kind, guard, cfg_text(pipe.dit))

    assert latents.device.type == "meta" and latents.shape == (1, 16, 3, 8, 8)
    assert guard.reads == [], "device values read on the host"
    assert guard.float64 == [], "float64 tensors on the execution device"
    assert all(non_blocking for _, _, non_blocking in guard.copies), f"blocking copies: {guard.copies}"
    setup = [k for step, k, _ in guard.copies if step is None]
    assert setup == ([] if kind == "t2v" else ["latent"]), "before the loop: the i2v first frame only"
    assert len(guard.steps) == (4 + 2 * 4 if kind == "t2v" else 2 * 4)
    for index, info in enumerate(guard.steps):
        copies = sorted(k for step, k, _ in guard.copies if step == index)
        assert copies == expected_copies(info, mode), f"step {index} ({info})"
    assert [k for step, k, _ in guard.copies if step == len(guard.steps)] == [], "nothing after the last step"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loop_keeps_float64_on_the_host(monkeypatch, dtype):
    """Timesteps and Euler scalars are rounded on the host; the device sees only the compute dtype."""
    pipe = meta_pipeline("miniflux_tiny", dtype, "segmented")
    guard = TransferGuard()
    guard_sampling(monkeypatch, guard)
    latents = run(pipe, "t2v", guard, cfg_text(pipe.dit))
    assert latents.dtype == dtype
    assert guard.reads == [] and guard.float64 == []
    assert all(non_blocking for _, _, non_blocking in guard.copies)


def test_scattered_text_mask_copies_its_index_tensors_once_per_generation(monkeypatch):
    pipe = meta_pipeline("sd3_tiny", torch.float32, "segmented")
    text = cfg_text(pipe.dit)
    text.attention_mask[1, 30:40] = 1  # real tokens after padding: not a prefix, so index tensors
    guard = TransferGuard()
    guard_sampling(monkeypatch, guard)
    run(pipe, "t2v", guard, text)
    assert guard.reads == [] and all(non_blocking for _, _, non_blocking in guard.copies)
    index_copies = [step for step, k, _ in guard.copies if k == "token ids"]
    assert index_copies == [0, 0], "valid and padded positions of the scattered row, at the first forward only"


def test_guard_sees_reads_blocking_copies_and_float64():
    guard = TransferGuard()
    with guard, HiddenCopyGuard(guard):
        x = torch.ones(3).to("meta")  # blocking
        torch.zeros(2, dtype=torch.float64, device="meta")
        torch.tensor([1, 2], device="meta")
        for read in (lambda: x.sum().item(), lambda: x.cpu(), lambda: bool(x[0])):
            with pytest.raises((RuntimeError, NotImplementedError)):
                read()
    assert guard.copies == [(None, "other (3,) torch.float32", False)]
    assert guard.float64 == ["aten.zeros.default"]
    assert len(guard.reads) == 4


# ------------------------------------------------------------------------------------------ parity on CPU


def official_euler(sample, model_output, sigma, sigma_next):
    """The official step: a 0-dim float64 difference cast to the output dtype, product in that dtype."""
    delta = (torch.as_tensor(sigma_next, dtype=torch.float64) - torch.as_tensor(sigma, dtype=torch.float64))
    prev = sample.to(torch.float32) + delta.to(model_output.dtype) * model_output
    return prev.to(model_output.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_euler_with_host_scalars_is_bit_identical_to_the_tensor_formula(dtype):
    scheduler = PyramidFlowScheduler()
    gen = torch.Generator().manual_seed(0)
    scale = torch.logspace(-3, 3, 4096, dtype=torch.float32)[torch.randperm(4096, generator=gen)]
    for stage in range(3):
        for steps in (1, 2, 3, 5, 10, 20, 28, 50):
            schedule = scheduler.stage_schedule(steps, stage)
            x = (torch.randn(4096, generator=gen) * 3).to(dtype)
            for step in schedule:
                v = (torch.randn(4096, generator=gen) * scale).clamp(-6e4, 6e4).to(dtype)
                expected = official_euler(x, v, step.sigma, step.sigma_next)
                assert torch.equal(euler_step(x, v, step.sigma, step.sigma_next), expected), (stage, steps, step.index)
                x = expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_timesteps_are_the_official_casts(dtype):
    scheduler = PyramidFlowScheduler()
    for stage in range(3):
        for steps in (1, 2, 7, 20, 28, 50):
            for step in scheduler.stage_schedule(steps, stage):
                ours = torch.full((2,), model_timestep(step.timestep, dtype), dtype=dtype)
                assert torch.equal(ours, step.timestep.expand(2).to(dtype)), (stage, steps, step.index)


class StubDiT(torch.nn.Module):
    """A cheap deterministic velocity field that depends on the clips and the timestep."""

    def __init__(self):
        super().__init__()
        self.timesteps: list[torch.Tensor] = []

    def forward(self, clips, timestep, embeds, mask, pooled):
        self.timesteps.append(timestep.clone())
        current = clips[-1].float()
        history = sum(c.float().mean() for c in clips[:-1]) if len(clips) > 1 else 0.0
        t = timestep.float()[:, None, None, None, None] / 1000
        return (torch.sin(current * 3.1 + t) * 1.7 + history - current * t).to(clips[-1].dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampler_steps_and_timesteps_match_the_official_formulas(monkeypatch, dtype):
    scheduler = PyramidFlowScheduler()
    checked = []
    original_update, original_delta = sampling.euler_update, sampling.euler_delta
    sigmas = []

    def spy_delta(sigma, sigma_next, out_dtype):
        sigmas.append((sigma, sigma_next))
        return original_delta(sigma, sigma_next, out_dtype)

    def spy_update(sample, velocity, delta):
        result = original_update(sample, velocity, delta)
        assert torch.equal(result, official_euler(sample, velocity, *sigmas[-1]))
        checked.append(result.dtype)
        return result

    monkeypatch.setattr(sampling, "euler_delta", spy_delta)
    monkeypatch.setattr(sampling, "euler_update", spy_update)
    dit = StubDiT()
    sampler = PyramidSampler(dit, scheduler, torch.device("cpu"), dtype, torch.Generator().manual_seed(3))
    text = TextEmbeddings(torch.zeros(2, 4, 8), torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]), torch.zeros(2, 8))
    first, video = [3, 2, 2], [2, 3, 1]
    noise = torch.randn(1, 16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sampler.sample(noise, text, first_frame_steps=first, video_steps=video, guidance_scale=7.0, video_guidance_scale=5.0)

    expected = [
        step.timestep.expand(2).to(dtype)
        for steps in (first, video, video) for stage in range(3) for step in scheduler.stage_schedule(steps[stage], stage)
    ]
    assert len(dit.timesteps) == len(expected) == len(checked)
    assert all(torch.equal(ours, official) for ours, official in zip(dit.timesteps, expected))
    assert set(checked) == {dtype}


# ------------------------------------------------------------------------------------------ layout from shapes


def test_scattered_masks_take_index_tensors_and_match_the_dense_mask():
    """Rows 0 and 2 share a non-prefix mask (index tensors); row 1 is a prefix (slices)."""
    gen = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    host = HostTextMask(mask)
    layout = TokenLayout(host, frame_sizes=(3, 3, 5), device=torch.device("cpu"))
    first, second = layout.sample_groups
    assert all(isinstance(i, torch.Tensor) for i in first[:3]) and all(isinstance(i, slice) for i in second[:3])
    assert host.sample_groups("cpu") is layout.sample_groups, "device indices are made once per mask"
    q, k, v = (torch.randn(3, 2, 6 + 11, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    real = torch.cat([mask, torch.ones(3, 11, dtype=torch.bool)], dim=1)[:, None, :, None].expand_as(q)
    fused, reference = segmented_attention(q, k, v, layout), masked_attention(q, k, v, layout)
    assert torch.allclose(fused[real], reference[real], atol=1e-12)


def test_layout_from_shapes_matches_the_frame_ids():
    clips = [torch.zeros(1, 16, 2, 4, 4), torch.zeros(1, 16, 1, 8, 8), torch.zeros(1, 16, 1, 16, 16)]
    shapes = [tuple(c.shape) for c in clips]
    _, frame_ids = clip_positions(clips, 2)
    mask = torch.ones(1, 5, dtype=torch.bool)
    from_ids, from_shapes = TokenLayout(mask, frame_ids), TokenLayout(mask, frame_sizes=frame_token_counts(shapes, 2))
    assert from_ids.segments == from_shapes.segments == ((0, 4), (4, 8), (8, 24), (24, 88))
    assert torch.equal(from_ids.dense_mask(), from_shapes.dense_mask())
    positions, ids = clip_positions(shapes, 2)
    assert torch.equal(positions, clip_positions(clips, 2)[0]) and torch.equal(ids, frame_ids)


def test_dense_mask_is_built_once_per_forward(monkeypatch):
    builds = []
    original = TokenLayout.__dict__["_dense_mask"].func

    def counted(self):
        builds.append(1)
        return original(self)

    spy = cached_property(counted)
    spy.__set_name__(TokenLayout, "_dense_mask")
    monkeypatch.setattr(TokenLayout, "_dense_mask", spy)
    pipe = meta_pipeline("sd3_tiny", torch.float32, "masked")
    with pipe.memory.use("dit") as dit:
        text = cfg_text(dit).to("meta")
        dit([torch.zeros(2, 16, 1, 8, 8, device="meta")], torch.ones(2, device="meta"), text.prompt_embeds,
            HostTextMask.from_mask(torch.ones(2, 128)), text.pooled)
    assert len(pipe.dit.blocks) > 1 and len(builds) == 1


def test_history_levels_describe_history_for_stage():
    assert history_levels(0, 2) == []
    assert history_levels(3, 2) == [0, 1, 2]
    assert history_levels(5, 2) == [0, 0, 0, 1, 2]
    assert history_levels(4, 1) == [0, 0, 0, 1]
    assert history_levels(3, 0) == [0, 0, 0]
    assert history_levels(1, 2) == [2]
    for num_past in range(7):
        pyramid = [torch.arange(num_past).float().view(1, 1, -1, 1, 1).expand(1, 1, num_past, 2**s, 2**s)
                   for s in range(3)]
        for stage in range(3):
            levels = []
            for clip in history_for_stage(pyramid, stage):
                levels += [clip.shape[-1].bit_length() - 1] * clip.shape[2]
            assert levels == history_levels(num_past, stage), (num_past, stage)
