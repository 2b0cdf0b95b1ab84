"""Smoke test of scripts/reproduce_meanbias.py in its --tiny CPU mode (a few steps, two recipes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_meanbias.py"


def test_tiny_reproduction_writes_table_curves_and_diagnostics(tmp_path):
    out = tmp_path / "repro"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--configs", "bf16,nvfp4-averis",
           "--steps", "6", "--eval-every", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in res["table"]}
    assert set(rows) == {"bf16", "nvfp4-averis"}
    assert rows["bf16"]["gap_to_bf16_pct"] == 0.0
    for r in res["runs"].values():
        assert [s for s, _ in r["curve"]] == [3, 6] and r["curve"][-1][1] < r["curve"][0][1] + 0.5
    late = res["runs"]["bf16"]["diagnostics"]["late"]
    assert 0.0 <= late["r2"] <= 1.0 and (out / "diag_late" / "mean_bias.json").exists()
    assert "| nvfp4-averis |" in proc.stdout


@pytest.mark.parametrize("extra,message", [(["--configs", "fp8"], "--configs='fp8' is not valid"),
                                           (["--hidden", "30"], "--hidden=30 is not valid")])
def test_bad_arguments_fail_before_any_work(extra, message, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_meanbias", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as err:
        script.main(["--tiny", "--out", str(tmp_path / "x"), *extra])
    assert err.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_meanbias", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_chunked_tokenization_round_trips_the_text():
    from hf_lowbit.corpus import tokenize_chunked
    from hf_lowbit.demo import demo_text, train_tokenizer

    text = demo_text()[:20_000] + "\nno newline at the end"
    tok = train_tokenizer(text, vocab_size=300)
    ids = tokenize_chunked(tok, text, chunk_chars=997)
    assert tok.decode(ids.tolist()) == text
    assert abs(len(ids) - len(tok(text)["input_ids"])) < 0.02 * len(ids)


def test_merge_combines_parallel_runs(tmp_path):
    script = _script()
    common = ["--tiny", "--steps", "2", "--eval-every", "2"]
    assert script.main([*common, "--configs", "bf16", "--out", str(tmp_path / "a")]) == 0
    assert script.main([*common, "--configs", "nvfp4,nvfp4-averis", "--out", str(tmp_path / "b")]) == 0
    assert script.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    res = json.loads((tmp_path / "m" / "results.json").read_text())
    assert [r["config"] for r in res["table"]] == ["bf16", "nvfp4", "nvfp4-averis"]
    assert isinstance(res["paper_ordering_held"], bool) and res["table"][0]["gap_to_bf16_pct"] == 0.0
    assert script.main([*common, "--configs", "nvfp4", "--seq", "32", "--out", str(tmp_path / "c")]) == 0
    with pytest.raises(SystemExit, match="same arguments"):
        script.main(["--merge", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "n")])
    with pytest.raises(SystemExit, match="hold no results.json"):
        script.main(["--merge", str(tmp_path / "a"), str(tmp_path / "nope"), "--out", str(tmp_path / "n")])
    assert not (tmp_path / "n").exists()


def test_text_sources():
    from hf_lowbit.corpus import load_text

    code = load_text("site-packages", max_bytes=50_000)
    assert len(code) >= 50_000 and "def " in code and code == load_text("site-packages", max_bytes=50_000)
    assert "Macbeth" in load_text("shakespeare") or "MACBETH" in load_text("shakespeare")
    with pytest.raises(ValueError, match="allowed"):
        load_text("wikipedia")
