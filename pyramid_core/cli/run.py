"""Running a checked request: load, sample, decode, write, with progress for each phase.

Nothing finished is lost: sampling returns latents first; when decoding or writing then fails (disk full, no
permission, out of memory, a codec error), the latents are kept in a `.latents.safetensors` file and the
error names it and the `decode` command that writes the video from it.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO

from ..settings import dtype_name
from ..validation import frames_for_temp, guidance_note
from .request import GenerationRequest, writes_image
from .stream import check_streamable, sample_streaming

if TYPE_CHECKING:
    import torch

    from ..parallel import ParallelGroups

__all__ = [
    "DecodeProgress", "KeptLatentsError", "Reporter", "RunSummary", "StepProgress", "WriteProgress",
    "decode_and_write", "peak_host_rss", "run_generation",
]


class Reporter:
    """Status lines and progress bars of one command; `quiet` silences both, `verbose` adds detail."""

    def __init__(self, log: TextIO, quiet: bool = False, verbose: bool = False):
        self.log, self.quiet, self.verbose = log, quiet, verbose

    def say(self, message: str, *, detail: bool = False) -> None:
        """Print a status line (a `detail` line only when verbose)."""
        if not self.quiet and (self.verbose or not detail):
            print(message, file=self.log, flush=True)


class _Bar:
    """A tqdm bar on stderr that starts on first use (nothing printed when `quiet`)."""

    unit = "step"

    def __init__(self, stream: TextIO | None = None, quiet: bool = False):
        self.stream, self.quiet, self.bar = stream, quiet, None

    def _update(self, done: int, total: int, description: str | None = None) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit=self.unit, file=self.stream or sys.stderr, dynamic_ncols=True, leave=True)
        if description is not None:
            self.bar.set_description(description, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StepProgress(_Bar):
    """Every denoising step of every frame and stage (the pipeline's step_callback)."""

    def __call__(self, info) -> None:
        self._update(info.completed, info.total, f"frame {info.unit + 1}/{info.num_units} stage {info.stage + 1}/3")


class DecodeProgress(_Bar):
    """The VAE decode, in decode steps: temporal chunks x spatial tiles (the decode `progress` callback)."""

    unit = "tile"

    def __call__(self, done: int, total: int) -> None:
        self._update(done, total, "decoding")


class WriteProgress(_Bar):
    """Encoded frames (write_video's callback)."""

    unit = "frame"

    def __init__(self, total: int, stream: TextIO | None = None, quiet: bool = False):
        super().__init__(stream, quiet)
        self.total = total

    def __call__(self, written: int) -> None:
        self._update(written, self.total, "writing")


class KeptLatentsError(RuntimeError):
    """Decoding or writing failed after sampling; the latents were kept (`path`)."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


@dataclass
class RunSummary:
    """What a run produced and what it cost."""

    path: Path
    frames: int
    width: int
    height: int
    fps: float
    seed: int
    seconds: float
    load_seconds: float
    generate_seconds: float
    write_seconds: float  # VAE decode and writing
    peak_device_allocated: int | None  # bytes; None off CUDA
    peak_device_reserved: int | None
    peak_host_rss: int | None  # bytes; None where the OS does not report it

    def lines(self) -> list[str]:
        what = "1 image" if self.frames == 1 and self.path.suffix.lower() == ".png" else (
            f"{self.frames} frames, {self.fps:g} fps, {self.frames / self.fps:.2f} s"
        )
        size = self.path.stat().st_size if self.path.exists() else 0
        device = (
            f"{_gib(self.peak_device_allocated)} allocated, {_gib(self.peak_device_reserved)} reserved"
            if self.peak_device_allocated is not None else "n/a (not CUDA)"
        )
        return [
            f"wrote {self.path}  ({what}, {self.width}x{self.height}, {size / 2**20:.2f} MiB)",
            f"time: {self.seconds:.1f} s (load {self.load_seconds:.1f} s, generate {self.generate_seconds:.1f} s, "
            f"decode and write {self.write_seconds:.1f} s)",
            f"peak device memory: {device}",
            f"peak host memory (RSS): {_gib(self.peak_host_rss) if self.peak_host_rss is not None else 'n/a'}",
            f"seed: {self.seed}",
        ]


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def peak_host_rss() -> int | None:
    """Peak resident memory of this process in bytes (None where `resource` is missing, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def _dtype_name(dtype: torch.dtype) -> str:
    return dtype_name(str(dtype))


def run_generation(
    request: GenerationRequest, log: TextIO | None = None, parallel: ParallelGroups | None = None
) -> RunSummary | None:
    """Load the model, generate, write the file (never overwriting); returns the summary.

    `parallel` (several processes): every rank loads the DiT and samples its share; only rank 0 loads the text
    encoders, decodes and writes; the other ranks return None after sampling.
    """
    import torch

    from ..loading.quiet import quiet_transformers
    from ..pipeline import PyramidFlowPipeline

    report = Reporter(log or sys.stdout, request.quiet, request.verbose)
    start = time.perf_counter()
    if request.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(request.device)
    report.say(f"loading {request.variant} from {request.model} ({_dtype_name(request.dtype)} on {request.device}, "
               f"offload {request.offload})")
    if request.dtype_note:
        report.say(f"compute dtype {_dtype_name(request.dtype)}: {request.dtype_note}")
    if request.compile:
        report.say("compiling the DiT blocks (torch.compile): the first steps are slow")
    with quiet_transformers():
        pipe = PyramidFlowPipeline.from_pretrained(
            request.source, request.variant, dtype=request.dtype, device=request.device, offload=request.offload,
            fp8=request.fp8, attention_backend=request.attention, budget_gb=request.budget_gb,
            resident_blocks=request.resident_blocks, compile_blocks=request.compile,
            load_text_encoder=parallel is None or parallel.is_first, parallel=parallel,
        )
    plan = pipe.memory.prepare(request.width, request.height, request.total_temp, cfg=request.guidance > 0,
                               dtype=request.dtype)
    report.say(plan.describe(), detail=request.offload != "auto")
    if parallel is not None:
        report.say(f"{parallel.plan.describe()} (this is rank {parallel.rank}, on {request.device})")
    loaded = time.perf_counter()
    mode = "image-to-video" if request.image is not None else ("text-to-image" if request.temp == 1 else "text-to-video")
    if request.clip is not None:
        mode = f"extending {request.clip.path.name} ({request.clip.latent_frames} latent frames) by {request.temp}"
    report.say(f"{mode}: {request.width}x{request.height}, temp {request.total_temp} "
               f"({frames_for_temp(request.total_temp)} frames), seed {request.seed}")
    note = guidance_note(request.guidance, request.video_guidance if request.temp > 1 else 1.0)
    if note is not None:
        report.say(note)
    report.say("encoding the prompt")
    writes = parallel is None or parallel.is_first  # rank 0 decodes and writes; the others only sample
    if request.stream and writes:
        check_streamable(plan)
    progress = StepProgress(quiet=request.quiet)
    streamed = failure = None
    try:
        if request.stream and writes:
            latents, streamed, failure = sample_streaming(pipe, request, progress)
        else:
            latents = _sample(pipe, request, progress)
    finally:
        progress.close()
    generated = time.perf_counter()
    if not writes:
        return None
    if request.save_latents:
        from ..latents_file import save_latents

        kept = save_latents(latents.cpu(), request.out.with_suffix(".safetensors"), _metadata(request))
        report.say(f"latents: {kept} (continue with --extend {kept})")
    if failure is not None:
        raise _keep(latents, request.out, _metadata(request), failure) from failure
    if streamed is not None:
        path, frames = streamed, frames_for_temp(request.total_temp)
    else:
        path, frames = decode_and_write(pipe.decode, latents, request, metadata=_metadata(request))
    done = time.perf_counter()
    allocated = reserved = None
    if request.device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(request.device)
        reserved = torch.cuda.max_memory_reserved(request.device)
    return RunSummary(
        path=path, frames=frames, width=request.width, height=request.height, fps=request.fps,
        seed=request.seed, seconds=done - start, load_seconds=loaded - start, generate_seconds=generated - loaded,
        write_seconds=done - generated, peak_device_allocated=allocated, peak_device_reserved=reserved,
        peak_host_rss=peak_host_rss(),
    )


def _sample(pipe, request: GenerationRequest, progress: StepProgress) -> torch.Tensor:
    from ..text import DEFAULT_NEGATIVE_PROMPT

    negative = request.negative_prompt if request.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
    common = dict(
        negative_prompt=negative, guidance_scale=request.guidance, video_guidance_scale=request.video_guidance,
        seed=request.seed, output_type="latent", step_callback=progress, history_frames=request.history_frames,
    )
    if request.clip is not None:
        clip = request.clip.latents if request.clip.latents is not None else pipe.encode_video(request.clip.pixels)
        return pipe.extend(clip, prompt=request.prompt, temp=request.temp, num_inference_steps=request.video_steps,
                           **common)
    if request.image is not None:
        return pipe.generate_i2v(
            prompt=request.prompt, input_image=request.image, temp=request.temp, num_inference_steps=request.video_steps,
            width=request.width, height=request.height, **common,
        )
    return pipe.generate(
        prompt=request.prompt, height=request.height, width=request.width, temp=request.temp,
        num_inference_steps=request.steps, video_num_inference_steps=request.video_steps, **common,
    )


def _metadata(request: GenerationRequest) -> dict[str, str | int | float]:
    vae = request.vae or request.model
    return {
        "family": request.family, "variant": request.variant, "model": str(Path(vae).resolve()),
        "prompt": request.prompt, "seed": request.seed, "fps": request.fps, "width": request.width,
        "height": request.height, "temp": request.total_temp,
    }


def decode_and_write(decode: Callable[..., torch.Tensor], latents: torch.Tensor, request,
                     metadata: dict[str, str | int | float] | None = None) -> tuple[Path, int]:
    """Decode `latents` (`decode(latents, output_type="pt", progress=...)`: a pipeline's or codec's) with
    progress and write them to `request.out` (an object with out, format, fps, quality, quiet); returns
    (path written, frames).

    When `metadata` is given and decoding or writing fails for any reason but a cancel, the latents are kept
    (`pyramid_core.latents_file`) and a `KeptLatentsError` names where and how to write the video later.
    """
    try:
        bar = DecodeProgress(quiet=request.quiet)
        try:
            frames = decode(latents, output_type="pt", progress=bar)
        finally:
            bar.close()
        return _write(frames, request), len(frames)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if metadata is None:
            raise
        raise _keep(latents, request.out, metadata, exc) from exc


def _write(frames: torch.Tensor, request) -> Path:
    from .. import video

    if writes_image(request.out, request.format):
        return video.write_image(frames[0].cpu().numpy(), request.out)
    bar = WriteProgress(len(frames), quiet=request.quiet)
    try:
        return video.write_video(frames, request.out, fps=request.fps, format=request.format, quality=request.quality,
                                 callback=bar)
    finally:
        bar.close()


def _keep(latents: torch.Tensor, out: Path, metadata: dict, failure: BaseException) -> KeptLatentsError:
    from ..latents_file import fallback_latents_path, save_latents

    try:
        kept = save_latents(latents.cpu(), fallback_latents_path(out.parent, out.stem), metadata)
    except Exception as second:  # nowhere to keep them: say both failures
        return KeptLatentsError(f"{_reason(failure)}; keeping the latents failed too ({second})", out)
    command = f"python -m pyramid_core decode {kept} --out {out}"
    return KeptLatentsError(f"{_reason(failure)}; the generation is kept in {kept}: write it later with: {command}", kept)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if text.startswith("cannot write") else f"decoding or writing failed: {text}"


