"""Sampler node: text-to-video, image-to-video and text-to-image through `PyramidFlowPipeline`."""
from __future__ import annotations

import torch

from pyramid_core.latent_rgb import LatentRGB
from pyramid_core.pipeline import PyramidFlowPipeline
from pyramid_core.settings import DEFAULT_VARIANT, DEFAULTS, FAMILIES, FPS, SIZE_MULTIPLE, VARIANTS
from pyramid_core.validation import (
    check_guidance, check_resolution, check_seed, check_temp, parse_steps, temp_for_duration,
)

from . import comfy as host
from .managed import FAMILY_KEY, ComfyMemory, PyramidFlowConditioning, PyramidFlowModel, PyramidFlowVAE
from .preview import latent_preview, preview_map

CATEGORY = "PyramidFlow"
SEED_MAX = DEFAULTS.seed_limit - 1
MAX_TEMP = max(v.trained_temp for v in VARIANTS.values())
MAX_SIDE = 2048  # widget limit; larger sizes are refused by the memory estimate anyway
MAX_HISTORY = 1024  # history_frames widget limit (0 = the whole history)


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


def _history(latent: dict, family: str, width: int, height: int) -> torch.Tensor:
    """The clip a `history` LATENT holds, [1,16,k,h,w]; a clear error naming what to connect otherwise."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 5 or samples.shape[1] != 16:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(
            f"history must be a Pyramid Flow latent clip [1,16,T,h,w]: connect the samples of a Pyramid Flow Sampler "
            f"or of Pyramid Flow VAE Encode (a video); got {shape}"
        )
    made = latent.get(FAMILY_KEY, family)
    if made != family:
        title = FAMILIES[made].title if made in FAMILIES else repr(made)
        raise ValueError(
            f"history was made for {title} ({FAMILY_KEY}={made!r}) but the model is {FAMILIES[family].title}: "
            f"connect a latent from a {FAMILIES[family].title} sampler or VAE Encode, or load a {title} model"
        )
    if samples.shape[0] != 1:
        raise ValueError(f"history holds a batch of {samples.shape[0]} clips; connect one clip (batch 1)")
    h, w = samples.shape[-2] * 8, samples.shape[-1] * 8
    if (w, h) != (width, height):
        raise ValueError(f"history is {w}x{h}; set width to {w} and height to {h} (the clip continued sets the size)")
    return samples


class PyramidFlowCoreSampler:
    DESCRIPTION = (
        "Generates Pyramid Flow latents: text-to-video, or image-to-video with a start image (and the VAE), or "
        "continues a clip connected to history by temp latent frames. temp latent frames = 8*(temp-1)+1 video "
        "frames at 24 fps. Outputs LATENT {'samples': [B,16,T,h,w]} (with history: the whole clip)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("PYRAMIDFLOW_MODEL", {"tooltip": "the DiT from the Pyramid Flow model loader"}),
                "conditioning": ("PYRAMIDFLOW_CONDITIONING", {"tooltip": "prompt and negative prompt from Pyramid Flow Text Encode (same model family)"}),
                "width": ("INT", {"default": VARIANTS[DEFAULT_VARIANT].width, "min": SIZE_MULTIPLE, "max": MAX_SIDE,
                          "step": SIZE_MULTIPLE, "tooltip": f"multiple of 64; {_sizes('width')}"}),
                "height": ("INT", {"default": VARIANTS[DEFAULT_VARIANT].height, "min": SIZE_MULTIPLE, "max": MAX_SIDE,
                           "step": SIZE_MULTIPLE, "tooltip": f"multiple of 64; {_sizes('height')}"}),
                "temp": ("INT", {"default": VARIANTS[DEFAULT_VARIANT].default_temp, "min": 1, "max": MAX_TEMP,
                         "tooltip": "latent frames (video frames = 8*(temp-1)+1): " + ", ".join(
                             f"{v.alias} trained up to {v.trained_temp}" for v in VARIANTS.values() if v.makes_video)
                         + " (longer runs, with a warning); with history: the latent frames added (8 video frames each)"}),
                "seconds": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.5,
                            "tooltip": f"if > 0: the length in seconds at {FPS} fps, replacing temp (with history: the length added)"}),
                "first_frame_steps": ("STRING", {"default": _steps_text(DEFAULTS.steps),
                                      "tooltip": "steps per pyramid stage for the first frame (unused with start_image, start_latent or history)"}),
                "video_steps": ("STRING", {"default": _steps_text(DEFAULTS.video_steps),
                                "tooltip": "steps per pyramid stage for later frames (image-to-video and history use these for every new frame)"}),
                "guidance_scale": ("FLOAT", {"default": DEFAULTS.guidance, "min": 0.0, "max": 30.0, "step": 0.1,
                                   "tooltip": "first-frame CFG (0 turns CFG off); 7 for 384p, 7-9 for 768p"}),
                "video_guidance_scale": ("FLOAT", {"default": DEFAULTS.video_guidance, "min": 0.0, "max": 30.0, "step": 0.1,
                                         "tooltip": f"CFG of later frames: higher = more motion; {DEFAULTS.i2v_video_guidance:g} for image-to-video"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX,
                         "tooltip": "the same seed and settings give the same video"}),
            },
            "optional": {
                "start_image": ("IMAGE", {"tooltip": "image-to-video: the first frame (scaled to cover and centre-cropped)"}),
                "vae": ("PYRAMIDFLOW_VAE", {"tooltip": (
                    "needed with start_image; also colours the sampling previews (a model from an official folder "
                    "previews in colour without it)")}),
                "start_latent": ("LATENT", {"tooltip": "image-to-video from a Pyramid Flow VAE Encode latent (instead of start_image)"}),
                "history": ("LATENT", {"tooltip": (
                    "continue this clip by temp latent frames: a Pyramid Flow Sampler's samples, or a video through "
                    "Pyramid Flow VAE Encode (same model family; width and height must be its size). The output is "
                    "the whole clip; a prompt schedule counts latent frames from the clip's first frame")}),
                "history_frames": ("INT", {"default": 0, "min": 0, "max": MAX_HISTORY, "tooltip": (
                    "how many of the newest latent frames the model sees as history (0 = all, official); a cap "
                    "stops the cost per frame growing on long clips")}),
            },
        }

    def sample(self, model: PyramidFlowModel, conditioning: PyramidFlowConditioning, width: int, height: int,
               temp: int, seconds: float, first_frame_steps: str, video_steps: str, guidance_scale: float,
               video_guidance_scale: float, seed: int, start_image: torch.Tensor | None = None,
               vae: PyramidFlowVAE | None = None, start_latent: dict | None = None, history: dict | None = None,
               history_frames: int = 0) -> tuple[dict]:
        check_resolution(width, height)
        guidance_scale = check_guidance(guidance_scale, "guidance_scale")
        video_guidance_scale = check_guidance(video_guidance_scale, "video_guidance_scale")
        check_seed(int(seed))
        if history is not None:  # the pipeline checks (and warns about) the whole clip's length
            temp = temp_for_duration(seconds, FPS) if seconds > 0 else int(temp)
        else:
            temp = pick_temp(model.variant, temp, seconds)
        first, video = parse_steps(first_frame_steps, "first_frame_steps"), parse_steps(video_steps, "video_steps")
        if not isinstance(history_frames, int) or history_frames < 0:
            raise ValueError(f"history_frames must be an integer >= 0 (0 = the whole history), got {history_frames!r}")
        if conditioning.family != model.family:
            raise ValueError(
                f"the conditioning was made for {FAMILIES[conditioning.family].title} but the model is "
                f"{FAMILIES[model.family].title}: use that model's text encoder or the matching CLIP loader"
            )
        if history is not None and (start_image is not None or start_latent is not None):
            raise ValueError(
                "connect one of them: history continues a clip, start_image / start_latent start one from a picture"
            )
        if start_image is not None and start_latent is not None:
            raise ValueError("connect start_image or start_latent, not both")
        if start_image is not None and vae is None:
            raise ValueError("start_image needs the vae input (the model loader's vae output, or the VAE loader)")
        i2v = start_image is not None or start_latent is not None
        if i2v and temp < 2:
            raise ValueError("image-to-video needs temp >= 2 (the start image is frame 0)")
        clip = _history(history, model.family, width, height) if history is not None else None
        total = temp + (clip.shape[2] if clip is not None else 0)
        text = conditioning.for_units(total, cfg=guidance_scale > 0)  # a schedule entry past the video fails here

        memory = ComfyMemory(
            {"dit": model.dit, "vae": vae.vae if vae is not None else None}, model.offload,
            vram_budget_gb=model.vram_budget_gb, resident_blocks=model.resident_blocks,
        )
        pipe = PyramidFlowPipeline(model.dit.module, vae.vae.module if vae is not None else None, None,
                                   model.family, model.variant, model.dtype, memory)
        new_video_units = temp if clip is not None else temp - 1
        rgb = preview_map(model, vae) if host.previews_enabled() else None  # fitted before the DiT runs
        progress = _Progress(new_video_units * sum(video) + (0 if i2v or clip is not None else sum(first)), rgb,
                             model.family)
        common = dict(
            temp=temp, guidance_scale=guidance_scale, video_guidance_scale=video_guidance_scale, output_type="latent",
            seed=int(seed), prompt_embeds=text, step_callback=progress.step, unit_callback=progress.unit,
            history_frames=history_frames or None,
        )
        host.check_interrupt()
        if clip is not None:
            latents = pipe.extend(clip, num_inference_steps=video, **common)
        elif not i2v:
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

    def __init__(self, total: int, rgb: LatentRGB | None = None, family: str = "flux"):
        self.bar = host.progress_bar(total)
        self.total, self.completed = total, 0
        self.rgb, self.family = rgb, family  # the latent->RGB map of previews (None: channel stretch)

    def step(self, info) -> None:
        self.completed, self.total = info.completed, info.total
        self.bar.update_absolute(info.completed, info.total)
        host.check_interrupt()  # after the update: a Cancel that arrived during this step stops before the next

    def unit(self, unit: int, num_units: int, latent: torch.Tensor) -> None:
        if host.previews_enabled():  # the newest latent frame; unit 0 is a clip's first frame (image normalisation)
            image = latent_preview(latent, self.rgb, self.family, first_frame=unit == 0)
            self.bar.update_absolute(self.completed, self.total, host.preview_payload(image))
