"""End-to-end generation against the official runs (seed for seed), history composition, callbacks."""
import warnings

import pytest
import torch

from pyramid_core import PyramidFlowPipeline
from pyramid_core.sampling import GenerationCancelled, StepInfo, history_for_stage
from tests.reference import assert_frames_match, assert_matches, case, model_dir, tensors

PROMPT = "a cat walking on the beach at sunset"
MODELS = ["miniflux_tiny", "sd3_tiny"]


@pytest.fixture(scope="module")
def pipelines():
    return {m: PyramidFlowPipeline.from_pretrained(model_dir(m), dtype=torch.float32, device="cpu") for m in MODELS}


def official_t2v(pipe, output_type, **extra):
    torch.manual_seed(4321)
    return pipe.generate(
        prompt=PROMPT, height=64, width=64, temp=3, num_inference_steps=[2, 2, 2],
        video_num_inference_steps=[2, 2, 2], guidance_scale=7.0, video_guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(1234), output_type=output_type, **extra,
    )


def official_i2v(pipe, image, output_type, **extra):
    torch.manual_seed(5432)
    return pipe.generate_i2v(
        prompt=PROMPT, input_image=image, temp=3, num_inference_steps=[2, 2, 2], guidance_scale=7.0,
        video_guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(2345), output_type=output_type, **extra,
    )


@pytest.mark.parametrize("model", MODELS)
def test_t2v_matches_official_latents_and_frames(pipelines, model):
    entry, expected = case(f"{model}/e2e/t2v"), tensors(f"{model}/e2e/t2v")
    decoded: list[tuple[int, int]] = []
    latents = official_t2v(pipelines[model], "latent", decode_callback=lambda *a: decoded.append(a))
    assert_matches(latents, expected["latents"], entry["tolerance"]["latents"], "latents")
    assert decoded == [], "nothing is decoded for output_type='latent'"
    frames = official_t2v(pipelines[model], "pt", decode_callback=lambda *a: decoded.append(a))
    assert_frames_match(frames, expected["frames"], "frames")
    assert decoded == [(0, 2), (1, 2), (2, 2)]  # decode steps: one 64x64 tile x chunks of 2 + 1 latent frames


@pytest.mark.parametrize("model", MODELS)
def test_i2v_matches_official_latents_and_frames(pipelines, model):
    entry, expected = case(f"{model}/e2e/i2v"), tensors(f"{model}/e2e/i2v")
    image = expected["input_image"].numpy()
    latents = official_i2v(pipelines[model], image, "latent")
    assert_matches(latents, expected["latents"], entry["tolerance"]["latents"], "latents")
    decoded: list[tuple[int, int]] = []
    frames = official_i2v(pipelines[model], image, "pt", decode_callback=lambda *a: decoded.append(a))
    assert_frames_match(frames, expected["frames"], "frames")
    assert decoded == [(0, 2), (1, 2), (2, 2)]


class DitRecorder:
    """Forward hook that keeps every DiT call's inputs and output."""

    def __init__(self, dit):
        self.calls = []
        self.handle = dit.register_forward_hook(self, with_kwargs=False)

    def __call__(self, module, args, output):
        clips, timestep = args[0], args[1]
        self.calls.append(([c.clone() for c in clips], timestep.clone(), output.clone()))


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
@pytest.mark.parametrize("model", MODELS)
def test_every_dit_call_sees_the_official_history(pipelines, model, kind):
    entry, expected = case(f"{model}/e2e/{kind}"), tensors(f"{model}/e2e/{kind}")
    pipe = pipelines[model]
    recorder = DitRecorder(pipe.dit)
    try:
        if kind == "t2v":
            official_t2v(pipe, "latent")
        else:
            official_i2v(pipe, expected["input_image"].numpy(), "latent")
    finally:
        recorder.handle.remove()
    trace = entry["dit_trace"]
    assert len(recorder.calls) == len(trace)
    tol = entry["tolerance"]["latents"]
    units = {u["unit"]: u for u in entry["units"]}
    for (clips, timestep, output), record in zip(recorder.calls, trace):
        where = f"unit {record['unit']} stage {record['stage']} step {record['step']}"
        assert [list(c.shape) for c in clips] == record["sample_shapes"][0], where
        assert torch.allclose(timestep.double(), torch.tensor(record["timestep_ratio"], dtype=torch.float64)), where
        assert_matches(clips[-1], expected[record["x_in"]], tol, f"{where} current latent")
        assert_matches(output, expected[record["dit_out"]], tol, f"{where} DiT output")
        past = units[record["unit"]]["past_conditions_per_stage"][record["stage"]]
        assert len(clips) - 1 == len(past), where
        for clip, name in zip(clips[:-1], past):
            assert_matches(clip, expected[name], tol, f"{where} history {name}")


