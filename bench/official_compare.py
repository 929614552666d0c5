"""pyramid_core side by side with the official Pyramid Flow code on the CPU, fp32 (a script, not a test).

Needs the official environment of shared/reference/OFFICIAL_ENV.md: a venv with torch 2.1.2 and the official
source tree (jy0205/Pyramid-Flow, commit 3040d717) in a folder; this script runs in the pyramid_core
environment and starts the official side with that venv's python.

1. Builds one checkpoint in the official layout with the official classes (in the official venv): a miniFLUX
   DiT at the real width (1920 = 30 heads x 64) with 1 double + 2 single blocks, random weights drawn as the
   fixtures' were, and the fixtures' tiny text encoders, tokenizers and VAE (miniflux_tiny).
2. Runs every case in a fresh process per side, one after the other:
   - end to end at 320x192 (and 128x128), temp 3, steps [2, 2, 2], video steps [1, 1, 1], guidance 7 / 5,
     seeded as the fixtures are (`torch.manual_seed(4321)`, then a CPU generator seeded 1234); the decode is
     the official `decode_latent(save_memory=True)` with tiling on, and ours `pipe.decode`;
   - one DiT forward at 384p, unit 3, stage 2 (history at 1/4, 1/2 and full size plus the current clip:
     2220 image + 128 text = 2348 tokens), CFG batch 2, on the same random inputs.
3. Prints wall times (load excluded; listed apart), peak RSS of each process and the ratios in one table,
   and the largest latent / frame / DiT-output differences.

    python bench/official_compare.py
    python bench/official_compare.py --official-python ~/envs/pyramid_official/bin/python \\
        --official-src ~/src/pyramid_flow_official --work /tmp/pyramid_compare --cases e2e_320x192,dit_384p
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).absolute().parents[1]
FIXTURES = Path(os.environ.get("PYRAMID_FLOW_FIXTURES", REPO.parent / "shared" / "fixtures" / "reference"))
DEFAULT_OFFICIAL_PYTHON = Path("~/envs/pyramid_official/bin/python")
DEFAULT_OFFICIAL_SRC = Path("~/src/pyramid_flow_official")
VARIANT = "diffusion_transformer_384p"
MARK = "RESULT "  # the worker's result line (the official code prints to stdout too)

# the DiT: real width and head layout, few blocks; text sizes of the fixtures' tiny encoders
DIT_SIZES = dict(num_attention_heads=30, attention_head_dim=64, num_layers=1, num_single_layers=2)
DIT_SEED = 1001
COPIED = ("causal_video_vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")

PROMPT = "a cat walking on the beach at sunset"
GLOBAL_SEED, GENERATOR_SEED = 4321, 1234
E2E_CASES = {  # name -> (width, height)
    "e2e_320x192": (320, 192),
    "e2e_128x128": (128, 128),
}
E2E = dict(temp=3, num_inference_steps=[2, 2, 2], video_num_inference_steps=[1, 1, 1], guidance_scale=7.0,
           video_guidance_scale=5.0)
# 384p (640x384) latents 80x48; unit 3 stage 2 history: frame 0 at 1/4, frame 1 at 1/2, frame 2 at full size
DIT_CLIPS = [(12, 20), (24, 40), (48, 80), (48, 80)]
DIT_TIMESTEP = 386.0
TEXT_TOKENS = 128
CASES = (*E2E_CASES, "dit_384p")


# ------------------------------------------------------------------------------------------- workers


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _report(result: dict) -> None:
    import torch

    result.update(peak_rss_mib=_peak_rss_mib(), torch=torch.__version__, threads=torch.get_num_threads())
    print(MARK + json.dumps(result), flush=True)


def fill_fixture_weights(module, seed: int) -> None:
    """Random weights drawn as the fixtures' were (shared/fixtures/reference/README.md, "Weights and seeds"):
    matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.01), the rest N(0, 0.0025), in parameter order."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * param[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def build_checkpoint(args) -> None:
    """(official venv) The official-layout folder: official PyramidFluxTransformer, fixture encoders and VAE."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(args.official_src))
    from pyramid_dit.flux_modules import PyramidFluxTransformer

    root, source = Path(args.root), FIXTURES / "miniflux_tiny"
    config = json.loads((source / VARIANT / "config.json").read_text())
    config.update(DIT_SIZES)
    dit = PyramidFluxTransformer.from_config(config)
    fill_fixture_weights(dit, DIT_SEED)
    target = root / VARIANT
    target.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(target / "diffusion_pytorch_model.safetensors"))
    (target / "config.json").write_text(json.dumps(config, indent=2))
    for name in COPIED:
        shutil.copytree(source / name, root / name, dirs_exist_ok=True)
    params = sum(p.numel() for p in dit.parameters())
    _report({"params": params})


def make_dit_inputs(path: Path) -> None:
    """Random DiT inputs at 384p unit 3 stage 2 (CFG batch 2), stored for both sides."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((FIXTURES / "miniflux_tiny" / VARIANT / "config.json").read_text())
    g = torch.Generator("cpu").manual_seed(7)
    tensors = {f"clip.{i}": torch.randn(2, 16, 1, h, w, generator=g) for i, (h, w) in enumerate(DIT_CLIPS)}
    mask = torch.zeros(2, TEXT_TOKENS, dtype=torch.int64)
    mask[0, :23], mask[1, :31] = 1, 1  # [negative, positive] prompts of unequal length
    tensors.update(
        encoder_hidden_states=torch.randn(2, TEXT_TOKENS, config["joint_attention_dim"], generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(2, config["pooled_projection_dim"], generator=g),
        timestep_ratio=torch.full((2,), DIT_TIMESTEP),
    )
    save_file(tensors, str(path))


def e2e_worker(args) -> None:
    """End to end on one side: load, sample (latents), decode (uint8 frames); times and outputs."""
    import torch
    from safetensors.torch import save_file

    width, height = E2E_CASES[args.case]
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.side == "official":
        sys.path.insert(0, str(args.official_src))
        import numpy as np
        from pyramid_dit import PyramidDiTForVideoGeneration

        model = PyramidDiTForVideoGeneration(args.root, model_name="pyramid_flux", model_dtype="fp32",
                                             model_variant=VARIANT)
        model.vae.enable_tiling()
        generate = model.generate

        def decode(latents):  # decode_latent rescales its input in place
            images = model.decode_latent(latents.clone(), save_memory=True)
            return torch.from_numpy(np.stack([np.asarray(image) for image in images]))
    else:
        sys.path.insert(0, str(REPO))
        from pyramid_core import PyramidFlowPipeline

        pipe = PyramidFlowPipeline.from_pretrained(args.root, VARIANT, dtype=torch.float32, device="cpu")
        generate = pipe.generate

        def decode(latents):
            return pipe.decode(latents, output_type="pt", save_memory=True)
    loaded = time.perf_counter()
    torch.manual_seed(GLOBAL_SEED)
    with torch.no_grad():
        latents = generate(prompt=PROMPT, height=height, width=width, output_type="latent",
                           generator=torch.Generator("cpu").manual_seed(GENERATOR_SEED), **E2E)
        sampled = time.perf_counter()
        frames = decode(latents)
    done = time.perf_counter()
    save_file({"latents": latents.contiguous(), "frames": frames.contiguous()}, args.out)
    _report({"load_s": loaded - start, "sampling_s": sampled - loaded, "decode_s": done - sampled,
             "wall_s": done - loaded})


def dit_worker(args) -> None:
    """One DiT forward on one side, on the stored inputs."""
    import torch
    from safetensors.torch import load_file, save_file

    if args.threads:
        torch.set_num_threads(args.threads)
    t = load_file(args.inputs)
    clips = [t[f"clip.{i}"] for i in range(len(DIT_CLIPS))]
    start = time.perf_counter()
    if args.side == "official":
        sys.path.insert(0, str(args.official_src))
        from pyramid_dit.pyramid_dit_for_video_gen_pipeline import build_pyramid_dit

        dit = build_pyramid_dit("pyramid_flux", str(Path(args.root) / VARIANT), torch.float32, use_flash_attn=False,
                                use_mixed_training=False).eval()

        def forward():
            return dit(sample=[clips], timestep_ratio=t["timestep_ratio"], encoder_hidden_states=t["encoder_hidden_states"],
                       encoder_attention_mask=t["encoder_attention_mask"], pooled_projections=t["pooled_projections"])[0]
    else:
        sys.path.insert(0, str(REPO))
        from pyramid_core.loading import load_dit

        dit = load_dit(args.root, VARIANT, dtype=torch.float32).model.eval()

        def forward():
            return dit(clips, t["timestep_ratio"], t["encoder_hidden_states"], t["encoder_attention_mask"],
                       t["pooled_projections"])
    loaded = time.perf_counter()
    with torch.no_grad():
        out = forward()
    done = time.perf_counter()
    save_file({"output": out.contiguous()}, args.out)
    tokens = sum(h * w // 4 for h, w in DIT_CLIPS) + TEXT_TOKENS
    _report({"load_s": loaded - start, "wall_s": done - loaded, "tokens": tokens})


# ------------------------------------------------------------------------------------------- driver


def _run(cmd: list[str], what: str) -> dict:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        sys.exit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1][len(MARK):])


