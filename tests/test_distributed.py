"""Several processes (pyramid_core.parallel) against one: CFG-parallel, sequence-parallel and both, on CPU with gloo.

Each world size is one fork of N processes that runs every check of that size: both DiT families, text- and
image-to-video, each rank's latents compared with one process's within fp32 tolerance (and the ranks with each
other, bit for bit). The DiTs are tiny and random with 6 heads (divisible by 2 and 3); the text has 7 tokens, so
most forwards' sequences do not divide by 3 and the shards end in padding. Bad input fails with clear errors.
"""
from __future__ import annotations

import io
import math
import os
import socket
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyramid_core import PyramidFlowPipeline, cli, settings
from pyramid_core.demo import DEMO_VARIANT
from pyramid_core.latents_file import load_latents
from pyramid_core.memory import MemoryManager
from pyramid_core.models.dit import configure_dit
from pyramid_core.models.flux import PyramidFluxTransformer
from pyramid_core.models.layers import frame_token_counts
from pyramid_core.models.mmdit import PyramidMMDiT
from pyramid_core.parallel import (
    Channel,
    LaunchEnv,
    ParallelGroups,
    ParallelPlan,
    PeerFailure,
    SequenceParallel,
    choose_plan,
    start_process_group,
    stop_process_group,
)
from pyramid_core.text import TextEmbeddings
from tests.helpers import run_cli
from tests.reference import model_dir

HEADS, TEXT_LEN, TEXT_DIM, POOLED_DIM = 6, 7, 32, 16
WIDTH, HEIGHT, TEMP = 128, 64, 3
TOLERANCE = 1e-5  # max |difference| relative to max |reference|: fp32 rounding of a differently split batch
START = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
CLI_MODEL = str(model_dir("miniflux_tiny"))
CLI_ARGS = ["--prompt", "a cat", "--width", "64", "--height", "64", "--temp", "2", "--steps", "1,1,1", "--video-steps",
            "1,1,1", "--dtype", "fp32", "--device", "cpu", "--seed", "3", "--save-latents", "--quiet"]


class Job(NamedTuple):
    family: str
    kind: str  # t2v | i2v | extend
    cfg: int
    sp: int
    guidance: float = 7.0

    @property
    def name(self) -> str:
        return f"{self.family}-{self.kind}-g{self.guidance:g}-cfg{self.cfg}xsp{self.sp}"

    @property
    def reference(self) -> tuple[str, str, float]:
        return self.family, self.kind, self.guidance


def jobs_of(cfg: int, sp: int, guidance: float = 7.0, families=("flux", "mmdit"), kinds=("t2v", "i2v")) -> list[Job]:
    return [Job(family, kind, cfg, sp, guidance) for family in families for kind in kinds]


WORLDS = {
    2: jobs_of(2, 1) + jobs_of(1, 2),
    3: jobs_of(1, 3) + jobs_of(1, 3, guidance=0.0, families=("flux",), kinds=("t2v",))
    + jobs_of(1, 3, families=("mmdit",), kinds=("extend",)),
    4: jobs_of(2, 2),
}


# ----------------------------------------------------------------------------------------- models and runs


def tiny_dit(family: str) -> torch.nn.Module:
    """A random 6-head DiT of `family`, the same in every process (seeded)."""
    if family == "flux":
        dit = PyramidFluxTransformer(num_attention_heads=HEADS, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
                                     num_layers=1, num_single_layers=2, joint_attention_dim=TEXT_DIM,
                                     pooled_projection_dim=POOLED_DIM)
    else:
        dit = PyramidMMDiT(sample_size=32, num_attention_heads=HEADS, attention_head_dim=16,
                           caption_projection_dim=HEADS * 16, num_layers=2, joint_attention_dim=TEXT_DIM,
                           pooled_projection_dim=POOLED_DIM, pos_embed_max_size=24)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in dit.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel()))
            else:
                param.copy_((1.0 if "norm" in name else 0.0) + 0.05 * torch.randn(param.shape, generator=generator))
    return dit.eval()


def tiny_pipeline(family: str, parallel: ParallelGroups | None = None) -> PyramidFlowPipeline:
    return PyramidFlowPipeline(tiny_dit(family), None, None, family, DEMO_VARIANT, torch.float32,
                               MemoryManager(device="cpu"), parallel=parallel)


