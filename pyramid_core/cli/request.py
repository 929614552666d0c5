"""The `generate` settings: one validation pass over the arguments, before anything is loaded.

Every check that can fail runs here, cheapest first (numbers, output file, model files' headers, start
image, device, what the device can hold), so a bad setting ends the run in seconds with one message.
"""
from __future__ import annotations

import argparse
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import settings
from ..settings import DEFAULTS, FPS, IMAGE_FORMAT, VARIANTS, VIDEO_FORMATS
from ..validation import (
    check_device, check_fits, check_fps, check_guidance, check_quality, check_resolution, check_seed, check_steps,
    device_capacity, frames_for_temp, parse_steps, temp_beyond_training, temp_for_duration,
)

if TYPE_CHECKING:
    import torch

    from ..clips import Clip

__all__ = [
    "GenerationRequest", "UsageError", "check_output", "compute_dtype_for", "resolve_request", "writes_image",
]

CPU_DTYPE_NOTE = ("the CPU default: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 convolutions and "
                  "matmuls run many times slower than fp32; pass --dtype bf16 to halve the memory anyway")
CPU_BF16_NOTE = ("the CPU default: this CPU has native bf16 matmul ({feature}), so bf16 as trained, at half the "
                 "memory of fp32; pass --dtype fp32 for full precision")


class UsageError(ValueError):
    """A command-line setting that cannot work; the message says what to pass instead."""


@dataclass
class GenerationRequest:
    """Every setting of one run, resolved and checked (nothing loaded yet)."""

    model: Path  # an official root folder, or a single DiT file / folder (with vae and text_encoders)
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
    dtype: torch.dtype
    device: torch.device
    family: str = "flux"
    vae: Path | None = None  # None: the model folder's
    text_encoders: Path | None = None  # None: the model folder's
    negative_prompt: str | None = None
    image: object | None = None  # PIL image for image-to-video
    fps: float = FPS
    format: str | None = None
    quality: int = DEFAULTS.quality
    dtype_note: str = ""  # why this dtype, when the command line chose it (printed)
    offload: str = "none"
    compile: bool = False
    fp8: str | None = None
    attention: str = "sdpa"
    budget_gb: float | None = None
    resident_blocks: int | None = None
    quiet: bool = False
    verbose: bool = False
    clip: Clip | None = None  # --extend: the clip continued (temp is then the length added)
    history_frames: int | None = None
    save_latents: bool = False
    stream: bool = False  # decode and write each latent frame as soon as it is generated
    heads: int = 1  # the DiT's attention heads (what sequence parallelism splits)

    @property
    def total_temp(self) -> int:
        """Latent frames of the output (the extended clip included)."""
        return self.temp + (self.clip.latent_frames if self.clip is not None else 0)

    @property
    def writes_image(self) -> bool:
        return writes_image(self.out, self.format)

    @property
    def source(self) -> Path | dict[str, Path]:
        """What `load_components` loads: the root folder, or component -> path for single files."""
        if self.vae is None and self.text_encoders is None:
            return self.model
        return {"dit": self.model, "vae": self.vae or self.model, "text_encoder": self.text_encoders or self.model}


def writes_image(out: Path, fmt: str | None) -> bool:
    """Whether `out` gets a still PNG image."""
    return fmt is None and out.suffix.lower() == f".{IMAGE_FORMAT}"


def compute_dtype_for(device: torch.device, requested: str | None = None) -> tuple[torch.dtype, str]:
    """The compute dtype to run on `device`, and a note saying why when it was not requested.

    An explicit `--dtype` wins. Otherwise bf16 on a GPU (as trained); on a CPU, bf16 where it has native
    bf16 matmul (`pyramid_core.devices.cpu_bf16_feature`: AMX-BF16 or AVX512-BF16), else fp32 (without it
    bf16 conv3d is ~100x and bf16 matmul ~8x slower than fp32 on an AVX2 CPU).
    """
    import torch

    from .. import devices

    if requested is not None:
        return getattr(torch, settings.torch_dtype_name(requested)), ""
    if device.type == "cpu":
        feature = devices.cpu_bf16_feature()
        if feature is not None:
            return torch.bfloat16, CPU_BF16_NOTE.format(feature=feature)
        return torch.float32, CPU_DTYPE_NOTE
    return torch.bfloat16, ""


