"""Double of ComfyUI's `latent_preview` module (the preview size constant)."""
MAX_PREVIEW_RESOLUTION = 512