def text_batch(guidance: float) -> TextEmbeddings:
    """[negative; positive] with different padding (5 and 3 real tokens of 7); the positive row alone without CFG."""
    generator = torch.Generator().manual_seed(12)
    mask = torch.zeros(2, TEXT_LEN, dtype=torch.long)
    mask[0, :5], mask[1, :3] = 1, 1
    text = TextEmbeddings(torch.randn(2, TEXT_LEN, TEXT_DIM, generator=generator), mask,
                          torch.randn(2, POOLED_DIM, generator=generator))
    return text if guidance > 0 else text[1]


def run(pipe: PyramidFlowPipeline, kind: str, guidance: float) -> torch.Tensor:
    common = dict(prompt_embeds=text_batch(guidance), guidance_scale=guidance, video_guidance_scale=guidance / 2,
                  seed=5, output_type="latent")
    if kind == "t2v":
        return pipe.generate(height=HEIGHT, width=WIDTH, temp=TEMP, num_inference_steps=[2, 1, 1],
                             video_num_inference_steps=[1, 1, 1], **common)
    image = torch.randn(1, 16, 1, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(13))
    if kind == "extend":  # a clip of 2 latent frames continued by 1
        return pipe.extend(torch.cat([image, image.flip(-1)], dim=2), temp=1, num_inference_steps=[1, 1, 1], **common)
    return pipe.generate_i2v(image_latent=image, temp=TEMP, num_inference_steps=[1, 1, 1], width=WIDTH,
                             height=HEIGHT, **common)


# ----------------------------------------------------------------------------------------- the workers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, ports: tuple[int, int], folder: Path, cli_out: Path | None) -> None:
    """One rank: the command line under torchrun's variables (optional), every API job of its world, and (world 2)
    a rank that stops answering and one that fails. Results go to folder/rank{rank}.pt."""
    torch.set_num_threads(1)
    results: dict[str, object] = {}
    launch = {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"}
    if cli_out is not None:
        os.environ.update(launch, MASTER_PORT=str(ports[1]))
        log = io.StringIO()
        results["cli"] = (cli.main(["generate", "--model", CLI_MODEL, *CLI_ARGS, "--out", str(cli_out)], log=log),
                          log.getvalue())
        for name in launch:
            os.environ.pop(name)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    device = start_process_group(LaunchEnv(world, rank, rank), torch.device("cpu"), timeout_s=120)
    try:
        made: dict[tuple[int, int], ParallelGroups] = {}
        for job in WORLDS[world]:
            groups = made.setdefault((job.cfg, job.sp), ParallelGroups.create(ParallelPlan(job.cfg, job.sp), device))
            results[job.name] = run(tiny_pipeline(job.family, groups), job.kind, job.guidance)
        if world == 2:
            results.update(_failures(rank, device))
    finally:
        torch.save(results, folder / f"rank{rank}.pt")
        stop_process_group()


def _failures(rank: int, device: torch.device) -> dict[str, str]:
    """Rank 1 stays silent past a 1 s timeout, then fails before its first step: rank 0 reports both clearly."""
    seen: dict[str, str] = {}
    silent = ParallelGroups.create(ParallelPlan(2, 1), device, timeout_s=1.0)
    if rank == 0:
        started = time.perf_counter()
        try:
            silent.cfg.gather(torch.ones(1, 2))
        except PeerFailure as exc:
            seen["silent"] = f"{time.perf_counter() - started:.1f} s: {exc}"
    else:
        time.sleep(2.0)
    crashing = ParallelGroups.create(ParallelPlan(2, 1), device)
    if rank == 0:
        try:
            run(tiny_pipeline("flux", crashing), "t2v", 7.0)
        except PeerFailure as exc:
            seen["crash"] = str(exc)
    return seen  # rank 1 leaves here: its connections close


@pytest.fixture(scope="module")
def references():
    """One process's latents of every (family, kind, guidance), and the joint sequence lengths of its DiT calls."""
    torch.manual_seed(0)
    out: dict[tuple[str, str, float], torch.Tensor] = {}
    lengths: set[int] = set()
    for job in {j.reference: j for jobs in WORLDS.values() for j in jobs}.values():
        pipe = tiny_pipeline(job.family)
        hook = pipe.dit.register_forward_hook(
            lambda module, args, output: lengths.add(TEXT_LEN + sum(frame_token_counts(args[0], module.token_patch))))
        out[job.reference] = run(pipe, job.kind, job.guidance)
        hook.remove()
    return out, lengths


def launch_world(world: int, tmp_path: Path, cli_out: Path | None = None) -> list[dict]:
    mp.start_processes(_worker, args=(world, (free_port(), free_port()), tmp_path, cli_out), nprocs=world,
                       start_method=START)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world2")
    return launch_world(2, folder, cli_out=folder / "parallel.mp4"), folder


def assert_like_one_process(ranks: list[dict], references, world: int) -> None:
    for job in WORLDS[world]:
        expected = references[job.reference]
        for rank, results in enumerate(ranks):
            actual = results[job.name]
            assert actual.shape == expected.shape, job.name
            error = (actual - expected).abs().max().item() / expected.abs().max().item()
            assert error <= TOLERANCE, f"{job.name} rank {rank}: relative error {error:.2e}"
            assert torch.equal(actual, ranks[0][job.name]), f"{job.name}: rank {rank} differs from rank 0"


# ----------------------------------------------------------------------------------------- equal to one process


def test_cfg_parallel_and_sequence_parallel_on_two_processes(two_ranks, references):
    assert_like_one_process(two_ranks[0], references[0], 2)


def test_sequence_parallel_on_three_processes_pads_uneven_sequences(tmp_path, references):
    ranks = launch_world(3, tmp_path)
    assert any(length % 3 for length in references[1]), "no forward had a length the shards must pad"
    assert_like_one_process(ranks, references[0], 3)


def test_cfg_and_sequence_parallel_together_on_four_processes(tmp_path, references):
    assert_like_one_process(launch_world(4, tmp_path), references[0], 4)


def test_torchrun_generate_writes_once_and_equals_one_process(two_ranks, tmp_path):
    ranks, folder = two_ranks
    code, _ = run_cli(["generate", "--model", CLI_MODEL, *CLI_ARGS, "--out", tmp_path / "single.mp4"])
    assert code == 0
    assert ranks[0]["cli"][0] == 0 and "wrote" in ranks[0]["cli"][1]
    assert ranks[1]["cli"] == (0, ""), "rank 1 is quiet"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("rank")) == [
        "parallel.mp4", "parallel.safetensors"]
    single, _ = load_latents(tmp_path / "single.safetensors")
    parallel, _ = load_latents(folder / "parallel.safetensors")
    assert (parallel - single).abs().max() <= TOLERANCE * single.abs().max()


