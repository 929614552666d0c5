"""Command line: `python -m pyramid_core generate ...` (real weights) and `python -m pyramid_core demo`.

Bad input ends with one `error: ...` message and exit status 2 (set PYRAMID_CORE_TRACEBACK=1 to see the
stack instead), Ctrl-C with status 130 and no output file; a finished run prints a summary (time, peak
memory, the file written).
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TextIO

import torch

from .validation import FPS, frames_for_temp, parse_steps, temp_for_duration

__all__ = [
    "EXIT_CANCELLED", "EXIT_USAGE", "GenerationRequest", "RunSummary", "StepProgress", "VARIANT_DEFAULTS",
    "build_parser", "compute_dtype_for", "main", "resolve_request", "run_generation",
]

EXIT_USAGE = 2
EXIT_CANCELLED = 130  # the shell convention for "stopped by Ctrl-C"
IMAGE_SUFFIX = ".png"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_HELP = ("compute precision (default: bf16 on a GPU, as trained; fp32 on a CPU, where bf16 convolutions and "
              "matmuls run many times slower); fp16 for GPUs without bf16: residual streams stay fp32")
CPU_DTYPE_NOTE = ("the CPU default: bf16 convolutions and matmuls run many times slower than fp32 on CPUs without "
                  "native bf16; pass --dtype bf16 to halve the memory anyway")


@dataclass(frozen=True)
class VariantDefaults:
    """Settings a DiT variant was trained for."""

    width: int
    height: int
    temp: int


# the sizes and lengths of the official README examples (temp 16 = 121 frames = 5 s at 24 fps)
VARIANT_DEFAULTS = {
    "diffusion_transformer_384p": VariantDefaults(640, 384, 16),
    "diffusion_transformer_768p": VariantDefaults(1280, 768, 16),
    "diffusion_transformer_image": VariantDefaults(1024, 1024, 1),
}
DEFAULT_STEPS = "20,20,20"
DEFAULT_VIDEO_STEPS = "10,10,10"
DEFAULT_GUIDANCE = 7.0
DEFAULT_VIDEO_GUIDANCE = 5.0
DEFAULT_I2V_VIDEO_GUIDANCE = 4.0  # official generate_i2v default

DEMO_PROMPT = "a cat walking on the beach at sunset"
DEMO_NOTICE = "PIPELINE CHECK ON RANDOM WEIGHTS: this model is tiny and untrained; its output is noise, not a video of anything."


class UsageError(ValueError):
    """A command-line setting that cannot work; the message says what to pass instead."""


# --------------------------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    """The `python -m pyramid_core` parser with its `generate` and `demo` commands."""
    from .memory import PLANS
    parser = argparse.ArgumentParser(
        prog="python -m pyramid_core",
        description="Pyramid Flow text/image-to-video from an official checkpoint folder.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,demo}")

    gen = commands.add_parser(
        "generate",
        help="generate a video (or image) from a Pyramid Flow model folder",
        description="Generate a video (or a still image) with a Pyramid Flow checkpoint folder "
        "(rain1011/pyramid-flow-miniflux or -sd3 layout).",
        epilog="example: python -m pyramid_core generate --model ./pyramid-flow-miniflux "
        "--prompt 'a cat walking on the beach at sunset' --out cat.mp4",
    )
    gen.add_argument("--model", required=True, help="model root folder (holds diffusion_transformer_*/, causal_video_vae/, ...)")
    gen.add_argument("--prompt", required=True, help="what to generate")
    gen.add_argument("--negative-prompt", default=None, help="what to avoid (default: the official negative prompt)")
    gen.add_argument("--image", default=None, help="start image: image-to-video (scaled to cover, centre-cropped)")
    gen.add_argument("--variant", default="384p", help="DiT variant: 384p (default), 768p or image")
    gen.add_argument("--width", type=int, default=None, help="pixels, multiple of 64 (384p: 640, 768p: 1280, image: 1024)")
    gen.add_argument("--height", type=int, default=None, help="pixels, multiple of 64 (384p: 384, 768p: 768, image: 1024)")
    length = gen.add_mutually_exclusive_group()
    length.add_argument("--temp", type=int, default=None, help="latent frames; the video has 8*(temp-1)+1 frames (default 16; image: 1)")
    length.add_argument("--duration", type=float, default=None, help="seconds of video (picks the smallest temp that lasts that long)")
    gen.add_argument("--steps", default=None, help=f"first-frame steps per pyramid stage (default {DEFAULT_STEPS})")
    gen.add_argument("--video-steps", default=DEFAULT_VIDEO_STEPS, help=f"steps per stage for later frames (default {DEFAULT_VIDEO_STEPS}; all frames in image-to-video)")
    gen.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"first-frame guidance (default {DEFAULT_GUIDANCE:g}; 0 turns guidance off)")
    gen.add_argument("--video-guidance", type=float, default=None, help=f"guidance of later frames (default {DEFAULT_VIDEO_GUIDANCE:g}; image-to-video {DEFAULT_I2V_VIDEO_GUIDANCE:g})")
    gen.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    _add_output_arguments(gen)
    gen.add_argument("--dtype", choices=tuple(DTYPES), default=None, help=DTYPE_HELP)
    gen.add_argument("--fp8", choices=("row", "tensor"), default=None,
                     help="store the DiT's Linear weights in float8 with per-row or per-tensor scales (half the memory)")
    gen.add_argument("--attention", choices=("sdpa", "sage", "flash"), default="sdpa",
                     help="attention kernel of the fused frame-causal attention (sage/flash need their pip package)")
    gen.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--offload", default="none", metavar="PLAN",
                     help=f"memory plan, one of {', '.join(PLANS)} (default none: everything stays on the device; "
                     "model: each model on the device only while it runs)")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile each DiT block (slow first steps while it compiles; not with --offload sequential)")
    gen.add_argument("--budget-gb", type=float, default=None, help="GPU memory budget for --offload auto/block_swap (GiB; default: free memory)")
    gen.add_argument("--resident-blocks", type=int, default=None, help="--offload block_swap: DiT blocks kept on the GPU")
    gen.add_argument("--out", required=True, help="output file: .mp4, .webm, .webp, .gif, or .png for a still image (never overwritten)")

    demo = commands.add_parser(
        "demo",
        help="pipeline check with a tiny random model (no weights, no network); the output is noise",
        description="Build a tiny random Pyramid Flow model, load it like a real one and write a short video. "
        "It checks the installation; the video is noise.",
    )
    demo.add_argument("--out", default="demo.mp4", help="output file (default demo.mp4; never overwritten)")
    demo.add_argument("--family", choices=("flux", "mmdit"), default="flux", help="miniFLUX (default) or SD3-style MMDiT")
    demo.add_argument("--keep", default=None, metavar="DIR", help="write the tiny model into DIR (new or empty) and keep it")
    demo.add_argument("--seed", type=int, default=0, help="seed of the weights and of the generation (default 0)")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    demo.add_argument("--dtype", choices=tuple(DTYPES), default=None, help=DTYPE_HELP)
    return parser


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    from .video import VIDEO_FORMATS

    parser.add_argument("--fps", type=float, default=FPS, help=f"frames per second of the file (default {FPS}, as trained)")
    parser.add_argument("--format", choices=VIDEO_FORMATS, default=None, help="video format (default: from the --out suffix)")
    parser.add_argument("--quality", type=int, default=80, help="0-100, higher = better and larger (default 80)")


@dataclass
class GenerationRequest:
    """Every setting of one run, resolved and checked (nothing loaded yet)."""

    model: Path
    variant: str
    prompt: str
    out: Path
    width: int
    height: int
    temp: int
    steps: list[int]
    video_steps: list[int]
    guidance: float
    video_guidance: float
    seed: int
    negative_prompt: str | None = None
    image: object | None = None  # PIL image for image-to-video
    fps: float = FPS
    format: str | None = None
    quality: int = 80
    dtype: torch.dtype = torch.bfloat16
    dtype_note: str = ""  # why this dtype, when the command line chose it (printed)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload: str = "none"
    compile: bool = False
    fp8: str | None = None
    attention: str = "sdpa"
    budget_gb: float | None = None
    resident_blocks: int | None = None

    @property
    def writes_image(self) -> bool:
        return self.format is None and self.out.suffix.lower() == IMAGE_SUFFIX


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
    write_seconds: float
    peak_device_allocated: int | None  # bytes; None off CUDA
    peak_device_reserved: int | None
    peak_host_rss: int | None  # bytes; None where the OS does not report it

    def lines(self) -> list[str]:
        what = "1 image" if self.path.suffix.lower() == IMAGE_SUFFIX else (
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
            f"write {self.write_seconds:.1f} s)",
            f"peak device memory: {device}",
            f"peak host memory (RSS): {_gib(self.peak_host_rss) if self.peak_host_rss is not None else 'n/a'}",
            f"seed: {self.seed}",
        ]


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def resolve_request(args: argparse.Namespace) -> GenerationRequest:
    """Check the `generate` arguments and fill in the variant's defaults; raises UsageError/ValueError/FileNotFoundError."""
    from .loading import resolve_model_folder, resolve_variant
    from .validation import check_resolution

    offload = _check_offload(args.offload)
    _check_compile(args.compile, offload)
    variant = resolve_variant(args.variant)
    defaults = VARIANT_DEFAULTS.get(variant, VARIANT_DEFAULTS["diffusion_transformer_384p"])
    out, fmt = _check_output(args.out, args.format)
    _check_quality_fps(args.quality, args.fps)

    width = args.width if args.width is not None else defaults.width
    height = args.height if args.height is not None else defaults.height
    check_resolution(width, height)
    if args.duration is not None:
        temp = temp_for_duration(args.duration, args.fps)
    else:
        temp = args.temp if args.temp is not None else defaults.temp
    if temp < 1:
        raise UsageError(f"--temp must be >= 1 (the video has 8*(temp-1)+1 frames), got {temp}")
    video_steps = parse_steps(args.video_steps, "--video-steps")
    steps = parse_steps(args.steps if args.steps is not None else DEFAULT_STEPS, "--steps")

    image = None
    if args.image is not None:
        if variant == "diffusion_transformer_image":
            raise UsageError("the image variant makes still images; use --variant 384p or 768p for image-to-video")
        if temp < 2:
            raise UsageError(f"image-to-video needs --temp >= 2 (the start image is frame 0), got {temp}")
        if args.steps is not None:
            warnings.warn("--steps is not used in image-to-video: every frame uses --video-steps", stacklevel=2)
        image = _open_image(args.image)
    if out.suffix.lower() == IMAGE_SUFFIX and fmt is None and temp != 1:
        raise UsageError(
            f"{out.name} is a still image but temp {temp} makes a {frames_for_temp(temp)}-frame video; "
            "use --temp 1 (or --variant image) or a .mp4/.webm/.webp/.gif name"
        )
    video_guidance = args.video_guidance
    if video_guidance is None:
        video_guidance = DEFAULT_I2V_VIDEO_GUIDANCE if image is not None else DEFAULT_VIDEO_GUIDANCE
    folder = resolve_model_folder(args.model)
    folder.dit_path(variant)  # fails now, before any loading, when the variant is not there
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    device = _check_device(args.device)
    dtype, dtype_note = compute_dtype_for(device, args.dtype)
    return GenerationRequest(
        model=folder.root, variant=variant, prompt=args.prompt, out=out, width=width, height=height, temp=temp,
        steps=steps, video_steps=video_steps, guidance=args.guidance, video_guidance=video_guidance, seed=seed,
        negative_prompt=args.negative_prompt, image=image, fps=args.fps, format=fmt, quality=args.quality,
        dtype=dtype, dtype_note=dtype_note, device=device, offload=offload, compile=args.compile,
        fp8=args.fp8, attention=args.attention, budget_gb=args.budget_gb, resident_blocks=args.resident_blocks,
    )


