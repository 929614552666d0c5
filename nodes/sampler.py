"""Sampler node: text-to-video, image-to-video and text-to-image through `PyramidFlowPipeline`."""
from __future__ import annotations

import torch

from pyramid_core.pipeline import PyramidFlowPipeline
from pyramid_core.settings import DEFAULT_VARIANT, DEFAULTS, FAMILIES, FPS, SIZE_MULTIPLE, VARIANTS
from pyramid_core.validation import (
    check_guidance, check_resolution, check_seed, check_temp, parse_steps, temp_for_duration,
)

from . import comfy as host
from .managed import FAMILY_KEY, ComfyMemory, PyramidFlowConditioning, PyramidFlowModel, PyramidFlowVAE, inference_bytes
from .preview import latent_preview

CATEGORY = "PyramidFlow"
SEED_MAX = DEFAULTS.seed_limit - 1
MAX_TEMP = max(v.trained_temp for v in VARIANTS.values())
MAX_SIDE = 2048  # widget limit; larger sizes are refused by the memory estimate anyway


def pick_temp(variant: str, temp: int, seconds: float) -> int:
    """Latent frames from the widgets (seconds > 0 wins). Beyond what the variant was trained for it warns
    and runs, as everywhere in pyramid_core (`validation.temp_beyond_training`)."""
    temp = temp_for_duration(seconds, FPS) if seconds > 0 else int(temp)
    check_temp(temp, variant)
    return temp


def _steps_text(steps: tuple[int, ...]) -> str:
    return ", ".join(map(str, steps))  # as the widget shows them: "20, 20, 20"


def _sizes(side: str) -> str:
    return ", ".join(f"{v.alias}: {getattr(v, side)}" for v in VARIANTS.values())


def _start_latent(latent: dict, family: str, width: int, height: int) -> torch.Tensor:
    samples = latent["samples"]
    if samples.ndim != 5 or samples.shape[1] != 16:
        raise ValueError(f"start_latent must be a Pyramid Flow latent [B,16,T,h,w]; got shape {tuple(samples.shape)}")
    if latent.get(FAMILY_KEY, family) != family:
        raise ValueError(f"start_latent was encoded for {FAMILIES[latent[FAMILY_KEY]].title}, the model is {FAMILIES[family].title}")
    h, w = samples.shape[-2] * 8, samples.shape[-1] * 8
    if (w, h) != (width, height):
        raise ValueError(f"start_latent is {w}x{h}; set width and height to {w} and {h}, or connect start_image instead")
    return samples[:1, :, :1]


