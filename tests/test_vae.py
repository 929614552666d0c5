"""Causal video VAE and latent format: parity with the official fixtures, streaming and chunking."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from pyramid_core.latent_format import (
    decode_latents,
    denormalize_latents,
    frames_to_float,
    frames_to_uint8,
    latent_factors,
    normalize_latents,
)
from pyramid_core.models import operations
from pyramid_core.models import vae_blocks as vae_module  # owns NORM_SLICE_ELEMENTS (monkeypatched below)
from pyramid_core.models.vae import CausalVideoVAE
from tests.reference import FIXTURES, assert_frames_match, assert_matches, case, case_ids, model_dir, tensors

KEY_TABLE = FIXTURES.parents[1] / "reference" / "pyramid_flow_keys_vae.tsv"
FAMILY = {"miniflux_tiny": "flux", "sd3_tiny": "mmdit"}


def vae_config(model: str) -> dict:
    cfg = json.loads((model_dir(model) / "causal_video_vae" / "config.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}  # what the loader passes


def load_vae(model: str) -> CausalVideoVAE:
    vae = CausalVideoVAE(**vae_config(model)).eval()
    state = load_file(str(model_dir(model) / "causal_video_vae" / "diffusion_pytorch_model.safetensors"))
    vae.load_state_dict(state, strict=True)
    return vae


@pytest.fixture(scope="module")
def vae() -> CausalVideoVAE:
    return load_vae("miniflux_tiny")


def smooth_latents(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(shape, generator=g)


# ------------------------------------------------------------------------------- structure


def test_real_config_matches_official_key_table():
    lines = [ln for ln in KEY_TABLE.read_text().splitlines() if ln and not ln.startswith("# ")]
    total = int(lines[-1].split("\t")[1])
    expected = {k: tuple(int(n) for n in re.findall(r"\d+", s)) for k, s in (ln.split("\t") for ln in lines[:-1])}
    real = dict(vae_config("miniflux_tiny"), encoder_block_out_channels=[128, 256, 512, 512],
                decoder_block_out_channels=[128, 256, 512, 512], encoder_norm_num_groups=32,
                decoder_norm_num_groups=32)
    with torch.device("meta"):
        model = CausalVideoVAE(**real)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert sum(v.numel() for v in model.state_dict().values()) == total == 335_402_067


def test_config_errors_name_the_problem():
    with pytest.raises(TypeError, match="unknown config keys"):
        CausalVideoVAE(**vae_config("miniflux_tiny"), latent_channels=16)
    with pytest.raises(ValueError, match="interpolate=False"):
        CausalVideoVAE(**dict(vae_config("miniflux_tiny"), interpolate=True))
    CausalVideoVAE(**dict(vae_config("miniflux_tiny"), _class_name="CausalVideoVAE"))  # private keys ignored


# ------------------------------------------------------------------------------- fixture parity


@pytest.mark.parametrize("case_id", case_ids("vae_encode"))
def test_encode_matches_official(vae, case_id):
    c, t = case(case_id), tensors(case_id)
    kwargs = dict(temporal_chunk=True, window_size=8) if "temporal_chunk=True" in c["call"] else {}
    posterior = vae.encode(t["x"], **kwargs)
    for name in ("mean", "std", "logvar"):
        assert_matches(getattr(posterior, name), t[name], c["tolerance"], f"{case_id}:{name}")


@pytest.mark.parametrize("case_id", case_ids("vae_decode"))
def test_decode_matches_official(vae, case_id):
    c, t = case(case_id), tensors(case_id)
    chunked = "temporal_chunk=True" in c["call"]
    tile = c.get("tiling", {}).get("tile_sample_min_size", 256)
    out = vae.decode(t["z"], temporal_chunk=chunked, window_size=1, tile_sample_min_size=tile)
    assert_matches(out, t["sample"], c["tolerance"], case_id)


@pytest.mark.parametrize("case_id", case_ids("pipeline_decode_latent"))
def test_decode_latents_matches_official(vae, case_id):
    c, t = case(case_id), tensors(case_id)
    model = vae if c["model"] == "miniflux_tiny" else load_vae(c["model"])
    family = FAMILY[c["model"]]
    factors = latent_factors(family)
    assert factors.image_shift == c["constants"]["vae_shift_factor"]
    assert factors.image_scale == c["constants"]["vae_scale_factor"]
    assert factors.video_scale == c["constants"]["vae_video_scale_factor"]
    latents = t["latents"]
    before = latents.clone()
    frames = decode_latents(model, latents, family, save_memory=True)
    assert torch.equal(latents, before)
    assert_frames_match(frames, t["frames"], case_id)


# ------------------------------------------------------------------------------- streaming / chunking


@pytest.mark.parametrize("tile", [32, 256], ids=["tiled", "untiled"])
@pytest.mark.parametrize("window", [1, 2])
def test_streaming_decode_equals_decode(vae, tile, window):
    z = smooth_latents((1, 16, 4, 8, 8), seed=7)
    expected = vae.decode(z, temporal_chunk=True, window_size=window, tile_sample_min_size=tile)
    for order in ("tile", "chunk"):
        got: list[tuple[int, torch.Tensor]] = []
        out = vae.decode_to_host(z, temporal_chunk=True, window_size=window, tile_sample_min_size=tile,
                                 order=order, frame_callback=lambda s, f: got.append((s, f)))
        assert out.device.type == "cpu"
        assert torch.equal(out, expected), order
        starts = [s for s, _ in got]
        assert starts == sorted(starts) and starts[0] == 0
        assert torch.equal(torch.cat([f for _, f in got], dim=2), expected)
    if tile == 32:
        assert len(got) == (3 if window == 1 else 2)  # chunk order emits frames chunk by chunk


def test_unchunked_decode_equals_chunked(vae):
    z = smooth_latents((1, 16, 4, 4, 4), seed=3)
    whole = vae.decode(z, temporal_chunk=False)
    for window in (1, 2, 3):
        chunked = vae.decode(z, temporal_chunk=True, window_size=window)
        assert (chunked - whole).abs().max().item() < 1e-5 * whole.abs().max().item()


def test_chunked_encode_equals_unchunked(vae):
    x = torch.sin(torch.linspace(0, 20, 3 * 17 * 32 * 32)).reshape(1, 3, 17, 32, 32)
    whole = vae.encode(x).mean
    chunked = vae.encode(x, temporal_chunk=True, window_size=8).mean
    assert whole.shape == (1, 16, 3, 4, 4)
    assert (chunked - whole).abs().max().item() < 1e-5 * whole.abs().max().item()
    with pytest.raises(ValueError, match="8k\\+1 frames"):
        vae.encode(x[:, :, :16], temporal_chunk=True, window_size=8)
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(x, temporal_chunk=True, window_size=4)


def test_frame_sliced_group_norm_is_exact(vae, monkeypatch):
    z = smooth_latents((1, 16, 3, 4, 4), seed=13)
    whole = vae.decode(z)
    monkeypatch.setattr(vae_module, "NORM_SLICE_ELEMENTS", 1)  # one frame per group-norm step
    assert torch.equal(vae.decode(z), whole)


def test_decode_rejects_wrong_layout(vae):
    with pytest.raises(ValueError, match=r"\[B, 16, frames, height, width\]"):
        vae.decode(torch.zeros(1, 4, 2, 4, 4))


def test_bf16_decode_tracks_fp32(vae):
    z = smooth_latents((1, 16, 2, 4, 4), seed=5)
    ref = vae.decode(z)
    half = load_vae("miniflux_tiny").to(torch.bfloat16)
    out = half.decode(z)  # fp32 input is cast to the weights' dtype
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


# ------------------------------------------------------------------------------- posterior / latent format


def test_posterior_sample_uses_global_rng(vae):
    x = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    posterior = vae.encode(x)
    torch.manual_seed(1234)
    sample = posterior.sample()
    torch.manual_seed(1234)
    expected = posterior.mean + posterior.std * torch.randn(posterior.mean.shape)
    assert torch.equal(sample, expected)
    g = torch.Generator().manual_seed(9)
    assert torch.equal(posterior.sample(g), posterior.mean + posterior.std * torch.randn(
        posterior.mean.shape, generator=torch.Generator().manual_seed(9)))


@pytest.mark.parametrize("family", ["flux", "mmdit"])
def test_latent_normalisation_roundtrip_without_mutation(family):
    z = smooth_latents((1, 16, 3, 2, 2), seed=11)
    keep = z.clone()
    norm = normalize_latents(z, family)
    f = latent_factors(family)
    assert torch.equal(norm[:, :, :1], (z[:, :, :1] - f.image_shift) * f.image_scale)
    assert torch.equal(norm[:, :, 1:], (z[:, :, 1:] - f.video_shift) * f.video_scale)
    norm_keep = norm.clone()
    back = denormalize_latents(norm, family)
    assert torch.equal(norm, norm_keep) and torch.equal(z, keep)
    assert torch.allclose(back, z, atol=1e-6)
    single = normalize_latents(z[:, :, :1], family)  # a 1-frame latent is an image latent
    assert torch.equal(single, norm[:, :, :1])
    with pytest.raises(ValueError, match="unknown model family"):
        normalize_latents(z, "sdxl")


def test_frame_conversions():
    x = torch.tensor([-1.5, -1.0, -0.2, 0.0, 0.003, 1.0, 2.0]).view(1, 1, 7, 1, 1).expand(1, 3, 7, 1, 1)
    u8 = frames_to_uint8(x)
    assert u8.shape == (7, 1, 1, 3) and u8.dtype == torch.uint8
    assert u8[:, 0, 0, 0].tolist() == [0, 0, 102, 127, 127, 255, 255]  # truncation, not rounding
    fl = frames_to_float(x)
    assert fl.dtype == torch.float32 and fl[:, 0, 0, 0].tolist() == pytest.approx([0, 0, 0.4, 0.5, 0.5015, 1, 1])
    video = torch.arange(2 * 3 * 2 * 1 * 1, dtype=torch.float32).view(2, 3, 2, 1, 1) / 12
    assert torch.equal(frames_to_float(video)[3, 0, 0], (video[1, :, 1, 0, 0] / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("channels, stride", [(8, (1, 1, 1)), (16, (2, 2, 2))])
def test_conv3d_runs_onednn_on_narrow_cpu_layers(monkeypatch, channels, stride):
    """Narrow fp32 layers (torch alone would pick the im2col path) call oneDNN and equal ATen's result."""
    torch.manual_seed(0)
    conv = operations.Conv3d(channels, 8, 3, stride=stride)
    x = torch.randn(1, channels, 5, 34, 30)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    with torch.no_grad():
        reference = conv(x)  # ATen's own convolution: the module respects mkldnn being switched off
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    calls = []
    onednn = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: calls.append(a[0].shape) or onednn(*a))
    with torch.no_grad():
        out = conv(x)
    assert calls == [x.shape]
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        conv.to(torch.bfloat16)(x.bfloat16())  # other dtypes keep torch's own choice
    assert len(calls) == 1
