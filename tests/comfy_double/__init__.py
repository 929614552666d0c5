"""A test double of ComfyUI's modules (`comfy.*`, `folder_paths`, `latent_preview`, `comfy_api.latest`,
stock nodes): real signatures, CPU only, recording model loads/unloads, progress and interrupt checks.

`install(base_dir)` puts it on `sys.path` and rebinds the pack's gateway (`nodes.comfy`);
`uninstall()` undoes both, so other tests see the standalone fallbacks again.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_MODULES = ("comfy", "folder_paths", "latent_preview", "comfy_api", "stock_nodes")


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _MODULES:
            del sys.modules[name]


def install(base_dir: str | Path):
    """Activate the double rooted at `base_dir` (models/, output/, input/ are created there)."""
    _purge()
    sys.path.insert(0, str(HERE))
    import folder_paths

    folder_paths.set_base(str(base_dir))
    from nodes import comfy as gateway

    assert gateway.bind(), "the ComfyUI double did not import"
    import comfy.model_management

    comfy.model_management.reset()
    return folder_paths


def uninstall() -> None:
    while str(HERE) in sys.path:
        sys.path.remove(str(HERE))
    _purge()
    from nodes import comfy as gateway

    gateway.bind()
