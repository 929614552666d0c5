"""bench/gpu_check.py: the CPU self-check runs every section with sane figures, and the trace analysis is right.

The GPU run happens rarely and must work the first time, so everything that can run on CPU runs here: the
script in-process on tiny models (`--small --device cpu`), and its profiler-trace analysis on synthetic traces.
"""
from __future__ import annotations

import gzip
import json

import pytest

from bench import gpu_check as g


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    data = g.main(["--small", "--device", "cpu", "--out", str(out)])
    return data, out


def _ms(entry: dict) -> float:
    return entry["ms"]["median"]


def test_report_on_disk_has_every_section(report):
    data, out = report
    on_disk = json.loads((out / "gpu_check.json").read_text())
    assert list(on_disk["sections"]) == list(g.SECTIONS)
    for name, section in on_disk["sections"].items():
        assert isinstance(section, dict) and "error" not in section, (name, section)
        assert section["section_s"] > 0
    assert on_disk["context"]["start"]["at_init_gib"] == g.NA
    assert data["sections"]["dit"]["rows"] == on_disk["sections"]["dit"]["rows"]


def test_dit_segmented_flex_masked_and_flash_agree(report):
    rows = report[0]["sections"]["dit"]["rows"]
    assert [(r["resolution"], r["stage"]) for r in rows] == [("768p", 2), ("768p", 1), ("384p", 2), ("384p", 1)]
    for row in rows:
        assert row["tokens"] > g.TEXT_TOKENS and row["finite"]
        for mode in g.ATTENTION_MODES:
            assert _ms(row[mode]) > 0 and row[mode]["enqueue_ms"]["median"] > 0, (mode, row[mode])
        assert row["segmented"]["kernels"] == g.NA and row["masked"]["syncs"] == g.NA
        assert row["masked_vs_segmented"]["rel_l2"] < 1e-4
        assert row["flash_vs_segmented"]["rel_l2"] < 1e-4
        assert row["flex_vs_segmented"]["rel_l2"] < 1e-4


def test_every_plan_samples_the_latents_of_none(report):
    sections = report[0]["sections"]
    memory = sections["memory"]["rows"]
    assert [r["case"] for r in memory] == [c.name for c in g.MEMORY_CASES]
    time_rows = sections["time"]["768p"] + sections["time"]["384p"]
    for row in memory + time_rows:
        assert "error" not in row, row
        assert row["sampling_s"] > 0 and row["finite"]
        assert row["vs_none"]["max_abs"] < 1e-5, row["case"]
        assert row["estimate_gib"] > 0 and "memory plan" in row["describe"]
        assert row["sampling"]["max_allocated_gib"] == g.NA and row["allocator_cap_gib"] == g.NA
    by_case = {r["case"]: r for r in sections["time"]["768p"]}
    assert by_case["none"]["x_none"] == 1.0 and len(by_case["none"]["sampling_runs_s"]) == 2
    assert by_case["block_swap K=8"]["resident_blocks"] == 2  # the tiny DiT's double blocks; the rest stream
    assert by_case["sequential"]["weights"]["gib_copied"] > 0


def test_block_swap_trace_is_written(report):
    data, out = report
    trace = data["sections"]["time"]["block_swap_trace"]
    assert trace["chosen"] == "block_swap" and trace["resident_blocks"] == 2 and trace["copies"] == g.NA
    with gzip.open(out / trace["trace_file"], "rt") as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("name") == g.PROFILE_LABEL for e in events)


def test_vae_and_fp8_sections(report):
    sections = report[0]["sections"]
    for row in sections["vae"]["rows"]:
        assert row["seconds"] > 0 and row["frames"] == [17, 64, 64, 3]
        assert row["estimate_gib"] > 0
    fp8 = sections["fp8"]
    assert _ms(fp8["reference"]) > 0 and _ms(fp8["fp8"]) > 0 and _ms(fp8["scaled_mm"]) > 0
    assert fp8["fp8"]["weights_gib"] < fp8["reference"]["weights_gib"]
    assert fp8["fp8"]["vs_reference"]["rel_l2"] < 0.2
    assert fp8["reference"]["vs_dit_section"]["max_abs"] == 0.0  # every plan gave the DiT its weights back


def test_deadline_skips_instead_of_running(tmp_path):
    data = g.main(["--small", "--device", "cpu", "--out", str(tmp_path), "--deadline-s", "0"])
    assert data["sections"] == {name: g.SKIPPED for name in g.SECTIONS}
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["fp8"] == g.SKIPPED


