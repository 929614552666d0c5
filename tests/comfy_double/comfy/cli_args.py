"""Double of `comfy.cli_args` (the two settings the nodes read)."""
import enum
import types


class LatentPreviewMethod(enum.Enum):
    NoPreviews = "none"
    Auto = "auto"
    Latent2RGB = "latent2rgb"
    TAESD = "taesd"


args = types.SimpleNamespace(preview_method=LatentPreviewMethod.Auto, disable_metadata=False)
