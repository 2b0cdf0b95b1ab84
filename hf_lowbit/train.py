"""`hf-lowbit train` / `scripts/train.py`: causal-LM pretraining or fine-tuning with `transformers.Trainer`.

Model (exactly one of):
  * ``--model ID_OR_PATH``: a hub id or a local checkpoint (float, or an hf_lowbit ``mode="train"`` checkpoint);
  * ``--from-config NAME``: random init from a named config (``qwen3-tiny``, ``qwen3-moe-tiny``,
    ``qwen3-0.6b-shape``, ``qwen3-1.7b-shape``); the tokenizer is ``--tokenizer`` or, if not given, a byte-level BPE
    trained on the training text (saved in ``<output-dir>/tokenizer`` and in every checkpoint).

Data (exactly one of, unless ``--tiny``):
  * ``--dataset NAME``: a `datasets` dataset (hub name or local path; needs ``pip install datasets``), column
    ``--text-column`` of split ``--train-split``; held-out data is ``--eval-split`` if given;
  * ``--train-files PATH ...``: local text files and/or directories (files matching ``--file-pattern`` found
    recursively, sorted by path: deterministic); held-out data is ``--eval-files`` if given.
  Every document is tokenized, followed by the EOS token, concatenated and cut into ``--block-size`` blocks (the
  remainder is dropped). Without an explicit held-out set, the last ``--eval-fraction`` of the blocks (default 5%)
  is held out: a deterministic, contiguous split.

Precision (``--precision``), each a `hf_lowbit.LowBitConfig`:
  ``bf16`` (no quantization; BF16 autocast on a GPU, FP32 on a CPU), ``nvfp4`` / ``mxfp4`` (plain W4A4G4,
  ``mean_center=False``), ``nvfp4-averis`` / ``mxfp4-averis`` (``mean_center=True``), ``nvfp4-hadamard``
  (``hadamard=True``, no mean-centring), ``nvfp4-averis-hadamard`` (both). FP4 runs also use BF16 autocast on a
  GPU for the unconverted parts (embeddings, norms, attention products, lm_head); ``--fp32`` turns autocast off.
  ``--moe sd`` adds ``LowBitConfig(moe="sd")`` (SD-MoE for MoE models).

Outputs in ``--output-dir`` (never overwritten when non-empty without ``--overwrite``, except by ``--resume``):
  ``checkpoint-N/`` (every ``--save-every`` steps, resumable with ``--resume`` [PATH]; the model part is an
  ordinary ``save_pretrained`` folder, for FP4 a ``mode="train"`` hf_lowbit checkpoint with master weights),
  ``final/`` (the trained model + tokenizer), ``finalized/`` with ``--finalize`` (packed FP4, reload with
  ``import hf_lowbit; AutoModelForCausalLM.from_pretrained(dir)``), ``log.json`` (run settings + the Trainer log
  history, rewritten on every save and at the end), ``runs/`` (TensorBoard, when installed), ``tokenizer/``.

Multi-process: the script runs unchanged under ``torchrun`` and ``accelerate launch``::

    accelerate launch --config_file scripts/accelerate/ddp.yaml  scripts/train.py --model Qwen/Qwen3-0.6B ...
    accelerate launch --config_file scripts/accelerate/fsdp2.yaml scripts/train.py --model Qwen/Qwen3-0.6B ...
    torchrun --nproc_per_node 2 scripts/train.py --tiny --output-dir runs/ddp          # CPU: gloo backend

``--batch-size`` is per process: the global batch is batch-size × processes × ``--grad-accum``. Under data
parallelism the Averis mean is taken per local micro-batch. Accelerate's FSDP path needs GPUs (on a CPU it runs as
DDP). Every process imports hf_lowbit before loading a model (this module does), as transformers requires.

Smoke test: ``hf-lowbit train --tiny --precision nvfp4-averis --output-dir /tmp/t`` (a tiny Qwen3 model on a slice
of the packaged Shakespeare text, a few steps, about a minute on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

PRECISIONS = ("bf16", "nvfp4", "nvfp4-averis", "mxfp4", "mxfp4-averis", "nvfp4-hadamard", "nvfp4-averis-hadamard")
NAMED_CONFIGS = ("qwen3-tiny", "qwen3-moe-tiny", "qwen3-0.6b-shape", "qwen3-1.7b-shape")
LOG_FILE = "log.json"
TOKENIZER_DIR = "tokenizer"
SR_STATE_FILE = "hf_lowbit_sr_state.json"

#: Defaults that differ between --tiny and a normal run (flags left unset take these).
_DEFAULTS = {
    "block_size": 1024, "batch_size": 8, "lr": 3e-4, "max_steps": None, "epochs": 1.0, "warmup_steps": None,
    "logging_steps": 10, "save_every": 500, "tokenizer_vocab_size": 32000,
}
_TINY_DEFAULTS = {
    "block_size": 64, "batch_size": 8, "lr": 3e-3, "max_steps": 12, "epochs": 1.0, "warmup_steps": 2,
    "logging_steps": 1, "save_every": 0, "tokenizer_vocab_size": 512,
}
TINY_TEXT_CHARS = 60_000


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `train` options to `p` (used by scripts/train.py and the `hf-lowbit train` subcommand)."""
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="ID_OR_PATH", help="hub id or local checkpoint to fine-tune")
    m.add_argument("--from-config", metavar="NAME", choices=NAMED_CONFIGS,
                   help=f"random init from a named config: {', '.join(NAMED_CONFIGS)}")
    m.add_argument("--tokenizer", metavar="ID_OR_PATH",
                   help="tokenizer (default: --model's; for --from-config a BPE trained on the training text)")
    m.add_argument("--tokenizer-vocab-size", type=int, default=None,
                   help="vocabulary of the trained BPE tokenizer (default: 32000; --tiny: 512)")
    m.add_argument("--precision", default="nvfp4-averis", choices=PRECISIONS,
                   help="bf16 (no quantization) or an FP4 recipe (default: %(default)s)")
    m.add_argument("--moe", choices=["sd"], default=None, help="SD-MoE (LowBitConfig(moe='sd')), FP4 precisions")
    m.add_argument("--quant-backend", choices=["auto", "triton", "torch"], default="auto",
                   help="LowBitConfig.backend (default: %(default)s)")
    m.add_argument("--fp32", action="store_true", help="no BF16 autocast on GPUs (FP32 everywhere)")
    m.add_argument("--gradient-checkpointing", action="store_true")

    d = p.add_argument_group("data")
    d.add_argument("--dataset", metavar="NAME", help="`datasets` dataset name or path (needs `pip install datasets`)")
    d.add_argument("--dataset-config", metavar="NAME", help="dataset configuration name")
    d.add_argument("--train-split", default="train", help="--dataset split to train on (default: %(default)s)")
    d.add_argument("--eval-split", help="--dataset split to evaluate on (default: hold out --eval-fraction)")
    d.add_argument("--text-column", default="text", help="--dataset text column (default: %(default)s)")
    d.add_argument("--train-files", nargs="+", metavar="PATH", help="local text files and/or directories")
    d.add_argument("--eval-files", nargs="+", metavar="PATH", help="local held-out text files and/or directories")
    d.add_argument("--file-pattern", default="*.txt", help="files taken from directories (default: %(default)s)")
    d.add_argument("--eval-fraction", type=float, default=0.05,
                   help="share of the blocks held out when no eval split/files are given; 0 = no evaluation "
                        "(default: %(default)s)")
    d.add_argument("--block-size", type=int, default=None, help="tokens per sequence (default: 1024; --tiny: 64)")
    d.add_argument("--max-train-blocks", type=int, default=None, help="use at most this many training blocks")
    d.add_argument("--max-eval-blocks", type=int, default=None, help="use at most this many held-out blocks")

    t = p.add_argument_group("training")
    t.add_argument("--output-dir", required=True, help="checkpoints, logs and the final model")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    t.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or from the last checkpoint-* in --output-dir when no path is given")
    t.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs; --tiny: 12)")
    t.add_argument("--epochs", type=float, default=None, help="epochs when --max-steps is not given (default: 1)")
    t.add_argument("--batch-size", type=int, default=None, help="per-process micro-batch (default: 8)")
    t.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: %(default)s)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-4; --tiny: 3e-3)")
    t.add_argument("--lr-scheduler", default="cosine",
                   choices=["cosine", "linear", "constant", "constant_with_warmup", "warmup_stable_decay"],
                   help="(default: %(default)s)")
    t.add_argument("--warmup-steps", type=int, default=None, help="(default: 2%% of the steps; --tiny: 2)")
    t.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: %(default)s)")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="model init, data order, SR streams (default: %(default)s)")
    t.add_argument("--logging-steps", type=int, default=None, help="(default: 10; --tiny: 1)")
    t.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps; 0 = only at the end")
    t.add_argument("--save-every", type=int, default=None,
                   help="checkpoint every N steps; 0 = no intermediate checkpoints (default: 500; --tiny: 0)")
    t.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (default: %(default)s)")
    t.add_argument("--report-to", default="auto",
                   help="Trainer report_to: auto (tensorboard when installed), none, or a comma-separated list")
    t.add_argument("--num-workers", type=int, default=0, help="dataloader workers (default: %(default)s)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--finalize", action="store_true", help="also write a packed FP4 checkpoint to finalized/")
    t.add_argument("--mean-bias-every", type=int, default=0, metavar="N",
                   help="log mean-bias statistics (MeanBiasCallback) every N steps; 0 = off")
    t.add_argument("--tiny", action="store_true",
                   help="CPU smoke test: qwen3-tiny, a slice of the packaged text, 12 steps (flags still override)")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(p)


