"""The command line never loses a result and never fails silently: every bad setting is refused before anything
loads (exit 2, one `error:` line naming the fix), a failed write keeps the latents, signals clean up, and
`--help` does not import torch."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyramid_core import cli, outputs, settings, video
from pyramid_core.latents_file import load_latents
from pyramid_core.loading import load_dit, load_vae, save_single_file
from tests.helpers import record_written_frames, run_cli
from tests.reference import model_dir

PROMPT = "a cat"
MODEL = str(model_dir("miniflux_tiny"))
SMALL = ["--width", "64", "--height", "64", "--temp", "2", "--steps", "1", "--video-steps", "1", "--dtype", "fp32",
         "--device", "cpu", "--seed", "3", "--quiet"]
REPO = Path(__file__).resolve().parents[1]


def refuse_loading(monkeypatch) -> None:
    from pyramid_core import loading, pipeline

    def loaded(*args, **kwargs):
        raise AssertionError("nothing may be loaded")

    for name in ("load_dit", "load_vae", "load_components"):
        monkeypatch.setattr(loading, name, loaded)
    monkeypatch.setattr(pipeline.PyramidFlowPipeline, "from_pretrained", classmethod(loaded))


# ---------------------------------------------------------------------------------------------- refused up front

BAD_SETTINGS = [
    (["--guidance", "inf"], "--guidance must be a finite number >= 0"),
    (["--guidance", "nan"], "--guidance must be a finite number >= 0"),
    (["--guidance", "-1"], "--guidance must be a finite number >= 0"),
    (["--video-guidance", "-0.5"], "--video-guidance must be a finite number >= 0"),
    (["--seed", str(2**64)], "--seed must be an integer in 0..18446744073709551615"),
    (["--seed", str(2**70)], "--seed must be an integer"),  # once wrapped to seed 0's video
    (["--seed", "-1"], "--seed must be an integer"),
    (["--duration", "inf"], "--duration must be a positive, finite number of seconds"),
    (["--duration", "0"], "--duration must be a positive"),
    (["--fps", "inf"], "--fps must be a positive number"),
    (["--fps", "0"], "--fps must be a positive number"),
    (["--device", "mps"], "--device mps, but this PyTorch build has no usable Apple GPU (MPS); use cpu"),
    (["--device", "tpu"], "unknown --device 'tpu'; use cuda, cuda:N or cpu"),
    (["--width", "65536", "--height", "65536"], "the largest size that fits at temp 16 is about"),
    (["--format", "webm"], "ends in .mp4 but --format is webm; make them agree"),
    (["--quality", "101"], "quality must be an integer 0..100"),
    (["--steps", ","], "like 20,20,20"),
    (["--budget-gb", "nan"], "--budget-gb must be a positive number of GiB"),
    (["--resident-blocks", "-1"], "--resident-blocks must be >= 0"),
]


@pytest.mark.parametrize("argv, message", BAD_SETTINGS, ids=[" ".join(a) for a, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_before_loading(tmp_path, monkeypatch, capsys, argv, message):
    refuse_loading(monkeypatch)
    code, log = run_cli(["generate", "--model", MODEL, "--prompt", PROMPT, "--out", tmp_path / "x.mp4", *argv])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and log == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cuda_without_a_gpu_is_refused(tmp_path, monkeypatch, capsys):
    refuse_loading(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _ = run_cli(["generate", "--model", MODEL, "--prompt", PROMPT, "--device", "cuda", "--out", tmp_path / "x.mp4"])
    assert code == cli.EXIT_USAGE and "PyTorch sees no CUDA GPU here; use cpu" in capsys.readouterr().err


def test_the_largest_fitting_size_really_fits():
    from pyramid_core.validation import check_fits, largest_fitting_size

    capacity = 8 * 2**30
    size = largest_fitting_size(4096, 2304, 16, 1920, capacity)
    assert size is not None and size[0] % 64 == 0 and size[1] % 64 == 0 and 1.6 < size[0] / size[1] < 1.9
    check_fits(*size, 16, hidden=1920, capacity=capacity)  # no error
    with pytest.raises(ValueError, match="the largest size that fits"):
        check_fits(size[0] + 128, size[1] + 64, 16, hidden=1920, capacity=capacity)
    with pytest.raises(ValueError, match=r"or keep 1280x768 with temp <= 31\b"):  # 2.44 GiB at temp 31
        check_fits(1280, 768, 200, hidden=1920, capacity=int(2.45 * 2**30))


@pytest.mark.parametrize("failure", ["unwritable", "parent_is_a_file", "missing"])
def test_an_unusable_output_folder_is_refused_up_front(tmp_path, monkeypatch, capsys, failure):
    refuse_loading(monkeypatch)
    out = tmp_path / "out" / "x.mp4"
    if failure == "unwritable":
        out.parent.mkdir()

        def refuse(target):
            raise PermissionError(errno.EACCES, "Permission denied", str(target))

        monkeypatch.setattr(outputs, "_reserve_temp", refuse)
    elif failure == "parent_is_a_file":
        out.parent.write_text("a file")
    code, _ = run_cli(["generate", "--model", MODEL, "--prompt", PROMPT, "--out", out])
    err = capsys.readouterr().err
    expected = {"unwritable": "permission denied; choose a folder you can write to",
                "parent_is_a_file": "is a file, not a folder", "missing": "output folder does not exist"}[failure]
    assert code == cli.EXIT_USAGE and expected in err and str(out.parent) in err and "Traceback" not in err


def test_single_dit_file_without_vae_names_the_missing_flags(tmp_path, capsys):
    dit = save_single_file(load_dit(MODEL, dtype=torch.float32), tmp_path / "dit.safetensors")
    code, _ = run_cli(["generate", "--model", dit, "--prompt", PROMPT, "--out", tmp_path / "x.mp4"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and "add --vae FILE and --text-encoders FOLDER" in err


@pytest.mark.parametrize("value, shows_stack", [("0", False), ("", False), ("1", True), ("true", True)])
def test_traceback_switch_only_turns_on_for_1_or_true(tmp_path, monkeypatch, capsys, value, shows_stack):
    monkeypatch.setenv(cli.TRACEBACK_ENV, value)
    argv = ["generate", "--model", MODEL, "--prompt", PROMPT, "--guidance", "-1", "--out", tmp_path / "x.mp4"]
    if shows_stack:
        with pytest.raises(ValueError, match="--guidance"):
            run_cli(argv)
    else:
        assert run_cli(argv)[0] == cli.EXIT_USAGE and capsys.readouterr().err.startswith("error: --guidance")


# ---------------------------------------------------------------------------------------------- fast startup


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_help_version_and_argument_errors_do_not_import_torch():
    script = (
        "import sys, contextlib, io\n"
        "from pyramid_core.cli import main\n"
        "for argv in (['--help'], ['generate', '--help'], ['--version'], ['generate', '--offload', 'fast'], []):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        code = main(argv)\n"
        "    print(code)\n"
        "print('torch' in sys.modules)\n"
    )
    result = _fresh_python(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0", "0", "2", "2", "False"]


# ---------------------------------------------------------------------------------------------- nothing lost


def test_a_failed_write_keeps_the_latents_and_decode_writes_them_later(tmp_path, monkeypatch, capsys):
    written = record_written_frames(monkeypatch)
    recorder = video.write_video
    assert run_cli(["generate", "--model", MODEL, "--prompt", PROMPT, *SMALL, "--out", tmp_path / "reference.mp4"])[0] == 0

    def disk_full(frames, path, **kwargs):
        raise outputs.WriteError(path, "no space left on device", "free some space or choose another output folder",
                                 errno.ENOSPC)

    monkeypatch.setattr(video, "write_video", disk_full)
    out = tmp_path / "clip.mp4"
    code, _ = run_cli(["generate", "--model", MODEL, "--prompt", PROMPT, *SMALL, "--out", out])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and err.count("\n") == 1 and "no space left on device" in err
    kept = tmp_path / "clip.safetensors"
    assert f"kept in {kept}" in err and f"python -m pyramid_core decode {kept} --out {out}" in err
    latents, meta = load_latents(kept)
    assert latents.shape == (1, 16, 2, 8, 8) and meta["seed"] == 3 and meta["family"] == "flux"
    assert not out.exists()

    monkeypatch.setattr(video, "write_video", recorder)
    code, log = run_cli(["decode", kept, "--out", out, "--device", "cpu", "--dtype", "fp32", "--quiet"])
    assert code == 0 and f"wrote {out}" in log and out.is_file()
    assert len(written) == 2 and torch.equal(written[1], written[0])  # the video the failed run would have written


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_while_writing_leaves_no_file(tmp_path, monkeypatch, capsys, stop):
    from pyramid_core.cli import run as run_module

    def terminate(self, written):
        if written >= 3:
            os.kill(os.getpid(), getattr(signal, stop))

    monkeypatch.setattr(run_module.WriteProgress, "__call__", terminate)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [a for a in SMALL if a != "--quiet"]
    code, _ = run_cli(["generate", "--model", MODEL, "--prompt", PROMPT, *argv, "--out", out_dir / "clip.mp4"])
    assert code == cli.EXIT_CANCELLED and "cancelled" in capsys.readouterr().err
    assert list(out_dir.iterdir()) == []
    assert signal.getsignal(getattr(signal, stop)) == signal.SIG_DFL  # the handler is put back


# ---------------------------------------------------------------------------------------------- single files, models


def test_single_files_generate_the_same_video_as_the_folder(tmp_path, monkeypatch):
    written = record_written_frames(monkeypatch)
    assert run_cli(["generate", "--model", MODEL, "--prompt", PROMPT, *SMALL, "--out", tmp_path / "folder.mp4"])[0] == 0
    dit = save_single_file(load_dit(MODEL, dtype=torch.float32), tmp_path / "dit.safetensors")
    vae = save_single_file(load_vae(MODEL, dtype=torch.float32), tmp_path / "vae.safetensors")
    code, _ = run_cli(["generate", "--model", dit, "--vae", vae, "--text-encoders", MODEL, "--prompt", PROMPT, *SMALL,
                   "--out", tmp_path / "files.mp4"])
    assert code == 0 and torch.equal(written[0], written[1])


def test_models_lists_what_a_folder_and_a_file_hold(tmp_path):
    code, log = run_cli(["models", MODEL])
    assert code == 0
    assert f"{MODEL}: miniFLUX (flux), official layout" in log
    assert "DiT diffusion_transformer_384p:" in log and "VAE:" in log and "text_encoder_2:" in log
    dit = save_single_file(load_dit(MODEL, dtype=torch.bfloat16), tmp_path / "dit.safetensors")
    code, log = run_cli(["models", dit])
    assert code == 0 and "miniFLUX DiT" in log and "bfloat16" in log and "GiB" in log


def test_cli_choices_node_widgets_and_settings_agree():
    from nodes import loaders, managed, sampler

    parser = cli.build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    choices = {action.dest: action.choices for action in generate._actions if action.choices}
    assert tuple(choices["dtype"]) == settings.COMPUTE_DTYPES
    assert tuple(choices["offload"]) == settings.PLANS
    assert tuple(choices["fp8"]) == settings.FP8_GRANULARITIES
    assert tuple(choices["attention"]) == settings.ATTENTION_CHOICES
    assert set(settings.ATTENTION_CHOICES) - set(settings.ATTENTION_KERNELS) <= set(settings.ATTENTION_MODES)
    assert tuple(choices["format"]) == settings.VIDEO_FORMATS == video.VIDEO_FORMATS
    widgets = loaders.PyramidFlowCoreModelLoader.INPUT_TYPES()["required"]
    assert widgets["variant"][0] == [v.alias for v in settings.VARIANTS.values()]
    assert widgets["precision"][0] == list(settings.PRECISIONS)
    assert set(widgets["offload"][0]) == set(settings.PLANS) == set(managed.OFFLOAD_MODES)
    assert set(widgets["attention"][0]) == {*settings.ATTENTION_MODES, *settings.ATTENTION_KERNELS} - {"sdpa"}
    sampler_widgets = sampler.PyramidFlowCoreSampler.INPUT_TYPES()["required"]
    default = settings.VARIANTS[settings.DEFAULT_VARIANT]
    assert (sampler_widgets["width"][1]["default"], sampler_widgets["height"][1]["default"]) == (default.width, default.height)
    assert sampler_widgets["guidance_scale"][1]["default"] == settings.DEFAULTS.guidance
    assert sampler_widgets["seed"][1]["max"] == settings.DEFAULTS.seed_limit - 1
    assert sampler_widgets["temp"][1]["max"] == max(v.trained_temp for v in settings.VARIANTS.values())


def test_every_phase_reports_and_auto_shows_its_plan(tmp_path, capsys):
    long_prompt = " ".join(["a cat walking on the beach at sunset"] * 30)  # far over T5's 128 tokens
    argv = [a for a in SMALL if a != "--quiet"]
    code, log = run_cli(["generate", "--model", MODEL, "--prompt", long_prompt, *argv, "--offload", "auto",
                     "--out", tmp_path / "x.mp4"])
    err = capsys.readouterr().err
    assert code == 0
    assert "memory plan 'auto'" in log and "estimated peak" in log and "encoding the prompt" in log
    assert err.count("warning: prompt is") == 1 and "T5 tokens; the last" in err
    assert all(phase in err for phase in ("frame 2/2 stage 3/3", "decoding", "writing"))
    code, log = run_cli(["generate", "--model", MODEL, "--prompt", PROMPT, *SMALL, "--out", tmp_path / "y.mp4"])
    assert code == 0 and "memory plan" not in log and "encoding the prompt" not in log
    assert capsys.readouterr().err == "" and log.startswith("wrote ")  # --quiet: the summary only


def test_requirements_txt_lists_the_package_dependencies_but_torch():
    """ComfyUI-Manager installs requirements.txt: the pyproject dependencies, without torch (never reinstalled)."""
    import tomllib

    from tests.reference import REPO_ROOT

    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line.strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()]
    listed = [line for line in lines if line and not line.startswith("#")]
    assert listed == [d for d in declared if not d.startswith("torch")]
