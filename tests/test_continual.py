"""Continual-learning harness: OP/BWT, metrics, task loaders, answer-only encoding, and an end-to-end toy run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from hf_lowbit import continual
from hf_lowbit.continual import (ContinualConfig, Task, builtin_tasks, collate, encode, identifying_lengths,
                                 load_trace, op_bwt, rouge_l, run_continual, sari)

ROOT = Path(__file__).resolve().parents[1]


def test_op_bwt_on_a_hand_built_matrix():
    a = [[80.0, 10.0, 5.0],
         [60.0, 70.0, 20.0],
         [50.0, 65.0, 90.0]]
    op, bwt = op_bwt(a)
    assert op == pytest.approx((50 + 65 + 90) / 3)
    assert bwt == pytest.approx(((50 - 80) + (65 - 70)) / 2)
    assert op_bwt([[42.0]])[0] == 42.0 and math.isnan(op_bwt([[42.0]])[1])
    with pytest.raises(ValueError, match="square"):
        op_bwt([[1.0, 2.0]])


def test_metrics():
    assert continual.accuracy(" B.", "b") == 100.0 and continual.accuracy("B is right", "B") == 100.0
    assert continual.accuracy("C", "B") == 0.0
    assert rouge_l("the cat sat", "the cat sat") == 100.0
    assert rouge_l("the cat", "the dog sat") == pytest.approx(100 * 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert continual.edit_similarity("abcd", "abcf") == pytest.approx(75.0)
    # (keep F1, delete precision, add F1) per n-gram order, averaged over n = 1..4 (a 3-word line has no 4-grams)
    # no edit when none was needed: keep 1 for n <= 3, nothing deleted or added -> 100 * (3/4) / 3
    assert sari("a b c", "a b c", source="a b c") == pytest.approx(25.0)
    # the exact edit c -> d: n=1 (1, 1, 1), n=2 (1, 1, 1), n=3 (0, 1, 1), n=4 (0, 0, 0)
    assert sari("a b d", "a b d", source="a b c") == pytest.approx(100 * (2 / 4 + 3 / 4 + 3 / 4) / 3)


def test_identifying_prefix_lengths():
    assert identifying_lengths([[1, 2, 0], [3, 0]]) == [1, 1]
    assert identifying_lengths([[1, 2, 0], [1, 3, 0], [4, 0]]) == [2, 2, 1]
    assert identifying_lengths([[1, 0], [1, 1, 0]]) == [2, 2]  # a prefix choice is told apart by its eos


def test_builtin_tasks_are_deterministic_balanced_and_disjoint():
    tasks = builtin_tasks(n_train=64, n_test=20, seed=0)
    assert [t.name for t in tasks] == ["last_letter", "cloze", "first_letter", "ending"]
    again = builtin_tasks(n_train=64, n_test=20, seed=0)
    for t, u in zip(tasks, again):
        assert t.train == u.train and t.test == u.test
        assert len(t.test) == 20 and set(r["answer"] for r in t.test) <= set(t.choices)
        counts = [sum(r["answer"] == c for r in t.test) for c in t.choices]
        assert max(counts) - min(counts) <= 1  # round-robin over classes
        assert not {(r["prompt"], r["answer"]) for r in t.test} & {(r["prompt"], r["answer"]) for r in t.train}
    with pytest.raises(ValueError, match="unknown task"):
        builtin_tasks(names=["nope"])


def test_load_trace_layout(tmp_path):
    for name, split in (("C-STANCE", "test"), ("MeetingBank", "eval")):
        (tmp_path / name).mkdir()
        rows = [{"prompt": f"{name} q{i}", "answer": f"a{i}"} for i in range(5)]
        (tmp_path / name / "train.json").write_text(json.dumps(rows))
        (tmp_path / name / f"{split}.json").write_text("\n".join(json.dumps(r) for r in rows[:2]))  # JSON Lines
    tasks = load_trace(tmp_path, ["C-STANCE", "MeetingBank"], max_train=3)
    assert [(t.name, t.metric, len(t.train), len(t.test)) for t in tasks] == [
        ("C-STANCE", "accuracy", 3, 2), ("MeetingBank", "rouge_l", 3, 2)]
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path, ["FOMC"])


class CharTokenizer:
    """Byte-level stand-in for a tokenizer: enough to check the encoding (id 0 is eos/pad)."""

    eos_token_id = pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [b + 1 for b in text.encode()]}


def test_answer_only_labels_and_left_truncation():
    tok = CharTokenizer()
    ids, start = encode(tok, "abcdef", "xy", max_length=6)
    assert ids == [ord(c) + 1 for c in "def"] + [ord("x") + 1, ord("y") + 1, 0] and start == 3
    batch = collate([(ids, start), ([5, 6, 7], 2)], pad_id=0)
    assert batch["labels"][0].tolist() == [-100, -100, -100] + ids[3:]
    assert batch["labels"][1].tolist() == [-100, -100, 7, -100, -100, -100]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]
    left = collate([([5], 0), ([5, 6, 7], 2)], 0, left=True)
    assert left["input_ids"][0].tolist() == [0, 0, 5] and left["attention_mask"][0].tolist() == [0, 0, 1]


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    """A random tiny Qwen3 with a small BPE tokenizer trained on the package text, saved like a real checkpoint."""
    from transformers import AutoModelForCausalLM

    from hf_lowbit.demo import demo_text, tiny_qwen3_config, train_tokenizer

    path = tmp_path_factory.mktemp("toy_base")
    tok = train_tokenizer(demo_text()[:20000], vocab_size=300)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_qwen3_config(len(tok), hidden=32, layers=2)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _load_script():
    spec = importlib.util.spec_from_file_location("continual_script", ROOT / "scripts" / "continual.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_runs_the_builtin_sequence_end_to_end(toy_base, tmp_path):
    out = tmp_path / "run"
    result = _load_script().main(["--model", toy_base, "--output-dir", str(out), "--num-heads", "4", "--r", "2",
                                  "--steps", "3", "--batch-size", "4", "--max-train", "16", "--max-eval", "8",
                                  "--max-length", "64", "--neff", "--load-balancing-coef", "0.01"])
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert (out / "accuracy_matrix.png").stat().st_size > 0
    t = len(saved["tasks"])
    assert t == 4 and len(saved["matrix"]) == t and all(len(row) == t for row in saved["matrix"])
    op, bwt = op_bwt(saved["matrix"])
    assert saved["op"] == pytest.approx(op) and saved["bwt"] == pytest.approx(bwt)
    assert saved["steps"] == 3 * t and saved["step_time_s"] > 0 and saved["peak_memory_mb"] > 0
    assert saved["info"]["adapter"]["num_heads"] == 4 and saved["info"]["adapter"]["modules"] == 2
    assert [n["after_task"] for n in saved["neff"]] == saved["tasks"][:-1]
    layers = saved["neff"][0]["layers"]
    assert len(layers) == 2 and all(v["neff_weighted"] >= 1 for v in layers.values())


def test_generation_tasks_and_a_frozen_base_without_adapter_fail_clearly(toy_base):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_lowbit.model_patches.mhmoe import MHMoEConfig

    tok = AutoTokenizer.from_pretrained(toy_base)
    base = AutoModelForCausalLM.from_pretrained(toy_base)
    for p in base.parameters():
        p.requires_grad_(False)
    gen = Task("summ", [{"prompt": "Say: hail king", "answer": " hail"}] * 4,
               [{"prompt": "Say: hail king", "answer": " hail"}] * 2, metric="rouge_l", max_new_tokens=3)
    cfg = ContinualConfig(steps_per_task=2, batch_size=2, lr=1e-2, max_length=32)
    with pytest.raises(ValueError, match="no trainable parameters"):
        run_continual(base, tok, [gen], cfg, log=lambda *_: None)
    model = get_peft_model(base, MHMoEConfig(num_heads=2, r=2, task_type="CAUSAL_LM"))
    res = run_continual(model, tok, [gen, builtin_tasks(8, 4)[0]], cfg, log=lambda *_: None)
    assert res.metrics == ["rouge_l", "accuracy"] and all(0 <= s <= 100 for row in res.matrix for s in row)