def check_output(path: str, fmt: str | None) -> tuple[Path, str | None]:
    """The output file and format: the suffix and --format agree, the folder exists and takes a file."""
    from ..outputs import check_writable

    out = Path(path).expanduser()
    suffix = out.suffix.lower().lstrip(".")
    if fmt is None and suffix not in (*VIDEO_FORMATS, IMAGE_FORMAT):
        raise UsageError(f"cannot tell the format of --out {out.name!r}; end it in .mp4, .webm, .webp, .gif or .png, or pass --format")
    if fmt is not None and suffix == IMAGE_FORMAT:
        raise UsageError(f"--out {out.name!r} is a .png but --format is {fmt}; drop --format for a still image")
    if fmt is not None and suffix in VIDEO_FORMATS and suffix != fmt:
        raise UsageError(f"--out {out.name!r} ends in .{suffix} but --format is {fmt}; make them agree (e.g. --out {out.stem}.{fmt})")
    check_writable(out)
    return out, fmt


def _check_plan(offload: str, compile_blocks: bool, resident_blocks: int | None, budget_gb: float | None) -> None:
    import math

    if compile_blocks and offload == "sequential":
        raise UsageError(
            "--compile cannot run with --offload sequential (it hooks every layer inside the compiled blocks); "
            "use --offload none, model or block_swap with --compile, or drop --compile"
        )
    if resident_blocks is not None and resident_blocks < 0:
        raise UsageError(f"--resident-blocks must be >= 0, got {resident_blocks}")
    if budget_gb is not None and not (math.isfinite(budget_gb) and budget_gb > 0):
        raise UsageError(f"--budget-gb must be a positive number of GiB, got {budget_gb}")


def _length(args: argparse.Namespace, default_temp: int) -> int:
    if args.duration is not None:
        return temp_for_duration(args.duration, args.fps, "--duration")
    temp = args.temp if args.temp is not None else default_temp
    if temp < 1:
        raise UsageError(f"--temp must be >= 1 (the video has 8*(temp-1)+1 frames), got {temp}")
    return temp


def _model_sources(args: argparse.Namespace, variant: str) -> tuple[Path, Path | None, Path | None, str, int, int]:
    """(DiT path, VAE, text encoders, family, DiT width, attention heads), reading only headers and config files."""
    from ..loading import dit_config, resolve_model_folder
    from ..loading.folders import is_component_dir

    model = Path(args.model).expanduser()
    if not model.exists():
        raise FileNotFoundError(f"model folder not found: {model} (give an official model folder or a DiT file)")
    single = model.is_file() or is_component_dir(model)
    vae = Path(args.vae).expanduser() if args.vae else None
    text = Path(args.text_encoders).expanduser() if args.text_encoders else None
    if single and (vae is None or text is None):
        missing = " and ".join(flag for flag, value in (("--vae FILE", vae), ("--text-encoders FOLDER", text)) if value is None)
        raise UsageError(f"--model {model.name} is a single DiT, not a model folder: add {missing} "
                         "(the text encoders come from an official model folder)")
    for flag, path in (("--vae", vae), ("--text-encoders", text)):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{flag} not found: {path}")
    if text is not None:
        resolve_model_folder(text)  # fails now when it holds no text encoders
    family, config = dit_config(model, None if single else variant)
    heads = int(config["num_attention_heads"])
    return model, vae, text, family, heads * int(config["attention_head_dim"]), heads


