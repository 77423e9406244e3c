"""Runtime policy decisions, with the machine's capabilities monkeypatched: `--precision auto` (bf16 only on
CPUs with bf16 units) and the default thread count with its busy-cores hint."""

import os

import pytest
import torch

import ldm.runtime
import ldm.runtime.bf16
from ldm.runtime import busy_cores_hint, default_threads, resolve_precision

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


def cpu(monkeypatch, *, onednn_bf16: bool, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(ldm.runtime.bf16, "cpu_has_fast_bf16", lambda: onednn_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(
    "onednn_bf16, avx512_bf16, amx, expected",
    [
        (True, True, False, "autocast"),  # Zen 4, Cooper Lake: AVX512-BF16
        (True, False, True, "autocast"),  # Sapphire Rapids: AMX
        (True, False, False, "full"),  # plain AVX512: oneDNN emulates bf16, no faster than fp32
        (False, False, False, "full"),  # AVX2 only
        (False, True, False, "full"),  # a torch built without oneDNN has no bf16 kernels to use
    ],
)
def test_auto_precision_is_bf16_only_with_bf16_units(
    monkeypatch, capsys, onednn_bf16, avx512_bf16, amx, expected
):
    cpu(monkeypatch, onednn_bf16=onednn_bf16, avx512_bf16=avx512_bf16, amx=amx)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision(None, CPU) == expected
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].startswith(f"precision: {expected} (")
    assert ("bf16" if expected == "autocast" else "fp32") in printed[0]


def test_auto_precision_elsewhere_and_explicit_choices(monkeypatch, capsys):
    cpu(monkeypatch, onednn_bf16=True, avx512_bf16=True, amx=True)
    assert resolve_precision("auto", CUDA) == "autocast"
    assert resolve_precision("auto", MPS) == "full"
    assert capsys.readouterr().out.count("precision: ") == 2
    for precision in ("full", "autocast"):  # asked for: kept, nothing printed
        for device in (CPU, CUDA):
            assert resolve_precision(precision, device) == precision
    assert capsys.readouterr().out == ""


def test_default_threads_is_the_affinity_mask_unless_omp_says(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert default_threads() == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    assert default_threads() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_threads() == 2


@pytest.mark.parametrize(
    "load, cpus, threads, suggested",
    [(0.2, 2, 2, None), (1.0, 2, 2, 1), (9.8, 2, 2, 1), (3.0, 8, 8, 5), (3.0, 8, 4, None), (7.9, 8, 1, None)],
)
def test_busy_cores_hint_suggests_the_free_cores(monkeypatch, load, cpus, threads, suggested):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    hint = busy_cores_hint(threads)
    if suggested is None:
        assert hint is None
    else:
        assert f"--threads {suggested} " in hint and f"load average {load:.1f} on {cpus} cores" in hint
        assert "\n" not in hint


def test_prepare_sets_the_default_threads_and_prints_the_hint(tiny_ldm, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (6.5, 6.0, 5.0))
    before = torch.get_num_threads()
    try:
        ldm.runtime.prepare(tiny_ldm, CPU, "full", ldm.runtime.RuntimeOptions())
        assert torch.get_num_threads() == 2
        assert "--threads 1 may run" in capsys.readouterr().out
        ldm.runtime.prepare(tiny_ldm, CPU, "full", ldm.runtime.RuntimeOptions(threads=1))
        assert torch.get_num_threads() == 1 and capsys.readouterr().out == ""
    finally:
        torch.set_num_threads(before)


def test_compiled_unet_runs_without_the_packed_fast_paths(tiny_ldm):
    """--compile: inductor cannot lower the prepacked products (`weight must be a graph constant`), so a UNet to
    be compiled keeps plain layers (whatever the precision); the compiled UNet gives the eager one's eps."""
    import copy

    from ldm.runtime import RuntimeOptions, prepare
    from ldm.runtime.fast_paths import BlockedAttention, MatmulConv2d, PackedLinear

    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    eager = copy.deepcopy(tiny_ldm)
    cpu = torch.device("cpu")
    prepare(eager, cpu, "full", RuntimeOptions(threads=1))
    prepare(tiny_ldm, cpu, "full", RuntimeOptions(threads=1, compile=True))
    fast = (PackedLinear, MatmulConv2d, BlockedAttention)
    assert not any(isinstance(m, fast) for m in tiny_ldm.model.diffusion_model.modules())
    with torch.inference_mode():
        expected, compiled = eager.apply_model(x, t, c), tiny_ldm.apply_model(x, t, c)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "onednn_bf16, amx, expected", [(True, True, True), (True, False, False), (False, True, False)]
)
def test_cpu_has_amx_needs_onednn_bf16_and_the_tiles(monkeypatch, onednn_bf16, amx, expected):
    cpu(monkeypatch, onednn_bf16=onednn_bf16, avx512_bf16=True, amx=amx)
    assert ldm.runtime.bf16.cpu_has_amx() == expected


@pytest.mark.parametrize(
    "vendor, family, capability, expected",
    [
        ("AuthenticAMD", "26", "AVX512", True),  # Zen 5: full-width AVX512
        ("AuthenticAMD", "25", "AVX512", False),  # Zen 4: AVX512 in two halves
        ("AuthenticAMD", "23", "AVX2", False),  # Zen 1
        ("AuthenticAMD", "26", "AVX2", False),  # a torch that runs only AVX2 kernels there
        ("GenuineIntel", "6", "AVX512", False),  # MKL runs AVX512 itself on Intel's CPUs
    ],
)
def test_full_width_avx512_on_amd_from_the_cpu_family(
    monkeypatch, tmp_path, vendor, family, capability, expected
):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 2\n")
    monkeypatch.setattr(ldm.runtime.bf16, "Path", lambda path: cpuinfo if path == "/proc/cpuinfo" else path)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert ldm.runtime.bf16.cpu_has_full_width_avx512_on_amd() is expected
