"""pyramid_core: self-contained Pyramid Flow inference (no ComfyUI imports)."""