def _fail(flag: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{flag}={value!r} is not valid; allowed: {allowed}")


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill --tiny / normal defaults and validate every flag (no side effects: nothing is read or written except
    checks that paths exist). Raises ValueError / FileExistsError naming the flag, the value and what is allowed."""
    a = argparse.Namespace(**vars(args))
    defaults = _TINY_DEFAULTS if a.tiny else _DEFAULTS
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)

    if a.model and a.from_config:
        raise ValueError(f"--model={a.model!r} and --from-config={a.from_config!r} exclude each other; "
                         "allowed: one of them")
    if not a.model and not a.from_config:
        if not a.tiny:
            raise ValueError("no model: give --model ID_OR_PATH, --from-config NAME "
                             f"(allowed: {', '.join(NAMED_CONFIGS)}) or --tiny")
        a.from_config = "qwen3-tiny"
    n_sources = sum(x is not None for x in (a.dataset, a.train_files))
    if n_sources > 1:
        raise ValueError(f"--dataset={a.dataset!r} and --train-files={a.train_files!r} exclude each other; "
                         "allowed: one of them")
    if n_sources == 0 and not a.tiny:
        raise ValueError("no training data: give --dataset NAME or --train-files PATH ... (or --tiny)")
    if a.eval_files and not a.train_files and not a.tiny:
        raise ValueError(f"--eval-files={a.eval_files!r} needs --train-files; allowed with --dataset: --eval-split")
    if a.dataset:
        import importlib.util

        if importlib.util.find_spec("datasets") is None:
            raise ValueError(f"--dataset={a.dataset!r} needs the `datasets` package, which is not installed; allowed: "
                             "`pip install datasets`, or local text with --train-files")
    if a.eval_split and not a.dataset:
        raise ValueError(f"--eval-split={a.eval_split!r} needs --dataset; allowed with local files: --eval-files")

    for flag in ("train_files", "eval_files"):
        for path in getattr(a, flag) or []:
            if not os.path.exists(path):
                raise ValueError(f"--{flag.replace('_', '-')}: {path!r} does not exist; allowed: existing "
                                 "text files or directories")
    for flag, lo in (("block_size", 8), ("batch_size", 1), ("grad_accum", 1), ("logging_steps", 1),
                     ("tokenizer_vocab_size", 64), ("save_total_limit", 1)):
        value = getattr(a, flag)
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            _fail("--" + flag.replace("_", "-"), value, f"an integer >= {lo}")
    for flag, lo in (("max_steps", 1), ("max_train_blocks", 1), ("max_eval_blocks", 1)):
        value = getattr(a, flag)
        if value is not None and value < lo:
            _fail("--" + flag.replace("_", "-"), value, f"an integer >= {lo}")
    for flag in ("eval_every", "save_every", "mean_bias_every", "num_workers", "seed", "warmup_steps"):
        value = getattr(a, flag)
        if value is not None and value < 0:
            _fail("--" + flag.replace("_", "-"), value, "an integer >= 0")
    if not (math.isfinite(a.lr) and 0 < a.lr < 1):
        _fail("--lr", a.lr, "a number in (0, 1)")
    if not (math.isfinite(a.epochs) and a.epochs > 0):
        _fail("--epochs", a.epochs, "a number > 0")
    if not (0 <= a.eval_fraction < 1):
        _fail("--eval-fraction", a.eval_fraction, "a number in [0, 1)")
    if not (math.isfinite(a.weight_decay) and a.weight_decay >= 0):
        _fail("--weight-decay", a.weight_decay, "a number >= 0")
    if not (math.isfinite(a.max_grad_norm) and a.max_grad_norm >= 0):
        _fail("--max-grad-norm", a.max_grad_norm, "a number >= 0 (0 = no clipping)")
    if a.moe and a.precision == "bf16":
        _fail("--moe", a.moe, "only with an FP4 --precision (SD-MoE is configured through hf_lowbit.LowBitConfig)")
    if a.finalize and a.precision == "bf16":
        _fail("--finalize", True, "only with an FP4 --precision (bf16 has nothing to pack)")
    if a.quant_backend == "triton" and a.precision == "bf16":
        _fail("--quant-backend", a.quant_backend, "'auto' with --precision bf16")
    report = [r.strip() for r in a.report_to.split(",") if r.strip()]
    if not report:
        _fail("--report-to", a.report_to, "auto, none, or a comma-separated list of Trainer integrations")
    a.report_to = report

    out = Path(a.output_dir)
    if out.exists() and not out.is_dir():
        _fail("--output-dir", a.output_dir, "a directory (this path is a file)")
    if a.resume is not None:
        if a.overwrite:
            raise ValueError(f"--resume={a.resume!r} and --overwrite exclude each other (resuming keeps --output-dir); "
                             "allowed: one of them")
        if a.resume == "last":
            ckpt = _last_checkpoint(out)
            if ckpt is None:
                _fail("--resume", None, f"a checkpoint folder, or --output-dir={a.output_dir!r} holding "
                      "checkpoint-* folders (none found)")
            a.resume = str(ckpt)
        elif not (Path(a.resume) / "trainer_state.json").is_file():
            _fail("--resume", a.resume, "a Trainer checkpoint folder (with trainer_state.json)")
    elif out.exists() and any(out.iterdir()) and not a.overwrite:
        raise FileExistsError(f"--output-dir={a.output_dir!r} exists and is not empty; pass --overwrite to replace "
                              "it, --resume to continue its last checkpoint, or choose another --output-dir "
                              "(nothing was changed)")
    return a


def _last_checkpoint(out: Path) -> Path | None:
    if not out.is_dir():
        return None
    ckpts = [p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
             and (p / "trainer_state.json").is_file()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1]), default=None)


# ---------------------------------------------------------------------------------------------------------------------
# Precision → LowBitConfig
# ---------------------------------------------------------------------------------------------------------------------
def lowbit_config(precision: str, moe: str | None = None, backend: str = "auto", seed: int = 0):
    """The `LowBitConfig` of a --precision name (None for bf16)."""
    import hf_lowbit

    if precision not in PRECISIONS:
        _fail("--precision", precision, ", ".join(PRECISIONS))
    if precision == "bf16":
        return None
    parts = precision.split("-")
    return hf_lowbit.LowBitConfig(format=parts[0], mean_center="averis" in parts, hadamard="hadamard" in parts,
                                  moe=moe, backend=backend, seed=seed)


# ---------------------------------------------------------------------------------------------------------------------
# Models and tokenizers
# ---------------------------------------------------------------------------------------------------------------------
def named_config(name: str, tokenizer):
    """A transformers config for a --from-config name, its vocabulary fitted to `tokenizer`."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    vocab = len(tokenizer)
    vocab = ((vocab + 63) // 64) * 64  # embedding rows a multiple of 64
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, vocab_size=vocab)
    if name == "qwen3-tiny":
        return Qwen3Config(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                           tie_word_embeddings=False, **ids)
    if name == "qwen3-moe-tiny":
        return Qwen3MoeConfig(hidden_size=64, intermediate_size=192, moe_intermediate_size=32, num_experts=4,
                              num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                              tie_word_embeddings=False, **ids)
    if name == "qwen3-0.6b-shape":
        return Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1e6,
                           rms_norm_eps=1e-6, tie_word_embeddings=True, **ids)
    if name == "qwen3-1.7b-shape":
        return Qwen3Config(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1e6,
                           rms_norm_eps=1e-6, tie_word_embeddings=True, **ids)
    _fail("--from-config", name, ", ".join(NAMED_CONFIGS))


