"""Small-scale reproduction of paper A's FP4 result: BF16 vs plain NVFP4 vs NVFP4 + Averis (mean-centring).

Trains the same small Qwen3-style model from scratch, from the same initial weights, on the same token stream, once
per precision recipe, evaluates held-out loss at fixed steps, and writes:
  results.json      table (final held-out loss, gap to BF16 in %, tokens/s, peak GPU memory) + loss curves
  loss_curves.png   held-out loss vs step for every recipe
  diag_early/, diag_late/   mean-bias diagnostics of the BF16 model at an early and the final step (JSON + PNG)

Real text without a network: the packaged Shakespeare (`--data shakespeare`) or the Python sources of the
installed site-packages (`--data site-packages`: sorted file list, deterministic). The paper's ordering to check:
loss(BF16) < loss(NVFP4 + Averis) < loss(plain NVFP4).

    python scripts/reproduce_meanbias.py --tiny --out runs/repro-tiny              # CPU smoke run, ~1 minute
    python scripts/reproduce_meanbias.py --data site-packages --out runs/repro     # GPU run (defaults below)
    # one config per GPU in parallel, then one table:
    CUDA_VISIBLE_DEVICES=0 python scripts/reproduce_meanbias.py ... --configs bf16 --out runs/a &
    CUDA_VISIBLE_DEVICES=1 python scripts/reproduce_meanbias.py ... --configs nvfp4 --out runs/b; wait
    python scripts/reproduce_meanbias.py --merge runs/a runs/b --out runs/repro
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import hf_lowbit
from hf_lowbit.corpus import SOURCES, load_text, tokenize_chunked
from hf_lowbit.demo import train_tokenizer

#: precision name → LowBitConfig arguments (None = high precision: BF16 autocast on a GPU, FP32 on a CPU)
RECIPES = {
    "bf16": None,
    "nvfp4": dict(format="nvfp4", mean_center=False),
    "nvfp4-averis": dict(format="nvfp4", mean_center=True),
    "nvfp4-hadamard": dict(format="nvfp4", mean_center=False, hadamard=True),
    "nvfp4-averis-hadamard": dict(format="nvfp4", mean_center=True, hadamard=True),
    "mxfp4": dict(format="mxfp4", mean_center=False),
    "mxfp4-averis": dict(format="mxfp4", mean_center=True),
}


def build_data(args, device: str):
    text = load_text(args.data, args.max_bytes)
    tokenizer = train_tokenizer(text[: 4_000_000], vocab_size=args.vocab)
    ids = tokenize_chunked(tokenizer, text)
    n_eval = max(args.seq * args.eval_batches * args.batch, len(ids) // 50)
    train, held = ids[:-n_eval], ids[-n_eval:]
    blocks = lambda t: t[: (len(t) // args.seq) * args.seq].reshape(-1, args.seq)  # noqa: E731
    return tokenizer, blocks(train), blocks(held)[: args.eval_batches * args.batch].to(device)


def model_config(vocab: int, args):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=max(1, args.heads // 2), head_dim=args.hidden // args.heads,
                       max_position_embeddings=args.seq, tie_word_embeddings=False)


def held_out_loss(model, held: torch.Tensor, batch: int, amp: bool) -> float:
    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        for i in range(0, len(held), batch):
            x = held[i: i + batch]
            losses.append(model(x, labels=x).loss.float().item())
    model.train()
    return sum(losses) / len(losses)


def diagnostics(model, held: torch.Tensor, out: Path) -> dict:
    from hf_lowbit.diagnostics import mean_bias, summarize

    results = mean_bias(model, {"input_ids": held[:2]}, max_tokens=1024, keep_projections=True)
    summary = summarize(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mean_bias.json").write_text(json.dumps(results, indent=1))
    try:
        from hf_lowbit.diagnostics.plots import plot_mean_bias

        plot_mean_bias(results, out)
    except ImportError:
        pass
    return {k: summary[k]["mean"] for k in ("r2", "cos_mu_v1", "energy_mean", "qerr_plain", "qerr_averis")
            if k in summary}


def train_one(name: str, init_state: dict, vocab: int, train: torch.Tensor, held: torch.Tensor, args,
              device: str, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(vocab, args))
    model.load_state_dict(init_state)
    if RECIPES[name] is not None:
        hf_lowbit.convert(model, hf_lowbit.LowBitConfig(**RECIPES[name]))
    model.to(device).train()
    amp = device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(len(train), generator=g)
    curve, diag, train_time, tokens = [], {}, 0.0, 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(1, args.steps + 1):
        idx = order[((step - 1) * args.batch + torch.arange(args.batch)) % len(train)]
        x = train[idx].to(device)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        tokens += x.numel()
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, held_out_loss(model, held, args.batch, amp)))
            print(f"  {name:>22} step {step:5d}  train {loss.item():.4f}  held-out {curve[-1][1]:.4f}", flush=True)
        if name == "bf16" and step == max(1, args.steps // 10):
            diag["early"] = {"step": step, **diagnostics(model, held, out / "diag_early")}
    if name == "bf16":
        diag["late"] = {"step": args.steps, **diagnostics(model, held, out / "diag_late")}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"final_loss": curve[-1][1], "curve": curve, "tokens_per_s": tokens / train_time,
            "peak_mem_gib": peak, "diagnostics": diag}


def plot_curves(results: dict, path: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, r in results.items():
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, label=name)
    ax.set(xlabel="step", ylabel="held-out loss", title="From-scratch training: BF16 vs FP4 recipes")
    ax.legend()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--configs", default="bf16,nvfp4,nvfp4-averis",
                   help=f"comma-separated, from {list(RECIPES)}")
    p.add_argument("--data", default="shakespeare", choices=SOURCES)
    p.add_argument("--tiny", action="store_true", help="CPU smoke-test sizes")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--max-bytes", type=int, default=200_000_000, help="site-packages text to read")
    p.add_argument("--merge", nargs="+", metavar="RUN_DIR",
                   help="only combine the results.json of runs made in parallel (one config per GPU) into --out")
    if p.parse_known_args(argv)[0].tiny:  # tiny sizes become the defaults; explicit flags still win
        p.set_defaults(steps=30, batch=4, seq=64, hidden=64, layers=2, heads=4, vocab=512, eval_every=10,
                       eval_batches=2)
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [n for n in names if n not in RECIPES]
    if bad or not names:
        p.error(f"--configs={args.configs!r} is not valid; allowed: comma-separated names from {list(RECIPES)}")
    args.names = names
    for flag in ("steps", "batch", "seq", "hidden", "layers", "heads", "eval_every", "eval_batches"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}={getattr(args, flag)} is not valid; allowed: an integer >= 1")
    if args.hidden % args.heads:
        p.error(f"--hidden={args.hidden} is not valid; allowed: a multiple of --heads ({args.heads})")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        p.error(f"--out={args.out!r} exists and is not empty; choose a new directory (nothing was changed)")
    return args


def write_summary(out: Path, results: dict, meta: dict) -> dict:
    """results.json (table + runs), loss_curves.png and the printed table for the runs in `results`."""
    base = results.get("bf16", {}).get("final_loss")
    table = []
    for name, r in results.items():
        gap = None if base is None else 100 * (r["final_loss"] - base) / base
        table.append({"config": name, "final_loss": r["final_loss"], "gap_to_bf16_pct": gap,
                      "tokens_per_s": r["tokens_per_s"], "peak_mem_gib": r["peak_mem_gib"]})
    versions = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                "hf_lowbit": hf_lowbit.__version__}
    summary = {**meta, "versions": versions, "table": table, "runs": results}
    f = {n: results[n]["final_loss"] for n in ("bf16", "nvfp4", "nvfp4-averis") if n in results}
    if len(f) == 3:
        summary["paper_ordering_held"] = f["bf16"] < f["nvfp4-averis"] < f["nvfp4"]
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    plot_curves(results, out / "loss_curves.png")
    print("\n| config | final held-out loss | gap to BF16 | tokens/s | peak mem GiB |\n|---|---|---|---|---|")
    for row in table:
        gap = "" if row["gap_to_bf16_pct"] is None else f"{row['gap_to_bf16_pct']:+.2f}%"
        mem = "" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f}"
        print(f"| {row['config']} | {row['final_loss']:.4f} | {gap} | {row['tokens_per_s']:,.0f} | {mem} |")
    if "paper_ordering_held" in summary:
        print(f"paper ordering BF16 < NVFP4+Averis < NVFP4: "
              f"{'held' if summary['paper_ordering_held'] else 'did not hold'}")
    return summary


def merge(out: Path, run_dirs: list[str]) -> int:
    """Combine the results.json of runs made in parallel (e.g. one config per GPU, same arguments) into `out`."""
    missing = [d for d in run_dirs if not (Path(d) / "results.json").is_file()]
    if missing:
        raise SystemExit(f"--merge: {missing} hold no results.json; allowed: output directories of finished runs "
                         "(nothing was written)")
    parts = [json.loads((Path(d) / "results.json").read_text()) for d in run_dirs]
    strip = lambda a: {k: v for k, v in a.items() if k not in ("out", "configs", "merge")}  # noqa: E731
    for part in parts[1:]:
        if strip(part["args"]) != strip(parts[0]["args"]) or part["device"] != parts[0]["device"]:
            raise SystemExit(f"--merge: {run_dirs} were not run with the same arguments on the same device type")
    results = {name: r for part in parts for name, r in part["runs"].items()}
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out, results, {"device": parts[0]["device"], "params": parts[0]["params"],
                                 "args": parts[0]["args"], "merged_from": run_dirs})
    print(f"written: {out / 'results.json'}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(Path(args.out), args.merge)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, train, held = build_data(args, device)
    print(f"data: {train.numel():,} train tokens, {held.numel():,} held-out tokens; device {device}")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    init = AutoModelForCausalLM.from_config(model_config(len(tokenizer), args))
    n_params = sum(p.numel() for p in init.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters")
    init_state = {k: v.clone() for k, v in init.state_dict().items()}
    results = {}
    for name in args.names:
        results[name] = train_one(name, init_state, len(tokenizer), train, held, args, device, out)
    write_summary(out, results, {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                 "params": n_params, "args": {k: v for k, v in vars(args).items() if k != "names"}})
    print(f"written: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
