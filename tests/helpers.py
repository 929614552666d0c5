"""Code shared by several test modules (test modules never import each other)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.reference import model_dir


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
