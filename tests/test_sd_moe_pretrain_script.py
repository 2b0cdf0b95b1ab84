"""scripts/sd_moe_pretrain.py at toy size: four runs (baseline / SD-MoE at two LRs), plots and summary written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sd_moe_pretrain.py"


def _script():
    spec = importlib.util.spec_from_file_location("sd_moe_pretrain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_on_site_packages_text(tmp_path):
    out = tmp_path / "sd"
    summary = _script().main(["--tiny", "--data", "site-packages", "--max-bytes", "300000", "--steps", "4",
                              "--eval-every", "2", "--output-dir", str(out), "--device", "cpu"])
    runs = summary["runs"]
    assert set(runs) == {"baseline@lr", "sd_moe@lr", "baseline@4xlr", "sd_moe@4xlr"}
    for name, r in runs.items():
        assert r["sd_moe"] == name.startswith("sd_moe") and r["held_out_loss"] > 0 and len(r["eval"]) == 2
    assert summary["args"]["data"] == "site-packages"
    assert json.loads((out / "summary.json").read_text())["runs"].keys() == runs.keys()
    assert (out / "loss_curves.png").stat().st_size > 0 and len(list(out.glob("similarity_*.png"))) == 8


def test_earlier_results_and_bad_sizes_are_refused(tmp_path, capsys):
    out = tmp_path / "sd"
    out.mkdir()
    (out / "summary.json").write_text("keep")
    script = _script()
    for argv, message in ((["--output-dir", str(out)], "holds an earlier run's summary.json"),
                          (["--output-dir", str(tmp_path / "new"), "--max-bytes", "0"], "--max-bytes=0")):
        with pytest.raises(SystemExit):
            script.main(["--tiny", *argv])
        assert message in capsys.readouterr().err
    assert (out / "summary.json").read_text() == "keep" and not (tmp_path / "new").exists()
