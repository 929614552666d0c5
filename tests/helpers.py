"""Code shared by several test modules (test modules never import each other)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from pyramid_core.models.flux import PyramidFluxTransformer
from pyramid_core.models.mmdit import PyramidMMDiT
from tests.reference import model_dir

TINY_DIT_CLASSES = {"miniflux_tiny": PyramidFluxTransformer, "sd3_tiny": PyramidMMDiT}


def build_tiny(model: str):
    """A tiny fixture DiT built from its config and loaded with load_state_dict (not through our loader)."""
    folder = model_dir(model) / "diffusion_transformer_384p"
    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
    dit = TINY_DIT_CLASSES[model](**config)
    dit.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")), strict=True)
    return dit.eval()


def make_base(root: Path) -> Path:
    """A ComfyUI base folder: the read-only fixtures linked in, plus a 768p alias of the 384p DiT."""
    for name, source in (("pyramid-flow-miniflux", model_dir("miniflux_tiny")), ("pyramid-flow-sd3", model_dir("sd3_tiny"))):
        folder = root / "models" / "pyramidflow" / name
        folder.mkdir(parents=True)
        for sub in source.iterdir():
            (folder / sub.name).symlink_to(sub)
        (folder / "diffusion_transformer_768p").symlink_to(source / "diffusion_transformer_384p")
    (root / "input").mkdir(parents=True, exist_ok=True)
    gradient = np.linspace(0, 255, 96 * 80 * 3).reshape(80, 96, 3).astype(np.uint8)  # 96x80: exercises cover-crop
    Image.fromarray(gradient).save(root / "input" / "example.png")
    return root


def run_cli(argv: list) -> tuple[int, str]:
    """`python -m pyramid_core ARGV` in-process: (exit status, what it printed to its log)."""
    import io

    from pyramid_core import cli

    log = io.StringIO()
    return cli.main([str(a) for a in argv], log=log), log.getvalue()


def record_written_frames(monkeypatch) -> list:
    """Keep (a clone of) the frames every `video.write_video` call receives, then write them as usual."""
    from pyramid_core import video

    written: list = []
    original = video.write_video

    def write(frames, *args, **kwargs):
        written.append(frames.clone())
        return original(frames, *args, **kwargs)

    monkeypatch.setattr(video, "write_video", write)
    return written
