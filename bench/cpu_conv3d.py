"""CPU Conv3d layouts for the VAE decode, fp32 (a script, not a test).

Decodes one 256 px tile of the official VAE (channel widths 128/256/512/512, random weights) chunk by chunk as
the pipeline does (window 1: a first chunk of 1 latent frame -> 1 frame, then 1 latent frame -> 8 frames) in
each of these ways, and prints seconds and the largest difference to the default:

  default         contiguous NCDHW tensors; torch's CPU conv3d, which runs oneDNN (mkldnn) for fp32
  channels_last   the decoder and the latents in torch.channels_last_3d (NDHWC)
  no_mkldnn       torch.backends.mkldnn disabled: ATen's own slow_conv3d (im2col + GEMM)

Then every distinct Conv3d call of the first chunk alone (shapes recorded with hooks), per way, plus
`to_mkldnn` (oneDNN's blocked opaque layout through `torch.utils.mkldnn`, conversions included), summed over
the calls, to show where the time goes. Decode times are the best of --repeats runs (the first run of each
way also creates its oneDNN primitives); a layer's time is one call after a warm-up call.

    python bench/cpu_conv3d.py                 # the decode and the per-layer table
    python bench/cpu_conv3d.py --tile 128 --repeats 1 --skip-slow
    python bench/cpu_conv3d.py --small --tile 64 --repeats 1   # a quick check that the script runs
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).absolute().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

WAYS = ("default", "channels_last", "no_mkldnn")


def build_vae(small: bool = False, seed: int = 0) -> nn.Module:
    """The official-size causal VAE (`small`: the fixtures' 8/8/16/16 widths) in fp32 with random weights."""
    from bench._models import fill_random
    from pyramid_core.models.vae import CausalVideoVAE

    widths = dict(encoder_block_out_channels=(8, 8, 16, 16), decoder_block_out_channels=(8, 8, 16, 16),
                  encoder_norm_num_groups=4, decoder_norm_num_groups=4) if small else {}
    with torch.device("meta"):
        vae = CausalVideoVAE(**widths)
    return fill_random(vae, torch.float32, seed)


def best_of(fn, repeats: int) -> tuple[float, object]:
    """(fastest seconds of `repeats` timed calls after one warm-up, the last result)."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


@contextlib.contextmanager
def way_of_running(vae: nn.Module, way: str):
    """Run the block with the VAE (and its inputs, through `prepare`) in one way."""
    if way == "channels_last":
        vae.to(memory_format=torch.channels_last_3d)
        try:
            yield lambda z: z.contiguous(memory_format=torch.channels_last_3d)
        finally:
            vae.to(memory_format=torch.contiguous_format)
    elif way == "no_mkldnn":
        with torch.backends.mkldnn.flags(enabled=False):
            yield lambda z: z
    else:
        yield lambda z: z


def decode_tile(vae, z: torch.Tensor, prepare) -> list[tuple[float, torch.Tensor]]:
    """Decode `z` [1,16,T,h,w] chunk by chunk (window 1, as save_memory=True): (seconds, frames) per chunk."""
    vae.clear_caches()
    out = []
    for k in range(z.shape[2]):
        start = time.perf_counter()
        frames = vae._decode_chunk(prepare(z[:, :, k:k + 1]), True, first_chunk=k == 0)
        out.append((time.perf_counter() - start, frames.contiguous()))
    vae.clear_caches()
    return out


def record_convs(vae, z: torch.Tensor) -> Counter:
    """Each distinct (conv, padded input shape) of a decode of `z`'s first chunk, with how often it runs."""
    calls: Counter = Counter()
    convs = {m: name for name, m in vae.named_modules() if isinstance(m, nn.Conv3d)}
    hooks = [m.register_forward_pre_hook(lambda m, a: calls.update([(convs[m], tuple(a[0].shape))])) for m in convs]
    try:
        decode_tile(vae, z[:, :, :1], lambda t: t)
    finally:
        for h in hooks:
            h.remove()
    return calls


def conv_alone(conv: nn.Conv3d, x: torch.Tensor, reference: torch.Tensor, way: str) -> tuple[float, float]:
    """(seconds of one call after a warm-up, max |difference| to `reference`) of `conv` on `x` in one way."""
    if way == "channels_last":
        layer = nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride).to(
            memory_format=torch.channels_last_3d)
        layer.load_state_dict(conv.state_dict())
        xc = x.contiguous(memory_format=torch.channels_last_3d)
        seconds, out = best_of(lambda: layer(xc), 1)
    elif way == "no_mkldnn":
        with torch.backends.mkldnn.flags(enabled=False):
            seconds, out = best_of(lambda: conv(x), 1)
    elif way == "to_mkldnn":
        from torch.utils import mkldnn

        layer = mkldnn.to_mkldnn(conv)
        seconds, out = best_of(lambda: layer(x.to_mkldnn()).to_dense(), 1)
    else:
        seconds, out = best_of(lambda: conv(x), 1)
    return seconds, float((out - reference).abs().max())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tile", type=int, default=256, help="pixels of the square tile (latents: tile / 8)")
    parser.add_argument("--frames", type=int, default=2, help="latent frames (chunks of one) to decode")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-slow", action="store_true", help="leave out no_mkldnn (about 4x slower)")
    parser.add_argument("--no-layers", action="store_true", help="only the whole decode")
    parser.add_argument("--small", action="store_true", help="the fixtures' VAE widths (a quick check of the script)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    vae = build_vae(args.small)
    latent = args.tile // 8
    z = torch.randn(1, 16, args.frames, latent, latent, generator=torch.Generator().manual_seed(0))
    ways = [w for w in WAYS if not (args.skip_slow and w == "no_mkldnn")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, mkldnn {torch.backends.mkldnn.is_available()}; "
          f"{'small' if args.small else 'official'} VAE widths, tile {args.tile} px ({latent}x{latent} latents), {args.frames} chunks of 1 latent frame, fp32")

    results: dict = {"decode": {}, "layers": {}}
    reference = None
    with torch.no_grad():
        for way in ways:
            runs = []
            for _ in range(args.repeats):
                with way_of_running(vae, way) as prepare:
                    runs.append(decode_tile(vae, z, prepare))
            seconds = [min(run[k][0] for run in runs) for k in range(args.frames)]
            frames = torch.cat([f for _, f in runs[-1]], dim=2)
            if reference is None:
                reference = frames
            results["decode"][way] = {
                "chunk_s": seconds, "total_s": sum(seconds),
                "identical": bool(torch.equal(frames, reference)),
                "max_abs_diff": float((frames - reference).abs().max()),
            }

        print("\nwhole decode (best of %d), seconds per chunk" % args.repeats)
        print("| way | " + " | ".join(f"chunk {k}" for k in range(args.frames)) + " | total | x default | vs default |")
        print("|---|" + "---|" * (args.frames + 3))
        base = results["decode"]["default"]["total_s"]
        for way, r in results["decode"].items():
            diff = "identical" if r["identical"] else f"max {r['max_abs_diff']:.1e}"
            print(f"| {way} | " + " | ".join(f"{s:.2f}" for s in r["chunk_s"]) +
                  f" | {r['total_s']:.2f} | {r['total_s'] / base:.2f} | {diff} |")

        if not args.no_layers:
            calls = record_convs(vae, z)
            modules = dict(vae.named_modules())
            layer_ways = [*ways, "to_mkldnn"]
            totals = Counter()
            rows = []
            for (name, shape), count in sorted(calls.items(), key=lambda kv: -kv[1] * torch.Size(kv[0][1]).numel()):
                conv = modules[name]
                x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
                reference = conv(x)
                row = {"conv": name, "in_shape": list(shape), "calls": count,
                       "kernel": list(conv.kernel_size), "out_channels": conv.out_channels}
                for way in layer_ways:
                    seconds, diff = conv_alone(conv, x, reference, way)
                    row[way] = {"s": seconds, "max_abs_diff": diff}
                    totals[way] += seconds * count
                rows.append(row)
            results["layers"] = {"rows": rows, "total_s": dict(totals)}
            print(f"\nevery Conv3d call of the first chunk alone ({sum(calls.values())} calls, {len(calls)} distinct), "
                  "seconds summed over the calls")
            print("| way | conv seconds | x default | largest max-abs diff of a layer |")
            print("|---|---|---|---|")
            for way in layer_ways:
                worst = max(r[way]["max_abs_diff"] for r in rows)
                print(f"| {way} | {totals[way]:.2f} | {totals[way] / totals['default']:.2f} | "
                      f"{'identical' if worst == 0 else format(worst, '.1e')} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
