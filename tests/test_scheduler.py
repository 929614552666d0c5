"""Scheduler, block noise and pyramid resampling against the official fixtures (exact parity expected)."""
from __future__ import annotations

import re

import pytest
import torch

from pyramid_core.scheduler import (
    BLOCK_NOISE_SCALE_TRIL,
    PyramidFlowScheduler,
    StageSchedule,
    block_noise_covariance,
    downsample_2x,
    euler_step,
    nearest_upsample_2x,
    sample_block_noise,
)
from tests.reference import assert_matches, case, case_ids, tensors

SCHED = "common/scheduler"
E2E_CASES = case_ids("e2e_t2v") + case_ids("e2e_i2v")


@pytest.fixture(autouse=True)
def _keep_global_rng():
    # These tests reseed the global RNG; give the rest of the suite its state back.
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.fixture(scope="module")
def scheduler() -> PyramidFlowScheduler:
    return PyramidFlowScheduler()


def _seeds(entry: dict) -> tuple[int, int]:
    """(global seed, generator seed) of an e2e case, read from its recorded call."""
    global_seed = int(re.search(r"manual_seed\((\d+)\)", entry["call"]["before_call"]).group(1))
    gen_seed = int(re.search(r"manual_seed\((\d+)\)", entry["call"]["kwargs"]["generator"]).group(1))
    return global_seed, gen_seed


# ------------------------------------------------------------------------------------ tables


def test_config_defaults_match_fixture(scheduler):
    cfg = case(SCHED)["scheduler"]["config"]
    assert scheduler.num_train_timesteps == cfg["num_train_timesteps"]
    assert scheduler.shift == cfg["shift"]
    assert scheduler.stages == cfg["stages"]
    assert list(scheduler.stage_range) == cfg["stage_range"]
    assert scheduler.gamma == cfg["gamma"]


def test_per_stage_tables_are_exact(scheduler):
    ref = tensors(SCHED)
    tol = case(SCHED)["tolerance"]
    for k in range(3):
        for name, table in (("timesteps_per_stage", scheduler.timesteps_per_stage), ("sigmas_per_stage", scheduler.sigmas_per_stage)):
            expected = ref[f"{name}.{k}"]
            assert table[k].dtype == torch.float64
            assert_matches(table[k], expected, tol, f"{name}.{k}")
            assert torch.equal(table[k], expected), f"{name}.{k} not bit-identical"


def test_stage_sigmas_and_ratios_are_exact(scheduler):
    rec = case(SCHED)["scheduler"]
    assert list(scheduler.start_sigmas) == rec["start_sigmas"]
    assert list(scheduler.end_sigmas) == rec["end_sigmas"]
    assert list(scheduler.ori_start_sigmas) == rec["ori_start_sigmas"]
    assert [list(r) for r in scheduler.timestep_ratios] == rec["timestep_ratios"]


@pytest.mark.parametrize("steps", [20, 10, 3])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_stage_schedule_matches_set_timesteps(scheduler, steps, stage):
    ref = tensors(SCHED)
    tol = case(SCHED)["tolerance"]
    sched = scheduler.stage_schedule(steps, stage)
    assert isinstance(sched, StageSchedule) and len(sched) == steps
    assert sched.timesteps.dtype == torch.float64 and sched.sigmas.dtype == torch.float64
    assert sched.sigmas.shape == (steps + 1,) and sched.sigmas[-1].item() == 0.0
    prefix = f"steps_{steps}x{steps}x{steps}.stage{stage}"
    for field in ("timesteps", "sigmas"):
        expected = ref[f"{prefix}.{field}"]
        assert_matches(getattr(sched, field), expected, tol, f"{prefix}.{field}")
        assert torch.equal(getattr(sched, field), expected), f"{prefix}.{field} not bit-identical"
    # Iteration hands out consecutive sigma pairs; no hidden state between passes.
    pairs = [(s.sigma.item(), s.sigma_next.item()) for s in sched]
    assert pairs == list(zip(sched.sigmas[:-1].tolist(), sched.sigmas[1:].tolist()))
    assert [s.index for s in sched] == list(range(steps))