def test_summary_prints_every_section(report, capsys):
    g.print_summary(report[0])
    text = capsys.readouterr().out
    assert "summary failed" not in text
    assert all(f"== {name} ==" in text for name in g.SECTIONS)


def test_skipped_items_and_failing_sections_are_recorded(tmp_path, monkeypatch, capsys):
    calls = []

    def allows(self, need_s=0.0):  # the dit section and its first mode start, then time is up
        calls.append(need_s)
        return len(calls) <= 2

    def broken(run):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(g.Deadline, "allows", allows)
    monkeypatch.setitem(g.SECTION_FUNCTIONS, "memory", broken)
    data = g.main(["--small", "--device", "cpu", "--out", str(tmp_path), "--sections", "dit,memory"])
    rows = data["sections"]["dit"]["rows"]
    assert _ms(rows[0]["segmented"]) > 0 and rows[0]["masked"] == g.SKIPPED and rows[-1]["flash"] == g.SKIPPED
    assert data["sections"]["memory"] == g.SKIPPED
    monkeypatch.setattr(g.Deadline, "allows", lambda self, need_s=0.0: True)
    data = g.main(["--small", "--device", "cpu", "--out", str(tmp_path), "--sections", "memory"])
    assert "out of memory" in data["sections"]["memory"]["error"] and data["sections"]["memory"]["traceback"]
    assert "summary failed" not in capsys.readouterr().out


def test_overlap_fraction_on_synthetic_intervals():
    S = g.Span
    assert g.overlap_fraction([], [S(0, 1, "7")]) is None
    assert g.overlap_fraction([S(0, 10, "13")], [S(5, 20, "7")]) == 0.5
    assert g.overlap_fraction([S(0, 10, "13")], [S(0, 10, "13")]) == 0.0  # same stream: no overlap
    assert g.overlap_fraction([S(0, 10, "13")], [S(0, 6, "7"), S(4, 8, "7")]) == pytest.approx(0.8)  # union
    assert g.overlap_fraction([S(10, 20, "13")], [S(0, 12, "7"), S(14, 15, "9"), S(18, 30, "7")]) == 0.5
    copies = [S(0, 10, "a"), S(0, 10, "b")]
    assert g.overlap_fraction(copies, [S(0, 10, "a")]) == 0.5  # hides copy b only
    assert g.merge([(4, 8), (0, 6), (9, 10)]) == [(0, 8), (9, 10)]


def _event(cat, name, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}


def test_trace_analysis_on_a_synthetic_kineto_trace():
    trace = {"traceEvents": [
        {"ph": "M", "name": "process_name"},
        _event("user_annotation", g.PROFILE_LABEL, 0, 100),
        _event("cuda_runtime", "cudaStreamSynchronize", 10, 1),
        _event("cuda_runtime", "cudaStreamWaitEvent", 20, 1),
        _event("cuda_runtime", "cudaDeviceSynchronize", 150, 1),  # after the labelled forward
        _event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 0, 10, stream=13, bytes=2e6),
        _event("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 50, 10, stream=7, bytes=1e6),
        _event("kernel", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 5, 10, stream=7),
        _event("kernel", "nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NTN", 8, 1, stream=13),  # the copy's stream
        _event("kernel", "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", 30, 20, stream=7),
    ]}
    copies = g.copy_overlap(trace)
    assert copies["h2d_copies"] == 1 and copies["h2d_gb"] == pytest.approx(2e-3)
    assert copies["overlap_with_gemm"] == 0.5 and copies["overlap_with_any_kernel"] == 0.5
    assert copies["h2d_streams"] == ["13"] and copies["kernel_streams"] == ["13", "7"]
    assert g.runtime_calls(trace) == {"cudaStreamSynchronize": 1}
    assert g.runtime_calls(trace, "StreamWaitEvent") == {"cudaStreamWaitEvent": 1}
    kernels = g.kernel_summary(trace)
    assert kernels["kernels"] == 3 and kernels["busy_ms"] == pytest.approx(0.03)
    assert kernels["attention_ms"] == {"flash": pytest.approx(0.02)}
    assert [k["kind"] for k in kernels["top"]] == ["flash", "gemm", "gemm"]


@pytest.mark.parametrize("name,kind", [
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "flash"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<>::Params)", "mem_efficient"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "cudnn"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<8, c10::BFloat16>", "math (softmax)"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", None),
])
def test_attention_kernel_kinds(name, kind):
    assert g.attention_kind(name) == kind
    assert g.is_gemm(name) == (kind is None)