def compute_dtype_for(device: torch.device, requested: str | None = None) -> tuple[torch.dtype, str]:
    """The compute dtype to run on `device`, and a note saying why when it was not requested.

    An explicit `--dtype` wins. Otherwise fp32 on a CPU (bf16 conv3d is ~100x and bf16 matmul ~8x slower
    than fp32 on an AVX2 CPU without native bf16), bf16 elsewhere (as trained).
    """
    if requested is not None:
        return DTYPES[requested], ""
    if device.type == "cpu":
        return torch.float32, CPU_DTYPE_NOTE
    return torch.bfloat16, ""


def _check_output(path: str, fmt: str | None) -> tuple[Path, str | None]:
    from .video import VIDEO_FORMATS

    out = Path(path).expanduser()
    if out.is_dir() or out.name == "":
        raise UsageError(f"--out {path!r} is a folder; give a file name such as {str(out / 'video.mp4')!r}")
    suffix = out.suffix.lower().lstrip(".")
    if fmt is None and suffix not in (*VIDEO_FORMATS, IMAGE_SUFFIX[1:]):
        raise UsageError(f"cannot tell the format of --out {out.name!r}; end it in .mp4, .webm, .webp, .gif or .png, or pass --format")
    if fmt is not None and suffix == IMAGE_SUFFIX[1:]:
        raise UsageError(f"--out {out.name!r} is a .png but --format is {fmt}; drop --format for a still image")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {out.parent} (create it first or choose another --out)")
    return out, fmt