def test_history_rule_examples():
    frames = 4
    pyramid = [torch.arange(frames).float().view(1, 1, frames, 1, 1).expand(1, 1, frames, 2**s, 2**s) for s in range(3)]

    def describe(stage, past):
        sub = [level[:, :, :past] for level in pyramid]
        return [(int(c[0, 0, 0, 0, 0]), c.shape[2], c.shape[-1]) for c in history_for_stage(sub, stage)]

    # (first frame index, number of frames, resolution) oldest first
    assert describe(2, 3) == [(0, 1, 1), (1, 1, 2), (2, 1, 4)]
    assert describe(1, 2) == [(0, 1, 1), (1, 1, 2)]
    assert describe(0, 3) == [(0, 2, 1), (2, 1, 1)]
    assert describe(2, 1) == [(0, 1, 4)]
    assert describe(0, 0) == []


def test_seed_entry_point_is_self_contained_and_official(pipelines):
    pipe = pipelines["miniflux_tiny"]
    kwargs = dict(prompt=PROMPT, height=64, width=64, temp=2, num_inference_steps=[1, 1, 1],
                  video_num_inference_steps=[1, 1, 1], output_type="latent")
    torch.manual_seed(99)
    state = torch.get_rng_state()
    seeded = pipe.generate(seed=77, **kwargs)
    assert torch.equal(torch.get_rng_state(), state), "seed= must leave the caller's global RNG alone"
    torch.manual_seed(12345)  # whatever the caller did before must not matter
    assert torch.equal(pipe.generate(seed=77, **kwargs), seeded)
    torch.manual_seed(77)
    official = pipe.generate(generator=torch.Generator().manual_seed(77), **kwargs)
    assert torch.equal(official, seeded)
    assert not torch.equal(pipe.generate(seed=78, **kwargs), seeded)


def test_callbacks_report_every_step_and_cancel_within_one(pipelines):
    pipe = pipelines["sd3_tiny"]
    seen: list[StepInfo] = []
    units = []
    kwargs = dict(prompt=PROMPT, height=64, width=64, temp=3, num_inference_steps=[2, 1, 1],
                  video_num_inference_steps=[1, 1, 2], output_type="latent", seed=1)
    latents = pipe.generate(step_callback=seen.append, unit_callback=lambda u, n, x: units.append((u, n, x.shape)), **kwargs)
    assert [s.completed for s in seen] == list(range(1, 4 + 2 * 4 + 1))
    assert {s.total for s in seen} == {12}
    assert [(s.unit, s.stage, s.step) for s in seen[:4]] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 2, 0)]
    assert units == [(u, 3, torch.Size([1, 16, 1, 8, 8])) for u in range(3)]
    assert latents.shape == (1, 16, 3, 8, 8)

    calls = []
    handle = pipe.dit.register_forward_hook(lambda *a: calls.append(1))

    def cancel_at_five(info: StepInfo):
        if info.completed == 5:
            raise GenerationCancelled("stop")

    try:
        with pytest.raises(GenerationCancelled):
            pipe.generate(step_callback=cancel_at_five, **kwargs)
    finally:
        handle.remove()
    assert len(calls) == 5


def test_bad_settings_get_clear_errors(pipelines):
    pipe = pipelines["miniflux_tiny"]
    with pytest.raises(ValueError, match="use 64 or 128"):
        pipe.generate(PROMPT, height=64, width=100)
    with pytest.raises(ValueError, match="3 values"):
        pipe.generate(PROMPT, height=64, width=64, num_inference_steps=[2, 2])
    with pytest.raises(ValueError, match=">= 1"):
        pipe.generate(PROMPT, height=64, width=64, num_inference_steps=[2, 0, 2])
    with pytest.raises(ValueError, match="output_type"):
        pipe.generate(PROMPT, height=64, width=64, output_type="gif")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.generate(PROMPT, height=64, width=64, temp=17, num_inference_steps=1, video_num_inference_steps=1,
                      output_type="latent", seed=0, guidance_scale=0)
    assert any("temp <= 16" in str(w.message) for w in caught)