# ----------------------------------------------------------------------------------------- bad input


def test_a_silent_or_failed_rank_ends_the_others_with_a_clear_error(two_ranks):
    seen = two_ranks[0][0]
    took, message = seen["silent"].split(" s: ", 1)
    assert float(took) < 10, "the 1 s timeout ended the wait"
    assert "rank 0: the all-gather of the CFG-parallel group (ranks 0, 1) timed out" in message
    assert "another rank stopped answering within 1 s (--dist-timeout)" in message
    assert "(ranks 0, 1) lost its connection: another rank failed; its own error is in its output" in seen["crash"]


def test_shards_cover_the_sequence_in_order_with_padding_at_the_end():
    def shards(text: int, video: int, size: int) -> list:
        groups = [SequenceParallel(Channel("sequence-parallel", None, tuple(range(size)), r, 60.0)) for r in range(size)]
        return [g.shard(text, video) for g in groups]

    for text, video, size in [(7, 84, 3), (7, 2, 3), (1, 1, 3), (128, 60, 2), (5, 0, 4)]:
        parts = shards(text, video, size)
        assert [(p.start, p.end) for p in parts] == [(r * parts[0].per_rank, (r + 1) * parts[0].per_rank)
                                                      for r in range(size)]
        assert sum(p.text[1] - p.text[0] for p in parts) == text and sum(p.video[1] - p.video[0] for p in parts) == video
        assert [p.local_text_len + p.video[1] - p.video[0] + p.pad for p in parts] == [parts[0].per_rank] * size
        assert sum(p.pad for p in parts) == size * parts[0].per_rank - text - video
        for keep in range(video + 1):  # the last block's rows: the current clip's tail, padding included
            assert sum(p.kept(keep) for p in parts) == keep + sum(p.pad for p in parts)
    only_padding = shards(1, 1, 3)[2]
    assert (only_padding.local_text_len, only_padding.video, only_padding.pad) == (0, (1, 1), 1)
    tables = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    local = shards(1, 4, 3)[2].local_rope(tables)  # video token 3 and one padding row rotated by zero
    assert torch.equal(local[:, 0], tables[:, 3]) and torch.equal(local[:, 1], torch.tensor([[1.0] * 4, [0.0] * 4]))


