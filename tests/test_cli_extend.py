"""`generate --extend` (a video file or a saved latent clip), `--save-latents`, prompt schedules and
`--history-frames` through the command line."""
from __future__ import annotations


import torch

from pyramid_core import cli, video
from pyramid_core.latents_file import load_latents
from tests.helpers import record_written_frames, run_cli
from tests.reference import model_dir

MODEL = str(model_dir("miniflux_tiny"))
SMALL = ["--width", "64", "--height", "64", "--steps", "1", "--video-steps", "1", "--dtype", "fp32", "--device", "cpu",
         "--quiet"]


def test_a_saved_clip_is_extended_and_keeps_its_frames(tmp_path, monkeypatch):
    written = record_written_frames(monkeypatch)
    first = tmp_path / "first.mp4"
    code, log = run_cli(["generate", "--model", MODEL, "--prompt", "0: a cat | 2: a dog", *SMALL, "--temp", "3",
                     "--seed", "2", "--save-latents", "--out", first])
    saved = tmp_path / "first.safetensors"
    assert code == 0 and saved.is_file()
    latents, meta = load_latents(saved)
    assert latents.shape == (1, 16, 3, 8, 8) and meta["family"] == "flux" and meta["temp"] == 3
    code, log = run_cli(["generate", "--model", MODEL, "--prompt", "a dog", "--extend", saved, *SMALL, "--temp", "2",
                     "--seed", "3", "--history-frames", "2", "--out", tmp_path / "longer.mp4"])
    assert code == 0 and "33 frames" in log
    assert written[1].shape == (33, 64, 64, 3)
    assert torch.equal(written[1][:17], written[0])  # the causal VAE decodes the old part as before
    code, log = run_cli(["generate", "--model", MODEL, "--prompt", "a dog", "--extend", first, *SMALL, "--temp", "1",
                     "--seed", "3", "--out", tmp_path / "from_video.mp4"])
    assert code == 0 and "25 frames" in log and written[2].shape == (25, 64, 64, 3)


def test_bad_extension_settings_are_refused_up_front(tmp_path, capsys):
    clip = tmp_path / "clip.safetensors"
    from pyramid_core.latents_file import save_latents

    save_latents(torch.zeros(1, 16, 2, 8, 8), clip, {"family": "mmdit", "fps": 24.0})
    cases = [
        (["--extend", clip, "--image", clip], "use one of them"),
        (["--extend", clip], "made by a SD3 model but --model is miniFLUX"),
        (["--prompt", "0: a cat | 40: a dog"], "'40: a dog' starts at latent frame 40, but the video has 16"),
        (["--prompt", "0: a cat | x"], "'x' is not '<latent frame>: <text>'"),
        (["--history-frames", "0"], "--history-frames must be >= 1"),
        (["--extend", tmp_path / "none.mp4"], "clip to extend not found"),
    ]
    for extra, message in cases:
        argv = ["generate", "--model", MODEL, "--prompt", "a cat", "--out", tmp_path / "x.mp4", *extra]
        code, _ = run_cli(argv)
        err = capsys.readouterr().err
        assert code == cli.EXIT_USAGE and message in err and err.startswith("error: "), (extra, err)


def test_a_streamed_video_equals_the_one_decoded_at_the_end(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 120, 40)).save(tmp_path / "start.png")
    for name, extra in (("t2v", []), ("i2v", ["--image", tmp_path / "start.png"])):
        argv = ["generate", "--model", MODEL, "--prompt", "a cat", *SMALL, "--temp", "3", "--seed", "4", *extra]
        assert run_cli([*argv, "--stream", "--out", tmp_path / f"{name}_stream.mp4"])[0] == 0
        assert run_cli([*argv, "--out", tmp_path / f"{name}_end.mp4"])[0] == 0
        streamed, at_end = (tmp_path / f"{name}_stream.mp4").read_bytes(), (tmp_path / f"{name}_end.mp4").read_bytes()
        assert streamed == at_end, name  # byte for byte: the same frames, encoded the same way


def test_a_failed_streamed_write_keeps_the_latents(tmp_path, monkeypatch, capsys):
    import errno

    from pyramid_core.outputs import WriteError

    calls = []

    def add(self, frames):
        calls.append(len(frames))
        if len(calls) == 2:
            self.abort()
            raise WriteError(self.target, "no space left on device", "free some space", errno.ENOSPC)
        return ORIGINAL_ADD(self, frames)

    ORIGINAL_ADD = video.VideoSink.add
    monkeypatch.setattr(video.VideoSink, "add", add)
    out = tmp_path / "clip.mp4"
    code, _ = run_cli(["generate", "--model", MODEL, "--prompt", "a cat", *SMALL, "--temp", "4", "--seed", "4", "--stream",
                   "--out", out])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and "no space left on device" in err and "python -m pyramid_core decode" in err
    latents, _ = load_latents(tmp_path / "clip.safetensors")
    assert latents.shape == (1, 16, 4, 8, 8) and len(calls) == 2  # generation went on after the failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.safetensors"]
    code, _ = run_cli(["generate", "--model", MODEL, "--prompt", "a cat", "--stream", "--offload", "model",
                   "--out", tmp_path / "x.mp4"])
    assert code == cli.EXIT_USAGE and "--stream writes a video while generating" in capsys.readouterr().err
