"""The CPU's native bf16 detection and the CLI's compute dtype default that follows from it."""
import pytest
import torch

from pyramid_core import cli, devices


@pytest.mark.parametrize("flags,feature", [
    ({"avx2", "avx512_f", "avx512_bf16"}, "AVX512-BF16"),  # Cooper Lake, Zen 4
    ({"avx512_bf16", "amx_tile", "amx_bf16"}, "AMX-BF16"),  # Sapphire Rapids: the faster one is named
    ({"avx2", "fma", "avx512_f", "avx512_vnni"}, None),  # AVX-512 alone converts bf16 to fp32
    (set(), None),
])
def test_native_bf16_is_read_from_the_cpu_flags(flags, feature):
    assert devices.cpu_bf16_feature(flags) == feature


def test_flags_come_from_proc_cpuinfo_when_torch_has_no_probe(tmp_path, monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_bf16 amx_bf16\n\nprocessor\t: 1\nflags\t\t: x\n")
    assert devices.cpu_flags(info) == {"fpu", "sse2", "avx2", "avx512_bf16", "amx_bf16"}
    assert devices.cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("feature", ["AMX-BF16", None])
def test_cpu_default_is_bf16_with_native_bf16_and_fp32_without(monkeypatch, feature):
    monkeypatch.setattr(devices, "cpu_bf16_feature", lambda flags=None: feature)
    dtype, note = cli.compute_dtype_for(torch.device("cpu"))
    if feature:
        assert dtype == torch.bfloat16
        assert note.startswith("the CPU default: this CPU has native bf16 matmul (AMX-BF16)") and "--dtype fp32" in note
    else:
        assert dtype == torch.float32
        assert note.startswith("the CPU default: this CPU has no native bf16") and "--dtype bf16" in note
    assert cli.compute_dtype_for(torch.device("cpu"), "fp16") == (torch.float16, "")  # an explicit dtype wins
    assert cli.compute_dtype_for(torch.device("cuda")) == (torch.bfloat16, "")  # a GPU: as trained, whatever the CPU