def test_single_step_schedule(scheduler):
    sched = scheduler.stage_schedule(1, 2)
    assert sched.timesteps.tolist() == [386.0] and sched.sigmas.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("case_id", [SCHED] + E2E_CASES)
def test_stage_jump_coefficients_match_every_recorded_jump(scheduler, case_id):
    jumps = case(case_id)["stage_jumps"]
    assert jumps
    for jump in jumps:
        alpha, beta = scheduler.stage_jump_coefficients(jump["stage"])
        assert (alpha, beta) == (jump["alpha"], jump["beta"]), jump
        assert 1 - scheduler.ori_start_sigmas[jump["stage"]] == jump["ori_sigma"]


def test_bad_arguments_name_the_fix(scheduler):
    with pytest.raises(ValueError, match="stage must be an integer"):
        scheduler.stage_schedule(10, 3)
    with pytest.raises(ValueError, match="positive integer"):
        scheduler.stage_schedule(0, 0)
    with pytest.raises(ValueError, match="no stage jump"):
        scheduler.stage_jump_coefficients(0)
    with pytest.raises(ValueError, match="stages \\+ 1"):
        PyramidFlowScheduler(stages=2)
    with pytest.raises(ValueError, match="even"):
        sample_block_noise(1, 1, 1, 3, 4)
    with pytest.raises(ValueError, match="positive integer"):
        sample_block_noise(0, 1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"\[B,C,T,H,W\]"):
        nearest_upsample_2x(torch.zeros(1, 2, 3, 4))


# ------------------------------------------------------------------------------- Euler step


def test_bf16_euler_step_matches_official_rounding():
    sched = PyramidFlowScheduler().stage_schedule(20, 0)
    sigma, sigma_next = sched.sigmas[0], sched.sigmas[1]
    gen = torch.Generator().manual_seed(7)
    sample = torch.randn(2, 16, 1, 8, 8, generator=gen).to(torch.bfloat16)
    v = (torch.randn(2, 16, 1, 8, 8, generator=gen) * 3).to(torch.bfloat16)

    ours = euler_step(sample, v, sigma, sigma_next)
    # The official expression, literally: a 0-dim float64 difference times a bf16 tensor.
    official = (sample.to(torch.float32) + (sigma_next - sigma) * v).to(v.dtype)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, official)
    # The difference is rounded to bf16 (-0.0525789 -> -0.0524902) and the product is a bf16 product.
    dt = (sigma_next - sigma).to(torch.bfloat16)
    assert dt.item() == pytest.approx(-0.0524902, abs=1e-7)
    manual = (sample.float() + (dt * v).float()).to(torch.bfloat16)
    assert torch.equal(ours, manual)
    # ...which really differs from an fp32 product: the test would notice a non-official step.
    fp32_step = (sample.float() + (sigma_next - sigma).float() * v.float()).to(torch.bfloat16)
    assert not torch.equal(ours, fp32_step)
    # Python-float sigmas give the same result as the schedule's 0-dim tensors.
    assert torch.equal(euler_step(sample, v, sigma.item(), sigma_next.item()), ours)


def test_fp32_euler_step_matches_official():
    sched = PyramidFlowScheduler().stage_schedule(3, 1)
    x, v = torch.randn(1, 4, 1, 4, 4), torch.randn(1, 4, 1, 4, 4)
    out = euler_step(x, v, sched.sigmas[1], sched.sigmas[2])
    assert out.dtype == torch.float32
    assert torch.equal(out, x + (sched.sigmas[2] - sched.sigmas[1]) * v)


# ------------------------------------------------------------------------------ block noise


def test_scale_tril_is_bit_identical_to_fixture():
    ref = tensors(SCHED)
    assert torch.equal(block_noise_covariance(), ref["block_noise_covariance"])
    assert BLOCK_NOISE_SCALE_TRIL.dtype == torch.float32
    assert torch.equal(BLOCK_NOISE_SCALE_TRIL, ref["block_noise_scale_tril"])
    assert BLOCK_NOISE_SCALE_TRIL[3, 3].item() == 2.0**-12