def _check_official(python: Path, src: Path) -> None:
    problems = []
    if not python.is_file():
        problems.append(f"no python at {python} (--official-python)")
    if not (src / "pyramid_dit" / "pyramid_dit_for_video_gen_pipeline.py").is_file():
        problems.append(f"no official source tree at {src} (--official-src: a folder holding pyramid_dit/)")
    if not (FIXTURES / "miniflux_tiny").is_dir():
        problems.append(f"no fixtures at {FIXTURES} (set PYRAMID_FLOW_FIXTURES)")
    if problems:
        sys.exit("cannot run the official side: " + "; ".join(problems) + ".\nBuild the official environment as "
                 "shared/reference/OFFICIAL_ENV.md says (a venv with torch 2.1.2, and the official tree at commit "
                 "3040d717b0ef48f0dfb10d0eb9f3c1d0b55442e0), then pass its python and source folder.")


def _load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _diff(ours: Path, official: Path, key: str) -> dict:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(ours))[key], load_file(str(official))[key]
    if a.shape != b.shape:
        return {"shape": f"{tuple(a.shape)} vs {tuple(b.shape)}"}
    if a.dtype == torch.uint8:
        d = (a.to(torch.int16) - b.to(torch.int16)).abs()
        return {"max": int(d.max()), "fraction_differing": float((d > 0).double().mean())}
    d = (a.double() - b.double()).abs().max()
    return {"max": float(d), "relative_to_max": float(d / b.double().abs().max())}


