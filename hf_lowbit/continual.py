"""Continual-learning harness: train a sequence of tasks in order, evaluate every task after each (ALGORITHMS.md §4).

Protocol (TRACE): tasks are trained one after the other with the loss on answer tokens only (no replay, no task ids);
after task i every task j is evaluated, giving the score matrix ``a[i][j]`` (0-100). Then

    OP  = mean_j a[T-1][j]                        (overall performance after the last task)
    BWT = mean_{j<T-1} (a[T-1][j] - a[j][j])     (backward transfer; negative = forgetting)

Task sources:
* `load_trace(root)`: the released TRACE layout, one folder per dataset holding ``train.json`` and ``test.json``
  (or ``eval.json``), each a JSON list of ``{"prompt", "answer"}`` records;
* `load_hf_task(...)`: any `datasets` dataset (optional dependency, imported lazily);
* `builtin_tasks()`: small classification / cloze tasks built from the Shakespeare text shipped in the package,
  so the harness runs offline on a CPU in minutes (`build_tiny_base` pretrains a matching tiny model).

Scores: accuracy (classification tasks with a fixed answer set are scored by ranking the candidates' log-likelihood;
free-form answers by greedy generation and normalised exact match), ROUGE-L (MeetingBank), edit similarity (Py150)
and SARI (20Minuten), all on whitespace/word tokens and close to, not bit-identical with, the reference scorers.

`run_continual` returns a `ContinualResult` (matrix, OP, BWT, mean train step time, peak memory, optional routing
N_eff per task transition) and `save_results` writes it as JSON plus a PNG heatmap (matplotlib, imported lazily).
"""

from __future__ import annotations

import difflib
import json
import math
import random
import re
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

TRACE_ORDER = ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten")
TRACE_METRICS = {"MeetingBank": "rouge_l", "Py150": "edit_similarity", "20Minuten": "sari"}


@dataclass
class Task:
    """One task: train/test records ``{"prompt", "answer"}``, a metric name, and optionally the fixed answer set
    (then evaluation ranks the candidates by log-likelihood instead of generating)."""

    name: str
    train: list[dict[str, str]]
    test: list[dict[str, str]]
    metric: str = "accuracy"
    choices: list[str] | None = None
    max_new_tokens: int = 32


# ---------------------------------------------------------------------------------------------------------------------
# Metrics (0-100 per example)
# ---------------------------------------------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split()).rstrip(".")


def accuracy(pred: str, ref: str, source: str = "") -> float:
    """Normalised exact match (case, whitespace, a trailing period ignored); a prediction whose first word is the
    one-word reference also counts."""
    p, r = _normalise(pred), _normalise(ref)
    return 100.0 if p == r or (r and " " not in r and p.split(" ")[:1] == [r]) else 0.0


def rouge_l(pred: str, ref: str, source: str = "") -> float:
    """ROUGE-L F1 over lower-cased word tokens (longest common subsequence)."""
    a, b = _words(pred), _words(ref)
    if not a or not b:
        return 100.0 if a == b else 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 100.0 * 2 * precision * recall / (precision + recall)


