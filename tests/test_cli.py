"""Command line (`python -m pyramid_core generate|demo`) and the tiny demo model builder.

The generate runs reproduce the official fixture runs through the command line (the `--seed` streams are
patched to the fixture's generator and global seeds): the frames handed to the video writer must match the
official frames, and the decoded file must match the official frames put through the same mp4 encoding.
"""
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from pyramid_core import cli, settings
from pyramid_core.demo import build_tiny_model
from pyramid_core.pipeline import RandomStreams
from pyramid_core.validation import frames_for_temp, temp_for_duration
from pyramid_core import video
from tests.helpers import record_written_frames, run_cli
from tests.reference import assert_frames_match, model_dir, tensors

PROMPT = "a cat walking on the beach at sunset"
MODEL = str(model_dir("miniflux_tiny"))
FIXTURE_RUN = ["--width", "64", "--height", "64", "--temp", "3", "--video-steps", "2,2,2", "--guidance", "7",
               "--video-guidance", "5", "--dtype", "fp32", "--device", "cpu", "--seed", "7", "--quality", "100"]
# mean |decoded file - decoded mp4 of the official frames| (0..255): measured 0.06 (t2v) / 0.007 (i2v); a
# --video-guidance of 6 instead of 5 gives 2.6 / 2.9 (the codec alone loses ~13.5 on these noisy 64x64 frames)
CODEC_TOLERANCE = 0.5


def decode(path: Path) -> tuple[torch.Tensor, float]:
    """All frames of a video file as uint8 [F,H,W,3], and its frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        fps = float(stream.average_rate)
    return torch.from_numpy(np.stack(frames)), fps


def codec_round_trip(frames: torch.Tensor, folder: Path) -> torch.Tensor:
    """The official frames after the same mp4 encoding the command line uses."""
    decoded, _ = decode(WRITE_VIDEO(frames, folder / "reference.mp4", quality=100))
    (folder / "reference.mp4").unlink()
    return decoded


def use_official_streams(monkeypatch, noise_seed: int, global_seed: int) -> None:
    """Make `--seed` set up the fixture run's random streams: its noise generator and CPU global seed."""

    def from_seed(cls, seed):
        torch.manual_seed(global_seed)
        return cls(noise=torch.Generator("cpu").manual_seed(noise_seed), global_=None)

    monkeypatch.setattr(RandomStreams, "from_seed", classmethod(from_seed))


WRITE_VIDEO = video.write_video


def mean_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().mean().item()


# ---------------------------------------------------------------------------------------------- generate


def test_generate_t2v_writes_the_official_video(tmp_path, monkeypatch):
    use_official_streams(monkeypatch, noise_seed=1234, global_seed=4321)
    written = record_written_frames(monkeypatch)
    code, log = run_cli(["generate", "--model", MODEL, "--prompt", PROMPT, "--steps", "2,2,2", *FIXTURE_RUN,
                     "--out", tmp_path / "t2v.mp4"])
    assert code == 0
    frames, fps = decode(tmp_path / "t2v.mp4")
    assert tuple(frames.shape) == (frames_for_temp(3), 64, 64, 3) and fps == 24
    official = tensors("miniflux_tiny/e2e/t2v")["frames"]
    assert_frames_match(written[0], official, "t2v frames")
    assert mean_error(frames, codec_round_trip(official, tmp_path)) <= CODEC_TOLERANCE
    assert f"wrote {tmp_path / 't2v.mp4'}" in log and "17 frames" in log
    assert "peak device memory: n/a" in log and "peak host memory (RSS):" in log and "seed: 7" in log


def test_generate_i2v_from_image_file(tmp_path, monkeypatch):
    expected = tensors("miniflux_tiny/e2e/i2v")
    Image.fromarray(expected["input_image"].numpy()).save(tmp_path / "start.png")
    use_official_streams(monkeypatch, noise_seed=2345, global_seed=5432)
    written = record_written_frames(monkeypatch)
    code, log = run_cli(["generate", "--model", MODEL, "--prompt", PROMPT, "--image", tmp_path / "start.png", *FIXTURE_RUN,
                     "--out", tmp_path / "i2v.mp4"])
    assert code == 0 and "image-to-video" in log
    frames, fps = decode(tmp_path / "i2v.mp4")
    assert tuple(frames.shape) == (17, 64, 64, 3) and fps == 24
    assert_frames_match(written[0], expected["frames"], "i2v frames")
    assert mean_error(frames, codec_round_trip(expected["frames"], tmp_path)) <= CODEC_TOLERANCE