def _per_block_loop_state(draws: list[dict], global_seed: int) -> torch.Tensor:
    """Global RNG state after the official consumption: per-block torch.empty(4).normal_() calls."""
    torch.manual_seed(global_seed)
    for draw in draws:
        if draw["source"] != "global":
            continue
        if "num_blocks" in draw:
            for _ in range(draw["num_blocks"]):
                torch.empty(4).normal_()
        else:
            torch.randn(draw["args"]["shape"])
    return torch.get_rng_state()


@pytest.mark.parametrize("case_id", E2E_CASES)
def test_block_noise_replays_recorded_draws(case_id):
    entry, ref = case(case_id), tensors(case_id)
    global_seed, gen_seed = _seeds(entry)
    draws = sorted(entry["random_draws"], key=lambda d: d["order"])
    n_block_draws = 0
    torch.manual_seed(global_seed)
    for draw in draws:
        expected = ref[draw["tensor"]]
        if draw["source"] == "generator":
            got = torch.randn(draw["args"]["shape"], generator=torch.Generator().manual_seed(gen_seed))
        elif "num_blocks" in draw:
            a = draw["args"]
            got = sample_block_noise(a["bs"], a["ch"], a["temp"], a["height"], a["width"])
            assert got.dtype == torch.float32 and got.device.type == "cpu"
            n_block_draws += 1
        else:  # i2v: VAE posterior sample from the global RNG
            got = torch.randn(draw["args"]["shape"])
        assert torch.equal(got, expected), f"{case_id} {draw['tensor']}: max err {(got - expected).abs().max().item()}"
    assert n_block_draws >= 4
    state_after = torch.get_rng_state()
    assert torch.equal(state_after, _per_block_loop_state(draws, global_seed))


def test_vectorised_draw_equals_per_block_loop_on_larger_grids():
    shape = (2, 3, 3, 6, 10)  # 270 blocks: odd counts, non-square grid, B and T > 1
    blocks = 2 * 3 * 3 * 3 * 5
    torch.manual_seed(99)
    loop_eps = torch.stack([torch.empty(4).normal_() for _ in range(blocks)])
    loop_state = torch.get_rng_state()
    loop = (BLOCK_NOISE_SCALE_TRIL @ loop_eps.unsqueeze(-1)).squeeze(-1)
    loop = loop.view(2, 3, 3, 3, 5, 2, 2).permute(0, 1, 2, 3, 5, 4, 6).reshape(shape)
    torch.manual_seed(99)
    ours = sample_block_noise(*shape)
    assert torch.equal(torch.get_rng_state(), loop_state)
    assert torch.equal(ours, loop)
    # Block layout: each aligned 2x2 block sums to ~0 (singular covariance; only L[3,3]*eps4 remains).
    sums = ours.view(2, 3, 3, 3, 2, 5, 2).sum(dim=(-1, -3))
    assert sums.abs().max().item() < 2e-3
    # Neighbouring blocks are independent: shifting the grid by one breaks the zero sums.
    shifted = ours[..., 1:5, 1:9].reshape(2, 3, 3, 2, 2, 4, 2).sum(dim=(-1, -3))
    assert shifted.abs().max().item() > 0.1


def test_block_noise_uses_given_generator_only():
    torch.manual_seed(5)
    global_before = torch.get_rng_state()
    with_gen = sample_block_noise(1, 2, 1, 4, 6, generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.get_rng_state(), global_before)
    torch.manual_seed(11)
    from_global = sample_block_noise(1, 2, 1, 4, 6)
    assert torch.equal(with_gen, from_global)


# ---------------------------------------------------------- resampling, jumps and Euler in the e2e trace


