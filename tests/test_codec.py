"""`LatentCodec`: encode/decode parity with the official fixtures, decode progress, errors."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from pyramid_core.codec import FRAME_TYPES, LatentCodec
from pyramid_core.latent_format import decode_latents, normalize_latents
from pyramid_core.loading import load_vae
from pyramid_core.memory import MemoryManager
from tests.reference import assert_frames_match, assert_matches, case, case_ids, model_dir, tensors

FAMILY = {"miniflux_tiny": "flux", "sd3_tiny": "mmdit"}


def managed_vae(model: str) -> tuple[torch.nn.Module, MemoryManager]:
    vae = load_vae(model_dir(model), dtype=torch.float32).model
    memory = MemoryManager(plan="none", device="cpu")
    memory.register("vae", vae)
    return vae, memory


@pytest.fixture(scope="module")
def flux_codec() -> LatentCodec:
    _, memory = managed_vae("miniflux_tiny")
    return LatentCodec(memory, "flux")


class ChunkOrderVAE(torch.nn.Module):
    """The real VAE, streaming chunk by chunk (order="chunk"), so frames arrive in several runs."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.inner = vae
        self.temporal_ratio = vae.temporal_ratio

    def decode_to_host(self, z, **kwargs):
        return self.inner.decode_to_host(z, order="chunk", **kwargs)


class RecordingMemory:
    """A minimal memory plan (the `VaeMemory` protocol) that records every call the codec makes."""

    def __init__(self, vae: torch.nn.Module, window: int, tile: int):
        self.device = torch.device("cpu")
        self.vae, self.window, self.tile = vae, window, tile
        self.calls: list[tuple] = []

    @contextlib.contextmanager
    def use(self, name: str):
        self.calls.append(("use", name))
        yield self.vae

    def vae_decode_settings(self, save_memory: bool = True) -> tuple[int, int]:
        self.calls.append(("settings", save_memory))
        return self.window, self.tile

    @contextlib.contextmanager
    def oom_guard(self, phase: str):
        self.calls.append(("guard", phase))
        yield