def test_i2v_image_of_another_size_is_cover_resized_and_centre_cropped(pipelines):
    pipe = pipelines["miniflux_tiny"]
    image = torch.rand(96, 160, 3)  # ComfyUI-style float image, wider than the target
    frames = pipe.generate_i2v(PROMPT, image, temp=2, num_inference_steps=1, width=64, height=64, seed=3, output_type="float")
    assert frames.shape == (9, 64, 64, 3) and frames.dtype == torch.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0


def test_text_to_image_with_temp_one(pipelines):
    frames = pipelines["miniflux_tiny"].generate(PROMPT, height=64, width=64, temp=1, num_inference_steps=1,
                                                  output_type="pil", seed=5)
    assert len(frames) == 1 and frames[0].size == (64, 64)


def test_bf16_run_rounds_timesteps_and_steps_like_the_official_autocast_path():
    """Under bf16 the DiT sees the timestep cast to bf16 (986.54 -> 988) and gets bf16 latents."""
    pipe = PyramidFlowPipeline.from_pretrained(model_dir("miniflux_tiny"), dtype=torch.bfloat16, device="cpu")
    seen = []
    handle = pipe.dit.register_forward_hook(lambda m, args, out: seen.append((args[1].clone(), args[0][-1].dtype, out.dtype)))
    try:
        latents = pipe.generate(PROMPT, height=64, width=64, temp=1, num_inference_steps=[20, 1, 1],
                                output_type="latent", seed=0)
    finally:
        handle.remove()
    first_stage = [int(t[0].item()) if t[0] == t[0].round() else t[0].item() for t, _, _ in seen[:20]]
    assert first_stage == [1000, 988, 972, 960, 948, 932, 920, 904, 892, 880, 864, 852, 840, 824, 812, 800, 784, 772, 756, 744]
    assert all(t.dtype == torch.bfloat16 and x == torch.bfloat16 and o == torch.bfloat16 for t, x, o in seen)
    assert latents.dtype == torch.bfloat16 and torch.isfinite(latents.float()).all()


def test_components_can_be_left_out():
    pipe = PyramidFlowPipeline.from_pretrained(model_dir("miniflux_tiny"), dtype=torch.float32, device="cpu",
                                               load_vae=False, load_text_encoder=False)
    assert pipe.vae is None and pipe.text_encoder is None
    with pytest.raises(ValueError, match="no text encoder"):
        pipe.generate(PROMPT, height=64, width=64)
    with pytest.raises(ValueError, match="no VAE"):
        pipe.decode(torch.zeros(1, 16, 1, 8, 8))
    with pytest.raises(ValueError, match="no VAE"):
        pipe.encode_image(torch.zeros(1, 3, 1, 64, 64))
    assert not pipe.codec.has_vae


def test_decode_delegates_to_the_codec_and_progress_changes_nothing(pipelines):
    pipe = pipelines["sd3_tiny"]
    assert pipe.codec.family == "mmdit" and pipe.codec.memory is pipe.memory and pipe.codec.has_vae
    latents = tensors("sd3_tiny/e2e/t2v")["latents"]
    seen: list[tuple[int, int]] = []
    floats = pipe.decode(latents, "float", progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 2), (1, 2), (2, 2)]
    assert torch.equal(floats, pipe.codec.decode(latents, "float"))
    assert floats.shape == (17, 64, 64, 3) and floats.dtype == torch.float32
    assert pipe.decode(latents, "latent", progress=lambda *a: seen.append(a)) is latents and len(seen) == 3
    with pytest.raises(ValueError, match="output_type must be one of latent, pt, np, pil, float"):
        pipe.decode(latents, "mp4")


def test_encode_video_needs_8k_plus_1_frames(pipelines):
    with pytest.raises(ValueError, match="8k\\+1 frames"):
        pipelines["miniflux_tiny"].encode_video(torch.zeros(1, 3, 4, 32, 32))


def test_repeated_prompt_needs_no_text_encoder(pipelines, monkeypatch):
    pipe = pipelines["miniflux_tiny"]
    used = []
    original = type(pipe.memory).use

    def spy(self, name):
        used.append(name)
        return original(self, name)

    monkeypatch.setattr(type(pipe.memory), "use", spy)
    kwargs = dict(height=64, width=64, temp=1, num_inference_steps=1, output_type="latent", seed=4)
    first = pipe.generate("a lighthouse at dawn, unseen before", **kwargs)
    assert used.count("text_encoder") == 1
    second = pipe.generate("a lighthouse at dawn, unseen before", **kwargs)
    assert used.count("text_encoder") == 1, "a cached prompt must not load (move) the text encoder again"
    assert torch.equal(first, second)
