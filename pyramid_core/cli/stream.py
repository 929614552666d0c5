"""`generate --stream`: each latent frame is decoded and appended to the video as soon as its unit is done, so
the start of a long video can be watched while the rest generates and the whole video is never in memory.

The frames equal those of decoding at the end (same temporal chunking; `codec.StreamingDecode`). If writing
fails midway, generation goes on and the latents are kept as after any failed write.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .request import GenerationRequest, UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["check_streamable", "sample_streaming"]

SHARED_PLACEMENTS = ("none", "block_swap", "sequential")  # placements that leave room to decode while sampling


def check_streamable(plan) -> None:
    """Streaming decodes while the DiT is placed: refuse plans that swap whole models in and out."""
    for name in ("dit", "vae"):
        component = plan.components.get(name)
        if component is not None and component.placement not in SHARED_PLACEMENTS:
            raise UsageError(
                f"--stream decodes while sampling, so the DiT and the VAE must be on the device together, but the "
                f"memory plan swaps the {name} in whole ({component.placement!r}); use --offload none, block_swap or "
                "sequential with --stream, or drop --stream"
            )


def sample_streaming(pipe, request: GenerationRequest, progress) -> tuple[torch.Tensor, Path | None, BaseException | None]:
    """Generate with streamed writing; returns (latents, path written or None, the write failure or None)."""
    from ..codec import StreamingDecode
    from ..images import prepare_image
    from ..sampling import RandomStreams
    from ..text import DEFAULT_NEGATIVE_PROMPT
    from ..video import VideoSink

    streams = RandomStreams.from_seed(request.seed)
    decoder = StreamingDecode(pipe.codec, request.total_temp, request.height // 8, request.width // 8)
    sink = VideoSink(request.out, fps=request.fps, format=request.format, quality=request.quality)
    failure: list[BaseException] = []

    def write(latent: torch.Tensor) -> None:
        if failure:
            return
        try:
            frames = decoder.feed(latent)
            if frames is not None:
                sink.add(frames)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # keep generating: the latents are kept at the end
            failure.append(exc)
            sink.abort()

    common = dict(
        negative_prompt=request.negative_prompt if request.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT,
        guidance_scale=request.guidance, video_guidance_scale=request.video_guidance, random_streams=streams,
        output_type="latent", step_callback=progress, history_frames=request.history_frames,
        unit_callback=lambda unit, count, latent: write(latent),
    )
    try:
        if request.clip is not None:
            clip = request.clip.latents if request.clip.latents is not None else pipe.encode_video(request.clip.pixels)
            write(clip)
            latents = pipe.extend(clip, prompt=request.prompt, temp=request.temp,
                                  num_inference_steps=request.video_steps, **common)
        elif request.image is not None:
            pixels, _, _ = prepare_image(request.image, request.width, request.height)
            image_latent = pipe.encode_image(pixels, generator=streams.global_)  # the draw generate_i2v would make
            write(image_latent)
            latents = pipe.generate_i2v(prompt=request.prompt, image_latent=image_latent, temp=request.temp,
                                        num_inference_steps=request.video_steps, width=request.width,
                                        height=request.height, **common)
        else:
            latents = pipe.generate(prompt=request.prompt, height=request.height, width=request.width,
                                    temp=request.temp, num_inference_steps=request.steps,
                                    video_num_inference_steps=request.video_steps, **common)
    except BaseException:
        sink.abort()
        decoder.close()
        raise
    decoder.close()
    if failure:
        return latents, None, failure[0]
    try:
        return latents, sink.close(), None
    except Exception as exc:
        return latents, None, exc
