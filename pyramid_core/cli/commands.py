"""The commands: `generate`, `demo`, `decode` (a kept latents file to a video) and `models` (what a folder or
file holds)."""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..settings import DEFAULTS, FAMILIES
from ..validation import check_device, check_fps, check_quality
from .launch import parallel_session
from .request import GenerationRequest, UsageError, check_output, compute_dtype_for, resolve_request, writes_image
from .run import Reporter, RunSummary, decode_and_write, run_generation

__all__ = ["DEMO_NOTICE", "DEMO_PROMPT", "decode_command", "demo_command", "generate_command", "models_command"]

DEMO_PROMPT = "a cat walking on the beach at sunset"
DEMO_NOTICE = "PIPELINE CHECK ON RANDOM WEIGHTS: this model is tiny and untrained; its output is noise, not a video of anything."


def generate_command(args: argparse.Namespace, log: TextIO) -> RunSummary | None:
    """`generate`: resolve (every check), load, generate, write (under torchrun: rank 0 writes and reports)."""
    request = resolve_request(args)
    with parallel_session(args, request, request.heads) as (request, parallel):
        summary = run_generation(request, log, parallel)
    if summary is not None:
        for line in summary.lines():
            print(line, file=log)
    return summary


def demo_command(args: argparse.Namespace, log: TextIO) -> RunSummary | None:
    """`demo`: a tiny random model in a temporary (or --keep) folder, loaded and run like a real one (under
    torchrun every rank builds its own copy; rank 0 writes and reports)."""
    from ..demo import DEMO_VARIANT, build_tiny_model
    from ..loading import dit_config

    out, fmt = check_output(args.out, None)
    if writes_image(out, fmt):
        raise UsageError("the demo writes a video; give --out a .mp4, .webm, .webp or .gif name")
    device = check_device(args.device, "--device")
    dtype, dtype_note = compute_dtype_for(device, args.dtype)
    first = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks (and keeps the model)
    if first:
        print(DEMO_NOTICE, file=log, flush=True)
    with tempfile.TemporaryDirectory(prefix="pyramid_demo_") as scratch:
        keep = args.keep and first
        folder = Path(args.keep).expanduser() if keep else Path(scratch) / f"tiny_{args.family}"
        started = time.perf_counter()
        build_tiny_model(folder, args.family, seed=args.seed)
        Reporter(log, args.quiet or not first).say(f"built a tiny random {args.family} model in {folder} "
                                                   f"({time.perf_counter() - started:.1f} s)")
        request = GenerationRequest(
            model=folder, variant=DEMO_VARIANT, prompt=DEMO_PROMPT, out=out, width=128, height=128,
            temp=3, steps=[2, 2, 2], video_steps=[2, 2, 2], guidance=DEFAULTS.guidance,
            video_guidance=DEFAULTS.video_guidance, seed=args.seed, format=fmt, dtype=dtype, dtype_note=dtype_note,
            device=device, family=args.family, quiet=args.quiet, verbose=args.verbose,
        )
        heads = int(dit_config(folder, DEMO_VARIANT)[1]["num_attention_heads"])
        with parallel_session(args, request, heads) as (request, parallel):
            summary = run_generation(request, log, parallel)
    if summary is None:
        return None
    for line in summary.lines():
        print(line, file=log)
    print(DEMO_NOTICE, file=log)
    if keep:
        print(f"the tiny model stays in {folder}", file=log)
    return summary


@dataclass
class _Output:
    """Where and how `decode` writes (what `decode_and_write` reads)."""

    out: Path
    format: str | None
    fps: float
    quality: int
    quiet: bool


def decode_command(args: argparse.Namespace, log: TextIO) -> Path:
    """`decode`: a kept latents file -> the video (or one-frame image), with the VAE of --model or the one the
    file names."""
    import torch

    from ..codec import LatentCodec
    from ..latents_file import load_latents
    from ..loading import load_components
    from ..memory import MemoryManager

    latents, meta = load_latents(Path(args.latents).expanduser())
    model = args.model or meta.get("model")
    if not model:
        raise UsageError(f"{args.latents} does not name its model; pass --model (the model folder or VAE file)")
    family = meta.get("family")
    if family not in FAMILIES:
        raise UsageError(f"{args.latents} does not say which DiT family made it (got {family!r}); it is not a kept generation")
    out, fmt = check_output(args.out, args.format)
    frames = 8 * (latents.shape[2] - 1) + 1
    if writes_image(out, fmt) and frames != 1:
        raise UsageError(f"{out.name} is a still image but the latents hold {frames} frames; use a .mp4/.webm/.webp/.gif name")
    fps = check_fps(args.fps if args.fps is not None else float(meta.get("fps", DEFAULTS.fps)), "--fps")
    output = _Output(out, fmt, fps, check_quality(args.quality), args.quiet)
    device = check_device(args.device, "--device")
    dtype, _ = compute_dtype_for(device, args.dtype)
    report = Reporter(log, args.quiet, args.verbose)
    report.say(f"decoding {args.latents} with the VAE of {model}")
    vae = load_components(model, dtype=dtype, components=("vae",)).vae.model
    memory = MemoryManager(plan="none", device=device)
    memory.register("vae", vae)
    codec = LatentCodec(memory, family)
    path, count = decode_and_write(codec.decode, latents.to(torch.float32), output)
    print(f"wrote {path}  ({count} frames, {fps:g} fps)", file=log)
    return path


def models_command(args: argparse.Namespace, log: TextIO) -> None:
    """`models`: the family, variants, VAE and text encoders of a folder, or what one file holds."""
    from ..loading import open_checkpoint, resolve_model_folder
    from ..loading.folders import is_component_dir

    path = Path(args.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"not found: {path}")
    if path.is_file() or is_component_dir(path):
        print(_describe_checkpoint(path, open_checkpoint), file=log)
        return
    folder = resolve_model_folder(path)
    print(f"{folder.root}: {FAMILIES[folder.family].title} ({folder.family}), official layout", file=log)
    for name, variant_path in folder.dit_variants.items():
        print(f"  DiT {name}: {_describe_checkpoint(variant_path, open_checkpoint, short=True)}", file=log)
    print(f"  VAE: {_describe_checkpoint(folder.vae, open_checkpoint, short=True) if folder.vae else 'missing'}", file=log)
    for name, encoder in folder.text_encoders.items():
        print(f"  {name}: {_describe_checkpoint(encoder, open_checkpoint, short=True)}", file=log)


def _describe_checkpoint(path: Path, open_checkpoint, short: bool = False) -> str:
    from ..loading import detect_family
    from ..loading.configs import family_spec

    with open_checkpoint(path) as reader:
        count = sum(1 for _ in reader.keys())
        nbytes = sum(_numel(reader.shape(k)) * reader.dtype(k).itemsize for k in reader.keys())
        dtypes = ", ".join(sorted(str(d).removeprefix("torch.") for d in reader.dtypes()))
        try:
            kind = family_spec(detect_family(reader)).title
        except ValueError:
            kind = "not a Pyramid Flow DiT or VAE"
    sizes = f"{nbytes / 2**30:.2f} GiB, {count} tensors, {dtypes}"
    return sizes if short else f"{path}: {kind}; {sizes}"


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for side in shape:
        total *= side
    return total