def test_still_image_goes_to_png_without_overwriting(tmp_path):
    existing = tmp_path / "still.png"
    existing.write_bytes(b"keep me")
    code, log = run_cli(["generate", "--model", MODEL, "--prompt", PROMPT, "--width", "64", "--height", "64", "--temp", "1",
                     "--steps", "1", "--dtype", "fp32", "--device", "cpu", "--seed", "1", "--out", existing])
    assert code == 0 and "text-to-image" in log and "1 image" in log
    assert existing.read_bytes() == b"keep me"
    image = np.asarray(Image.open(tmp_path / "still_00001.png"))
    assert image.shape == (64, 64, 3) and image.std() > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["still.png", "still_00001.png"]


# ---------------------------------------------------------------------------------------------- settings


def resolve(argv: list[str]) -> cli.GenerationRequest:
    return cli.resolve_request(cli.build_parser().parse_args(["generate", "--prompt", PROMPT, *map(str, argv)]))


def test_duration_maps_to_temp():
    assert temp_for_duration(1) == 4 and frames_for_temp(4) == 25  # 25 frames >= 24 at 24 fps; temp 3 gives 17
    assert temp_for_duration(5) == 16 and frames_for_temp(16) == 121  # the official 5 s
    assert resolve(["--model", MODEL, "--duration", "1", "--out", "x.mp4"]).temp == 4


def test_variant_defaults(tmp_path):
    # one tiny DiT under all three variant names: defaults depend only on the folder name
    for variant in ("384p", "768p", "image"):
        (tmp_path / f"diffusion_transformer_{variant}").symlink_to(Path(MODEL) / "diffusion_transformer_384p")
    t2v = resolve(["--model", tmp_path, "--out", "x.mp4"])
    assert (t2v.width, t2v.height, t2v.temp) == (640, 384, 16)
    assert (t2v.steps, t2v.video_steps, t2v.guidance, t2v.video_guidance) == ([20] * 3, [10] * 3, 7.0, 5.0)
    hd = resolve(["--model", tmp_path, "--variant", "768p", "--out", "x.mp4"])
    assert (hd.width, hd.height, hd.temp) == (1280, 768, 16)
    image = resolve(["--model", tmp_path, "--variant", "image", "--out", tmp_path / "x.png"])
    assert (image.width, image.height, image.temp, image.writes_image) == (1024, 1024, 1, True)
    Image.new("RGB", (32, 32)).save(tmp_path / "start.png")
    i2v = resolve(["--model", tmp_path, "--image", tmp_path / "start.png", "--out", "x.mp4"])
    assert (i2v.video_guidance, i2v.video_steps, i2v.temp) == (4.0, [10] * 3, 16)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", MODEL, "--width", "100", "--out", "{tmp}/x.mp4"], "use 64 or 128"),
        (["--model", "{tmp}/no_such_model", "--out", "{tmp}/x.mp4"], "model folder not found"),
        (["--model", MODEL, "--out", "{tmp}/missing/x.mp4"], "output folder does not exist"),
        (["--model", MODEL, "--steps", "20,20", "--out", "{tmp}/x.mp4"], "3 values"),
        (["--model", MODEL, "--variant", "768p", "--out", "{tmp}/x.mp4"], "available: diffusion_transformer_384p"),
        (["--model", MODEL, "--out", "{tmp}/x.png"], "use --temp 1"),
        (["--model", MODEL, "--image", "{tmp}/none.png", "--out", "{tmp}/x.mp4"], "--image file not found"),
    ],
)
def test_bad_input_exits_2_with_one_message(tmp_path, capsys, argv, message):
    code, _ = run_cli(["generate", "--prompt", PROMPT, *[a.replace("{tmp}", str(tmp_path)) for a in argv]])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not any(p.suffix == ".mp4" for p in tmp_path.iterdir())


