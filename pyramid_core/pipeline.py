"""`PyramidFlowPipeline`: load a checkpoint, encode prompts, sample latents, decode frames.

Keyword names and defaults follow the official `PyramidDiTForVideoGeneration.generate` /
`generate_i2v`, so published settings carry over; `seed=` is the reproducible entry point used by
the command line and the ComfyUI nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from .codec import FRAME_TYPES, DecodeProgress, LatentCodec
from .images import prepare_image
from .memory import MemoryManager, MemoryPolicy, default_device
from .models.layers import host_to_device
from .sampling import PyramidSampler, RandomStreams, StepCallback, TextSource, UnitCallback, linear_guidance_scales
from .schedules import PromptSchedule, ScheduleSource, is_schedule_text
from .scheduler import PyramidFlowScheduler
from .text import DEFAULT_NEGATIVE_PROMPT, PyramidTextEncoder, TextEmbeddingCache, TextEmbeddings
from .settings import DEFAULT_VARIANT
from .validation import check_guidance, check_resolution, check_seed, check_steps, check_temp

if TYPE_CHECKING:
    from .parallel import ParallelGroups

OUTPUT_TYPES = ("latent", *FRAME_TYPES)
LATENT_CHANNELS = 16
VAE_DOWNSAMPLE = 8


@dataclass
class PyramidFlowPipeline:
    """Text-to-video, image-to-video and text-to-image with Pyramid Flow.

    `parallel`: this process's groups in a multi-process run (`pyramid_core.parallel`): the DiT runs its shard of
    the tokens, CFG branches split over rank pairs, rank 0 encodes the text for everyone. None: one process.
    """

    dit: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: PyramidTextEncoder | None
    family: str
    variant: str
    dtype: torch.dtype = torch.bfloat16
    memory: MemoryPolicy = field(default_factory=MemoryManager)
    scheduler: PyramidFlowScheduler = field(default_factory=PyramidFlowScheduler)
    text_cache: TextEmbeddingCache = field(default_factory=TextEmbeddingCache)
    parallel: ParallelGroups | None = None
    codec: LatentCodec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("text_encoder", "dit", "vae"):
            self.memory.register(name, getattr(self, name))
        self.codec = LatentCodec(self.memory, self.family, has_vae=self.vae is not None)
        if self.parallel is not None and self.parallel.sequence is not None:
            from .models.dit import configure_dit

            configure_dit(self.dit, sequence_parallel=self.parallel.sequence)

    @property
    def device(self) -> torch.device:
        """Execution device."""
        return self.memory.device

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | Mapping[str, str | Path],
        variant: str = DEFAULT_VARIANT,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        *,
        offload: str = "none",
        load_text_encoder: bool = True,
        load_vae: bool = True,
        budget_gb: float | None = None,
        resident_blocks: int | None = None,
        prefetch: int = 2,
        fp8: str | None = None,
        attention_backend: str = "sdpa",
        compile_blocks: bool = False,
        parallel: ParallelGroups | None = None,
    ) -> "PyramidFlowPipeline":
        """Load an official model folder (rain1011/pyramid-flow-miniflux or -sd3 layout), or single files given
        as component -> path ({"dit": file, "vae": file, "text_encoder": folder}), with `load_components`.

        `offload`: a memory plan name - none, model, block_swap, sequential or auto (see
        `pyramid_core.memory`). Weights are loaded on the host and placed by the memory plan.
        `budget_gb`: device budget for 'auto' (default: free device memory minus a margin);
        `resident_blocks` / `prefetch`: K and the streamed-block slots of 'block_swap'.
        `dtype` is the compute dtype (bf16 as trained; fp16 keeps the residual streams in fp32; fp32); the
        VAE's and text encoders' dtypes follow from it (`pyramid_core.loading.component_dtypes`).
        `fp8`: store the DiT's Linear weights as float8 with per-'row' or per-'tensor' scales (Kijai's fp8
        files are kept in fp8 either way). `attention_backend`: 'sdpa', 'sage' or 'flash' (when installed).
        `compile_blocks`: torch.compile each transformer block. `parallel`: the groups of a multi-process run
        (`pyramid_core.parallel.ParallelGroups`; ranks other than 0 may skip the text encoder).
        """
        from .loading import load_components, resolve_model_folder

        source = path if isinstance(path, Mapping) else resolve_model_folder(path).root
        optional = {"vae": load_vae, "text_encoder": load_text_encoder}
        wanted = ("dit", *(name for name, load in optional.items() if load))
        parts = load_components(source, variant, dtype=dtype, fp8=fp8, attention_backend=attention_backend,
                                compile_blocks=compile_blocks, components=wanted)
        memory = MemoryManager(
            plan=offload, device=torch.device(device) if device else default_device(),
            budget_gb=budget_gb, resident_blocks=resident_blocks, prefetch=prefetch,
        )
        vae = parts.vae.model if parts.vae is not None else None
        return cls(parts.dit.model, vae, parts.text_encoder, parts.family, parts.variant, dtype, memory,
                   parallel=parallel)

    # ------------------------------------------------------------------ text
    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = DEFAULT_NEGATIVE_PROMPT,
        *,
        add_suffix: bool = True,
        do_cfg: bool = True,
    ) -> TextEmbeddings:
        """CFG batch [negative, positive] (cached per prompt pair and encoder; CPU copies)."""
        if self.text_encoder is None:
            raise ValueError(
                "this pipeline has no text encoder: load one (from_pretrained(..., load_text_encoder=True)) "
                "or pass prompt_embeds"
            )
        return self.text_cache.encode_for_guidance(
            self.text_encoder, prompt, negative_prompt, add_suffix=add_suffix, do_cfg=do_cfg,
            placement=lambda: self.memory.use("text_encoder"),  # only on a cache miss: a hit never moves T5
        )

    def _text(self, prompt, negative_prompt, prompt_embeds, add_suffix, do_cfg) -> TextEmbeddings:
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give a prompt (or precomputed prompt_embeds)")
            def encode() -> TextEmbeddings:
                return self.encode_prompt(prompt, negative_prompt, add_suffix=add_suffix, do_cfg=do_cfg)

            prompt_embeds = encode() if self.parallel is None else self.parallel.share(encode)  # rank 0 encodes
        expected = 2 if do_cfg else 1
        if prompt_embeds.batch_size != expected:
            raise ValueError(
                f"prompt_embeds must hold {'[negative, positive]' if do_cfg else 'the positive prompt'} "
                f"(batch {expected}), got batch {prompt_embeds.batch_size}"
            )
        # embeddings to the device (asynchronously); the mask stays on the host, where the DiT reads the text layout
        return TextEmbeddings(
            host_to_device(prompt_embeds.prompt_embeds.to(dtype=self.dtype), self.device),
            prompt_embeds.attention_mask.cpu(),
            host_to_device(prompt_embeds.pooled.to(dtype=self.dtype), self.device),
        )

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        temp: int = 1,
        num_inference_steps: int | Sequence[int] = 28,
        video_num_inference_steps: int | Sequence[int] = 28,
        guidance_scale: float = 7.0,
        video_guidance_scale: float = 7.0,
        min_guidance_scale: float = 2.0,
        use_linear_guidance: bool = False,
        alpha: float = 0.5,
        negative_prompt: str | list[str] | None = DEFAULT_NEGATIVE_PROMPT,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        save_memory: bool = True,
        callback: Callable[[int, int], None] | None = None,
        *,
        seed: int | None = None,
        prompt_embeds: TextSource | None = None,
        add_prompt_suffix: bool = True,
        step_callback: StepCallback | None = None,
        unit_callback: UnitCallback | None = None,
        vae_tiling: bool = True,
        decode_callback: DecodeProgress | None = None,
        noise: torch.Tensor | None = None,
        random_streams: RandomStreams | None = None,
        history_frames: int | None = None,
    ):
        """Text-to-video (temp > 1) or text-to-image (temp = 1). Returns frames or latents per `output_type`.

        `prompt` / `negative_prompt` may be prompt schedules (`pyramid_core.schedules`: "0: a cat | 8: a dog").
        `noise`: the initial noise [1,16,temp,h,w] instead of a draw; `random_streams`: the random streams
        to draw from and advance (continue them in `extend` to reproduce a longer run exactly);
        `history_frames`: keep only the newest N latent frames as history. `decode_callback(done, total)`
        reports the VAE decode steps."""
        if height is None or width is None:
            raise ValueError("height and width are required (multiples of 64, e.g. 640x384 for 384p, 1280x768 for 768p)")
        check_resolution(width, height)
        check_temp(temp, self.variant)
        first_steps = check_steps(num_inference_steps, "num_inference_steps")
        video_steps = check_steps(video_num_inference_steps, "video_num_inference_steps")
        _check_request(prompt, num_images_per_prompt, output_type)
        _check_guidance_and_seed(guidance_scale, video_guidance_scale, seed)
        streams = _streams(seed, generator, random_streams)
        do_cfg = guidance_scale > 0
        self.memory.prepare(width, height, temp, cfg=do_cfg, dtype=self.dtype)
        text = self._unit_texts(prompt, negative_prompt, prompt_embeds, add_prompt_suffix, do_cfg, temp)

        noise = self._noise(noise, temp, height, width, streams.noise)
        unit_guidance = (
            linear_guidance_scales(guidance_scale, min_guidance_scale, alpha, temp) if use_linear_guidance else None
        )
        latents = self._sample(
            noise, text, streams, (step_callback, unit_callback, callback), first_frame_steps=first_steps,
            video_steps=video_steps, guidance_scale=guidance_scale, video_guidance_scale=video_guidance_scale,
            unit_guidance=unit_guidance, history_frames=history_frames,
        )
        return self._output(latents, output_type, save_memory, vae_tiling, decode_callback)

    @torch.no_grad()
    def generate_i2v(
        self,
        prompt: str | list[str] | None = "",
        input_image: Any = None,
        temp: int = 1,
        num_inference_steps: int | Sequence[int] = 28,
        guidance_scale: float = 7.0,
        video_guidance_scale: float = 4.0,
        min_guidance_scale: float = 2.0,
        use_linear_guidance: bool = False,
        alpha: float = 0.5,
        negative_prompt: str | list[str] | None = DEFAULT_NEGATIVE_PROMPT,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        save_memory: bool = True,
        callback: Callable[[int, int], None] | None = None,
        *,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        prompt_embeds: TextSource | None = None,
        add_prompt_suffix: bool = True,
        step_callback: StepCallback | None = None,
        unit_callback: UnitCallback | None = None,
        vae_tiling: bool = True,
        image_latent: torch.Tensor | None = None,
        decode_callback: DecodeProgress | None = None,
        random_streams: RandomStreams | None = None,
        history_frames: int | None = None,
    ):
        """Image-to-video: `temp` latent frames in total, frame 0 being the encoded `input_image`.

        `image_latent` (DiT-space [1,16,1,h,w]) may replace `input_image` (e.g. from a VAE-encode node).
        An image whose size differs from width x height is scaled to cover and centre-cropped.
        `decode_callback(done, total)` reports the VAE decode steps; the prompt may be a schedule, and
        `random_streams` / `history_frames` are as in `generate`.
        """
        if not isinstance(temp, int) or temp < 2:
            raise ValueError(f"image-to-video needs temp >= 2 (the image is frame 0), got {temp!r}")
        check_temp(temp, self.variant)
        steps = check_steps(num_inference_steps, "num_inference_steps")
        _check_request(prompt, num_images_per_prompt, output_type)
        _check_guidance_and_seed(guidance_scale, video_guidance_scale, seed)
        streams = _streams(seed, generator, random_streams)
        do_cfg = guidance_scale > 0
        if image_latent is None:
            if input_image is None:
                raise ValueError("generate_i2v needs input_image (or image_latent)")
            pixels, width, height = prepare_image(input_image, width, height)
        else:
            _, _, _, h, w = image_latent.shape
            width, height = width or w * VAE_DOWNSAMPLE, height or h * VAE_DOWNSAMPLE
            check_resolution(width, height)
        self.memory.prepare(width, height, temp, cfg=do_cfg, dtype=self.dtype)  # before any component is placed
        text = self._unit_texts(prompt or "", negative_prompt, prompt_embeds, add_prompt_suffix, do_cfg, temp)
        noise = self._initial_noise(temp, height, width, streams.noise)[:, :, : temp - 1]  # official: frames 0..T-2
        if image_latent is None:
            image_latent = self.encode_image(pixels, generator=streams.global_)
        if self.parallel is not None:  # every rank drew the same; rank 0's latent makes them bit-equal
            image_latent = self._from_first(image_latent)
        unit_guidance = (
            linear_guidance_scales(guidance_scale, min_guidance_scale, alpha, temp + 1) if use_linear_guidance else None
        )
        latents = self._sample(
            noise, text, streams, (step_callback, unit_callback, callback), first_frame_steps=steps,
            video_steps=steps, guidance_scale=guidance_scale, video_guidance_scale=video_guidance_scale,
            history=image_latent.to(self.dtype), unit_guidance=unit_guidance, history_frames=history_frames,
        )
        return self._output(latents, output_type, save_memory, vae_tiling, decode_callback)

    @torch.no_grad()
    def extend(
        self,
        latents: torch.Tensor,
        *,
        prompt: ScheduleSource | None = None,
        temp: int,
        num_inference_steps: int | Sequence[int] = 28,
        guidance_scale: float = 7.0,
        video_guidance_scale: float = 5.0,
        negative_prompt: ScheduleSource | None = DEFAULT_NEGATIVE_PROMPT,
        generator: torch.Generator | None = None,
        output_type: str = "latent",
        save_memory: bool = True,
        callback: Callable[[int, int], None] | None = None,
        seed: int | None = None,
        noise: torch.Tensor | None = None,
        random_streams: RandomStreams | None = None,
        history_frames: int | None = None,
        prompt_embeds: TextSource | None = None,
        add_prompt_suffix: bool = True,
        step_callback: StepCallback | None = None,
        unit_callback: UnitCallback | None = None,
        vae_tiling: bool = True,
        decode_callback: DecodeProgress | None = None,
    ):
        """Continue a clip by `temp` latent frames; returns the whole clip (old + new) per `output_type`.

        `latents`: the clip as DiT-space latents [1,16,k,h,w] (`output_type="latent"` of a generation, or
        `encode_video` of frames). The new units are video units with the clip as their history, exactly
        as the units at those indexes of a full run: with that run's initial noise of the new frames
        (`noise`) and its random streams continued (`random_streams`), the latents are the full run's.
        `num_inference_steps` are the new units' steps per stage; `guidance_scale` > 0 turns CFG on (as a
        full run's first-frame scale does) and `video_guidance_scale` guides the new units. Schedule starts
        count from the first frame of the whole clip.
        """
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[:2] != (1, LATENT_CHANNELS):
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"extend needs a clip of Pyramid Flow latents [1,16,k,h,w] (output_type='latent'); got {shape}")
        if not isinstance(temp, int) or isinstance(temp, bool) or temp < 1:
            raise ValueError(f"temp (latent frames to add) must be an integer >= 1, got {temp!r}")
        height, width = latents.shape[3] * VAE_DOWNSAMPLE, latents.shape[4] * VAE_DOWNSAMPLE
        check_resolution(width, height)
        total = latents.shape[2] + temp
        check_temp(total, self.variant)
        steps = check_steps(num_inference_steps, "num_inference_steps")
        _check_output_type(output_type)
        _check_guidance_and_seed(guidance_scale, video_guidance_scale, seed)
        streams = _streams(seed, generator, random_streams)
        do_cfg = guidance_scale > 0
        self.memory.prepare(width, height, total, cfg=do_cfg, dtype=self.dtype)
        text = self._unit_texts(prompt, negative_prompt, prompt_embeds, add_prompt_suffix, do_cfg, total)
        noise = self._noise(noise, temp, height, width, streams.noise)
        if self.parallel is not None:  # a clip encoded on each rank: rank 0's everywhere
            latents = self._from_first(latents)
        clip = self._sample(
            noise, text, streams, (step_callback, unit_callback, callback), first_frame_steps=steps,
            video_steps=steps, guidance_scale=guidance_scale, video_guidance_scale=video_guidance_scale,
            history=latents.to(self.dtype), history_frames=history_frames,
        )
        return self._output(clip, output_type, save_memory, vae_tiling, decode_callback)

    def _unit_texts(self, prompt, negative_prompt, prompt_embeds, add_suffix: bool, do_cfg: bool,
                    num_units: int) -> TextSource:
        """The text of every unit: one embedding for plain prompts (unchanged path), or unit -> embedding
        for schedules, each distinct (negative, prompt) pair encoded once.

        `prompt_embeds` (of generate, generate_i2v, extend) is precomputed embeddings for every unit, or a
        function unit -> embeddings (a schedule resolved by the caller, e.g. the ComfyUI sampler node): it is
        called here for units 0..num_units-1, and each distinct object it returns (return the same object
        for units that share a prompt) is checked and put on the device once."""
        if callable(prompt_embeds):
            placed: dict[int, tuple[TextEmbeddings, TextEmbeddings]] = {}  # id -> (the caller's object, placed)
            per_unit = []
            for unit in range(num_units):
                embeddings = prompt_embeds(unit)
                if not isinstance(embeddings, TextEmbeddings):
                    raise TypeError(f"prompt_embeds({unit}) returned {type(embeddings).__name__}, not TextEmbeddings")
                if id(embeddings) not in placed:
                    placed[id(embeddings)] = (embeddings, self._text(None, None, embeddings, add_suffix, do_cfg))
                per_unit.append(placed[id(embeddings)][1])
            return per_unit.__getitem__
        if prompt_embeds is not None or not (is_schedule(prompt) or is_schedule(negative_prompt)):
            return self._text(prompt, negative_prompt, prompt_embeds, add_suffix, do_cfg)
        positive = PromptSchedule.parse(prompt if prompt is not None else "")
        negative = PromptSchedule.parse(negative_prompt if negative_prompt is not None else "")
        for schedule in (positive, negative):
            schedule.check_length(num_units)
        encoded: dict[tuple[str, str], TextEmbeddings] = {}
        for unit in sorted({start for start, _ in positive.entries + negative.entries}):
            pair = (positive.at(unit), negative.at(unit))
            if pair not in encoded:
                encoded[pair] = self._text(pair[0], pair[1], None, add_suffix, do_cfg)
        return lambda unit: encoded[(positive.at(unit), negative.at(unit))]

    def _noise(self, noise: torch.Tensor | None, temp: int, height: int, width: int,
               generator: torch.Generator | None) -> torch.Tensor:
        """The given initial noise (checked) or one draw of it."""
        if noise is None:
            return self._initial_noise(temp, height, width, generator)
        expected = (1, LATENT_CHANNELS, temp, height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE)
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise must have shape {list(expected)} (1, 16, temp, height/8, width/8), got {list(noise.shape)}")
        return host_to_device(noise.float(), self.device).to(self.dtype)

    # ------------------------------------------------------------------ VAE (delegated to the codec)
    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[1,3,1,H,W] pixels in [-1,1] -> DiT-space image latent (posterior sample, image factors)."""
        return self.codec.encode_image(pixels, generator=generator)

    def encode_video(self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B,3,F,H,W] pixels in [-1,1] (F = 8k+1) -> DiT-space latents (posterior mean unless `sample`)."""
        return self.codec.encode_video(pixels, sample=sample, generator=generator)

    def decode(self, latents: torch.Tensor, output_type: str = "pt", save_memory: bool = True, tiling: bool = True,
               progress: DecodeProgress | None = None):
        """DiT-space latents -> frames: 'pt' uint8 [F,H,W,3], 'np', 'pil' (list), 'float' [F,H,W,3] in [0,1];
        'latent' returns `latents`. `progress(done, total)`: latent frames decoded (see `LatentCodec.decode`)."""
        _check_output_type(output_type)
        if output_type == "latent":
            return latents
        return self.codec.decode(latents, output_type, save_memory=save_memory, tiling=tiling, progress=progress)

    # ------------------------------------------------------------------ helpers
    def _initial_noise(self, temp: int, height: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
        """One randn of the full latent video, as official (a CPU generator draws on the CPU)."""
        shape = (1, LATENT_CHANNELS, temp, height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE)
        draw_device = generator.device if generator is not None else self.device
        noise = torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32)
        return host_to_device(noise, self.device).to(self.dtype)  # a CPU draw is copied asynchronously

    def _sample(self, noise, text, streams: RandomStreams, callbacks, **settings) -> torch.Tensor:
        """Run the pyramid sampler with the DiT placed by the memory plan (OOM turned into advice)."""
        step_callback, unit_callback, unit_start_callback = callbacks
        with self.memory.oom_guard("sampling"), self.memory.use("dit") as dit:
            sampler = PyramidSampler(
                dit, self.scheduler, self.device, self.dtype, block_noise_generator=streams.global_,
                step_callback=step_callback, unit_callback=unit_callback, unit_start_callback=unit_start_callback,
                cfg_parallel=self.parallel.cfg if self.parallel is not None else None,
            )
            return sampler.sample(noise, text, **settings)

    def _from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's copy of a tensor every rank computed, on this rank's device (the caller's tensor is left as is)."""
        own = host_to_device(tensor, self.device).clone(memory_format=torch.contiguous_format)
        return self.parallel.broadcast(own)

    def _output(self, latents: torch.Tensor, output_type: str, save_memory: bool, tiling: bool,
                progress: DecodeProgress | None):
        if output_type == "latent":
            return latents
        return self.decode(latents, output_type=output_type, save_memory=save_memory, tiling=tiling, progress=progress)


