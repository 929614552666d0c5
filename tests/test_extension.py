"""Continuing a clip (`extend`), prompt schedules and the history cap."""
from __future__ import annotations

import pytest
import torch

from pyramid_core.pipeline import PyramidFlowPipeline
from pyramid_core.sampling import PyramidSampler, RandomStreams
from pyramid_core.schedules import PromptSchedule, is_schedule_text
from pyramid_core.text import TextEmbeddings
from tests.reference import model_dir

RUN = dict(height=64, width=64, num_inference_steps=[1, 1, 1], video_num_inference_steps=[1, 2, 1],
           guidance_scale=7.0, video_guidance_scale=5.0, output_type="latent")


@pytest.fixture(scope="module", params=["miniflux_tiny", "sd3_tiny"])
def pipe(request):
    return PyramidFlowPipeline.from_pretrained(model_dir(request.param), dtype=torch.float32, device="cpu")


def test_a_continued_run_equals_the_full_run(pipe):
    temp, first = 3, 1
    noise = torch.randn(1, 16, temp, 8, 8, generator=torch.Generator().manual_seed(3))
    full = pipe.generate("a cat", temp=temp, noise=noise, random_streams=RandomStreams.from_seed(5), **RUN)
    streams = RandomStreams.from_seed(5)  # continued: its block-noise stream goes on where the first run stopped
    start = pipe.generate("a cat", temp=first, noise=noise[:, :, :first], random_streams=streams, **RUN)
    clip = pipe.extend(start, prompt="a cat", temp=temp - first, noise=noise[:, :, first:], random_streams=streams,
                       num_inference_steps=[1, 2, 1], guidance_scale=7.0, video_guidance_scale=5.0)
    assert clip.shape == full.shape == (1, 16, temp, 8, 8)
    assert torch.equal(clip, full)
    again = pipe.extend(start, prompt="a cat", temp=temp - first, seed=9)  # fresh streams: another continuation
    assert torch.equal(again[:, :, :first], start) and not torch.equal(again, full)


def test_schedules_of_one_prompt_are_the_plain_prompt_and_a_change_starts_at_its_frame(pipe):
    plain = pipe.generate("a cat", temp=3, seed=1, **RUN)
    for schedule in ("0: a cat", [(0, "a cat"), (2, "a cat")], PromptSchedule(((0, "a cat"),))):
        assert torch.equal(pipe.generate(schedule, temp=3, seed=1, **RUN), plain)
    encoded = []
    original = pipe._text

    def counting(prompt, *args):
        encoded.append(prompt)
        return original(prompt, *args)

    pipe._text = counting
    try:
        changed = pipe.generate("0: a cat | 2: a dog", temp=3, seed=1, **RUN)
    finally:
        del pipe._text
    assert encoded == ["a cat", "a dog"]  # each distinct prompt encoded once
    assert torch.equal(changed[:, :, :2], plain[:, :, :2]) and not torch.equal(changed[:, :, 2], plain[:, :, 2])


def test_history_cap_keeps_the_newest_frames():
    seen: list[list[int]] = []

    def dit(clips, timestep, embeds, mask, pooled):
        seen.append([clip.shape[2] for clip in clips[:-1]])
        return torch.zeros_like(clips[-1])

    from pyramid_core.scheduler import PyramidFlowScheduler

    text = TextEmbeddings(torch.zeros(1, 4, 8), torch.ones(1, 4, dtype=torch.int64), torch.zeros(1, 8))
    sampler = PyramidSampler(dit, PyramidFlowScheduler(), torch.device("cpu"), torch.float32,
                             block_noise_generator=torch.Generator().manual_seed(0))
    settings = dict(first_frame_steps=[1, 1, 1], video_steps=[1, 1, 1], guidance_scale=0.0, video_guidance_scale=0.0)
    history = torch.zeros(1, 16, 5, 8, 8)
    out = sampler.sample(torch.zeros(1, 16, 2, 8, 8), text, history=history, history_frames=2, **settings)
    assert out.shape == (1, 16, 7, 8, 8)
    assert all(sum(frames) == 2 for frames in seen)  # 2 history frames at every stage of both new units
    seen.clear()
    sampler.sample(torch.zeros(1, 16, 1, 8, 8), text, history=history, **settings)
    assert all(sum(frames) == 5 for frames in seen)  # uncapped: the official whole history
    with pytest.raises(ValueError, match="history_frames must be >= 1"):
        sampler.sample(torch.zeros(1, 16, 1, 8, 8), text, history=history, history_frames=0, **settings)


def test_schedule_text_form_and_bad_schedules():
    schedule = PromptSchedule.parse("0: a cat sleeps | 8: the cat wakes up")
    assert schedule.entries == ((0, "a cat sleeps"), (8, "the cat wakes up"))
    assert [schedule.at(u) for u in (0, 7, 8, 30)] == ["a cat sleeps"] * 2 + ["the cat wakes up"] * 2
    assert PromptSchedule.parse("a cat: sleeping").entries == ((0, "a cat: sleeping"),)  # not a schedule
    assert is_schedule_text("0: x") and not is_schedule_text("x | 0: y")
    for bad, quoted in (("0: a | 4: b | 2: c", "'2: c'"), ("3: a", "'3: a'"), ("0: a | b", "'b'")):
        with pytest.raises(ValueError, match=quoted):
            PromptSchedule.parse(bad)
    with pytest.raises(ValueError, match="'9: b' starts at latent frame 9, but the video has 4"):
        PromptSchedule.parse("0: a | 9: b").check_length(4)


def test_bad_extension_input_names_the_fix(pipe):
    clip = torch.zeros(1, 16, 2, 8, 8)
    with pytest.raises(ValueError, match=r"extend needs a clip of Pyramid Flow latents \[1,16,k,h,w\]"):
        pipe.extend(torch.zeros(1, 4, 2, 8, 8), prompt="a cat", temp=1)
    with pytest.raises(ValueError, match="temp .* must be an integer >= 1"):
        pipe.extend(clip, prompt="a cat", temp=0)
    with pytest.raises(ValueError, match="'5: a dog' starts at latent frame 5, but the video has 3"):
        pipe.extend(clip, prompt="0: a cat | 5: a dog", temp=1)
    with pytest.raises(ValueError, match="noise must have shape"):
        pipe.extend(clip, prompt="a cat", temp=1, noise=torch.zeros(1, 16, 2, 8, 8))
