"""The profiling scripts at toy size on a CPU: they run, time both precisions and refuse bad input up front."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import kernel_switch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import profile_experts  # noqa: E402
import profile_train_step  # noqa: E402
import ab_quantizer  # noqa: E402,F401


def test_train_step_profile_compares_precisions(tmp_path):
    out = tmp_path / "prof.json"
    results = profile_train_step.main(["--config", "qwen3-tiny", "--vocab", "256", "--batch", "2", "--seq", "16",
                                       "--warmup", "1", "--steps", "1", "--rows", "3", "--out", str(out)])
    assert [r["precision"] for r in results] == ["bf16", "nvfp4-averis"]
    assert all(r["tokens_per_s"] > 0 and "Name" in r["table"] for r in results)
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and len(saved["results"]) == 2 and "table" not in saved["results"][0]


def test_host_profile_names_the_fp4_layers(tmp_path):
    results = profile_train_step.main(["--config", "qwen3-tiny", "--vocab", "256", "--batch", "2", "--seq", "16",
                                       "--precisions", "nvfp4-averis", "--warmup", "1", "--steps", "1",
                                       "--rows", "3", "--host-rows", "400"])
    host = results[0]["host_table"]
    assert "function calls" in host and "layers.py" in host  # the LowBitLinear forward shows up by file


def test_device_time_counts_device_events_only():
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(device_type=cpu, device_time_total=500.0),   # the op that launched the kernel
              SimpleNamespace(device_type=cuda, device_time_total=120.0),  # the kernel itself
              SimpleNamespace(device_type=cuda, device_time_total=30.5)]
    assert profile_train_step.kernel_time_us(events) == 150.5


def test_profiles_refuse_bad_input(tmp_path, capsys):
    out = tmp_path / "keep.json"
    out.write_text("keep")
    for main, argv, message in (
            (profile_train_step.main, ["--precisions", "fp8"], "--precisions='fp8' is not valid"),
            (profile_train_step.main, ["--steps", "0"], "--steps=0 is not valid"),
            (profile_train_step.main, ["--config", "qwen3-tiny", "--out", str(out)], "exists"),
            (profile_experts.main, ["--tiny", "--tokens", "0"], "--tokens=0 is not valid"),
            (profile_experts.main, ["--tiny", "--out", str(out)], "exists"),
            (profile_experts.main, ["--tiny", "--iters", "0"], "--iters=0 is not valid")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
    assert out.read_text() == "keep"


def test_experts_profile_tiny(tmp_path):
    out = tmp_path / "table.txt"
    profile_experts.main(["--tiny", "--rows", "3", "--out", str(out)])
    text = out.read_text()
    assert "experts fwd+bwd" in text and "GroupedAverisLinear" in text  # the FP4 experts op ran and was profiled
    assert "host (self CPU time)" in text
    timeline = text.split("timeline (median, no profiler): ")[1].splitlines()[0]
    times = dict(item.split(" ") for item in timeline.split(", "))
    assert set(times) == {"host_fwd_ms", "host_bwd_ms"} and all(float(v) > 0 for v in times.values())  # CPU: host


def test_device_idle_finds_the_gaps_and_what_the_host_did():
    """`device_idle` on a hand-made event list: busy time is the union of kernel intervals (overlaps counted once),
    idle the rest of the span, the longest gap first with the kernel after it and the innermost host op at its
    middle."""
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, start, end, kind):
        return SimpleNamespace(name=name, device_type=kind, time_range=SimpleNamespace(start=start, end=end))

    events = [event("k1", 0, 10, cuda), event("k2", 5, 20, cuda), event("k3", 50, 60, cuda), event("k4", 62, 70, cuda),
              event("step", 0, 80, cpu), event("aten::copy_", 25, 45, cpu)]
    idle = profile_experts.device_idle(SimpleNamespace(events=lambda: events), top=2)
    assert (idle["span_ms"], idle["busy_ms"], idle["idle_ms"], idle["gaps"]) == (0.07, 0.038, 0.032, 2)
    assert idle["longest_gaps_us"] == [(30.0, "k3", "aten::copy_ < step"), (2.0, "k4", "step")]
    assert profile_experts.device_idle(SimpleNamespace(events=lambda: [events[4]])) == {}


def _assert_refused(main, cases, capsys, kept: Path) -> None:
    """Each (argv, message) exits with `message` on stderr before any work; `kept` (an existing --out) survives."""
    for argv, message in cases:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
    assert kept.read_text() == "keep"


def _cuda_cases() -> list:
    return [] if torch.cuda.is_available() else [([], "no CUDA device")]


def test_linear_host_profile_refuses_bad_input_and_a_cpu_only_machine(tmp_path, capsys):
    import profile_linear_host

    out = tmp_path / "keep.json"
    out.write_text("keep")
    cases = [(["--k", "8"], "--k=8 is not valid"), (["--iters", "0"], "--iters=0 is not valid"),
             (["--out", str(out)], "exists")] + _cuda_cases()
    _assert_refused(profile_linear_host.main, cases, capsys, out)


def test_wrapper_host_profile_counts_the_launches(tmp_path, capsys, monkeypatch):
    """scripts/profile_wrapper_host.py: the Averis linear fwd+bwd with every Triton kernel and the cuBLAS product
    stubbed out (CPU) makes its 16 launches (X and dY: stats + finalize + quantize, which also quantizes the mean;
    W: absmax + quantize; 2 mean GEMVs; 3 GEMMs, each a cuBLAS product + an epilogue pass), the kernels are
    restored afterwards, and bad sizes / an existing --out are refused."""
    pytest.importorskip("triton")
    import profile_wrapper_host

    from hf_lowbit.kernels import quantize

    kernel = quantize._quant_kernel
    out = tmp_path / "w.json"
    with kernel_switch(monkeypatch, "HF_LOWBIT_GEMM", "cublas32"):  # the cuBLAS path (small layers: Triton's)
        result = profile_wrapper_host.main(["--m", "64", "--k", "32", "--n", "48", "--iters", "5", "--out", str(out)])
    assert result["launches_per_step"] == 16 and result["launches"]["cublas_mm"] == 3
    assert result["launches"]["_epilogue_kernel"] == 3
    assert result["launches"]["_col_stats_kernel"] == 2 and result["launches"]["_absmax_kernel"] == 1
    assert result["launches"]["_quant_kernel"] == 3
    assert result["fwd_bwd_us"] > 0 and json.loads(out.read_text())["launches_per_step"] == 16
    assert quantize._quant_kernel is kernel
    for argv, match in ((["--out", str(out)], "exists"), (["--k", "8"], "--k=8")):
        with pytest.raises(SystemExit):
            profile_wrapper_host.main(argv)
        assert match in capsys.readouterr().err


def test_quantizer_probe_copy_kernel_and_bad_input(tmp_path, capsys):
    """scripts/probe_quantizer.py: its tiled copy moves exactly the tile (ragged shape, both outputs, the re-read
    variant doubles), and bad input is refused before any work."""
    import probe_quantizer

    from conftest import kernel_test_device

    dev = kernel_test_device()
    x = torch.randn(40, 70, device=dev).to(torch.bfloat16)
    y, z = torch.zeros_like(x), torch.zeros_like(x)
    probe_quantizer._tiled_copy_kernel[(3, 3)](x, y, z, 40, 70, BM=16, BK=32, TWO=True, REREAD=True)
    assert torch.equal(y, x) and torch.equal(z, x * 2)
    out = tmp_path / "keep.json"
    out.write_text("keep")
    cases = [(["--m", "0"], "--m=0 is not valid"), (["--out", str(out)], "exists")] + _cuda_cases()
    _assert_refused(probe_quantizer.main, cases, capsys, out)


def test_sass_count_of_the_quantizer_compiles_for_hopper_without_a_gpu(tmp_path):
    """scripts/count_sass.py compiles the quantizer (and with --other-kernels the grouped path's kernels) for sm_90 on
    this machine (a fresh process: the kernels must not be the interpreter's) and counts its common-path
    instructions; unknown constexprs are refused up front."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "count_sass.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sass.json"
    run = subprocess.run([sys.executable, str(script), "mx:IS_NV=False,B=32", "--other-kernels", "--json", str(out)],
                         env=env, capture_output=True, text=True)
    if run.returncode != 0 and "ptxas is missing" in run.stderr:
        pytest.skip("this Triton install has no NVIDIA backend tools")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["variants"]
    # the grouped path's other kernels compile for Hopper too (a GPU-only compile error shows here, on any machine)
    assert {"group_col_absmax", "group_col_stats", "group_finalize", "quant_grouped_col_sum",
            "epilogue_mean_row"} <= set(rows)
    row = rows["mx"]
    assert row["consts"] == {"IS_NV": False, "B": 32}
    # 64×64 tile, 128 threads: 32 elements per thread and axis, each loaded, centred, maxed, scaled, rounded, stored
    assert 64 * 8 < row["instructions"] < 20000 and 0 < row["registers"] <= 255
    assert row["opcodes"]["FMNMX"] >= 64 and "CALL" not in row["opcodes"]  # block maxima; no IEEE division (MXFP4)
    bad = subprocess.run([sys.executable, str(script), "x:NOPE=1"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "NOPE=1" in bad.stderr and "KEY one of" in bad.stderr


def test_quantizer_ab_prepares_an_earlier_version_and_finds_it_identical(tmp_path):
    """scripts/ab_quantizer.py: --prepare writes a commit's quantizer as its own package; the bitwise comparison
    then finds HEAD's version and the working tree's identical (RTN everywhere, SR where the streams do not enter);
    without a GPU the timing run is refused; an unknown revision is refused by name."""
    import importlib
    import os
    import subprocess

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("runs the kernels under the interpreter")
    import ab_quantizer

    root = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    assert ab_quantizer.main(["--prepare", "HEAD", "--dir", str(tmp_path)]) == 0
    src = (tmp_path / "qh" / "quantize.py").read_text()
    assert "from qh._common import" in src and "from hf_lowbit.kernels._common import" not in src
    sys.path.insert(0, str(tmp_path))
    try:
        old = importlib.import_module("qh.quantize")
        from hf_lowbit.kernels import quantize as new

        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        x[3, :16] = 0.0
        assert ab_quantizer.mismatches(old, new, [x]) == []

        class Perturbed:  # a "new" version whose row-axis operand differs in one element
            @staticmethod
            def averis_quantize(t, *args, **kw):
                q = new.averis_quantize(t, *args, **kw)
                if q.row_dq is not None:
                    q.row_dq[0, 0] = float("nan")
                return q

        found = ab_quantizer.mismatches(old, Perturbed, [x])
        assert found and all(m.endswith("row_dq") or "codes vs dq" in m for m in found)
        assert "nvfp4 rtn both_dq center=True row_dq" in found
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "qh" or m.startswith("qh.")]:
            del sys.modules[name]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as err:
            ab_quantizer.main(["--dir", str(tmp_path)])
        assert err.value.code == 2
    with pytest.raises(SystemExit):  # an existing copy is not overwritten
        ab_quantizer.main(["--prepare", "HEAD", "--dir", str(tmp_path)])
    assert (tmp_path / "qh" / "quantize.py").read_text() == src
    with pytest.raises(SystemExit):  # an unknown revision: refused before anything is written
        ab_quantizer.main(["--prepare", "no-such-revision", "--dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_grouped_gemm_bench_cases_are_consistent_and_bad_input_is_refused(capsys):
    """scripts/bench_grouped_parts.py: its six cases give the same products through cuBLAS + the epilogue pass and
    through the Triton GEMM (tiny sizes, CPU interpreter); bad sizes and a missing GPU are refused up front."""
    pytest.importorskip("triton")
    import bench_grouped_parts

    from hf_lowbit.kernels import gemm

    cases = bench_grouped_parts.gemm_cases(2, 32, 32, 16, torch.device("cpu"))
    assert len(cases) == 6
    for name, case in cases.items():
        kw = {k: v for k, v in case.items() if k not in ("a", "b")}
        ref = gemm.cublas_epilogue(case["a"], case["b"], torch.bfloat16, fp32_product=True, **kw).float()
        got = gemm.scaled_gemm(case["a"], case["b"], torch.bfloat16, **kw).float()
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()), msg=name)
    for argv, match in ((["--capacity", "0"], "--capacity=0 is not valid"),) + (
            () if torch.cuda.is_available() else ((["--experts", "2"], "needs a CUDA GPU"),)):
        with pytest.raises(SystemExit):
            bench_grouped_parts.main(argv)
        assert match in capsys.readouterr().err
