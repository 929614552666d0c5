"""The two DiTs against the official forward passes (fixtures) and the official key tables."""
import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pyramid_core.models.attention import TokenLayout, masked_attention, segmented_attention
from pyramid_core.settings import ATTENTION_MODES
from pyramid_core.models.dit import DiTSettings, configure_dit
from pyramid_core.models.flux import PyramidFluxTransformer
from pyramid_core.models.mmdit import PyramidMMDiT
from tests.helpers import TINY_DIT_CLASSES as MODEL_CLASSES, build_tiny
from tests.reference import FIXTURES, assert_matches, case, case_ids, model_dir, tensors


# released config.json values (FACTS 1.4) + the loader-only arguments of the official pipeline
REAL_CONFIGS = {
    "flux": dict(
        attention_head_dim=64, axes_dims_rope=[16, 24, 24], in_channels=64, interp_condition_pos=True,
        joint_attention_dim=4096, num_attention_heads=30, num_layers=8, num_single_layers=16, patch_size=1,
        pooled_projection_dim=768, use_flash_attn=False, use_temporal_causal=True,
    ),
    "mmdit": dict(
        attention_head_dim=64, caption_projection_dim=1536, in_channels=16, joint_attention_dim=4096,
        max_num_frames=200, num_attention_heads=24, num_layers=24, patch_size=2, pooled_projection_dim=2048,
        pos_embed_max_size=192, pos_embed_type="sincos", qk_norm="rms_norm", sample_size=128,
        use_t5_mask=True, add_temp_pos_embed=True, temp_pos_embed_type="rope", use_temporal_causal=True,
        interp_condition_pos=True,
    ),
}
KEY_TABLES = {"flux": "pyramid_flow_keys_flux.tsv", "mmdit": "pyramid_flow_keys_mmdit.tsv"}


@pytest.fixture(scope="module")
def tiny_models():
    return {name: build_tiny(name) for name in MODEL_CLASSES}


@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("case_id", case_ids("dit_forward"))
def test_dit_forward_matches_official(tiny_models, case_id, mode):
    entry = case(case_id)
    t = tensors(case_id)
    dit = tiny_models[entry["model"]]
    configure_dit(dit, attention_mode=mode)
    clips = [t[name] for name in entry["inputs"]["sample"][0]]
    with torch.no_grad():
        out = dit(clips, t["timestep_ratio"], t["encoder_hidden_states"], t["encoder_attention_mask"], t["pooled_projections"])
    assert_matches(out, t["output.0"], entry["tolerance"], case_id)


def test_segmented_path_never_builds_the_dense_mask(tiny_models, monkeypatch):
    def refuse(self):
        raise AssertionError("dense mask built on the fused path")

    monkeypatch.setattr(TokenLayout, "dense_mask", refuse)
    case_id = "miniflux_tiny/dit/t2v_unit2_stage2_step1"
    entry, t = case(case_id), tensors(case_id)
    dit = tiny_models["miniflux_tiny"]
    configure_dit(dit, attention_mode="segmented")
    with torch.no_grad():
        dit([t[n] for n in entry["inputs"]["sample"][0]], t["timestep_ratio"], t["encoder_hidden_states"],
            t["encoder_attention_mask"], t["pooled_projections"])


def test_segmented_equals_masked_on_real_tokens():
    """Random q/k/v, ragged text padding per sample, several frames of unequal size."""
    gen = torch.Generator().manual_seed(7)
    text_len, frames = 12, [0] * 5 + [1] * 7 + [2] * 3 + [3] * 9
    text_mask = torch.zeros(3, text_len, dtype=torch.bool)
    for b, n in enumerate([12, 5, 5]):
        text_mask[b, :n] = True
    layout = TokenLayout(text_mask, torch.tensor(frames))
    q, k, v = (torch.randn(3, 2, text_len + len(frames), 8, generator=gen, dtype=torch.float64) for _ in range(3))
    reference = masked_attention(q, k, v, layout)
    fused = segmented_attention(q, k, v, layout)
    real = torch.cat([text_mask, torch.ones(3, len(frames), dtype=torch.bool)], dim=1)
    assert torch.allclose(fused[real[:, None, :, None].expand_as(fused)], reference[real[:, None, :, None].expand_as(fused)], atol=1e-12)
    # padded text queries see only padded text, as official
    assert torch.allclose(fused[1:, :, 5:text_len], reference[1:, :, 5:text_len], atol=1e-12)