def _row(name: str, ours: float, official: float, unit: str, fmt: str = ".1f") -> str:
    return f"| {name} | {ours:{fmt}} {unit} | {official:{fmt}} {unit} | {ours / official:.2f} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-python", type=Path, default=DEFAULT_OFFICIAL_PYTHON,
                        help=f"python of the official venv (default {DEFAULT_OFFICIAL_PYTHON})")
    parser.add_argument("--official-src", type=Path, default=DEFAULT_OFFICIAL_SRC,
                        help=f"the official source tree, holding pyramid_dit/ (default {DEFAULT_OFFICIAL_SRC})")
    parser.add_argument("--ours-python", type=Path, default=Path(sys.executable),
                        help="python with pyramid_core's requirements (default: this one)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pyramid_official_compare"),
                        help="where the checkpoint and outputs go (the checkpoint is reused when present)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=("build", "e2e", "dit"), help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=("ours", "official"), help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.official_python, args.official_src = args.official_python.expanduser(), args.official_src.expanduser()
    if args.worker:
        {"build": build_checkpoint, "e2e": e2e_worker, "dit": dit_worker}[args.worker](args)
        return

    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    _check_official(args.official_python, args.official_src)
    work, root = args.work.expanduser(), args.work.expanduser() / "miniflux_1920"
    work.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).absolute()
    common = ["--official-src", args.official_src, "--threads", str(args.threads)]
    if not (root / VARIANT / "diffusion_pytorch_model.safetensors").is_file():
        print(f"building the checkpoint in {root} (official classes)...", flush=True)
        built = _run([args.official_python, script, "--worker", "build", "--root", root, *common], "building")
        print(f"  DiT: {built['params'] / 1e6:.0f} M parameters", flush=True)
    inputs = work / "dit_inputs.safetensors"
    if "dit_384p" in cases:
        make_dit_inputs(inputs)

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = _load_average()
    results: dict = {"started": started, "load_average_before": load_before, "cases": {}}
    pythons = {"ours": args.ours_python, "official": args.official_python}
    for case in cases:
        kind = "dit" if case == "dit_384p" else "e2e"
        entry = results["cases"][case] = {}
        for side in ("ours", "official"):
            out = work / f"{case}.{side}.safetensors"
            print(f"{case}: {side}...", flush=True)
            cmd = [pythons[side], script, "--worker", kind, "--side", side, "--case", case, "--root", root,
                   "--out", out, *common]
            if kind == "dit":
                cmd += ["--inputs", inputs]
            entry[side] = _run(cmd, f"{case} ({side})")
            entry[side]["file"] = str(out)
        files = (Path(entry["ours"]["file"]), Path(entry["official"]["file"]))
        if kind == "dit":
            entry["output_diff"] = _diff(*files, "output")
        else:
            entry["latents_diff"] = _diff(*files, "latents")
            entry["frames_diff"] = _diff(*files, "frames")
    results["load_average_after"] = _load_average()

    first = next(iter(results["cases"].values()))
    print(f"\nstarted {started}; load average before {load_before}, after {results['load_average_after']}; "
          f"fp32, CPU; ours torch {first['ours']['torch']} ({first['ours']['threads']} threads), official torch "
          f"{first['official']['torch']} ({first['official']['threads']} threads); each side a fresh process\n")
    print("| case | pyramid_core | official | ratio |")
    print("|---|---|---|---|")
    for case, entry in results["cases"].items():
        ours, official = entry["ours"], entry["official"]
        if case == "dit_384p":
            title = f"one DiT forward at 384p, unit 3 stage 2 ({ours['tokens']} tokens, CFG batch 2)"
            print(_row(f"{title}: wall", ours["wall_s"], official["wall_s"], "s"))
            print(_row("same: peak RSS", ours["peak_rss_mib"], official["peak_rss_mib"], "MiB", ".0f"))
            continue
        width, height = E2E_CASES[case]
        title = f"end to end, {width}×{height}, temp {E2E['temp']}, steps [2,2,2] / video [1,1,1]"
        print(_row(title, ours["wall_s"], official["wall_s"], "s"))
        print(f"| of which sampling / decode | {ours['sampling_s']:.1f} / {ours['decode_s']:.1f} s | "
              f"{official['sampling_s']:.1f} / {official['decode_s']:.1f} s | "
              f"{ours['sampling_s'] / official['sampling_s']:.2f} / {ours['decode_s'] / official['decode_s']:.2f} |")
        print(_row("load (not in the wall time)", ours["load_s"], official["load_s"], "s"))
        print(_row("peak RSS end to end", ours["peak_rss_mib"], official["peak_rss_mib"], "MiB", ".0f"))
    print()
    for case, entry in results["cases"].items():
        if case == "dit_384p":
            d = entry["output_diff"]
            print(f"{case}: DiT output max |diff| {d.get('max', float('nan')):.2e} "
                  f"({d.get('relative_to_max', float('nan')):.1e} of the largest value)")
        else:
            lat, fr = entry["latents_diff"], entry["frames_diff"]
            print(f"{case}: latents max |diff| {lat.get('max', float('nan')):.2e} "
                  f"({lat.get('relative_to_max', float('nan')):.1e} of the largest value); frames max |diff| "
                  f"{fr.get('max', 'n/a')} / 255 on {fr.get('fraction_differing', float('nan')):.3%} of values")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
