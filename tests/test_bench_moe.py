"""Smoke test of scripts/bench_moe.py in its --tiny CPU mode (run in-process)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_moe.py"

#: loose agreement of the FP4 experts with the BF16 ones: a wrong computation (weights not copied, routing lost)
#: gives ~1.0+; MXFP4 (32-element blocks, power-of-two scales) is noisier than NVFP4 at these toy sizes.
MAX_OUT_REL_ERR = {"nvfp4": 0.3, "mxfp4": 0.35}


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_moe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_moe") / "results.json"
    assert _load_script().main(["--tiny", "--out", str(out), "--budget-s", "0"]) == 0  # 0: no time budget
    return json.loads(out.read_text())


def test_json_header(tiny_run):
    env = tiny_run["env"]
    for key in ("device", "device_name", "torch", "transformers", "triton"):
        assert key in env
    assert env["device"] == "cpu" and tiny_run["tiny"] is True
    for section in ("experts", "sd_moe"):
        assert _positive_finite(tiny_run[section]["elapsed_s"])
        for row in [tiny_run[section], *tiny_run[section]["results"]]:
            assert "error" not in row and "skipped" not in row, row


def test_experts_rows_times_and_agreement(tiny_run):
    ex = tiny_run["experts"]
    assert ex["shape"] == {"tokens": 64, "hidden": 64, "intermediate": 32, "experts": 8, "top_k": 2}
    rows = {r["name"]: r for r in ex["results"]}
    assert set(rows) == {"bf16_grouped_mm", "nvfp4_auto", "nvfp4_torch", "mxfp4_auto"}
    assert rows["bf16_grouped_mm"]["experts_implementation"] == "grouped_mm"
    for row in rows.values():
        for key in ("median_ms", "mean_ms", "min_ms", "ratio"):
            assert _positive_finite(row[key]), (row["name"], key, row[key])
        assert row["reps"] >= 3
    for name in ("nvfp4_auto", "nvfp4_torch", "mxfp4_auto"):
        row = rows[name]
        assert row["module"] == "LowBitExperts"
        assert row["backend_resolved"] == "torch" and row["grouped_accelerated"] is False  # CPU: reference
        assert 0.0 < row["out_rel_err"] < MAX_OUT_REL_ERR[row["format"]], (name, row["out_rel_err"])
        assert 0.0 < row["dx_rel_err"] < 0.5, (name, row["dx_rel_err"])
    assert ex["ratio_nvfp4_auto"] == rows["nvfp4_auto"]["ratio"]
    assert isinstance(ex["meets_target"], bool)


def test_sd_moe_rows_and_overheads(tiny_run):
    sd = tiny_run["sd_moe"]
    rows = {(r["precision"], r["name"]): r for r in sd["results"]}
    assert set(rows) == {("autocast", n) for n in ("stock", "hp", "sd", "fp4", "fp4_sd")} | {
        ("bf16", n) for n in ("stock", "hp", "sd")}
    for (precision, name), row in rows.items():
        assert _positive_finite(row["mean_ms"]) and _positive_finite(row["median_ms"])
        assert len(row["step_ms"]) == sd["timed_steps"] and all(_positive_finite(t) for t in row["step_ms"])
        assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
        is_sd = name in ("sd", "fp4_sd")
        assert row["experts_module"] == ("SDMoEExperts" if is_sd else "Qwen3MoeExperts" if name == "stock"
                                         else "LowBitExperts")
        # the timed window holds timed_steps / refresh_every basis refreshes
        assert row["refreshes_timed"] == (sd["timed_steps"] // sd["refresh_every"] if is_sd else None)
        assert row["triton_compiles_timed_window"] == []  # CPU: the interpreter compiles nothing
    pairs = {(o["precision"], o["variant"], o["baseline"]): o for o in sd["overheads"]}
    assert ("autocast", "sd", "stock") in pairs and ("autocast", "fp4_sd", "fp4") in pairs
    assert all(math.isfinite(o["overhead_pct"]) for o in pairs.values())
    # the overhead is the median of per-round ratios of the interleaved loops
    v, b = rows[("autocast", "sd")]["step_ms"], rows[("autocast", "stock")]["step_ms"]
    ratios = sorted(x / y for x, y in zip(v, b))
    expected = 100 * ((ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2 - 1) if len(ratios) % 2 == 0 \
        else 100 * (ratios[len(ratios) // 2] - 1)
    assert pairs[("autocast", "sd", "stock")]["overhead_pct"] == pytest.approx(expected)


def test_bad_arguments_fail_before_any_work(tmp_path, capsys):
    script = _load_script()
    with pytest.raises(SystemExit) as err:
        script.main(["--tiny", "--out", str(tmp_path / "x.json"), "--sd-precisions", "fp8"])
    assert err.value.code == 2 and "--sd-precisions='fp8' is not valid" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_existing_results_are_not_overwritten(tmp_path, capsys):
    script = _load_script()
    out = tmp_path / "x.json"
    out.write_text("{\"keep\": 1}")
    with pytest.raises(SystemExit) as err:
        script.main(["--tiny", "--out", str(out), "--skip-sd"])
    assert err.value.code == 2 and f"--out={str(out)!r} exists" in capsys.readouterr().err
    assert out.read_text() == '{"keep": 1}'


def test_sd_accumulation_counts_micro_batches(tmp_path):
    """--sd-accum 2: the SD-MoE rows train with two micro-batches per optimizer step (tokens per step doubled), and
    the refresh still follows optimizer steps."""
    out = tmp_path / "accum.json"
    bench = _load_script()
    assert bench.main(["--tiny", "--out", str(out), "--budget-s", "0", "--skip-experts", "--skip-sd-fp4",
                       "--sd-precisions", "autocast", "--sd-accum", "2"]) == 0
    sd = json.loads(out.read_text())["sd_moe"]
    assert sd["micro_batches_per_step"] == 2 and sd["tokens_per_step"] == 2 * 2 * 32
    rows = {r["name"]: r for r in sd["results"]}
    assert rows["sd"]["refreshes_timed"] == sd["timed_steps"] // sd["refresh_every"]
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--out", str(tmp_path / "bad.json"), "--sd-accum", "0"])
    assert not (tmp_path / "bad.json").exists()


def test_bench_sd_refresh_tiny(tmp_path, capsys):
    """scripts/bench_sd_refresh.py --tiny: a refresh time per driver and top-k subspaces equal to an FP64 SVD's;
    an existing --out and a bad --rank are refused before any work."""
    spec = importlib.util.spec_from_file_location("bench_sd_refresh", SCRIPT.parent / "bench_sd_refresh.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "refresh.json"
    rows = script.main(["--tiny", "--reps", "2", "--out", str(out)])
    assert [r["driver"] for r in rows] == ["lapack", "subspace"] and json.loads(out.read_text())["rows"] == rows
    assert all(_positive_finite(r["median_ms"]) and r["matrices"] == 6 for r in rows)
    assert all(r["subspace_err"] < 1e-5 for r in rows)  # the warm-started subspace iteration too
    assert script.best_driver(rows, "tiny") in ("lapack", "subspace")
    rows = rows[:1]
    slow_exact, fast_wrong = {**rows[0], "driver": "gesvd", "median_ms": 1e-3}, {**rows[0], "driver": "gesvdj",
                                                                                  "median_ms": 1e-6, "subspace_err": 0.1}
    assert script.best_driver(rows + [slow_exact, fast_wrong], "tiny") == "gesvd"  # fastest among the accurate
    assert script.best_driver(rows, "no such shape") == "gesvda"
    bad = [(["--tiny", "--out", str(out)], "exists"), (["--tiny", "--rank", "0", "--out", "x"], "--rank=0"),
           (["--tiny", "--drivers", "lanczos", "--out", "x"], "--drivers='lanczos'"),
           (["--tiny", "--shapes", "3", "--out", "x"], "--shapes='3'")]
    for argv, match in bad:
        with pytest.raises(SystemExit):
            script.main(argv)
        assert match in capsys.readouterr().err


def test_profile_sd_step_pieces_run_on_cpu(monkeypatch):
    """scripts/profile_sd_step.py (GPU timing): its pieces run at toy size on the CPU, the eager variant of the rule
    sets HF_LOWBIT_SD_GRAPH=0 only while it runs, and the script refuses to start without a GPU, bad flags first."""
    _load_script()  # profile_sd_step imports bench_moe
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import torch

    import profile_sd_step as prof

    bench = sys.modules["bench_moe"]
    monkeypatch.setenv("HF_LOWBIT_SD_GRAPH", "1")
    seen = []
    pieces = prof.pieces("bf16", torch.device("cpu"), bench.TINY_LM, bench.Settings(device="cpu"))
    assert list(pieces) == ["fwd_bwd stock", "fwd_bwd hp", "fwd_bwd sd", "project_gradients sd",
                            "project_gradients sd eager", "refresh_bases sd"]
    for fn in pieces.values():
        fn()
    prof.eager(lambda: seen.append(os.environ["HF_LOWBIT_SD_GRAPH"]))
    assert seen == ["0"] and os.environ["HF_LOWBIT_SD_GRAPH"] == "1"
    with pytest.raises(SystemExit):
        prof.main(["--iters", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            prof.main([])
