"""Test double of ComfyUI's `comfy` package (only what the Pyramid Flow nodes touch, real signatures)."""