def test_cpu_runs_default_to_fp32_and_an_explicit_dtype_wins(monkeypatch):
    from pyramid_core import devices

    monkeypatch.setattr(devices, "cpu_bf16_feature", lambda flags=None: None)  # a CPU without native bf16
    cpu = resolve(["--model", MODEL, "--device", "cpu", "--out", "x.mp4"])
    assert cpu.dtype == torch.float32 and "CPU default" in cpu.dtype_note and "--dtype bf16" in cpu.dtype_note
    for name in settings.COMPUTE_DTYPES:
        dtype = getattr(torch, settings.torch_dtype_name(name))
        explicit = resolve(["--model", MODEL, "--device", "cpu", "--dtype", name, "--out", "x.mp4"])
        assert (explicit.dtype, explicit.dtype_note) == (dtype, "")
    assert cli.compute_dtype_for(torch.device("cuda")) == (torch.bfloat16, "")  # as trained
    assert cli.compute_dtype_for(torch.device("cuda"), "fp16") == (torch.float16, "")


def _refuse_loading(monkeypatch) -> None:
    from pyramid_core import loading, pipeline

    def loaded(*args, **kwargs):
        raise AssertionError("nothing may be loaded")

    for module, name in [(loading, "load_dit"), (loading, "load_vae"), (loading, "open_checkpoint")]:
        monkeypatch.setattr(module, name, loaded)
    monkeypatch.setattr(pipeline.PyramidFlowPipeline, "from_pretrained", classmethod(loaded))


