"""scripts/train.py / `hf-lowbit train` (hf_lowbit.train): tiny CPU runs for every precision, resume, DDP, errors.

The FP4 reference numerics are many small tensor ops: with several threads on a shared CPU they spin; the runs here
use one thread (set in the fixture, and OMP_NUM_THREADS=1 for the subprocesses).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_lowbit import train as T

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _losses(out: Path, key: str = "loss") -> dict[int, float]:
    hist = json.loads((out / T.LOG_FILE).read_text())["log_history"]
    return {h["step"]: h[key] for h in hist if key in h}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One --tiny FP4 run that trains its own tokenizer, checkpoints every 3 steps, finalizes, logs mean bias."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny") / "run"
    argv = ["--tiny", "--precision", "nvfp4-averis", "--max-steps", "6", "--save-every", "3", "--eval-every", "3",
            "--save-total-limit", "3", "--finalize", "--mean-bias-every", "3", "--no-progress",
            "--output-dir", str(out)]
    assert T.main(argv) == 0
    return out, argv


def _tiny(tok: Path, out: Path, *extra: str) -> list[str]:
    return ["--tiny", "--no-progress", "--tokenizer", str(tok), "--output-dir", str(out), *extra]


# ---------------------------------------------------------------------------------------------------------------------
def test_tiny_run_outputs(tiny_run):
    from transformers import AutoModelForCausalLM

    import hf_lowbit

    out, _ = tiny_run
    log = json.loads((out / T.LOG_FILE).read_text())
    assert log["run"]["precision"] == "nvfp4-averis"
    assert log["run"]["quantization_config"]["mean_center"] is True
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in losses.values())
    assert sorted(_losses(out, "eval_loss")) == [3, 6]
    assert sorted(_losses(out, "meanbias/r2")) == [3, 6]
    assert math.isfinite(log["summary"]["eval_loss"])
    for d in ("checkpoint-3", "checkpoint-6", "final", "finalized", "tokenizer"):
        assert (out / d).is_dir(), d
    assert log["summary"]["finalized"]["reload_identical"] is True
    assert log["summary"]["tokens_per_s"] > 0  # steady state: steps 2..6 of 6
    packed = AutoModelForCausalLM.from_pretrained(out / "finalized")
    assert packed.config.quantization_config.mode == "infer"
    assert isinstance(packed.model.layers[0].mlp.down_proj, hf_lowbit.LowBitLinear)


def test_checkpoint_reloads_as_train_mode_model(tiny_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import hf_lowbit

    out, _ = tiny_run
    ckpt = out / "checkpoint-3"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    cfg = model.config.quantization_config
    assert isinstance(cfg, hf_lowbit.LowBitConfig) and cfg.mode == "train" and cfg.mean_center and not cfg.hadamard
    layer = model.model.layers[1].self_attn.q_proj
    assert isinstance(layer, hf_lowbit.LowBitLinear) and layer.mode == "train"
    saved = load_file(ckpt / "model.safetensors")
    for name, p in model.state_dict().items():
        assert torch.equal(p, saved[name]), name


def test_resume_gives_the_same_losses(tiny_run, tmp_path):
    out, argv = tiny_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-6")
    # resuming into the non-empty directory is allowed without --overwrite; --finalize etc. as before
    args = [a if a != str(out) else str(resumed) for a in argv] + ["--resume"]
    assert T.main(args) == 0
    full, again = _losses(out), _losses(resumed)
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # SR streams are restored too, so every later step repeats bit for bit
        assert again[step] == pytest.approx(full[step], abs=1e-6), (step, full, again)
    assert _losses(resumed, "eval_loss")[6] == pytest.approx(_losses(out, "eval_loss")[6], abs=1e-6)


@pytest.mark.parametrize("precision", T.PRECISIONS)
def test_every_precision_trains(tiny_run, tmp_path, precision):
    out = tmp_path / precision
    assert T.main(_tiny(tiny_run[0] / "tokenizer", out, "--precision", precision, "--max-steps", "8")) == 0
    losses = [v for _, v in sorted(_losses(out).items())]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.2, losses
    config = json.loads((out / "final" / "config.json").read_text())
    if precision == "bf16":
        assert "quantization_config" not in config
    else:
        qc = config["quantization_config"]
        fmt, *flags = precision.split("-")
        assert (qc["format"], qc["mean_center"], qc["hadamard"]) == (fmt, "averis" in flags, "hadamard" in flags)
        assert qc["mode"] == "train"


def test_ddp_two_processes_match_one(tiny_run, tmp_path):
    """torchrun, 2 CPU processes (gloo) × batch 4 vs 1 process × batch 8: same global batches, same losses."""
    tok = tiny_run[0] / "tokenizer"
    common = ["--precision", "bf16", "--max-steps", "4", "--eval-fraction", "0"]
    assert T.main(_tiny(tok, tmp_path / "one", *common, "--batch-size", "8")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
           str(REPO / "scripts" / "train.py"), *_tiny(tok, tmp_path / "two", *common, "--batch-size", "4")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert json.loads((tmp_path / "two" / T.LOG_FILE).read_text())["run"]["world_size"] == 2
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5), (one, two)


# ---------------------------------------------------------------------------------------------------------------------
def test_local_files_and_directories_are_sorted_and_split(tmp_path):
    from transformers import AutoTokenizer

    from hf_lowbit.demo import demo_text

    text = demo_text()[:20_000]
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text(text[10_000:])
    (d / "sub" / "a.txt").write_text(text[:10_000])
    (d / "skip.md").write_text("not matched")
    assert T.expand_files([str(d)], "*.txt") == [d / "b.txt", d / "sub" / "a.txt"]
    tok = T.train_bpe_tokenizer(iter([text]), 300)
    tok.save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    a = T.resolve_args(T.build_parser().parse_args(
        ["--from-config", "qwen3-tiny", "--train-files", str(d), "--output-dir", str(tmp_path / "o"),
         "--block-size", "32", "--eval-fraction", "0.1"]))
    train, held = T.local_datasets(a, tok)
    train2, held2 = T.local_datasets(a, tok)
    assert torch.equal(train.blocks, train2.blocks) and torch.equal(held.blocks, held2.blocks)
    n = len(train) + len(held)
    assert len(held) == math.ceil(0.1 * n)
    ids = T.tokenize_stream(T._read_chunks(T.expand_files([str(d)], "*.txt")), tok)
    assert torch.equal(torch.cat([train.blocks, held.blocks]).flatten(), ids[: n * 32])  # tail is held out
    assert (ids == tok.eos_token_id).sum() == 2  # one EOS after each document (file)
    a.eval_files = [str(d / "b.txt")]
    _, held3 = T.local_datasets(a, tok)
    assert len(held3) == len(T.tokenize_stream([((d / "b.txt").read_text(), True)], tok)) // 32


def test_named_configs_and_precision_mapping():
    from transformers import PreTrainedTokenizerFast

    tok = T.train_bpe_tokenizer(iter(["hello world " * 50]), 300)
    assert isinstance(tok, PreTrainedTokenizerFast)
    for name in T.NAMED_CONFIGS:
        cfg = T.named_config(name, tok)
        assert cfg.vocab_size >= len(tok) and cfg.vocab_size % 64 == 0
    assert T.lowbit_config("bf16") is None
    expect = {"nvfp4": ("nvfp4", False, False), "nvfp4-averis": ("nvfp4", True, False),
              "mxfp4": ("mxfp4", False, False), "mxfp4-averis": ("mxfp4", True, False),
              "nvfp4-hadamard": ("nvfp4", False, True), "nvfp4-averis-hadamard": ("nvfp4", True, True)}
    for precision, (fmt, mc, had) in expect.items():
        c = T.lowbit_config(precision)
        assert (c.format, c.mean_center, c.hadamard, c.mode, c.moe) == (fmt, mc, had, "train", None)


def test_moe_sd_reaches_the_config_and_the_trainer_runs_its_callback(tiny_run, tmp_path, monkeypatch):
    """--moe sd sets LowBitConfig(moe="sd") and hands Trainer the SD-MoE callback (gradient rule + refresh schedule):
    without it an SD-MoE model trains as plain W_c + W_u experts."""
    from hf_lowbit.model_patches.sd_moe import SDMoECallback

    a = T.resolve_args(T.build_parser().parse_args(
        ["--tiny", "--from-config", "qwen3-moe-tiny", "--moe", "sd", "--output-dir", str(tmp_path / "o")]))
    cfg = T.lowbit_config(a.precision, a.moe, a.quant_backend, a.seed)
    assert cfg.moe == "sd" and cfg.to_dict()["moe"] == "sd"
    steps: list[int] = []
    original = SDMoECallback.on_optimizer_step

    def counting(self, args, state, control, **kw):
        steps.append(state.global_step)
        return original(self, args, state, control, **kw)

    monkeypatch.setattr(SDMoECallback, "on_optimizer_step", counting)
    out = tmp_path / "sd"
    assert T.main(_tiny(tiny_run[0] / "tokenizer", out, "--from-config", "qwen3-moe-tiny", "--moe", "sd",
                        "--max-steps", "2")) == 0
    assert steps == [0, 1]


def test_report_to_auto_without_tensorboard(monkeypatch):
    import importlib.util

    have_tb = any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
    assert T._report_to(["none"]) == []
    assert T._report_to(["wandb"]) == ["wandb"]
    assert T._report_to(["auto"]) == (["tensorboard"] if have_tb else [])


# ---------------------------------------------------------------------------------------------------------------------
def _errors(tmp_path):
    out = str(tmp_path / "out")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    a_file = tmp_path / "file.txt"
    a_file.write_text("hello")
    return [
        (["--output-dir", out], "no model"),
        (["--tiny", "--model", "m", "--from-config", "qwen3-tiny", "--output-dir", out], "--from-config='qwen3-tiny'"),
        (["--from-config", "qwen3-tiny", "--output-dir", out], "no training data"),
        (["--tiny", "--dataset", "d", "--train-files", str(a_file), "--output-dir", out], "--train-files="),
        (["--tiny", "--train-files", str(tmp_path / "missing.txt"), "--output-dir", out], "missing.txt"),
        (["--tiny", "--eval-split", "validation", "--output-dir", out], "--eval-split='validation'"),
        (["--tiny", "--max-steps", "0", "--output-dir", out], "--max-steps=0"),
        (["--tiny", "--batch-size", "0", "--output-dir", out], "--batch-size=0"),
        (["--tiny", "--block-size", "4", "--output-dir", out], "--block-size=4"),
        (["--tiny", "--grad-accum", "0", "--output-dir", out], "--grad-accum=0"),
        (["--tiny", "--lr", "0", "--output-dir", out], "--lr=0.0"),
        (["--tiny", "--lr", "nan", "--output-dir", out], "--lr=nan"),
        (["--tiny", "--epochs", "-1", "--output-dir", out], "--epochs=-1.0"),
        (["--tiny", "--eval-fraction", "1.5", "--output-dir", out], "--eval-fraction=1.5"),
        (["--tiny", "--weight-decay", "-1", "--output-dir", out], "--weight-decay=-1.0"),
        (["--tiny", "--save-every", "-1", "--output-dir", out], "--save-every=-1"),
        (["--tiny", "--mean-bias-every", "-2", "--output-dir", out], "--mean-bias-every=-2"),
        (["--tiny", "--tokenizer-vocab-size", "10", "--output-dir", out], "--tokenizer-vocab-size=10"),
        (["--tiny", "--precision", "bf16", "--moe", "sd", "--output-dir", out], "--moe='sd'"),
        (["--tiny", "--precision", "bf16", "--finalize", "--output-dir", out], "--finalize=True"),
        (["--tiny", "--output-dir", str(full)], "--output-dir="),
        (["--tiny", "--output-dir", str(a_file)], "--output-dir="),
        (["--tiny", "--resume", "--output-dir", out], "--resume=None"),
        (["--tiny", "--resume", str(full), "--output-dir", out], "--resume="),
        (["--tiny", "--resume", "--overwrite", "--output-dir", str(full)], "and --overwrite exclude each other"),
    ]


def test_argument_errors_name_flag_value_and_allowed(tmp_path, capsys):
    for argv, expected in _errors(tmp_path):
        with pytest.raises((ValueError, FileExistsError)) as err:
            T.resolve_args(T.build_parser().parse_args(argv))
        msg = str(err.value)
        assert expected in msg, (argv, msg)
        assert "allowed" in msg or "pass --overwrite" in msg or "give --" in msg, (argv, msg)
        assert T.main(argv) == 2  # scripts/train.py: one-line message, exit status 2, nothing written
        assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["x"]


def test_dataset_without_datasets_package_names_pip_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "datasets" else real(n, *a))
    with pytest.raises(ValueError, match=r"--dataset='wikitext'.*pip install datasets"):
        T.resolve_args(T.build_parser().parse_args(["--tiny", "--dataset", "wikitext", "--output-dir",
                                                    str(tmp_path / "o")]))


@pytest.mark.parametrize("argv, flag", [(["--precision", "fp8"], "--precision"),
                                        (["--from-config", "gpt5"], "--from-config"),
                                        (["--max-steps", "ten"], "--max-steps"),
                                        (["--moe", "dense"], "--moe")])
def test_argparse_errors_name_the_flag(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) as err:
        T.main(["--tiny", "--output-dir", str(tmp_path / "o"), *argv])
    assert err.value.code == 2
    assert flag in capsys.readouterr().err


def test_precision_mismatch_with_checkpoint_is_refused(tiny_run, tmp_path):
    out, _ = tiny_run
    a = T.resolve_args(T.build_parser().parse_args(
        _tiny(out / "tokenizer", tmp_path / "o", "--precision", "mxfp4", "--model", str(out / "final"))))
    with pytest.raises(ValueError, match="--model=.*trained with"):
        T.build_model(a, None, T.lowbit_config(a.precision))
    a.precision = "bf16"
    with pytest.raises(ValueError, match="--precision bf16 is not allowed"):
        T.build_model(a, None, None)
    a.model = str(out / "finalized")
    with pytest.raises(ValueError, match="packed"):
        T.build_model(a, None, T.lowbit_config("nvfp4-averis"))


def test_throughput_meter_counts_steady_steps_only(monkeypatch):
    clock = iter([10.0, 14.0])
    meter = T._Throughput(step_tokens=100, warmup=2)
    monkeypatch.setattr(T._Throughput, "_now", staticmethod(lambda: next(clock)))
    for step in range(1, 7):
        meter.step_end(step, max_steps=6)
    assert meter.tokens_per_s() == (6 - 2) * 100 / 4.0
    assert T._Throughput(100, warmup=2).tokens_per_s() is None  # never reached the end
    clock = iter([10.0, 14.0])
    ragged = T._Throughput([100, 100, 20], warmup=2)  # epochs of three steps, the last one ragged
    for step in range(1, 8):
        ragged.step_end(step, max_steps=7)
    assert ragged.tokens_per_s() == (20 + 100 + 100 + 20 + 100) / 4.0  # steps 3..7


@pytest.mark.parametrize("n,batch,accum,world,expected", [
    (50, 8, 1, 1, [8] * 6 + [2]),          # the 2026-11-29 benchmark: a ragged last batch on one GPU
    (48, 8, 1, 1, [8] * 6),
    (50, 8, 1, 2, [16] * 4),               # even_batches: every rank gets whole batches
    (50, 4, 3, 1, [12] * 4 + [2]),         # 13 micro-batches: four full steps, then one of a 2-block batch
    (7, 4, 2, 1, [7]),
    (10, 2, 2, 2, [8, 4]),                  # 3 micro-batches per rank: a full step and a one-micro-batch step
])
def test_blocks_per_update_step(n, batch, accum, world, expected):
    assert T.blocks_per_update_step(n, batch, accum, world) == expected


def test_throughput_schedule_matches_what_trainer_feeds(tiny_run, tmp_path):
    """The token schedule the meter assumes equals the tokens Trainer actually feeds per optimizer step on a
    ragged dataset (counted with a forward hook): tokens/s stays exact when the data is not whole batches."""
    from transformers import TrainerCallback, Trainer

    seen, per_step = [0], []

    class Count(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            model.register_forward_pre_hook(lambda m, a, kw_: seen.__setitem__(0, seen[0] + kw_["input_ids"].numel())
                                            if m.training else None, with_kwargs=True)

        def on_step_end(self, args, state, control, **kw):
            per_step.append(seen[0] - sum(per_step))

    real_init = Trainer.__init__

    def init(self, *a, **kw):
        kw["callbacks"] = list(kw.get("callbacks") or []) + [Count()]
        real_init(self, *a, **kw)

    out = tmp_path / "ragged"
    import unittest.mock as um
    with um.patch.object(Trainer, "__init__", init):
        assert T.main(_tiny(tiny_run[0] / "tokenizer", out, "--batch-size", "3", "--grad-accum", "2",
                            "--max-steps", "9", "--eval-fraction", "0")) == 0
    info = json.loads((out / "log.json").read_text())["run"]
    blocks = T.blocks_per_update_step(info["train_blocks"], 3, 2, 1)
    assert info["train_blocks"] % 6 != 0, "the test needs a ragged epoch"
    expected = [blocks[i % len(blocks)] * info["block_size"] for i in range(9)]
    assert per_step == expected
