"""pyramid_core: self-contained Pyramid Flow inference (no ComfyUI imports)."""
from __future__ import annotations

__all__ = ["PyramidFlowPipeline"]


def __getattr__(name: str):
    # lazy: importing the package (e.g. for `python -m pyramid_core --help`) stays cheap
    if name == "PyramidFlowPipeline":
        from .pipeline import PyramidFlowPipeline

        return PyramidFlowPipeline
    raise AttributeError(name)