def _history(clean: list[torch.Tensor], unit: int, stage: int) -> list[torch.Tensor]:
    """Fixture README rule: frame u-1 at stage s, u-2 at s-1, ... (while >= 1), the rest at stage 0, oldest first."""
    items, ptr, s = [clean[stage][:, :, unit - 1 : unit]], 1, stage
    while ptr < unit:
        s = max(s - 1, 0)
        if s == 0:
            break
        ptr += 1
        items.append(clean[s][:, :, unit - ptr : unit - ptr + 1])
    if s == 0 and ptr < unit:
        items.append(clean[0][:, :, : unit - ptr])
    return list(reversed(items))


@pytest.mark.parametrize("case_id", E2E_CASES)
def test_e2e_trace_noise_pyramid_jumps_and_euler(scheduler, case_id):
    entry, ref = case(case_id), tensors(case_id)
    i2v = entry["kind"] == "e2e_i2v"
    block_draws = {(d["unit"], d["stage"]): d["tensor"] for d in entry["random_draws"] if "num_blocks" in d}
    initial = next(d["tensor"] for d in entry["random_draws"] if d["source"] == "generator")
    tol = entry["tolerance"]["latents"]

    # Initial noise -> stage-0 grid: bilinear halving x2, twice; t2v unit u takes frame u, i2v frame u-1.
    stage0_noise = downsample_2x(downsample_2x(ref[initial], 2.0), 2.0)
    generated = [ref["unit1.past.stage2.0"][:1]] if i2v else []
    for unit in entry["units"]:
        u = unit["unit"]
        frame = u - 1 if i2v else u
        assert torch.equal(stage0_noise[:, :, frame : frame + 1], ref[unit["latents_in"]]), f"unit {u} noise"

        # History pyramid: bilinear halving without the x2 factor, CFG-duplicated in the fixture.
        if u > 0:
            g = torch.cat(generated, dim=2)
            clean = [downsample_2x(downsample_2x(g)), downsample_2x(g), g]
            for s in range(3):
                expected = [ref[name] for name in unit["past_conditions_per_stage"][s]]
                ours = _history(clean, u, s)
                assert len(ours) == len(expected)
                for a, b in zip(ours, expected):
                    assert torch.equal(torch.cat([a, a]), b), f"unit {u} stage {s} history"

        guidance = 7.0 if unit["is_first_frame"] else 5.0
        trace = [t for t in entry["dit_trace"] if t["unit"] == u]
        for stage in range(3):
            calls = [t for t in trace if t["stage"] == stage]
            sched = scheduler.stage_schedule(len(calls), stage)
            x = ref[calls[0]["x_in"]][:1]
            if stage > 0:
                alpha, beta = scheduler.stage_jump_coefficients(stage)
                jumped = alpha * nearest_upsample_2x(ref[unit["stage_outputs"][stage - 1]]) + beta * ref[block_draws[(u, stage)]]
                assert torch.equal(jumped, x), f"unit {u} jump into stage {stage}"
            for step, call in zip(sched, calls):
                assert step.timestep.to(torch.float32).item() == call["timestep_ratio"][0]
                out = ref[call["dit_out"]]
                v = out[:1] + guidance * (out[1:] - out[:1])
                x = euler_step(x, v, step.sigma, step.sigma_next)
                nxt = calls[step.index + 1]["x_in"] if step.index + 1 < len(calls) else unit["stage_outputs"][stage]
                expected = ref[nxt][:1]
                assert_matches(x, expected, tol, f"unit {u} stage {stage} step {step.index}")
                assert torch.equal(x, expected)
                x = expected
        generated.append(ref[unit["stage_outputs"][2]])


def test_resamplers_shapes_and_dtype():
    x = torch.randn(2, 3, 4, 6, 10, dtype=torch.bfloat16)
    up = nearest_upsample_2x(x)
    assert up.shape == (2, 3, 4, 12, 20) and up.dtype == torch.bfloat16
    assert torch.equal(up[..., ::2, ::2], x) and torch.equal(up[..., 1::2, 1::2], x)
    down = downsample_2x(up.float(), scale=2.0)
    assert down.shape == (2, 3, 4, 6, 10)
    assert torch.equal(down, 2 * x.float())  # bilinear halving of a nearest 2x upsample is exact