def _check_quality_fps(quality: int, fps: float) -> None:
    if not 0 <= quality <= 100:
        raise UsageError(f"--quality must be 0..100, got {quality}")
    if not fps > 0:
        raise UsageError(f"--fps must be positive, got {fps:g}")


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    source = Path(path).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"--image file not found: {source}")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"cannot read --image {source}: {exc} (use a PNG, JPEG or WebP picture)") from None


def _check_device(name: str | None) -> torch.device:
    from .memory import default_device

    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}; use cuda or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but PyTorch sees no CUDA GPU here; use --device cpu (slow) or fix the CUDA install")
    return device


def _check_offload(plan: str) -> str:
    from .memory import PLANS

    if plan not in PLANS:
        raise UsageError(f"unknown --offload {plan!r}; choose one of {', '.join(PLANS)}")
    return plan


def _check_compile(compile_blocks: bool, plan: str) -> None:
    """--compile needs a plan that leaves the inside of the DiT blocks alone."""
    if compile_blocks and plan == "sequential":
        raise UsageError(
            "--compile cannot run with --offload sequential (it hooks every layer inside the compiled blocks); "
            "use --offload none, model or block_swap with --compile, or drop --compile"
        )


# --------------------------------------------------------------------------------------------
# running


class StepProgress:
    """A tqdm bar over every denoising step of every frame and stage, fed by the pipeline's step_callback."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.bar = None

    def __call__(self, info) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=info.total, unit="step", file=self.stream or sys.stderr, dynamic_ncols=True, leave=True)
        self.bar.set_description(f"frame {info.unit + 1}/{info.num_units} stage {info.stage + 1}/3", refresh=False)
        self.bar.update(info.completed - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class WriteProgress:
    """A tqdm bar over encoded frames (write_video's callback)."""

    def __init__(self, total: int, stream: TextIO | None = None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="frame", desc="writing", file=stream or sys.stderr, dynamic_ncols=True)

    def __call__(self, written: int) -> None:
        self.bar.update(written - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def run_generation(request: GenerationRequest, log: TextIO | None = None) -> RunSummary:
    """Load the model, generate, write the file (never overwriting); returns the summary."""
    from .demo import quiet_transformers
    from .pipeline import PyramidFlowPipeline

    log = log or sys.stdout
    start = time.perf_counter()
    if request.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(request.device)
    print(f"loading {request.variant} from {request.model} ({_dtype_name(request.dtype)} on {request.device}, "
          f"offload {request.offload})", file=log, flush=True)
    if request.dtype_note:
        print(f"compute dtype {_dtype_name(request.dtype)}: {request.dtype_note}", file=log, flush=True)
    if request.compile:
        print("compiling the DiT blocks (torch.compile): the first steps are slow", file=log, flush=True)
    with quiet_transformers():
        pipe = PyramidFlowPipeline.from_pretrained(
            request.model, request.variant, dtype=request.dtype, device=request.device, offload=request.offload,
            fp8=request.fp8, attention_backend=request.attention, budget_gb=request.budget_gb,
            resident_blocks=request.resident_blocks, compile_blocks=request.compile,
        )
    loaded = time.perf_counter()
    mode = "image-to-video" if request.image is not None else ("text-to-image" if request.temp == 1 else "text-to-video")
    print(f"{mode}: {request.width}x{request.height}, temp {request.temp} ({frames_for_temp(request.temp)} frames), "
          f"seed {request.seed}", file=log, flush=True)

    progress = StepProgress()
    try:
        frames = _generate(pipe, request, progress)
    finally:
        progress.close()
    generated = time.perf_counter()

    if request.writes_image:
        path = write_png(frames[0].cpu().numpy(), request.out)
    else:
        from .video import write_video

        bar = WriteProgress(len(frames))
        try:
            path = write_video(frames, request.out, fps=request.fps, format=request.format, quality=request.quality,
                               callback=bar)
        finally:
            bar.close()
    done = time.perf_counter()
    allocated = reserved = None
    if request.device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(request.device)
        reserved = torch.cuda.max_memory_reserved(request.device)
    return RunSummary(
        path=path, frames=len(frames), width=int(frames.shape[2]), height=int(frames.shape[1]), fps=request.fps,
        seed=request.seed, seconds=done - start, load_seconds=loaded - start, generate_seconds=generated - loaded,
        write_seconds=done - generated, peak_device_allocated=allocated, peak_device_reserved=reserved,
        peak_host_rss=peak_host_rss(),
    )


def _generate(pipe, request: GenerationRequest, progress: StepProgress) -> torch.Tensor:
    common = dict(
        negative_prompt=request.negative_prompt if request.negative_prompt is not None else _default_negative(),
        guidance_scale=request.guidance, video_guidance_scale=request.video_guidance, seed=request.seed,
        output_type="pt", step_callback=progress,
    )
    if request.image is not None:
        return pipe.generate_i2v(
            prompt=request.prompt, input_image=request.image, temp=request.temp, num_inference_steps=request.video_steps,
            width=request.width, height=request.height, **common,
        )
    return pipe.generate(
        prompt=request.prompt, height=request.height, width=request.width, temp=request.temp,
        num_inference_steps=request.steps, video_num_inference_steps=request.video_steps, **common,
    )


def _default_negative() -> str:
    from .text import DEFAULT_NEGATIVE_PROMPT

    return DEFAULT_NEGATIVE_PROMPT


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def peak_host_rss() -> int | None:
    """Peak resident memory of this process in bytes (None where `resource` is missing, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def write_png(image, path: Path) -> Path:
    """Write an RGB uint8 [H,W,3] image as PNG via a temporary file; an existing file gets a numbered sibling."""
    from PIL import Image

    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.partial")
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        for index in range(100000):
            candidate = path if index == 0 else path.with_name(f"{path.stem}_{index:05d}{path.suffix}")
            try:
                os.link(tmp, candidate)  # atomic "create if absent": never replaces a file
            except FileExistsError:
                continue
            except OSError:  # no hard links here: check, then rename
                if candidate.exists():
                    continue
                os.rename(tmp, candidate)
            return candidate
        raise FileExistsError(f"{path.name} and its numbered variants all exist; choose another --out")
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# commands


def generate_command(args: argparse.Namespace, log: TextIO) -> RunSummary:
    """`generate`: resolve, load, generate, write."""
    request = resolve_request(args)
    summary = run_generation(request, log)
    for line in summary.lines():
        print(line, file=log)
    return summary


def demo_command(args: argparse.Namespace, log: TextIO) -> RunSummary:
    """`demo`: a tiny random model in a temporary (or --keep) folder, loaded and run like a real one."""
    from .demo import build_tiny_model

    out, fmt = _check_output(args.out, None)
    if out.suffix.lower() == IMAGE_SUFFIX:
        raise UsageError("the demo writes a video; give --out a .mp4, .webm, .webp or .gif name")
    device = _check_device(args.device)
    dtype, dtype_note = compute_dtype_for(device, args.dtype)
    print(DEMO_NOTICE, file=log, flush=True)
    with tempfile.TemporaryDirectory(prefix="pyramid_demo_") as scratch:
        folder = Path(args.keep).expanduser() if args.keep else Path(scratch) / f"tiny_{args.family}"
        started = time.perf_counter()
        build_tiny_model(folder, args.family, seed=args.seed)
        print(f"built a tiny random {args.family} model in {folder} ({time.perf_counter() - started:.1f} s)", file=log)
        request = GenerationRequest(
            model=folder, variant="diffusion_transformer_384p", prompt=DEMO_PROMPT, out=out, width=128, height=128,
            temp=3, steps=[2, 2, 2], video_steps=[2, 2, 2], guidance=DEFAULT_GUIDANCE,
            video_guidance=DEFAULT_VIDEO_GUIDANCE, seed=args.seed, format=fmt, dtype=dtype, dtype_note=dtype_note,
            device=device,
        )
        summary = run_generation(request, log)
    for line in summary.lines():
        print(line, file=log)
    print(DEMO_NOTICE, file=log)
    if args.keep:
        print(f"the tiny model stays in {folder}", file=log)
    return summary


def main(argv: Sequence[str] | None = None, log: TextIO | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 130 cancelled)."""
    from .loading import CheckpointError
    from .sampling import GenerationCancelled

    log = log or sys.stdout
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage message
        return int(exc.code or 0)
    command = generate_command if args.command == "generate" else demo_command
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            command(args, log)
        except (KeyboardInterrupt, GenerationCancelled):
            print("\ncancelled; no file was written", file=sys.stderr)
            return EXIT_CANCELLED
        except torch.cuda.OutOfMemoryError as exc:
            # the memory module's message names the plan and budget to use; a raw CUDA one does not
            hint = str(exc) if "offload" in str(exc) else "try --offload auto (or model), a smaller size or a shorter --temp"
            print(f"error: out of GPU memory; {hint}", file=sys.stderr)
            return 1
        except (UsageError, CheckpointError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                ImportError) as exc:
            if os.environ.get("PYRAMID_CORE_TRACEBACK"):  # for bug reports: the full stack instead of one line
                raise
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)