def smooth_latents(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return 2 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case_id", case_ids("pipeline_decode_latent"))
def test_decode_matches_official_frames_and_decode_latents(case_id):
    model = case(case_id)["model"]
    vae, memory = managed_vae(model)
    latents = tensors(case_id)["latents"]
    before = latents.clone()
    codec = LatentCodec(memory, FAMILY[model])
    frames = codec.decode(latents, "pt")
    assert frames.dtype == torch.uint8 and frames.shape == (17, 32, 32, 3)
    assert torch.equal(latents, before)
    assert_frames_match(frames, tensors(case_id)["frames"], case_id)
    assert torch.equal(frames, decode_latents(vae, latents, FAMILY[model], save_memory=True))


def test_decode_output_types_agree(flux_codec):
    latents = tensors("miniflux_tiny/vae/decode_latent")["latents"][:, :, :2]
    frames = flux_codec.decode(latents, "pt")
    array = flux_codec.decode(latents, "np")
    images = flux_codec.decode(latents, "pil")
    floats = flux_codec.decode(latents, "float")
    assert isinstance(array, np.ndarray) and np.array_equal(array, frames.numpy())
    assert len(images) == 9 and all(isinstance(i, Image.Image) for i in images)
    assert np.array_equal(np.stack([np.asarray(i) for i in images]), frames.numpy())
    assert floats.dtype == torch.float32 and floats.shape == frames.shape
    assert 0.0 <= floats.min().item() and floats.max().item() <= 1.0
    # both conversions start from the same decoded pixels: uint8 truncates x*127.5+127.5, float is (x+1)/2
    assert (floats * 255 - frames.float()).abs().max().item() <= 1.0 + 1e-3


def test_encode_video_and_image_match_the_official_posterior(flux_codec):
    entry, video = case("miniflux_tiny/vae/encode_video"), tensors("miniflux_tiny/vae/encode_video")
    latents = flux_codec.encode_video(video["x"])
    assert_matches(latents, normalize_latents(video["mean"], "flux"), entry["tolerance"], "encode_video")

    entry, image = case("miniflux_tiny/vae/encode_image"), tensors("miniflux_tiny/vae/encode_image")
    latent = flux_codec.encode_image(image["x"], generator=torch.Generator().manual_seed(3))
    noise = torch.randn(image["mean"].shape, generator=torch.Generator().manual_seed(3))
    expected = normalize_latents(image["mean"] + image["std"] * noise, "flux")
    assert latent.shape == (1, 16, 1, 4, 4)
    assert_matches(latent, expected, entry["tolerance"], "encode_image")


def test_every_vae_use_goes_through_the_memory_plan():
    vae, _ = managed_vae("miniflux_tiny")
    memory = RecordingMemory(vae, window=2, tile=512)
    codec = LatentCodec(memory, "flux")
    codec.decode(smooth_latents((1, 16, 2, 4, 4), seed=1), "float", save_memory=False)
    assert memory.calls == [("settings", False), ("guard", "decoding"), ("use", "vae")]
    memory.calls.clear()
    codec.encode_video(torch.zeros(1, 3, 9, 32, 32))
    assert memory.calls == [("use", "vae")]


# ---------------------------------------------------------------------------------- progress


@pytest.mark.parametrize("output_type", ["pt", "float"])
def test_decode_progress_counts_decode_steps_and_changes_nothing(flux_codec, output_type):
    latents = smooth_latents((1, 16, 3, 4, 4), seed=5)
    seen: list[tuple[int, int]] = []
    with_progress = flux_codec.decode(latents, output_type, progress=lambda done, total: seen.append((done, total)))
    without = flux_codec.decode(latents, output_type)
    assert torch.equal(with_progress, without)
    assert seen == [(0, 2), (1, 2), (2, 2)]  # one tile; chunks of 2 + 1 latent frames (official window 1)


def test_decode_progress_counts_every_tile_and_chunk():
    vae, _ = managed_vae("miniflux_tiny")
    latents = smooth_latents((1, 16, 3, 3, 6), seed=9)
    tiled = dict(window=1, tile=32)  # 3x6 latents in 4x4 tiles: two tiles, chunks of 2 + 1 latent frames
    reference = LatentCodec(RecordingMemory(vae, **tiled), "flux").decode(latents, "pt")
    seen: list[tuple[int, int]] = []
    streamed = LatentCodec(RecordingMemory(ChunkOrderVAE(vae), **tiled), "flux").decode(
        latents, "pt", progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]  # 2 tiles x 2 chunks, total known up front
    assert streamed.shape == (17, 24, 48, 3) and torch.equal(streamed, reference)


# ------------------------------------------------------------------------------------ errors


def test_missing_vae_and_bad_requests_name_the_fix(flux_codec):
    without = LatentCodec(flux_codec.memory, "flux", has_vae=False)
    for call in (lambda: without.decode(torch.zeros(1, 16, 1, 4, 4)),
                 lambda: without.encode_video(torch.zeros(1, 3, 1, 32, 32)),
                 lambda: without.encode_image(torch.zeros(1, 3, 1, 32, 32))):
        with pytest.raises(ValueError, match="no VAE: load one"):
            call()
    with pytest.raises(ValueError, match="output_type must be one of pt, np, pil, float"):
        flux_codec.decode(torch.zeros(1, 16, 1, 4, 4), "latent")
    with pytest.raises(ValueError, match="8k\\+1 frames .* got 4: drop 3 frame\\(s\\) or add 5"):
        flux_codec.encode_video(torch.zeros(1, 3, 4, 32, 32))
    assert FRAME_TYPES == ("pt", "np", "pil", "float")
    assert flux_codec.device == torch.device("cpu") and LatentCodec(flux_codec.memory, "flux", "meta").device.type == "meta"