class PyramidFlowCoreSampler:
    DESCRIPTION = (
        "Generates Pyramid Flow latents: text-to-video, or image-to-video with a start image (and the VAE). "
        "temp latent frames = 8*(temp-1)+1 video frames at 24 fps. Outputs LATENT {'samples': [B,16,T,h,w]}."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("PYRAMIDFLOW_MODEL",),
                "conditioning": ("PYRAMIDFLOW_CONDITIONING",),
                "width": ("INT", {"default": VARIANTS[DEFAULT_VARIANT].width, "min": SIZE_MULTIPLE, "max": MAX_SIDE,
                          "step": SIZE_MULTIPLE, "tooltip": f"multiple of 64; {_sizes('width')}"}),
                "height": ("INT", {"default": VARIANTS[DEFAULT_VARIANT].height, "min": SIZE_MULTIPLE, "max": MAX_SIDE,
                           "step": SIZE_MULTIPLE, "tooltip": f"multiple of 64; {_sizes('height')}"}),
                "temp": ("INT", {"default": VARIANTS[DEFAULT_VARIANT].default_temp, "min": 1, "max": MAX_TEMP,
                         "tooltip": "latent frames (video frames = 8*(temp-1)+1): " + ", ".join(
                             f"{v.alias} trained up to {v.trained_temp}" for v in VARIANTS.values() if v.makes_video)
                         + " (longer runs, with a warning)"}),
                "seconds": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.5,
                            "tooltip": f"if > 0: the length in seconds at {FPS} fps, replacing temp"}),
                "first_frame_steps": ("STRING", {"default": _steps_text(DEFAULTS.steps),
                                      "tooltip": "steps per pyramid stage for the first frame"}),
                "video_steps": ("STRING", {"default": _steps_text(DEFAULTS.video_steps),
                                "tooltip": "steps per pyramid stage for later frames (image-to-video uses these for every frame)"}),
                "guidance_scale": ("FLOAT", {"default": DEFAULTS.guidance, "min": 0.0, "max": 30.0, "step": 0.1,
                                   "tooltip": "first-frame CFG (0 turns CFG off); 7 for 384p, 7-9 for 768p"}),
                "video_guidance_scale": ("FLOAT", {"default": DEFAULTS.video_guidance, "min": 0.0, "max": 30.0, "step": 0.1,
                                         "tooltip": f"CFG of later frames: higher = more motion; {DEFAULTS.i2v_video_guidance:g} for image-to-video"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX}),
            },
            "optional": {
                "start_image": ("IMAGE", {"tooltip": "image-to-video: the first frame (scaled to cover and centre-cropped)"}),
                "vae": ("PYRAMIDFLOW_VAE", {"tooltip": "needed with start_image"}),
                "start_latent": ("LATENT", {"tooltip": "image-to-video from a Pyramid Flow VAE Encode latent (instead of start_image)"}),
            },
        }

    def sample(self, model: PyramidFlowModel, conditioning: PyramidFlowConditioning, width, height, temp, seconds,
               first_frame_steps, video_steps, guidance_scale, video_guidance_scale, seed,
               start_image=None, vae: PyramidFlowVAE | None = None, start_latent=None):
        check_resolution(width, height)
        guidance_scale = check_guidance(guidance_scale, "guidance_scale")
        video_guidance_scale = check_guidance(video_guidance_scale, "video_guidance_scale")
        check_seed(int(seed))
        temp = pick_temp(model.variant, temp, seconds)
        first, video = parse_steps(first_frame_steps, "first_frame_steps"), parse_steps(video_steps, "video_steps")
        if conditioning.family != model.family:
            raise ValueError(
                f"the conditioning was made for {FAMILIES[conditioning.family].title} but the model is "
                f"{FAMILIES[model.family].title}: use that model's text encoder or the matching CLIP loader"
            )
        if start_image is not None and start_latent is not None:
            raise ValueError("connect start_image or start_latent, not both")
        if start_image is not None and vae is None:
            raise ValueError("start_image needs the vae input (the model loader's vae output, or the VAE loader)")
        i2v = start_image is not None or start_latent is not None
        if i2v and temp < 2:
            raise ValueError("image-to-video needs temp >= 2 (the start image is frame 0)")
        embeddings = conditioning.embeddings if guidance_scale > 0 else conditioning.embeddings.chunk_cfg()[1]

        memory = ComfyMemory(
            {"dit": model.dit, "vae": vae.vae if vae is not None else None}, model.offload,
            memory_required=inference_bytes(width, height, temp, model.dtype),
            vram_budget_gb=model.vram_budget_gb, resident_blocks=model.resident_blocks,
        )
        pipe = PyramidFlowPipeline(model.dit.module, vae.vae.module if vae is not None else None, None,
                                   model.family, model.variant, model.dtype, memory)
        progress = _Progress((temp - 1) * sum(video) + (0 if i2v else sum(first)))
        common = dict(
            temp=temp, guidance_scale=guidance_scale, video_guidance_scale=video_guidance_scale, output_type="latent",
            seed=int(seed), prompt_embeds=embeddings, step_callback=progress.step, unit_callback=progress.unit,
        )
        host.check_interrupt()
        if not i2v:
            latents = pipe.generate(height=height, width=width, num_inference_steps=first,
                                    video_num_inference_steps=video, **common)
        elif start_image is not None:
            latents = pipe.generate_i2v(input_image=start_image[0], num_inference_steps=video, width=width,
                                        height=height, **common)
        else:
            image_latent = _start_latent(start_latent, model.family, width, height)
            latents = pipe.generate_i2v(image_latent=image_latent, num_inference_steps=video, width=width,
                                        height=height, **common)
        return ({"samples": latents.to(host.intermediate_device()), FAMILY_KEY: model.family},)


class _Progress:
    """One progress bar over every step of every unit and stage; Cancel is checked after each step."""

    def __init__(self, total: int):
        self.bar = host.progress_bar(total)
        self.total, self.completed = total, 0

    def step(self, info) -> None:
        self.completed, self.total = info.completed, info.total
        self.bar.update_absolute(info.completed, info.total)
        host.check_interrupt()  # after the update: a Cancel that arrived during this step stops before the next

    def unit(self, unit: int, num_units: int, latent: torch.Tensor) -> None:
        if host.previews_enabled():
            self.bar.update_absolute(self.completed, self.total, host.preview_payload(latent_preview(latent)))
