"""Access to the golden fixtures made by the official implementation (../shared/fixtures/reference)."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(
    os.environ.get("PYRAMID_FLOW_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "reference")
)


@lru_cache(maxsize=1)
def manifest() -> dict:
    return json.loads((FIXTURES / "cases.json").read_text())


def case(case_id: str) -> dict:
    for entry in manifest()["cases"]:
        if entry["id"] == case_id:
            return entry
    raise KeyError(case_id)


def case_ids(kind: str) -> list[str]:
    return [c["id"] for c in manifest()["cases"] if c["kind"] == kind]


@lru_cache(maxsize=64)
def _tensors(file: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / file))


def tensors(case_id: str) -> dict[str, torch.Tensor]:
    """The stored tensors of a case (fresh clones, safe to modify)."""
    return {k: v.clone() for k, v in _tensors(case(case_id)["file"]).items()}


def model_dir(model: str) -> Path:
    return FIXTURES / manifest()["models"][model]["path"]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tolerance: dict, name: str = "") -> float:
    """Manifest metric: max|a-e| <= atol + rtol*max|e|. Returns the error relative to max|e|."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.to(torch.float64)
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    bound = tolerance["atol"] + tolerance["rtol"] * scale
    assert err <= bound, f"{name}: max abs err {err:.3g} > {bound:.3g} (max|expected| {scale:.3g})"
    return err / max(scale, 1e-30)


def assert_frames_match(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """uint8 frames: |diff| <= 1 everywhere and at most 1 % of values differ."""
    assert actual.dtype == torch.uint8, f"{name}: dtype {actual.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.to(torch.int16) - expected.to(torch.int16)).abs()
    assert diff.max().item() <= 1, f"{name}: max frame diff {diff.max().item()}"
    frac = (diff > 0).double().mean().item()
    assert frac <= 0.01, f"{name}: {frac:.2%} of values differ"
