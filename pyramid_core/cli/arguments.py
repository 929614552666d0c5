"""The command-line parser. It reads only `pyramid_core.settings`: `--help`, `--version` and argument errors
answer without importing torch."""
from __future__ import annotations

import argparse

from .. import settings
from ..settings import DEFAULTS, FPS, PLAN_HELP, PLANS, VARIANTS

__all__ = ["PROGRAM", "build_parser", "package_version"]

PROGRAM = "python -m pyramid_core"
DTYPE_HELP = ("compute precision (default: bf16 on a GPU, as trained; on a CPU bf16 only where it has native bf16 "
              "(AVX512-BF16 / AMX), else fp32: emulated bf16 convolutions and matmuls run many times slower); fp16 "
              "for GPUs without bf16: residual streams stay fp32")


def package_version() -> str:
    """The installed version of this package (or 'unknown' when run from a plain checkout)."""
    from importlib import metadata

    for name in ("comfyui-pyramidflow", "ComfyUI-PyramidFlow", "pyramid_core"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def _steps_text(steps: tuple[int, ...]) -> str:
    return ",".join(map(str, steps))


def build_parser() -> argparse.ArgumentParser:
    """The `python -m pyramid_core` parser: generate, demo, decode and models."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Pyramid Flow text/image-to-video from an official checkpoint folder or files.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,demo,decode,models}")
    _add_generate(commands)
    _add_demo(commands)
    _add_decode(commands)
    models = commands.add_parser(
        "models", help="list what a model folder or checkpoint file holds",
        description="List the family, DiT variants, VAE and text encoders of a folder, or what one file holds "
        "(family, dtypes, size). Reads only file headers.",
    )
    models.add_argument("path", help="an official model folder, a component folder or a checkpoint file")
    return parser


def _add_generate(commands) -> None:
    variants = ", ".join(f"{v.alias} ({v.width}x{v.height})" for v in VARIANTS.values())
    gen = commands.add_parser(
        "generate",
        help="generate a video (or image) from a Pyramid Flow model folder or files",
        description="Generate a video (or a still image) with a Pyramid Flow checkpoint folder "
        f"({', '.join(f.repo for f in settings.FAMILIES.values())} layout) or single files.",
        epilog=f"example: {PROGRAM} generate --model ./pyramid-flow-miniflux "
        "--prompt 'a cat walking on the beach at sunset' --out cat.mp4",
    )
    gen.add_argument("--model", required=True,
                     help="model root folder (holds diffusion_transformer_*/, causal_video_vae/, ...), or a single "
                     "DiT file (e.g. Kijai's bf16/fp8 .safetensors) with --vae and --text-encoders")
    gen.add_argument("--vae", default=None, help="VAE file or folder (default: the one in the --model folder)")
    gen.add_argument("--text-encoders", default=None, metavar="FOLDER",
                     help="folder with the text encoders and tokenizers (an official model folder; default: --model)")
    gen.add_argument("--prompt", required=True,
                     help="what to generate; a schedule changes it over time: '0: a cat sleeps | 8: the cat wakes up' "
                     "(latent frame: text)")
    gen.add_argument("--negative-prompt", default=None, help="what to avoid (default: the official negative prompt)")
    gen.add_argument("--image", default=None, help="start image: image-to-video (scaled to cover, centre-cropped)")
    gen.add_argument("--extend", default=None, metavar="CLIP",
                     help="continue this clip: a video file, or a .safetensors latents file (--save-latents, or kept by a "
                     "failed write); --temp/--duration is then the length added, and the output holds the whole clip")
    gen.add_argument("--history-frames", type=int, default=None, metavar="N",
                     help="keep only the newest N latent frames as history (long videos: cost per frame stops growing; "
                     "default: all, as official)")
    gen.add_argument("--variant", default=VARIANTS[settings.DEFAULT_VARIANT].alias,
                     help=f"DiT variant: {variants}; default {VARIANTS[settings.DEFAULT_VARIANT].alias}")
    gen.add_argument("--width", type=int, default=None, help="pixels, a multiple of 64 (default: the variant's)")
    gen.add_argument("--height", type=int, default=None, help="pixels, a multiple of 64 (default: the variant's)")
    length = gen.add_mutually_exclusive_group()
    length.add_argument("--temp", type=int, default=None,
                        help="latent frames; the video has 8*(temp-1)+1 frames (default 16; image: 1)")
    length.add_argument("--duration", type=float, default=None,
                        help="seconds of video (picks the smallest temp that lasts that long)")
    gen.add_argument("--steps", default=None, help=f"first-frame steps per pyramid stage (default {_steps_text(DEFAULTS.steps)})")
    gen.add_argument("--video-steps", default=_steps_text(DEFAULTS.video_steps),
                     help=f"steps per stage for later frames (default {_steps_text(DEFAULTS.video_steps)}; all frames in image-to-video)")
    gen.add_argument("--guidance", type=float, default=DEFAULTS.guidance,
                     help=f"first-frame guidance (default {DEFAULTS.guidance:g}; 0 turns guidance off)")
    gen.add_argument("--video-guidance", type=float, default=None,
                     help=f"guidance of later frames (default {DEFAULTS.video_guidance:g}; image-to-video {DEFAULTS.i2v_video_guidance:g})")
    gen.add_argument("--seed", type=int, default=None, help="random seed, 0..2**64-1 (default: a random one, printed)")
    _add_output_arguments(gen)
    gen.add_argument("--dtype", choices=settings.COMPUTE_DTYPES, default=None, help=DTYPE_HELP)
    gen.add_argument("--fp8", choices=settings.FP8_GRANULARITIES, default=None,
                     help="store the DiT's Linear weights in float8 with per-row or per-tensor scales (half the memory)")
    gen.add_argument("--attention", choices=settings.ATTENTION_CHOICES, default=settings.ATTENTION_CHOICES[0],
                     help="kernel of the fused frame-causal attention (sage/flash need their pip package), or flex: "
                          "one compiled FlexAttention call per block (CUDA, torch >= 2.5)")
    gen.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    gen.add_argument("--offload", choices=PLANS, default="none", metavar="PLAN",
                     help="memory plan: " + "; ".join(f"{name}: {text}" for name, text in PLAN_HELP.items())
                     + " (default none)")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile each DiT block (slow first steps while it compiles; not with --offload sequential)")
    gen.add_argument("--budget-gb", type=float, default=None, help="GPU memory budget for --offload auto/block_swap (GiB; default: free memory)")
    gen.add_argument("--resident-blocks", type=int, default=None, help="--offload block_swap: DiT blocks kept on the GPU")
    gen.add_argument("--out", required=True, help="output file: .mp4, .webm, .webp, .gif, or .png for a still image (never overwritten)")
    gen.add_argument("--stream", action="store_true",
                     help="decode and append each latent frame as soon as it is generated (watch the start while the rest "
                     "generates; the same frames as decoding at the end)")
    gen.add_argument("--save-latents", action="store_true",
                     help="also write the latent clip beside the video (NAME.safetensors) to --extend it later")
    _add_parallel(gen)
    _add_verbosity(gen)


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="pipeline check with a tiny random model (no weights, no network); the output is noise",
        description="Build a tiny random Pyramid Flow model, load it like a real one and write a short video. "
        "It checks the installation; the video is noise.",
    )
    demo.add_argument("--out", default="demo.mp4", help="output file (default demo.mp4; never overwritten)")
    demo.add_argument("--family", choices=tuple(settings.FAMILIES), default="flux", help="miniFLUX (default) or SD3-style MMDiT")
    demo.add_argument("--keep", default=None, metavar="DIR", help="write the tiny model into DIR (new or empty) and keep it")
    demo.add_argument("--seed", type=int, default=0, help="seed of the weights and of the generation (default 0)")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    demo.add_argument("--dtype", choices=settings.COMPUTE_DTYPES, default=None, help=DTYPE_HELP)
    _add_parallel(demo)
    _add_verbosity(demo)


def _add_decode(commands) -> None:
    decode = commands.add_parser(
        "decode", help="write the video of a kept latents file (after a failed write)",
        description="Decode a latents file that a generation kept (when writing its video failed) and write the video.",
    )
    decode.add_argument("latents", help="the .latents.safetensors file")
    decode.add_argument("--model", default=None, help="model folder or VAE file (default: the one the latents name)")
    decode.add_argument("--out", required=True, help="output file: .mp4, .webm, .webp, .gif, or .png for one frame")
    _add_output_arguments(decode, fps_default=None)
    decode.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    decode.add_argument("--dtype", choices=settings.COMPUTE_DTYPES, default=None, help=DTYPE_HELP)
    _add_verbosity(decode)


def _add_output_arguments(parser: argparse.ArgumentParser, fps_default: float | None = FPS) -> None:
    shown = f"default {fps_default}, as trained" if fps_default is not None else "default: the generation's"
    parser.add_argument("--fps", type=float, default=fps_default, help=f"frames per second of the file ({shown})")
    parser.add_argument("--format", choices=settings.VIDEO_FORMATS, default=None, help="video format (default: from the --out suffix)")
    parser.add_argument("--quality", type=int, default=DEFAULTS.quality,
                        help=f"0-100, higher = better and larger (default {DEFAULTS.quality})")


def _add_parallel(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "several processes", "start N processes with torchrun --nproc-per-node N -m pyramid_core ... (one per GPU; "
        "--device cpu uses gloo). N = CFG-parallel degree x sequence-parallel degree; rank 0 writes the file")
    group.add_argument("--cfg-parallel", choices=settings.CFG_PARALLEL_CHOICES, default="auto",
                       help="2: the ranks pair up and each runs one guidance branch (default when guidance is on and N "
                       "is even); 1: no pairs")
    group.add_argument("--sp-degree", type=int, default=None, metavar="K",
                       help="sequence-parallel ranks: each runs 1/K of every DiT step's tokens; K must divide the "
                       "attention heads (miniFLUX 30, SD3 24; default: the processes left after --cfg-parallel)")
    group.add_argument("--dist-timeout", type=float, default=settings.DIST_TIMEOUT_S, metavar="SECONDS",
                       help=f"how long a rank waits for the others before failing (default {settings.DIST_TIMEOUT_S:g})")


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status lines (errors still print)")
    loudness.add_argument("--verbose", "-v", action="store_true", help="also print the memory plan chosen and its estimated peak")