def train_bpe_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer (as in the demo) trained on an iterable of strings, as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _checkpoint_quant(path: str) -> dict | None:
    """The quantization_config dict of a checkpoint's config.json (None if float or unreadable)."""
    try:
        from transformers import AutoConfig

        qc = getattr(AutoConfig.from_pretrained(path), "quantization_config", None)
    except Exception:  # noqa: BLE001 - an unreadable config is reported by from_pretrained itself
        return None
    if qc is None:
        return None
    return qc if isinstance(qc, dict) else qc.to_dict()


def _check_compatible(flag: str, path: str, qc: dict | None, cfg) -> None:
    """Refuse a checkpoint whose stored precision differs from --precision (config.json would silently win)."""
    if qc is None:
        if cfg is not None and flag == "--resume":
            raise ValueError(f"--resume={path!r} is a float (bf16) checkpoint; allowed: --precision bf16")
        return
    if qc.get("quant_method") != "hf_lowbit":
        raise ValueError(f"{flag}={path!r} is quantized with {qc.get('quant_method')!r}; allowed: float or "
                         "hf_lowbit checkpoints")
    if qc.get("mode") == "infer":
        raise ValueError(f"{flag}={path!r} is a packed (mode='infer') hf_lowbit checkpoint without master weights; "
                         "allowed: a float or mode='train' checkpoint (train LoRA adapters on packed bases with PEFT)")
    if cfg is None:
        raise ValueError(f"{flag}={path!r} is an hf_lowbit FP4 checkpoint; --precision bf16 is not allowed with it "
                         "(pass the precision it was trained with)")
    keys = ("format", "mean_center", "hadamard", "moe")
    mine = {k: getattr(cfg, k) for k in keys}
    theirs = {k: qc.get(k) for k in keys}
    if mine != theirs:
        raise ValueError(f"{flag}={path!r} was trained with {theirs}, but --precision/--moe ask for {mine}; "
                         "allowed: the same precision")