def edit_similarity(pred: str, ref: str, source: str = "") -> float:
    """Character-level similarity ratio ``2·matches / (len(pred) + len(ref))`` (difflib; TRACE's fuzz.ratio)."""
    return 100.0 * difflib.SequenceMatcher(None, pred.strip(), ref.strip()).ratio()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _sari_n(s: Counter, c: Counter, r: Counter) -> tuple[float, float, float]:
    """Keep F1, deletion precision and addition F1 for one n-gram order (one reference)."""
    keep, keep_good, keep_all = s & c, s & c & r, s & r
    keep_p = sum(keep_good[g] / keep[g] for g in keep) / len(keep) if keep else 0.0
    keep_r = sum(keep_good.values()) / sum(keep_all.values()) if keep_all else 0.0
    keep_f = 2 * keep_p * keep_r / (keep_p + keep_r) if keep_p + keep_r > 0 else 0.0
    deleted = s - c
    del_good = deleted - r
    del_p = sum(del_good[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 0.0
    added, ref_new = set(c) - set(s), set(r) - set(s)
    add_good = len(added & set(r))
    add_p = add_good / len(added) if added else 0.0
    add_r = add_good / len(ref_new) if ref_new else 0.0
    add_f = 2 * add_p * add_r / (add_p + add_r) if add_p + add_r > 0 else 0.0
    return keep_f, del_p, add_f


def sari(pred: str, ref: str, source: str = "") -> float:
    """SARI (Xu et al. 2016) with one reference: mean of keep-F1, delete-precision and add-F1 over 1-4-grams."""
    s, c, r = _words(source), _words(pred), _words(ref)
    scores = [_sari_n(_ngrams(s, n), _ngrams(c, n), _ngrams(r, n)) for n in range(1, 5)]
    return 100.0 * sum(sum(x[i] for x in scores) / 4 for i in range(3)) / 3


METRICS: dict[str, Callable[[str, str, str], float]] = {
    "accuracy": accuracy, "rouge_l": rouge_l, "edit_similarity": edit_similarity, "sari": sari}


def op_bwt(matrix: Sequence[Sequence[float]]) -> tuple[float, float]:
    """OP = mean of the last row; BWT = mean over j < T-1 of (last row − diagonal). BWT is NaN for one task."""
    t = len(matrix)
    if t == 0 or any(len(row) != t for row in matrix):
        raise ValueError(f"op_bwt: expected a square T×T matrix, got {[len(r) for r in matrix]}")
    last = matrix[-1]
    op = sum(last) / t
    bwt = sum(last[j] - matrix[j][j] for j in range(t - 1)) / (t - 1) if t > 1 else math.nan
    return op, bwt


# ---------------------------------------------------------------------------------------------------------------------
# Task sources
# ---------------------------------------------------------------------------------------------------------------------
def _read_records(path: Path) -> list[dict[str, str]]:
    """A JSON list (or JSON Lines file) of {"prompt", "answer"} records."""
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(records, list) or not all(isinstance(r, dict) and "prompt" in r and "answer" in r
                                                for r in records):
        raise ValueError(f"{path}: expected a list of {{'prompt', 'answer'}} records")
    return [{"prompt": str(r["prompt"]), "answer": str(r["answer"])} for r in records]


def load_trace(root: str | Path, tasks: Sequence[str] = TRACE_ORDER, eval_split: str = "test",
               max_train: int | None = None, max_eval: int | None = None) -> list[Task]:
    """TRACE tasks from ``root/<task>/{train,test,eval}.json`` in the given order (scores as in the paper)."""
    root = Path(root)
    out = []
    for name in tasks:
        folder = root / name
        splits = [eval_split, "test", "eval"]
        eval_path = next((folder / f"{s}.json" for s in splits if (folder / f"{s}.json").is_file()), None)
        if not (folder / "train.json").is_file() or eval_path is None:
            raise FileNotFoundError(f"load_trace: {folder} needs train.json and test.json (or eval.json)")
        out.append(Task(name, _read_records(folder / "train.json")[:max_train], _read_records(eval_path)[:max_eval],
                        metric=TRACE_METRICS.get(name, "accuracy"),
                        max_new_tokens=256 if name in TRACE_METRICS else 32))
    return out


def load_hf_task(path: str, name: str | None = None, *, config_name: str | None = None,
                 prompt_field: str = "prompt", answer_field: str = "answer", train_split: str = "train",
                 eval_split: str = "test", metric: str = "accuracy", choices: list[str] | None = None,
                 max_train: int | None = None, max_eval: int | None = None, max_new_tokens: int = 32) -> Task:
    """A task from any `datasets` dataset (hub name or local path) with prompt/answer columns."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("load_hf_task needs the `datasets` package: pip install 'hf-lowbit[continual]'") from e

    def records(split: str, limit: int | None) -> list[dict[str, str]]:
        ds = datasets.load_dataset(path, config_name, split=split)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        return [{"prompt": str(r[prompt_field]), "answer": str(r[answer_field])} for r in ds]

    if metric not in METRICS:
        raise ValueError(f"load_hf_task: metric={metric!r} is not valid; allowed: {sorted(METRICS)}")
    return Task(name or path, records(train_split, max_train), records(eval_split, max_eval), metric, choices,
                max_new_tokens)


def _macbeth_lines() -> list[tuple[str, str, str]]:
    """(act, speaker, line) for every spoken line of the shipped Macbeth."""
    act = speaker = None
    rows = []
    text = resources.files("hf_lowbit.data").joinpath("macbeth.txt").read_text(encoding="utf-8")
    for raw in text.splitlines():
        line = raw.strip()
        if m := re.match(r"^ACT ([IVX]+)\.$", line):
            act, speaker = m.group(1), None
        elif re.match(r"^SCENE [IVX]+\.", line):
            speaker = None
        elif act and re.match(r"^[A-Z][A-Z' ]+\.$", line):
            speaker = line[:-1]
        elif act and speaker and line and not line.startswith("["):
            rows.append((act, speaker, line))
    return rows


def _sonnet_lines() -> list[tuple[int, str]]:
    """(line index within its sonnet, line) for the 14-line sonnets of the shipped Sonnets."""
    text = resources.files("hf_lowbit.data").joinpath("sonnets.txt").read_text(encoding="utf-8")
    sonnets: list[list[str]] = []
    for raw in text.splitlines():
        if re.match(r"^[IVXLC]+$", raw.strip()):
            sonnets.append([])
        elif sonnets and raw.strip():
            sonnets[-1].append(raw.rstrip())
    return [(i, line) for s in sonnets if len(s) == 14 for i, line in enumerate(s)]


def _split(records: list[dict[str, str]], n_train: int, n_test: int, rng: random.Random,
           key: str = "answer") -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Shuffle, balance the answers (round-robin over classes) and split into disjoint train/test lists."""
    by_class: dict[str, list[dict[str, str]]] = {}
    for r in records:
        by_class.setdefault(r[key], []).append(r)
    for rows in by_class.values():
        rng.shuffle(rows)
    test: list[dict[str, str]] = []
    while len(test) < n_test and any(by_class.values()):
        for rows in by_class.values():
            if rows and len(test) < n_test:
                test.append(rows.pop())
    pool = [r for rows in by_class.values() for r in rows]
    rng.shuffle(pool)
    return pool[:n_train], test


def _final_word(line: str) -> str:
    return re.sub(r"[^a-z]", "", line.split()[-1].lower()) if line.split() else ""


def _bare(line: str) -> str:
    """The line without trailing punctuation, so that a prompt ends on its last word."""
    return re.sub(r"[^\w']+$", "", line.strip())


def builtin_tasks(n_train: int = 256, n_test: int = 64, seed: int = 0,
                  names: Sequence[str] = ("last_letter", "cloze", "first_letter", "ending")) -> list[Task]:
    """Small-answer-set tasks from the package's Shakespeare text, each with its own prompt format. The default
    sequence is learnable by adapters on a tiny base in ~100 steps and its tasks share inputs (lines and their last
    words) under different labels, so later tasks interfere with earlier ones:

    * ``last_letter``: the last letter of a line's final word (5: e t d s n);
    * ``cloze``: the missing last word of a line, among the 6 most frequent line-final words (next-word cloze);
    * ``first_letter``: the first letter of a line's final word (5: s t d m b; answers shared with
      ``last_letter``, so only the task tag tells the two apart);
    * ``ending``: the last two letters of a line's final word (6 most frequent endings);

    and ``vowel`` (does the final word end in a vowel: yes/no); harder for tiny models (kept for larger bases):
    ``source`` (play or sonnets), ``speaker`` (MACBETH, LADY MACBETH, MALCOLM, MACDUFF), ``quatrain`` (first/second/
    third quatrain or couplet of a sonnet line) and ``act`` (I-V of Macbeth).
    """
    rng = random.Random(seed)
    play, sonnets = _macbeth_lines(), _sonnet_lines()
    lines = [ln for _, _, ln in play] + [ln.strip() for _, ln in sonnets]
    long_lines = [(ln, _final_word(ln)) for ln in lines if len(ln.split()) >= 4 and len(_final_word(ln)) >= 2]
    top = lambda values, n: [v for v, _ in Counter(values).most_common(n)]  # noqa: E731
    words, letters, firsts = top([w for _, w in long_lines], 6), ["e", "t", "d", "s", "n"], ["s", "t", "d", "m", "b"]
    endings = top([w[-2:] for _, w in long_lines], 6)
    speakers = ("MACBETH", "LADY MACBETH", "MALCOLM", "MACDUFF")
    parts = ("first", "second", "third", "couplet")
    # Prompts end on the line's last word (the answer is predicted at that token): the task tag at the start
    # reaches the answer only through attention, as a domain cue.
    specs: dict[str, tuple[str, list[tuple[str, str]], list[str]]] = {
        "source": ("Play or sonnet? {}", [(_bare(ln), "play") for _, _, ln in play]
                   + [(_bare(ln), "sonnet") for _, ln in sonnets], ["play", "sonnet"]),
        "last_letter": ("Last letter: {}", [(_bare(ln), w[-1]) for ln, w in long_lines if w[-1] in letters],
                        letters),
        "cloze": ("Complete: {}", [(ln.rsplit(" ", 1)[0], w) for ln, w in long_lines if w in words], words),
        "first_letter": ("First letter: {}", [(_bare(ln), w[0]) for ln, w in long_lines if w[0] in firsts], firsts),
        "vowel": ("Ends in a vowel? {}", [(_bare(ln), "yes" if w[-1] in "aeiouy" else "no") for ln, w in long_lines],
                  ["yes", "no"]),
        "ending": ("Ending: {}", [(_bare(ln), w[-2:]) for ln, w in long_lines if w[-2:] in endings], endings),
        "speaker": ("Who speaks? {}", [(_bare(ln), sp) for _, sp, ln in play if sp in speakers], list(speakers)),
        "quatrain": ("Which quatrain? {}", [(_bare(ln), parts[min(i // 4, 3)]) for i, ln in sonnets], list(parts)),
        "act": ("Which act? {}", [(_bare(ln), act) for act, _, ln in play], ["I", "II", "III", "IV", "V"]),
    }
    tasks = []
    for name in names:
        if name not in specs:
            raise ValueError(f"builtin_tasks: unknown task {name!r}; allowed: {sorted(specs)}")
        template, pairs, answers = specs[name]
        records = [{"prompt": template.format(text), "answer": " " + ans} for text, ans in pairs]
        train, test = _split(records, n_train, n_test, rng)
        tasks.append(Task(name, train, test, "accuracy", [" " + a for a in answers], max_new_tokens=4))
    return tasks


# ---------------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------------
def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    if eos is None:
        raise ValueError("the tokenizer needs an eos_token or a pad_token")
    return int(eos)


def _pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else _eos_id(tokenizer)


def encode(tokenizer, prompt: str, answer: str, max_length: int, eos: bool = True) -> tuple[list[int], int]:
    """Token ids of prompt + answer (+ eos) and where the answer starts; the prompt is cut from the left to fit."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + ([_eos_id(tokenizer)] if eos else [])
    a = a[:max_length - 1]
    p = p[-(max_length - len(a)):]
    return p + a, len(p)


def collate(seqs: Sequence[tuple[list[int], int]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad to a batch; labels are -100 everywhere but on answer tokens (answer-only loss)."""
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (seq, start) in enumerate(seqs):
        off = width - len(seq) if left else 0
        ids[i, off:off + len(seq)] = torch.tensor(seq)
        labels[i, off + start:off + len(seq)] = torch.tensor(seq[start:])
        mask[i, off:off + len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ContinualConfig:
    """Training/evaluation settings shared by all tasks (TRACE: AdamW, LR 1e-4 cosine, weight decay 0.01)."""

    steps_per_task: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_length: int = 2048
    eval_batch_size: int = 32
    max_eval: int | None = None
    seed: int = 0
    aux_loss: bool = True
    track_neff: bool = False
    neff_examples: int = 64
    log_every: int = 0


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SavedActivations:
    """Context that counts the bytes autograd saves for backward (each storage once, parameters excluded): the
    activation memory of one step, measured exactly and independent of allocator or other processes."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[tuple[int, str], int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[(storage.data_ptr(), str(t.device))] = storage.nbytes()
        return t

    def __enter__(self) -> "SavedActivations":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    @property
    def mb(self) -> float:
        return sum(self.storages.values()) / 2**20


def train_task(model: torch.nn.Module, tokenizer, task: Task, cfg: ContinualConfig, task_index: int = 0,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train on one task for `cfg.steps_per_task` steps (fresh AdamW + cosine schedule); returns step times, losses
    and the activation memory (MB saved for backward) of the first step."""
    from transformers import get_cosine_schedule_with_warmup

    from hf_lowbit.model_patches.mhmoe import mhmoe_aux_loss

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_task: the model has no trainable parameters (wrap it with an adapter first)")
    if not task.train:
        raise ValueError(f"train_task: task {task.name!r} has no training records")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps_per_task)
    device, pad = _device(model), _pad_id(tokenizer)
    encoded = [encode(tokenizer, r["prompt"], r["answer"], cfg.max_length) for r in task.train]
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + task_index)
    order: list[int] = []
    times, losses = [], []
    model.train()
    for step in range(cfg.steps_per_task):
        while len(order) < cfg.batch_size:
            order += torch.randperm(len(encoded), generator=gen).tolist()
        batch = collate([encoded[i] for i in order[:cfg.batch_size]], pad)
        order = order[cfg.batch_size:]
        batch = {k: v.to(device) for k, v in batch.items()}
        _sync(device)
        t0 = time.perf_counter()
        if step == 0:  # measure the activation memory once (the hooks cost a little time)
            with SavedActivations(model) as saved:
                loss = model(**batch).loss
            saved_mb = saved.mb
        else:
            loss = model(**batch).loss
        aux = mhmoe_aux_loss(model) if cfg.aux_loss else None
        (loss if aux is None else loss + aux).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            recent = statistics.fmean(losses[-cfg.log_every:])
            log(f"  [{task.name}] step {step + 1}/{cfg.steps_per_task} loss {recent:.4f}")
    model.eval()
    return {"step_times": times, "losses": losses, "saved_activation_mb": saved_mb}


def identifying_lengths(choice_ids: Sequence[Sequence[int]]) -> list[int]:
    """For each tokenized choice, the length of its shortest prefix that no other choice shares.

    Ranking choices by the probability of that prefix compares disjoint events (the model's probability of
    committing to each choice); the tokens after it cannot discriminate and would only add a length bias.
    """
    def common(a: Sequence[int], b: Sequence[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    out = []
    for i, a in enumerate(choice_ids):
        shared = max((common(a, b) for j, b in enumerate(choice_ids) if j != i), default=0)
        out.append(min(len(a), shared + 1))
    return out


@torch.no_grad()
def _choice_scores(model, tokenizer, records: list[dict[str, str]], choices: list[str],
                   cfg: ContinualConfig) -> list[float]:
    """Accuracy per record: the gold answer's identifying prefix (answer + eos, as trained) must be the most likely
    among the choices (see `identifying_lengths`)."""
    device, pad = _device(model), _pad_id(tokenizer)
    tokens = [tokenizer(c, add_special_tokens=False)["input_ids"] + [_eos_id(tokenizer)] for c in choices]
    keep = identifying_lengths(tokens)
    seqs = []
    for r in records:
        for c, n in zip(choices, keep):
            ids, start = encode(tokenizer, r["prompt"], c, cfg.max_length)
            seqs.append((ids[:start + n], start))
    totals = []
    for i in range(0, len(seqs), cfg.eval_batch_size):
        batch = collate(seqs[i:i + cfg.eval_batch_size], pad)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits.float()
        target = batch["labels"][:, 1:].to(device)
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, target.clamp_min(0)[..., None])[..., 0]
        totals.append(torch.where(target >= 0, logp, torch.zeros_like(logp)).sum(dim=1).cpu())
    best = torch.cat(totals).reshape(len(records), len(choices)).argmax(dim=1).tolist()
    return [100.0 if choices[b] == r["answer"] else 0.0 for b, r in zip(best, records)]


@torch.no_grad()
def _generation_scores(model, tokenizer, task: Task, records: list[dict[str, str]],
                       cfg: ContinualConfig) -> list[float]:
    """Greedy generation (left-padded batches), cut at eos, scored by the task's metric."""
    device, pad, eos = _device(model), _pad_id(tokenizer), _eos_id(tokenizer)
    metric = METRICS[task.metric]
    room = max(1, cfg.max_length - task.max_new_tokens)
    scores = []
    for i in range(0, len(records), cfg.eval_batch_size):
        chunk = records[i:i + cfg.eval_batch_size]
        prompts = [(tokenizer(r["prompt"], add_special_tokens=True)["input_ids"][-room:], 0) for r in chunk]
        batch = collate(prompts, pad, left=True)
        out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=task.max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos)
        for r, row in zip(chunk, out[:, batch["input_ids"].shape[1]:].tolist()):
            row = row[:row.index(eos)] if eos in row else row
            pred = tokenizer.decode(row, skip_special_tokens=True)
            scores.append(metric(pred, r["answer"], r["prompt"]))
    return scores


def evaluate_task(model: torch.nn.Module, tokenizer, task: Task, cfg: ContinualConfig) -> float:
    """Mean score (0-100) of the model on the task's test records."""
    model.eval()
    records = task.test[:cfg.max_eval]
    if not records:
        raise ValueError(f"evaluate_task: task {task.name!r} has no test records")
    if task.choices and task.metric == "accuracy":
        scores = _choice_scores(model, tokenizer, records, task.choices, cfg)
    else:
        scores = _generation_scores(model, tokenizer, task, records, cfg)
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------------------------------
# Routing N_eff on old-task tokens (MH-MoE / LoRAMoE adapters)
# ---------------------------------------------------------------------------------------------------------------------
def _neff_probe(tokenizer, tasks: Sequence[Task], cfg: ContinualConfig) -> dict[str, torch.Tensor]:
    """Old-task test sequences (prompt + gold answer) with per-sequence domain (task) and label (answer) ids."""
    seqs, domain, label = [], [], []
    for j, task in enumerate(tasks):
        for r in task.test[:cfg.neff_examples]:
            seqs.append(encode(tokenizer, r["prompt"], r["answer"], cfg.max_length))
            domain.append(j)
            label.append(task.choices.index(r["answer"]) if task.choices and r["answer"] in task.choices else -1)
    batch = collate(seqs, _pad_id(tokenizer))
    batch["domain"], batch["label"] = torch.tensor(domain), torch.tensor(label)
    return batch


def _neff_routes(model, probe: dict[str, torch.Tensor], cfg: ContinualConfig) -> tuple[dict, torch.Tensor, dict]:
    from hf_lowbit.diagnostics.routing import collect_routes, token_factors, token_losses

    mask = probe["attention_mask"]
    routes = collect_routes(model, probe["input_ids"], mask, cfg.eval_batch_size)
    losses = token_losses(model, probe["input_ids"], mask, probe["labels"], cfg.eval_batch_size)
    factors = token_factors(probe["input_ids"], mask, domain=probe["domain"], label=probe["label"])
    return routes, losses, factors


def _neff_report(routes: dict, factors: dict, before: torch.Tensor, after: torch.Tensor) -> dict[str, Any]:
    from hf_lowbit.diagnostics.routing import layer_summary, routing_neff

    per_layer = {name: routing_neff(r, factors, loss_before=before, loss_after=after) for name, r in routes.items()}
    report = layer_summary(per_layer, min_tokens=5)
    report["routes"] = {name: r.table(limit=50) for name, r in per_layer.items()}
    return report


# ---------------------------------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ContinualResult:
    """Score matrix ``matrix[i][j]`` (after task i, on task j), OP, BWT, timings, memory (the device's peak:
    CUDA max allocated, or the process peak RSS on a CPU; and the activations saved for backward in one step) and
    optional routing N_eff per task transition."""

    tasks: list[str]
    metrics: list[str]
    matrix: list[list[float]]
    op: float
    bwt: float
    step_time_s: float
    step_time_median_s: float
    steps: int
    peak_memory_mb: float
    memory_kind: str
    saved_activation_mb: float
    trainable_params: int
    train_loss: list[float]
    wall_s: float
    neff: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, dict):
                return {str(k): clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        return clean(asdict(self))


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    try:
        import resource
    except ImportError:
        return math.nan, "unavailable"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def run_continual(model: torch.nn.Module, tokenizer, tasks: Sequence[Task], cfg: ContinualConfig | None = None,
                  log: Callable[[str], None] = print, info: dict[str, Any] | None = None) -> ContinualResult:
    """Train `tasks` in order on `model` (its trainable parameters: e.g. an MH-MoE adapter), evaluate all after
    each. With ``cfg.track_neff``, routes of the old tasks' test tokens are taken after each task and paired with
    their loss increase after the next one."""
    cfg = cfg or ContinualConfig()
    if not tasks:
        raise ValueError("run_continual: no tasks")
    unknown = {t.metric for t in tasks} - set(METRICS)
    if unknown:
        raise ValueError(f"run_continual: unknown metric(s) {sorted(unknown)}; allowed: {sorted(METRICS)}")
    device = _device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_start = time.perf_counter()
    matrix: list[list[float]] = []
    step_times: list[float] = []
    saved_mb: list[float] = []
    final_losses: list[float] = []
    neff: list[dict[str, Any]] = []
    pending = None
    for i, task in enumerate(tasks):
        log(f"[{i + 1}/{len(tasks)}] training {task.name} ({len(task.train)} records, {cfg.steps_per_task} steps)")
        stats = train_task(model, tokenizer, task, cfg, i, log)
        step_times += stats["step_times"][1:] or stats["step_times"]  # the first step pays one-off setup costs
        saved_mb.append(stats["saved_activation_mb"])
        final_losses.append(statistics.fmean(stats["losses"][-max(1, len(stats["losses"]) // 10):]))
        if pending is not None:
            routes, before, factors, old = pending
            after = _neff_routes(model, old, cfg)[1]
            neff.append({"after_task": tasks[i - 1].name, "next_task": task.name,
                         **_neff_report(routes, factors, before, after)})
            pending = None
        row = [evaluate_task(model, tokenizer, t, cfg) for t in tasks]
        matrix.append(row)
        log("      scores: " + "  ".join(f"{t.name} {s:5.1f}" for t, s in zip(tasks, row)))
        if cfg.track_neff and i + 1 < len(tasks):
            old = _neff_probe(tokenizer, tasks[:i + 1], cfg)
            routes, before, factors = _neff_routes(model, old, cfg)
            pending = (routes, before, factors, old) if routes else None
    op, bwt = op_bwt(matrix)
    peak, kind = _peak_memory(device)
    return ContinualResult([t.name for t in tasks], [t.metric for t in tasks], matrix, op, bwt,
                           statistics.fmean(step_times), statistics.median(step_times),
                           cfg.steps_per_task * len(tasks), peak, kind, max(saved_mb),
                           sum(p.numel() for p in model.parameters() if p.requires_grad), final_losses,
                           time.perf_counter() - t_start, neff, dict(info or {}))


def plot_matrix(matrix: Sequence[Sequence[float]], tasks: Sequence[str], path: str | Path, title: str = "") -> None:
    """Heatmap of the score matrix (rows: after training task i; columns: evaluated task j)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tasks)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n, 1.0 + 0.8 * n))
    im = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(n), tasks, rotation=45, ha="right")
    ax.set_yticks(range(n), [f"after {t}" for t in tasks])
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{matrix[i][j]:.0f}", ha="center", va="center",
                    color="white" if matrix[i][j] < 60 else "black", fontsize=8)
    ax.set_xlabel("evaluated task")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def save_results(result: ContinualResult, output_dir: str | Path, title: str = "") -> dict[str, str]:
    """Write ``results.json`` and ``accuracy_matrix.png`` (when matplotlib is installed); returns the paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "results.json")}
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2))
    try:
        plot_matrix(result.matrix, result.tasks, out / "accuracy_matrix.png",
                    title or f"OP {result.op:.1f}  BWT {result.bwt:+.1f}")
        paths["png"] = str(out / "accuracy_matrix.png")
    except ImportError:
        pass
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# A tiny pretrained base for the built-in sequence
# ---------------------------------------------------------------------------------------------------------------------
def build_tiny_base(output_dir: str | Path, steps: int = 300, hidden: int = 128, layers: int = 4,
                    batch_size: int = 16, block: int = 128, lr: float = 2e-3, vocab_size: int = 1024,
                    seed: int = 0, log: Callable[[str], None] = print) -> str:
    """Train a BPE tokenizer and a tiny Qwen3-style LM on the package's Shakespeare text (cached in `output_dir`)."""
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    from .demo import demo_text, tiny_qwen3_config, train_tokenizer

    out = Path(output_dir)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return str(out)
    t0 = time.perf_counter()
    text = demo_text()
    tokenizer = train_tokenizer(text, vocab_size)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    blocks = ids[:len(ids) // block * block].reshape(-1, block)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_qwen3_config(len(tokenizer), hidden, layers))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"  base LM step {step + 1}/{steps} loss {loss.item():.3f}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log(f"  tiny base saved to {out} ({time.perf_counter() - t0:.0f} s)")
    return str(out)


__all__ = ["ContinualConfig", "ContinualResult", "METRICS", "TRACE_METRICS", "TRACE_ORDER", "Task", "accuracy",
           "build_tiny_base", "builtin_tasks", "collate", "edit_similarity", "encode", "evaluate_task",
           "load_hf_task", "load_trace", "op_bwt", "plot_matrix", "rouge_l", "run_continual", "sari",
           "save_results", "train_task"]