def test_world_sizes_that_do_not_split_name_what_works():
    assert choose_plan(4, guidance=True, heads=30) == ParallelPlan(2, 2)
    assert choose_plan(3, guidance=True, heads=30) == ParallelPlan(1, 3)
    assert choose_plan(4, guidance=False, heads=24) == ParallelPlan(1, 4)
    assert choose_plan(4, guidance=True, heads=24, cfg="1") == ParallelPlan(1, 4)
    assert choose_plan(6, guidance=True, heads=24, sp=6) == ParallelPlan(1, 6)
    with pytest.raises(ValueError, match=r"a world of 7 processes needs sequence-parallel 7, but this DiT's 30 attention "
                                         r"heads split only over sequence-parallel degrees 1, 2, 3, 5, 6, 10, 15, 30; "
                                         r"launch one of 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60 processes"):
        choose_plan(7, guidance=True, heads=30)
    with pytest.raises(ValueError, match="sequence-parallel 4 with CFG-parallel 2 or sequence-parallel 8"):
        choose_plan(8, guidance=True, heads=30)
    with pytest.raises(ValueError, match=r"guidance is off \(--guidance 0\); use --cfg-parallel 1 or auto"):
        choose_plan(4, guidance=False, heads=24, cfg="2")
    with pytest.raises(ValueError, match="needs an even world size, got 3"):
        choose_plan(3, guidance=True, heads=24, cfg="2")
    with pytest.raises(ValueError, match="--cfg-parallel 2 x --sp-degree 4 makes 8 processes, but 4 were started"):
        choose_plan(4, guidance=True, heads=24, cfg="2", sp=4)
    with pytest.raises(ValueError, match="--sp-degree 3 does not divide the world size 4"):
        choose_plan(4, guidance=True, heads=24, sp=3)


def test_heads_that_do_not_divide_name_the_degrees_that_work():
    group = SequenceParallel(Channel("sequence-parallel", None, (0, 1, 2, 3), 0, 60.0))
    with pytest.raises(ValueError, match="heads .6. divisible by 4; degrees that work for this DiT: 1, 2, 3, 6"):
        configure_dit(tiny_dit("flux"), sequence_parallel=group)
    with pytest.raises(ValueError, match="degrees that work for this DiT: 1, 2, 3, 5, 6, 10, 15, 30"):
        group.check_heads(30)  # miniFLUX
    with pytest.raises(ValueError, match="degrees that work for this DiT: 1, 2, 3, 4, 6, 8, 12, 24"):
        SequenceParallel(Channel("sequence-parallel", None, (0, 1, 2, 3, 4), 0, 60.0)).check_heads(24)  # SD3


def test_launch_environment_nccl_and_flags(monkeypatch, tmp_path, capsys):
    assert LaunchEnv.detect({}) is None and LaunchEnv.detect({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert LaunchEnv.detect(env) == LaunchEnv(4, 2, 0)
    with pytest.raises(ValueError, match="RANK, MASTER_ADDR, MASTER_PORT is not: start several processes with torchrun"):
        LaunchEnv.detect({"WORLD_SIZE": "2"})
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(ValueError, match="needs NCCL, which this PyTorch build lacks.*--device cpu \\(gloo\\)"):
        start_process_group(LaunchEnv(2, 0, 0), torch.device("cuda"))
    assert not dist.is_initialized()
    parser = cli.build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    assert tuple({a.dest: a for a in generate._actions}["cfg_parallel"].choices) == settings.CFG_PARALLEL_CHOICES
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    code, _ = run_cli(["generate", "--model", CLI_MODEL, *CLI_ARGS, "--sp-degree", "2", "--out", tmp_path / "x.mp4"])
    assert code == cli.EXIT_USAGE
    assert "--sp-degree split the work of several processes: start them with torchrun" in capsys.readouterr().err