def _load_tokenizer(a: argparse.Namespace, out: Path, text_iter_fn, targs):
    """The tokenizer: --tokenizer, --model's, the resumed checkpoint's, or a BPE trained on the data (rank 0 first,
    saved to <output-dir>/tokenizer so every process and a later --resume get the same one)."""
    from transformers import AutoTokenizer

    if a.tokenizer:
        return AutoTokenizer.from_pretrained(a.tokenizer)
    if a.model:
        return AutoTokenizer.from_pretrained(a.model)
    if a.resume and (Path(a.resume) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(a.resume)
    saved = out / TOKENIZER_DIR
    with targs.main_process_first(local=False, desc="tokenizer"):
        if not (saved / "tokenizer_config.json").is_file():
            tok = train_bpe_tokenizer(text_iter_fn(), a.tokenizer_vocab_size)
            if targs.process_index == 0:
                tok.save_pretrained(saved)
        else:
            tok = AutoTokenizer.from_pretrained(saved)
    return tok


def build_model(a: argparse.Namespace, tokenizer, cfg):
    """Load or build the model and apply `cfg` (None = float)."""
    import hf_lowbit  # noqa: F401 - registers the quantizer in this process
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    if a.model:
        _check_compatible("--model", a.model, _checkpoint_quant(a.model), cfg)
        kwargs = {"dtype": torch.float32}
        if cfg is not None:
            kwargs["quantization_config"] = cfg
        return AutoModelForCausalLM.from_pretrained(a.model, **kwargs)
    set_seed(a.seed)
    model = AutoModelForCausalLM.from_config(named_config(a.from_config, tokenizer), dtype=torch.float32)
    if cfg is not None:
        hf_lowbit.convert(model, cfg)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
def expand_files(paths: list[str], pattern: str) -> list[Path]:
    """Files in `paths`, directories expanded recursively to their files matching `pattern`, sorted by path."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob(pattern) if f.is_file())
            if not found:
                raise ValueError(f"directory {str(p)!r} has no files matching --file-pattern={pattern!r}")
            files.extend(found)
        else:
            files.append(p)
    return files


def _read_chunks(files: list[Path], chunk_chars: int = 1 << 20):
    """Each file as ~1 MB chunks cut at line ends (a document = a file); yields (chunk, is_last_of_file)."""
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        start = 0
        while start < len(text):
            end = min(len(text), start + chunk_chars)
            if end < len(text):
                nl = text.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            yield text[start:end], end >= len(text)
            start = end


def tiny_text() -> str:
    from .demo import demo_text

    return demo_text()[:TINY_TEXT_CHARS]


def tokenize_stream(pieces, tokenizer) -> "torch.Tensor":  # noqa: F821
    """Token ids of (text, ends_document) pieces, EOS after each document, as one long tensor."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text, last in pieces:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if last and eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _split_blocks(blocks, eval_fraction: float):
    n = len(blocks)
    n_eval = 0 if eval_fraction == 0 else max(1, math.ceil(n * eval_fraction))
    if n - n_eval < 1:
        raise ValueError(f"only {n} blocks of data: too little text for --block-size and --eval-fraction="
                         f"{eval_fraction}")
    return n_eval


def local_datasets(a: argparse.Namespace, tokenizer):
    """(train, eval) TokenBlocks from --train-files/--eval-files or the --tiny text."""
    from .demo import TokenBlocks

    if a.train_files:
        train_ids = tokenize_stream(_read_chunks(expand_files(a.train_files, a.file_pattern)), tokenizer)
    else:
        train_ids = tokenize_stream([(tiny_text(), True)], tokenizer)
    train = TokenBlocks(train_ids, a.block_size)
    if a.eval_files:
        held = TokenBlocks(tokenize_stream(_read_chunks(expand_files(a.eval_files, a.file_pattern)), tokenizer),
                           a.block_size)
    else:
        n_eval = _split_blocks(train.blocks, a.eval_fraction)
        held = TokenBlocks(train_ids[:0], a.block_size)
        if n_eval:
            held.blocks = train.blocks[len(train.blocks) - n_eval:]
            train.blocks = train.blocks[: len(train.blocks) - n_eval]
    if len(train) == 0:
        raise ValueError(f"the training text is shorter than one --block-size={a.block_size} block")
    if a.max_train_blocks:
        train.blocks = train.blocks[: a.max_train_blocks]
    if a.max_eval_blocks:
        held.blocks = held.blocks[: a.max_eval_blocks]
    return train, (held if len(held) else None)


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"--dataset needs the `datasets` package ({err}); allowed: `pip install datasets`, or "
                         "local text with --train-files") from None
    return datasets


