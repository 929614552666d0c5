"""The fused small ops of the DiT blocks against the official formulas: q/k RMSNorm and RoPE."""
import pytest
import torch

from pyramid_core.models import layers
from pyramid_core.models.layers import RMSNorm, RotaryTables, apply_rope_, clip_positions, rope_cos_sin, rope_tables

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 16, 2, 4, 6), (1, 16, 1, 8, 12), (1, 16, 1, 16, 24)]  # history at lower resolution, then current


def official_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, cast_to_input: bool) -> torch.Tensor:
    """diffusers' RMSNorm: fp32 statistics, half weights take the result in their dtype; fp8 weights widen."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    out = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        out = out.to(weight.dtype) * weight
    else:
        out = out * weight.to(out.dtype)
    return out.to(x.dtype) if cast_to_input else out


def official_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The official rotation of x [B, H, L, D]: a 2x2 matrix [[cos, -sin], [sin, cos]] per pair (2k, 2k+1)."""
    matrix = torch.stack([torch.stack([cos, -sin], dim=-1), torch.stack([sin, cos], dim=-1)], dim=-2)
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = matrix[..., 0] * pairs[..., 0] + matrix[..., 1] * pairs[..., 1]
    return out.reshape(x.shape).to(x.dtype)


def ulps(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference in units of the dtype's epsilon relative to max|expected|."""
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / (torch.finfo(expected.dtype).eps * expected.double().abs().max().item())


@pytest.mark.parametrize("cast_to_input", [False, True])
@pytest.mark.parametrize("weight_dtype", DTYPES + [torch.float8_e4m3fn])
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("fused", [True, False])
def test_rms_norm_is_the_official_formula(monkeypatch, fused, x_dtype, weight_dtype, cast_to_input):
    """Every dtype pairing keeps the official result dtype; values within one rounding (bit-equal on CPU today)."""
    if fused and not hasattr(torch.nn.functional, "rms_norm"):
        pytest.skip("torch < 2.4 has no fused rms_norm")
    monkeypatch.setattr(layers, "_FUSED_RMS_NORM", fused)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 40, 3, 64, generator=gen) * 4).to(x_dtype)
    norm = RMSNorm(64, 1e-6, cast_to_input=cast_to_input)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=gen) + 0.5)
    norm.to(weight_dtype)
    expected = official_rms_norm(x, norm.weight, 1e-6, cast_to_input)
    actual = norm(x)
    assert actual.dtype == expected.dtype
    assert ulps(actual, expected) <= 1.0
    if not fused:  # the fallback (torch < 2.4) is the formula op by op: bit-identical
        assert torch.equal(actual, expected)


def test_rope_tables_repeat_each_angle_for_its_channel_pair():
    positions, _ = clip_positions(SHAPES, 2)
    cos, sin = rope_cos_sin(positions, [16, 24, 24])
    tables = rope_tables(SHAPES, 2, "thw", [16, 24, 24])
    assert tables.shape == (2, positions.shape[0], 64) and tables.dtype == torch.float32
    assert torch.equal(tables[0, :, 0::2], cos) and torch.equal(tables[0, :, 1::2], cos)
    assert torch.equal(tables[1, :, 0::2], sin) and torch.equal(tables[1, :, 1::2], sin)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_rope_in_place_is_the_official_rotation(dtype):
    """Bit-identical to the official pair rotation (fp32 math, one rounding to x's dtype), on a view too."""
    positions, _ = clip_positions(SHAPES, 2)
    cos, sin = rope_cos_sin(positions, [16, 24, 24])
    rope = RotaryTables.from_host(rope_tables(SHAPES, 2, "thw", [16, 24, 24]), "cpu")
    text, video = 5, positions.shape[0]
    gen = torch.Generator().manual_seed(1)
    joint = (torch.randn(2, text + video, 3, 64, generator=gen) * 3).to(dtype)  # [B, L, H, D]
    expected = official_rope(joint[:, text:].transpose(1, 2), cos, sin).transpose(1, 2)
    before = joint.clone()

    result = apply_rope_(joint[:, text:], rope)

    assert torch.equal(joint[:, text:], expected) and torch.equal(result, expected)
    assert torch.equal(joint[:, :text], before[:, :text]), "the text part is left alone"
    assert not torch.equal(joint, before)
