"""scripts/bench_mhmoe.py at toy size: both adapters train, matched trainable parameters, JSON written once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_mhmoe  # noqa: E402


def test_tiny_run_writes_matched_comparison(tmp_path):
    out = tmp_path / "mhmoe.json"
    result = bench_mhmoe.main(["--tiny", "--out", str(out), "--rounds", "1", "--steps-per-round", "2", "--warmup", "0"])
    saved = json.loads(out.read_text())
    rows = saved["results"]
    assert set(rows) == {"loramoe", "mhmoe"} and rows["mhmoe"]["num_heads"] == 8 and rows["loramoe"]["num_heads"] == 1
    assert rows["mhmoe"]["trainable_params"] == rows["loramoe"]["trainable_params"]  # matched parameter budget
    assert all(r["steps"] == 2 and r["median_step_ms"] > 0 for r in rows.values())
    assert saved["ratio_mhmoe_over_loramoe"] == pytest.approx(result["ratio_mhmoe_over_loramoe"])


def test_existing_output_and_bad_counts_are_refused(tmp_path, capsys):
    out = tmp_path / "mhmoe.json"
    out.write_text("keep")
    for argv, message in ((["--out", str(out)], "exists"),
                          (["--out", str(tmp_path / "new.json"), "--rounds", "0"], "--rounds=0 is not valid")):
        with pytest.raises(SystemExit):
            bench_mhmoe.main(["--tiny", *argv])
        assert message in capsys.readouterr().err
    assert out.read_text() == "keep" and not (tmp_path / "new.json").exists()