def hub_datasets(a: argparse.Namespace, tokenizer, targs):
    """(train, eval) `datasets.Dataset`s of packed blocks from --dataset (tokenized on rank 0 first, cached)."""
    datasets = _import_datasets()
    col, block, eos = a.text_column, a.block_size, tokenizer.eos_token_id

    def load(split):
        try:
            ds = datasets.load_dataset(a.dataset, a.dataset_config, split=split)
        except ValueError as err:
            if "split" in str(err).lower():
                raise ValueError(f"--dataset={a.dataset!r} has no split {split!r} ({err})") from None
            raise
        if col not in ds.column_names:
            _fail("--text-column", col, f"a column of --dataset={a.dataset!r}: {ds.column_names}")
        return ds

    def tokenize(batch):
        out = tokenizer(batch[col], add_special_tokens=False)["input_ids"]
        return {"input_ids": [ids + [eos] if eos is not None else ids for ids in out]}

    def group(batch):
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = (len(flat) // block) * block
        blocks = [flat[i: i + block] for i in range(0, n, block)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    def pack(ds):
        ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenize")
        return ds.map(group, batched=True, batch_size=1000, desc=f"pack into {block}-token blocks")

    with targs.main_process_first(local=False, desc="dataset"):
        train = pack(load(a.train_split))
        held = pack(load(a.eval_split)) if a.eval_split else None
    if held is None:
        n_eval = _split_blocks(range(len(train)), a.eval_fraction)
        if n_eval:
            held = train.select(range(len(train) - n_eval, len(train)))
            train = train.select(range(len(train) - n_eval))
    if a.max_train_blocks:
        train = train.select(range(min(len(train), a.max_train_blocks)))
    if held is not None and a.max_eval_blocks:
        held = held.select(range(min(len(held), a.max_eval_blocks)))
    train.set_format("torch")
    if held is not None:
        held.set_format("torch")
    return train, (held if held is not None and len(held) else None)


def _text_for_tokenizer(a: argparse.Namespace):
    """A function returning an iterator of training texts (for BPE training of --from-config tokenizers)."""
    if a.dataset:
        def it():
            ds = _import_datasets().load_dataset(a.dataset, a.dataset_config, split=a.train_split)
            if a.text_column not in ds.column_names:
                _fail("--text-column", a.text_column, f"a column of --dataset={a.dataset!r}: {ds.column_names}")
            for i in range(0, len(ds), 1000):
                yield from ds[i: i + 1000][a.text_column]
        return it
    if a.train_files:
        return lambda: (chunk for chunk, _ in _read_chunks(expand_files(a.train_files, a.file_pattern)))
    return lambda: iter([tiny_text()])


# ---------------------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------------------
def _strip(name: str) -> str:
    for prefix in ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def _make_callbacks(run_info: dict, resume: str | None):
    from transformers import TrainerCallback

    class JsonLogCallback(TrainerCallback):
        """Write run settings + the Trainer log history to <output_dir>/log.json on each save and at the end."""

        def _write(self, args, state):
            if not state.is_world_process_zero:
                return
            path = Path(args.output_dir) / LOG_FILE
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"run": run_info, "global_step": state.global_step,
                                       "log_history": state.log_history}, indent=1, default=str))
            tmp.replace(path)

        def on_save(self, args, state, control, **kw):
            self._write(args, state)

        def on_train_end(self, args, state, control, **kw):
            self._write(args, state)

        def on_evaluate(self, args, state, control, **kw):
            self._write(args, state)

    class SRStateCallback(TrainerCallback):
        """Save / restore the stochastic-rounding call counters of LowBit modules with each checkpoint, so a
        resumed run draws the same SR streams as an uninterrupted one."""

        def on_save(self, args, state, control, model=None, **kw):
            if model is None or not state.is_world_process_zero:
                return
            calls = {_strip(n): int(m.calls) for n, m in model.named_modules() if hasattr(m, "calls")}
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / SR_STATE_FILE).write_text(json.dumps(calls))

        def on_train_begin(self, args, state, control, model=None, **kw):
            if resume is None or model is None:
                return
            path = Path(resume) / SR_STATE_FILE
            if not path.is_file():
                return
            calls = json.loads(path.read_text())
            for n, m in model.named_modules():
                if hasattr(m, "calls") and _strip(n) in calls:
                    m.calls = calls[_strip(n)]

    class ThroughputCallback(TrainerCallback):
        """Write the steady-state global tokens/s into run_info at the end of training (see `_Throughput`)."""

        def on_train_begin(self, args, state, control, **kw):
            warmup = min(max(2, state.max_steps // 10), max(0, state.max_steps - 1))
            blocks = blocks_per_update_step(run_info["train_blocks"], args.per_device_train_batch_size,
                                            args.gradient_accumulation_steps, args.world_size)
            self.meter = _Throughput([b * run_info["block_size"] for b in blocks], state.global_step + warmup)

        def on_step_end(self, args, state, control, **kw):
            self.meter.step_end(state.global_step, state.max_steps)

        def on_train_end(self, args, state, control, **kw):
            run_info["tokens_per_s"] = self.meter.tokens_per_s()

    return [JsonLogCallback(), SRStateCallback(), ThroughputCallback()]


def blocks_per_update_step(n_blocks: int, batch: int, accum: int, world: int) -> list[int]:
    """Training blocks in each optimizer step of one epoch, as Trainer schedules them (no drop_last).

    One process: the last micro-batch of an epoch is ragged and the last step may have fewer micro-batches. Several
    processes: Accelerate's `even_batches` completes every rank's micro-batches, so each has `batch` blocks per rank.
    """
    if world > 1:
        micro = [batch * world] * -(-n_blocks // (batch * world))
    else:
        micro = [batch] * (n_blocks // batch) + ([n_blocks % batch] if n_blocks % batch else [])
    return [sum(micro[i:i + accum]) for i in range(0, len(micro), accum)]


class _Throughput:
    """Steady-state training throughput: tokens/s over the optimizer steps after the first `warmup` (compilation,
    autotuning and allocator warm-up excluded), measured between two device synchronisations.

    `step_tokens`: tokens of every optimizer step of an epoch (the schedule repeats each epoch), or one number for
    all steps; a ragged last batch is counted as what it is, not as a full batch."""

    def __init__(self, step_tokens: list[int] | int, warmup: int) -> None:
        self.step_tokens = [step_tokens] if isinstance(step_tokens, int) else list(step_tokens)
        self.warmup = warmup
        self.start: tuple[int, float] | None = None
        self.end: tuple[int, float] | None = None

    @staticmethod
    def _now() -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def step_end(self, step: int, max_steps: int) -> None:
        if step == self.warmup:
            self.start = (step, self._now())
        elif self.start is not None and step == max_steps:
            self.end = (step, self._now())

    def tokens_per_s(self) -> float | None:
        if self.start is None or self.end is None or self.end[0] <= self.start[0]:
            return None
        per_epoch = self.step_tokens
        tokens = sum(per_epoch[(step - 1) % len(per_epoch)] for step in range(self.start[0] + 1, self.end[0] + 1))
        return tokens / (self.end[1] - self.start[1])


# ---------------------------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------------------------
def _report_to(requested: list[str]) -> list[str]:
    if requested == ["none"]:
        return []
    if requested == ["auto"]:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                return []
        return ["tensorboard"]
    return requested


def _save_final(trainer, out: Path, tokenizer) -> None:
    """Save the trained model (all processes call this). Under FSDP the full state dict is gathered and rank 0
    writes it next to config.json (save_pretrained of a quantized model would ignore a passed state dict)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        trainer.save_model(str(out))
        if trainer.args.should_save:
            tokenizer.save_pretrained(out)
        return
    from safetensors.torch import save_file

    state = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        tokenizer.save_pretrained(out)
    trainer.accelerator.wait_for_everyone()


def _finalize(final_dir: Path, out_dir: Path) -> dict:
    """Reload the saved mode='train' model on the CPU, pack it with hf_lowbit.finalize, save, check the reload."""
    import hf_lowbit
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(final_dir)
    hf_lowbit.finalize(model)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(final_dir).save_pretrained(out_dir)
    probe = torch.arange(16).reshape(1, 16) % model.config.vocab_size
    with torch.no_grad():
        same = torch.equal(model(probe).logits, AutoModelForCausalLM.from_pretrained(out_dir)(probe).logits)
    size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    if not same:
        raise RuntimeError(f"finalized checkpoint {out_dir} does not reproduce the finalized model's logits")
    return {"dir": str(out_dir), "bytes": size, "reload_identical": same}


def run(a: argparse.Namespace) -> dict:
    """Run training with resolved arguments (see `resolve_args`); returns a summary (also in log.json)."""
    import hf_lowbit  # noqa: F401 - every process registers the quantizer before from_pretrained
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    t0 = time.time()
    cfg = lowbit_config(a.precision, a.moe, a.quant_backend, a.seed)
    out = Path(a.output_dir)
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported() and not a.fp32
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    report_to = _report_to(a.report_to)
    targs = TrainingArguments(
        output_dir=str(out), max_steps=a.max_steps if a.max_steps else -1, num_train_epochs=a.epochs,
        per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum, learning_rate=a.lr, lr_scheduler_type=a.lr_scheduler,
        warmup_steps=a.warmup_steps if a.warmup_steps is not None else 0,
        weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm, seed=a.seed, data_seed=a.seed,
        logging_steps=a.logging_steps, logging_first_step=True,
        eval_strategy="steps" if a.eval_every else "no", eval_steps=a.eval_every or None,
        save_strategy="steps" if a.save_every else "no", save_steps=a.save_every or 500,
        save_total_limit=a.save_total_limit, report_to=report_to, bf16=bf16, use_cpu=not cuda,
        ddp_backend=("gloo" if not cuda else None) if distributed else None,
        dataloader_num_workers=a.num_workers, disable_tqdm=a.no_progress, log_level="warning",
        remove_unused_columns=True, **({"gradient_checkpointing": True} if a.gradient_checkpointing else {}),
    )
    if a.overwrite and targs.process_index == 0 and out.exists():
        shutil.rmtree(out)
    with targs.main_process_first(local=False, desc="output dir"):
        out.mkdir(parents=True, exist_ok=True)

    tokenizer = _load_tokenizer(a, out, _text_for_tokenizer(a), targs)
    if a.dataset:
        train, held = hub_datasets(a, tokenizer, targs)
    else:
        train, held = local_datasets(a, tokenizer)
    if a.resume and (Path(a.resume) / "config.json").is_file():  # FSDP sharded checkpoints have none
        _check_compatible("--resume", a.resume, _checkpoint_quant(a.resume), cfg)
    model = build_model(a, tokenizer, cfg)
    if a.warmup_steps is None:
        steps = a.max_steps or math.ceil(len(train) * a.epochs /
                                         (a.batch_size * a.grad_accum * targs.world_size))
        targs.warmup_steps = max(1, round(0.02 * steps))

    callbacks = []
    if a.mean_bias_every:
        from .diagnostics import MeanBiasCallback

        src = held if held is not None else train
        ids = torch.stack([torch.as_tensor(src[i]["input_ids"]) for i in range(min(4, len(src)))])
        callbacks.append(MeanBiasCallback({"input_ids": ids}, every_n_steps=a.mean_bias_every))

    n_params = sum(p.numel() for p in model.parameters())
    run_info = {
        "argv": sys.argv, "args": {k: v for k, v in vars(a).items()}, "precision": a.precision,
        "quantization_config": cfg.to_dict() if cfg is not None else None, "bf16_autocast": bf16,
        "world_size": targs.world_size, "parameters": n_params, "train_blocks": len(train),
        "eval_blocks": len(held) if held is not None else 0, "block_size": a.block_size,
        "global_batch": a.batch_size * a.grad_accum * targs.world_size, "hf_lowbit_version": hf_lowbit.__version__,
    }
    # hf_lowbit.callbacks(model): SD-MoE's gradient rule and basis refresh (empty for models without SD-MoE)
    callbacks = _make_callbacks(run_info, a.resume) + hf_lowbit.callbacks(model) + callbacks

    trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=held,
                      data_collator=default_data_collator, processing_class=tokenizer, callbacks=callbacks)
    if targs.process_index == 0:
        print(f"[hf-lowbit train] {a.precision} | {n_params / 1e6:.2f}M parameters | {len(train)} train / "
              f"{run_info['eval_blocks']} held-out blocks of {a.block_size} | {targs.world_size} process(es) | "
              f"bf16 autocast: {bf16} | logging to: {report_to or 'log.json only'}", flush=True)
    result = trainer.train(resume_from_checkpoint=a.resume)
    summary: dict[str, Any] = {"train_loss": result.training_loss, "global_step": trainer.state.global_step,
                               "tokens_per_s": run_info.get("tokens_per_s")}
    if held is not None:
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
        done = evals and evals[-1].get("step") == trainer.state.global_step
        metrics = evals[-1] if done else trainer.evaluate()
        summary["eval_loss"] = metrics["eval_loss"]
        summary["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    final = out / "final"
    _save_final(trainer, final, tokenizer)
    summary["final_dir"] = str(final)
    if a.finalize and targs.process_index == 0:
        summary["finalized"] = _finalize(final, out / "finalized")
    summary["seconds"] = time.time() - t0
    if targs.process_index == 0:
        log = Path(out) / LOG_FILE
        data = json.loads(log.read_text()) if log.is_file() else {"run": run_info}
        data.update({"summary": summary, "log_history": trainer.state.log_history})
        log.write_text(json.dumps(data, indent=1, default=str))
        print(f"[hf-lowbit train] done: {json.dumps(summary, default=str)}", flush=True)
    return summary


def main_from_args(args: argparse.Namespace) -> int:
    """Entry point for `hf-lowbit train` (argparse namespace from `add_arguments`). Errors propagate as
    ValueError / FileExistsError (the CLI prints them)."""
    run(resolve_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """scripts/train.py: parse, validate (errors → exit status 2 with a one-line message), run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        a = resolve_args(args)
    except (ValueError, FileExistsError) as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    try:
        run(a)
    except ValueError as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