def resolve_request(args: argparse.Namespace) -> GenerationRequest:
    """Check the `generate` arguments and fill in the variant's defaults; raises UsageError / ValueError /
    FileNotFoundError / WriteError with one message naming the fix. Nothing is loaded."""
    _check_plan(args.offload, args.compile, args.resident_blocks, args.budget_gb)
    check_quality(args.quality)
    fps = check_fps(args.fps, "--fps")
    guidance = check_guidance(args.guidance, "--guidance")
    if args.video_guidance is not None:
        check_guidance(args.video_guidance, "--video-guidance")
    seed = check_seed(args.seed, "--seed") if args.seed is not None else secrets.randbelow(2**32)
    video_steps = parse_steps(args.video_steps, "--video-steps")
    steps = parse_steps(args.steps, "--steps") if args.steps is not None else check_steps(list(DEFAULTS.steps))
    variant = settings.variant_name(args.variant)
    defaults = VARIANTS.get(variant, VARIANTS[settings.DEFAULT_VARIANT])
    if args.history_frames is not None and args.history_frames < 1:
        raise UsageError(f"--history-frames must be >= 1, got {args.history_frames}")
    clip = _extended_clip(args)
    width = args.width if args.width is not None else (clip.width if clip else defaults.width)
    height = args.height if args.height is not None else (clip.height if clip else defaults.height)
    check_resolution(width, height)
    if clip is not None and (width, height) != (clip.width, clip.height):
        raise UsageError(f"--extend {clip.path.name} is {clip.width}x{clip.height}; drop --width/--height (the clip sets the size)")
    temp = _length(args, defaults.default_temp)
    total = temp + (clip.latent_frames if clip else 0)
    _check_schedules(args.prompt, args.negative_prompt, total)
    if args.image is not None:
        if variant in VARIANTS and not VARIANTS[variant].makes_video:
            raise UsageError("the image variant makes still images; use --variant 384p or 768p for image-to-video")
        if temp < 2:
            raise UsageError(f"image-to-video needs --temp >= 2 (the start image is frame 0), got {temp}")
    out, fmt = check_output(args.out, args.format)
    if args.stream and (writes_image(out, fmt) or args.offload == "model"):
        raise UsageError("--stream writes a video while generating: give a .mp4/.webm/.webp/.gif --out and an "
                         "--offload other than model (the DiT and the VAE must be on the device together)")
    if writes_image(out, fmt) and total != 1:
        raise UsageError(
            f"{out.name} is a still image but temp {temp} makes a {frames_for_temp(temp)}-frame video; "
            "use --temp 1 (or --variant image) or a .mp4/.webm/.webp/.gif name"
        )
    model, vae, text, family, dit_width, heads = _model_sources(args, variant)
    if clip is not None and clip.metadata.get("family", family) != family:
        made = settings.FAMILIES[clip.metadata["family"]].title
        raise UsageError(f"--extend {clip.path.name} was made by a {made} model but --model is "
                         f"{settings.FAMILIES[family].title}; extend it with a {made} model")
    image = _open_start_image(args.image) if args.image is not None else None
    if image is not None and args.steps is not None:
        warnings.warn("--steps is not used in image-to-video: every frame uses --video-steps", stacklevel=2)
    device = check_device(args.device, "--device")
    dtype, dtype_note = compute_dtype_for(device, args.dtype)
    video_guidance = args.video_guidance
    if video_guidance is None:
        video_guidance = DEFAULTS.i2v_video_guidance if image is not None else DEFAULTS.video_guidance
    check_fits(width, height, total, hidden=dit_width, capacity=device_capacity(device), cfg=guidance > 0,
               act_bytes=dtype.itemsize, where=f"the {device.type.upper() if device.type == 'cpu' else 'GPU'}")
    beyond = temp_beyond_training(total, variant)
    if beyond is not None:
        warnings.warn(beyond, stacklevel=2)
    return GenerationRequest(
        model=model, variant=variant, prompt=args.prompt, out=out, width=width, height=height, temp=temp,
        steps=steps, video_steps=video_steps, guidance=guidance, video_guidance=video_guidance, seed=seed,
        dtype=dtype, device=device, family=family, vae=vae, text_encoders=text, negative_prompt=args.negative_prompt,
        image=image, fps=fps, format=fmt, quality=args.quality, dtype_note=dtype_note, offload=args.offload,
        compile=args.compile, fp8=args.fp8, attention=args.attention, budget_gb=args.budget_gb,
        resident_blocks=args.resident_blocks, quiet=args.quiet, verbose=args.verbose, clip=clip,
        history_frames=args.history_frames, save_latents=args.save_latents, stream=args.stream, heads=heads,
    )


def _extended_clip(args: argparse.Namespace) -> Clip | None:
    if args.extend is None:
        return None
    if args.image is not None:
        raise UsageError("--extend continues a clip and --image starts one from a picture; use one of them")
    from ..clips import read_clip

    return read_clip(args.extend)


def _check_schedules(prompt: str, negative: str | None, num_units: int) -> None:
    from ..schedules import PromptSchedule

    for text in (prompt, negative):
        if text is not None:
            PromptSchedule.parse(text).check_length(num_units)


def _open_start_image(path: str):
    from ..images import open_image

    try:
        return open_image(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--image file not found: {Path(path).expanduser()}") from None