def is_schedule(prompt: object) -> bool:
    """Whether a prompt argument is a schedule (the text form, a list of (start, text) pairs, a PromptSchedule)."""
    if isinstance(prompt, PromptSchedule) or is_schedule_text(prompt):
        return True
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(e, (list, tuple)) for e in prompt)


def _streams(seed: int | None, generator: torch.Generator | None, random_streams: RandomStreams | None) -> RandomStreams:
    if random_streams is not None:
        if seed is not None or generator is not None:
            raise ValueError("pass random_streams, or seed / generator, not both")
        return random_streams
    return RandomStreams.from_seed(seed) if seed is not None else RandomStreams(noise=generator)


def _check_guidance_and_seed(guidance_scale: float, video_guidance_scale: float, seed: int | None) -> None:
    check_guidance(guidance_scale, "guidance_scale")
    check_guidance(video_guidance_scale, "video_guidance_scale")
    if seed is not None:
        check_seed(seed)


def _check_request(prompt, num_images_per_prompt: int, output_type: str) -> None:
    _check_output_type(output_type)
    if num_images_per_prompt != 1 or (isinstance(prompt, list) and len(prompt) != 1 and not is_schedule(prompt)):
        raise ValueError("one video per call: pass a single prompt and num_images_per_prompt=1")


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")

