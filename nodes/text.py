"""Text encode node: the folder's own text encoder, or a ComfyUI CLIP (DualCLIPLoader / TripleCLIPLoader)."""
from __future__ import annotations

from pyramid_core.text import DEFAULT_NEGATIVE_PROMPT, guidance_prompts

from . import comfy as host
from .clip_text import encode_with_clip
from .managed import ComfyMemory, PyramidFlowConditioning

CATEGORY = "PyramidFlow"


class PyramidFlowCoreTextEncode:
    DESCRIPTION = (
        "Encodes a prompt and a negative prompt for Pyramid Flow, with the model folder's text encoder or a CLIP "
        "from DualCLIPLoader (clip_l + t5xxl, type flux: miniFLUX) / TripleCLIPLoader (SD3). T5 is cut to 128 tokens."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("PYRAMIDFLOW_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "what the video shows (T5 reads 128 tokens)"}),
                "negative_prompt": ("STRING", {"multiline": True, "default": DEFAULT_NEGATIVE_PROMPT}),
                "quality_suffix": ("BOOLEAN", {"default": True,
                                   "tooltip": "append ', hyper quality, Ultra HD, 8K' to the prompt, as the official pipeline does"}),
                "keep_loaded": ("BOOLEAN", {"default": False,
                                "tooltip": "keep the text encoder in GPU memory after encoding (faster re-encoding, less room for the DiT)"}),
            },
            "optional": {
                "text_encoder": ("PYRAMIDFLOW_TEXT_ENCODER", {"tooltip": "from the model loader (official folder)"}),
                "clip": ("CLIP", {"tooltip": "instead: DualCLIPLoader clip_l + t5xxl type flux, or TripleCLIPLoader for SD3"}),
            },
        }

    def encode(self, prompt, negative_prompt, quality_suffix=True, keep_loaded=False, text_encoder=None, clip=None):
        if (text_encoder is None) == (clip is None):
            raise ValueError(
                "connect exactly one of text_encoder (from the Pyramid Flow model loader) or clip "
                "(DualCLIPLoader clip_l + t5xxl, type flux)"
            )
        positives, negatives = guidance_prompts(prompt, negative_prompt, add_suffix=bool(quality_suffix))
        host.check_interrupt()
        if clip is not None:
            embeddings, family = encode_with_clip(clip, positives[0], negatives[0])
            if not keep_loaded:
                host.unload_model(clip.patcher)
            return (PyramidFlowConditioning(embeddings, family),)
        managed = text_encoder.managed()
        memory = ComfyMemory({"text_encoder": managed}, "none")
        with memory.use("text_encoder") as encoder:
            embeddings = encoder.encode_for_guidance(prompt, negative_prompt, add_suffix=bool(quality_suffix))
        if not keep_loaded:
            host.unload_model(managed.patcher)
        return (PyramidFlowConditioning(embeddings.to("cpu"), text_encoder.family),)