def test_dense_mask_is_the_official_rule():
    layout = TokenLayout(torch.tensor([[True, False]]), torch.tensor([0, 1]))
    mask = layout.dense_mask()[0, 0]
    expected = torch.tensor(
        [  # keys: text, pad, frame0, frame1
            [1, 0, 1, 0],  # valid text sees text + frame 0
            [0, 1, 0, 0],  # padded text sees padded text only
            [1, 0, 1, 0],  # frame 0
            [1, 0, 1, 1],  # frame 1 sees everything before it
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def _official_keys(table: str) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (Path(FIXTURES).parents[1] / "reference" / table).read_text().splitlines():
        if line.startswith("#") or "\t" not in line:
            continue
        name, shape = line.split("\t")[:2]
        keys[name] = tuple(int(x) for x in re.findall(r"\d+", shape))
    return keys


@pytest.mark.parametrize("family", ["flux", "mmdit"])
def test_real_size_model_has_the_official_keys(family):
    cls = PyramidFluxTransformer if family == "flux" else PyramidMMDiT
    with torch.device("meta"):
        dit = cls(**REAL_CONFIGS[family])
    ours = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    official = _official_keys(KEY_TABLES[family])
    assert ours == official


def test_mmdit_position_table_is_the_stored_one():
    stored = load_file(str(model_dir("sd3_tiny") / "diffusion_transformer_384p" / "diffusion_pytorch_model.safetensors"))
    config = json.loads((model_dir("sd3_tiny") / "diffusion_transformer_384p" / "config.json").read_text())
    dit = PyramidMMDiT(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert torch.equal(dit.pos_embed.pos_embed, stored["pos_embed.pos_embed"])


def test_mmdit_rejects_a_grid_beyond_its_position_table(tiny_models):
    dit = tiny_models["sd3_tiny"]
    too_big = torch.zeros(1, 16, 1, 2 * 26, 2 * 26)  # 26 tokens per side > 24
    with pytest.raises(ValueError, match="smaller resolution"):
        dit([too_big], torch.ones(1), torch.zeros(1, 4, 64), None, torch.zeros(1, 144))


@pytest.mark.parametrize("model", list(MODEL_CLASSES))
def test_fused_path_reads_the_layout_from_the_device_once_per_forward(tiny_models, model, monkeypatch):
    """Frame segments and text-mask groups are computed once, not in every block (no per-block device sync)."""
    calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or original(self))
    case_id = f"{model}/dit/t2v_unit2_stage2_step1"
    entry, t = case(case_id), tensors(case_id)
    dit = tiny_models[model]
    configure_dit(dit, attention_mode="segmented")
    with torch.no_grad():
        dit([t[n] for n in entry["inputs"]["sample"][0]], t["timestep_ratio"], t["encoder_hidden_states"],
            t["encoder_attention_mask"], t["pooled_projections"])
    assert len(calls) <= 2, f"{len(calls)} tolist() calls in one forward"


def test_configure_dit_is_the_one_setter_of_the_settings(tiny_models):
    dit = copy.deepcopy(tiny_models["sd3_tiny"])
    with pytest.raises(AttributeError, match=r"configure_dit\(model, attention_mode="):
        dit.attention_mode = "masked"
    configure_dit(dit, attention_mode="masked", residual_dtype=torch.float32)
    configure_dit(dit, attention_backend="sdpa")  # keywords left out keep their values
    assert (dit.attention_mode, dit.attention_backend, dit.residual_dtype) == ("masked", "sdpa", torch.float32)
    configure_dit(dit, residual_dtype=None)  # None: automatic again
    assert dit.settings == DiTSettings(attention_mode="masked")
    with pytest.raises(ValueError, match="segmented"):
        configure_dit(dit, attention_mode="dense")
    with pytest.raises(ValueError, match="residual dtype"):
        configure_dit(dit, residual_dtype=torch.float64)
    with pytest.raises(TypeError, match="Pyramid Flow DiT"):
        configure_dit(torch.nn.Linear(2, 2), attention_mode="masked")


def _forward(dit, case_id):
    entry, t = case(case_id), tensors(case_id)
    with torch.no_grad():
        return dit([t[n] for n in entry["inputs"]["sample"][0]], t["timestep_ratio"], t["encoder_hidden_states"],
                   t["encoder_attention_mask"], t["pooled_projections"])


@pytest.mark.parametrize("step", ["t2v_unit2_stage2_step1", "t2v_unit2_stage0_step0"])  # two history clips each
@pytest.mark.parametrize("model", list(MODEL_CLASSES))
def test_last_block_computes_only_the_current_clip_and_equals_the_full_block(tiny_models, model, step, monkeypatch):
    """The read-out keeps the current clip only: the last block's MLP sees just its tokens, with the same result.

    Measured on both tiny models over every DiT fixture case and both attention modes (fp32, CPU): bit-identical
    in 20 of 32, else at most 2.0e-7 of max|out| (GEMMs over fewer rows round differently); bound 1e-6.
    """
    case_id = f"{model}/dit/{step}"
    dit = copy.deepcopy(tiny_models[model])
    configure_dit(dit, attention_mode="segmented")
    last = dit.blocks[-1]
    mlp = last.proj_mlp if model == "miniflux_tiny" else last.ff
    rows = []
    mlp.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[1]))
    t = tensors(case_id)
    clips = [t[n] for n in case(case_id)["inputs"]["sample"][0]]
    video = sum(c.shape[2] * (c.shape[3] // 2) * (c.shape[4] // 2) for c in clips)
    pruned = _forward(dit, case_id)
    assert len(clips) == 3 and rows == [dit.current_token_count(clips)] and rows[0] < video

    unpruned_forward = type(last).forward
    monkeypatch.setattr(last, "forward", lambda **kwargs: unpruned_forward(last, **{**kwargs, "keep_last": None}))
    full = _forward(dit, case_id)
    text = t["encoder_hidden_states"].shape[1] if model == "miniflux_tiny" else 0  # the joint stream holds the text
    assert rows[1:] == [video + text]
    assert (pruned - full).abs().max().item() <= 1e-6 * full.abs().max().item()


def test_rope_tables_are_built_once_per_shape_set(tiny_models, monkeypatch):
    """Steps of one stage share the clip shapes: one host build, then cached (bounded, cleared on new settings)."""
    import pyramid_core.models.dit as dit_module

    built = []
    original = dit_module.rope_tables
    monkeypatch.setattr(dit_module, "rope_tables", lambda *args: built.append(args[0]) or original(*args))
    dit = copy.deepcopy(tiny_models["miniflux_tiny"])
    stage = [torch.zeros(2, 16, 1, 4, 4), torch.zeros(2, 16, 1, 8, 8)]
    first = dit.rotary_tables(stage, "thw", dit.axes_dims_rope)
    again = dit.rotary_tables([c + 1 for c in stage], "thw", dit.axes_dims_rope)  # the next step: same shapes
    assert len(built) == 1 and torch.equal(first.cos, again.cos) and torch.equal(first.sin, again.sin)
    fresh = original([c.shape for c in stage], 2, "thw", dit.axes_dims_rope)
    assert first.cos.shape == (4 + 16, 1, 64) and torch.equal(first.cos[:, 0], fresh[0])
    for size in range(6):  # more shape sets than the cache holds: the oldest go first
        dit.rotary_tables([torch.zeros(2, 16, 1, 2 * size + 2, 4)], "thw", dit.axes_dims_rope)
    assert len(dit._rope_cache) == dit_module.ROPE_CACHE_SIZE
    dit.rotary_tables(stage, "thw", dit.axes_dims_rope)
    assert len(built) == 1 + 6 + 1, "evicted, so built again"
    configure_dit(dit, attention_mode="masked")
    assert not dit._rope_cache
    case_id = "miniflux_tiny/dit/t2v_unit2_stage2_step1"
    entry = case(case_id)
    first_out, second_out = _forward(dit, case_id), _forward(dit, case_id)
    assert len(built) == 1 + 6 + 1 + 1 and torch.equal(first_out, second_out)
    assert_matches(second_out, tensors(case_id)["output.0"], entry["tolerance"], case_id)
