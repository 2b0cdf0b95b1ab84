"""The command line: `hf-lowbit diagnose` end to end on a tiny checkpoint, and argument errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from hf_lowbit.cli import main
from hf_lowbit.demo import train_tokenizer


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tok = train_tokenizer("To be, or not to be, that is the question. " * 50, vocab_size=300)
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_diagnose_writes_json_and_plots(tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    assert main(["diagnose", str(tiny_checkpoint), "--output-dir", str(out), "--tokens", "128", "--block",
                 "32", "--gradients"]) == 0
    results = json.loads((out / "mean_bias.json").read_text())
    assert len([k for k in results if not k.endswith(".grad_output")]) == 7  # 7 linears in the one layer
    assert any(k.endswith(".grad_output") for k in results)
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["r2"]["mean"] <= 1.0
    assert sorted(p.name for p in out.glob("*.png"))
    assert "GEMM operands analysed" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["diagnose", "/no/such/dir"], "model='/no/such/dir' is not a local checkpoint"),
    (["demo", "--steps", "0"], "steps=0 is not valid"),
    (["demo", "--format", "fp8"], "format='fp8' is not valid"),
])
def test_argument_errors_name_the_field(argv, message, capsys, tmp_path):
    assert main(argv + ["--output-dir", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


def test_existing_output_is_never_overwritten(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "precious.txt").write_text("do not delete")
    assert main(["demo", "--output-dir", str(out)]) == 2
    assert main(["diagnose", str(tiny_checkpoint), "--output-dir", str(out)]) == 2
    assert (out / "precious.txt").read_text() == "do not delete"
    assert "--overwrite" in capsys.readouterr().err
