"""Peak host memory while loading a DiT, next to the size of the loaded model (CPU, no downloads).

Writes a random-weight miniFLUX checkpoint in fp32 (the dtype of the official files), then loads it in
bf16 (or `--dtype fp32`: no cast) with `pyramid_core.loading.load_dit` in a fresh process while a thread
samples the process's anonymous resident memory (RssAnon: what the loader allocated) and its resident
file-backed memory (RssFile: pages of memory-mapped files, reclaimable page cache). Prints the peaks next to
the model size: the loader builds on the meta device and fills tensor by tensor, so the peak should stay
near one copy in the target dtype, not fp32 + bf16.

    python bench/load_memory.py [--blocks 4 8] [--heads 30] [--dtype bf16|fp32]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

GIB = 1024**3


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def rss(kind: str = "RssAnon") -> int:
    """RssAnon or RssFile of this process, in bytes (Linux /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{kind}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{kind} not available (Linux only)")


def write_checkpoint(folder: Path, double: int, single: int, heads: int) -> int:
    """A random fp32 DiT folder (config.json + safetensors) built block by block; returns its parameter count."""
    from safetensors.torch import save_file

    from pyramid_core.models.flux import PyramidFluxTransformer

    config = dict(num_layers=double, num_single_layers=single, num_attention_heads=heads, attention_head_dim=64)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in PyramidFluxTransformer(**config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=gen) / max(1, s[-1]) ** 0.5 for k, s in shapes.items()}
    (folder / "diffusion_transformer_384p").mkdir(parents=True)
    save_file(tensors, str(folder / "diffusion_transformer_384p" / "diffusion_pytorch_model.safetensors"))
    official = {"_class_name": "PyramidFluxTransformer", "in_channels": 64, "joint_attention_dim": 4096,
                "pooled_projection_dim": 768, "patch_size": 1, "axes_dims_rope": [16, 24, 24], **config}
    (folder / "diffusion_transformer_384p" / "config.json").write_text(json.dumps(official))
    return sum(t.numel() for t in tensors.values())


def measure_load(folder: str, dtype: str) -> dict:
    """Run in a fresh process: load in `dtype` while sampling RssAnon and RssAnon + RssFile."""
    from pyramid_core.loading import load_dit

    anon0, file0 = rss("RssAnon"), rss("RssFile")
    peak = {"anon": anon0, "total": anon0 + file0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            anon, mapped = rss("RssAnon"), rss("RssFile")
            peak["anon"], peak["total"] = max(peak["anon"], anon), max(peak["total"], anon + mapped)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    model = load_dit(folder, "384p", dtype=DTYPES[dtype]).model
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    anon, mapped = rss("RssAnon"), rss("RssFile")
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"peak_extra": max(peak["anon"], anon) - anon0, "peak_total_extra": max(peak["total"], anon + mapped) - anon0 - file0,
            "after_anon": anon - anon0, "after_file": mapped - file0, "model_bytes": model_bytes, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs=2, default=(4, 8), metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--heads", type=int, default=30, help="30 x 64 = 1920 wide, the real width")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="load dtype (fp32: no cast)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_load(args.measure, args.dtype)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        params = write_checkpoint(Path(tmp), *args.blocks, args.heads)
        file_bytes = params * 4
        result = subprocess.run([sys.executable, __file__, "--measure", tmp, "--dtype", args.dtype],
                                capture_output=True, text=True, check=True)
        r = json.loads(result.stdout.strip().splitlines()[-1])
    model = r["model_bytes"]
    print(f"DiT {args.blocks[0]} double + {args.blocks[1]} single blocks, {params / 1e9:.2f} B params")
    print(f"file (fp32):                          {file_bytes / GIB:6.2f} GiB")
    print(f"loaded model ({args.dtype}):                 {model / GIB:6.2f} GiB")
    print(f"peak extra anonymous memory:          {r['peak_extra'] / GIB:6.2f} GiB  ({r['peak_extra'] / model:.2f}x the "
          f"model; with a cast, fp32 + bf16 copies would be 3.00x)")
    print(f"peak extra resident (anon + mapped):  {r['peak_total_extra'] / GIB:6.2f} GiB  ({r['peak_total_extra'] / model:.2f}x)")
    print(f"after loading: anon {r['after_anon'] / GIB:.2f} GiB, mapped file pages {r['after_file'] / GIB:.2f} GiB")
    print(f"load time:                            {r['seconds']:6.1f} s")


if __name__ == "__main__":
    main()
