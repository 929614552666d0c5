"""Text encode node: the folder's own text encoder, or a ComfyUI CLIP (DualCLIPLoader / TripleCLIPLoader)."""
from __future__ import annotations

from typing import Any

from pyramid_core.text import DEFAULT_NEGATIVE_PROMPT, guidance_prompts

from . import comfy as host
from .clip_text import encode_pairs_with_clip
from .managed import ComfyMemory, PyramidFlowConditioning, PyramidFlowTextEncoder

CATEGORY = "PyramidFlow"


class PyramidFlowCoreTextEncode:
    DESCRIPTION = (
        "Encodes a prompt and a negative prompt for Pyramid Flow, with the model folder's text encoder or a CLIP "
        "from DualCLIPLoader (clip_l + t5xxl, type flux: miniFLUX) / TripleCLIPLoader (SD3). T5 is cut to 128 tokens. "
        "A prompt schedule ('0: a cat sleeps | 8: the cat wakes up') changes the prompt at those latent frames."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("PYRAMIDFLOW_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "what the video shows (T5 reads 128 tokens); to change it over time write a schedule of "
                    "'latent frame: text' entries, '0: a cat sleeps | 8: the cat wakes up' (latent frame n >= 1 starts at video frame 8n-7, about second n/3)")}),
                "negative_prompt": ("STRING", {"multiline": True, "default": DEFAULT_NEGATIVE_PROMPT,
                                    "tooltip": "what to avoid; may be a schedule too ('0: ... | 8: ...')"}),
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

    def encode(self, prompt: str, negative_prompt: str, quality_suffix: bool = True, keep_loaded: bool = False,
               text_encoder: PyramidFlowTextEncoder | None = None, clip: Any = None) -> tuple[PyramidFlowConditioning]:
        """One CFG batch for plain prompts; for prompt schedules one per distinct (prompt, negative) pair."""
        if (text_encoder is None) == (clip is None):
            raise ValueError(
                "connect exactly one of text_encoder (from the Pyramid Flow model loader) or clip "
                "(DualCLIPLoader clip_l + t5xxl, type flux)"
            )
        schedules = PyramidFlowConditioning.schedules(prompt, negative_prompt)  # a malformed schedule fails here
        pairs = [(prompt, negative_prompt)] if schedules is None else PyramidFlowConditioning.pairs(*schedules)
        host.check_interrupt()
        if clip is not None:
            exact = [guidance_prompts(p, n, add_suffix=bool(quality_suffix)) for p, n in pairs]
            batches, family = encode_pairs_with_clip(clip, [(positive[0], negative[0]) for positive, negative in exact])
            if not keep_loaded:
                host.unload_model(clip.patcher)
        else:
            managed = text_encoder.managed()
            memory = ComfyMemory({"text_encoder": managed}, "none")
            with memory.use("text_encoder") as encoder:
                batches = [encoder.encode_for_guidance(p, n, add_suffix=bool(quality_suffix)).to("cpu")
                           for p, n in pairs]
            if not keep_loaded:
                host.unload_model(managed.patcher)
            family = text_encoder.family
        if schedules is None:
            return (PyramidFlowConditioning(batches[0], family),)
        return (PyramidFlowConditioning.from_schedules(*schedules, family, dict(zip(pairs, batches))),)