@pytest.mark.parametrize("model", [MODEL, "{tmp}/no_such_model"])
def test_compile_with_sequential_offload_is_refused_up_front(tmp_path, monkeypatch, capsys, model):
    _refuse_loading(monkeypatch)
    code, log = run_cli(["generate", "--model", model.replace("{tmp}", str(tmp_path)), "--prompt", PROMPT, "--compile",
                     "--offload", "sequential", "--out", tmp_path / "x.mp4"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and log == "" and "Traceback" not in err
    assert err.startswith("error: --compile cannot run with --offload sequential")
    assert "use --offload none, model or block_swap with --compile, or drop --compile" in err
    assert list(tmp_path.iterdir()) == []


def test_compile_flag_reaches_the_pipeline(tmp_path, monkeypatch, capsys):
    from pyramid_core import pipeline

    calls = []

    def stop(cls, *args, **kwargs):
        calls.append(kwargs)
        raise cli.UsageError("stopped after recording the pipeline settings")

    monkeypatch.setattr(pipeline.PyramidFlowPipeline, "from_pretrained", classmethod(stop))
    code, log = run_cli(["generate", "--model", MODEL, "--prompt", PROMPT, "--compile", "--offload", "block_swap",
                     "--device", "cpu", "--out", tmp_path / "x.mp4"])
    assert code == cli.EXIT_USAGE and "stopped after recording" in capsys.readouterr().err
    assert calls[0]["compile_blocks"] is True and calls[0]["offload"] == "block_swap"
    assert calls[0]["dtype"] == torch.float32 and "compiling the DiT blocks" in log


# ---------------------------------------------------------------------------------------------- cancellation


def interrupt_at(count: int):
    def call(self, progress):
        number = progress if isinstance(progress, int) else progress.completed
        if number >= count:
            raise KeyboardInterrupt

    return call


@pytest.mark.parametrize("where", ["sampling", "writing"])
def test_ctrl_c_leaves_no_file(tmp_path, monkeypatch, capsys, where):
    target = cli.StepProgress if where == "sampling" else cli.WriteProgress
    monkeypatch.setattr(target, "__call__", interrupt_at(3))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _ = run_cli(["generate", "--model", MODEL, "--prompt", PROMPT, "--width", "64", "--height", "64", "--temp", "2",
                   "--steps", "1", "--video-steps", "1", "--device", "cpu", "--out", out_dir / "clip.mp4"])
    assert code == cli.EXIT_CANCELLED and "cancelled" in capsys.readouterr().err
    assert list(out_dir.iterdir()) == []  # neither the video nor its .partial temporary file


# ---------------------------------------------------------------------------------------------- demo


@pytest.mark.parametrize("family", ["flux", "mmdit"])
def test_demo_writes_a_video_quickly(tmp_path, family):
    started = time.perf_counter()
    code, log = run_cli(["demo", "--family", family, "--keep", tmp_path / "model", "--out", tmp_path / "demo.mp4"])
    seconds = time.perf_counter() - started
    assert code == 0 and seconds < 60
    assert log.count(cli.DEMO_NOTICE) == 2 and "output is noise" in cli.DEMO_NOTICE
    on_cpu = not torch.cuda.is_available()
    if on_cpu:  # fp32, or bf16 where this CPU has native bf16: the same rule the command line applies
        dtype, note = cli.compute_dtype_for(torch.device("cpu"))
        name = settings.dtype_name(str(dtype))
        assert f"({name} on cpu" in log and f"compute dtype {name}: {note}" in log
    else:
        assert "(bf16 on cuda" in log
    frames, fps = decode(tmp_path / "demo.mp4")
    assert tuple(frames.shape) == (17, 128, 128, 3) and fps == 24
    assert 40 < frames.double().mean().item() < 215 and frames.double().std().item() > 5  # neither black nor flat
    t5 = "tokenizer_2" if family == "flux" else "tokenizer_3"
    assert (tmp_path / "model" / t5 / "tokenizer.json").is_file()
    assert (tmp_path / "model" / "tokenizer" / "merges.txt").is_file()


def test_tiny_model_is_seeded_and_tokenizes_like_the_real_one(tmp_path):
    from pyramid_core.text import PyramidTextEncoder

    first, again, other = (build_tiny_model(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    weights = "diffusion_transformer_384p/diffusion_pytorch_model.safetensors"
    assert (first / weights).read_bytes() == (again / weights).read_bytes() != (other / weights).read_bytes()
    encoder = PyramidTextEncoder.from_folder(first, "flux", dtype=torch.float32)
    tokens = encoder.tokenize(["a cat walking"])
    clip, t5, mask = tokens["clip_0"][0].tolist(), tokens["t5"][0].tolist(), tokens["t5_mask"][0].tolist()
    clip_tokenizer = encoder.clip_tokenizers[0]
    words = ["<|startoftext|>", "a</w>", "c", "at</w>", "walking</w>", "<|endoftext|>"]  # the learnt merges
    assert clip_tokenizer.convert_ids_to_tokens(clip[:6]) == words
    assert len(clip) == 77 and clip[6:] == [clip_tokenizer.eos_token_id] * 71  # pads with <|endoftext|>
    assert t5[:4] == encoder.t5_tokenizer.convert_tokens_to_ids(["\u2581a", "\u2581cat", "\u2581walking", "</s>"])
    assert t5[4:] == [0] * 124 and mask == [1] * 4 + [0] * 124
    with pytest.raises(ValueError, match="not empty"):
        build_tiny_model(first)


def test_precision_and_attention_flags_reach_the_model(tmp_path, monkeypatch, capsys):
    from pyramid_core.cli import main
    from pyramid_core.precision import has_fp8_weights
    from pyramid_core import pipeline as pipeline_module

    built = []
    original = pipeline_module.PyramidFlowPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        pipe = original(cls, *args, **kwargs)
        built.append(pipe)
        return pipe

    monkeypatch.setattr(pipeline_module.PyramidFlowPipeline, "from_pretrained", classmethod(spy))
    out = tmp_path / "fp8.mp4"
    status = main(["generate", "--model", str(model_dir("miniflux_tiny")), "--prompt", "a cat", "--width", "64",
                   "--height", "64", "--temp", "2", "--steps", "1", "--video-steps", "1", "--seed", "1",
                   "--device", "cpu", "--fp8", "row", "--attention", "flex", "--out", str(out)])
    assert status == 0 and out.exists()
    assert has_fp8_weights(built[0].dit) and (built[0].dit.attention_mode, built[0].dit.attention_backend) == ("flex", "sdpa")
    monkeypatch.setitem(__import__("sys").modules, "sageattention", None)
    status = main(["generate", "--model", str(model_dir("miniflux_tiny")), "--prompt", "a cat", "--width", "64",
                   "--height", "64", "--temp", "2", "--device", "cpu", "--attention", "sage",
                   "--out", str(tmp_path / "sage.mp4")])
    assert status == 2 and "pip install sageattention" in capsys.readouterr().err
