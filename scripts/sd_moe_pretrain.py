#!/usr/bin/env python
"""From-scratch MoE pretraining: baseline MoE vs SD-MoE (ALGORITHMS.md §3), at a base LR and at `--lr-mult`× it.

Real text, offline (`hf_lowbit.corpus`): the Shakespeare shipped in `hf_lowbit/data` (`--data shakespeare`, the
`--tiny` default; 200 KB, too little for the GPU size) or the installed site-packages' Python source
(`--data site-packages`, the default otherwise; `--max-bytes` of it), with a byte-level BPE tokenizer trained on it. Model: a Qwen3-MoE (or `--family qwen2_moe`) random init, identical for every run; SD-MoE runs
use Algorithm 1 (`init="scratch"`). The training loop is a plain PyTorch/Accelerate-style loop using the SD-MoE
functions (`project_gradients` before clipping, `after_optimizer_step` for the 16-step basis refresh).

    python scripts/sd_moe_pretrain.py --tiny                  # CPU, < ~2 minutes
    python scripts/sd_moe_pretrain.py --output-dir out        # GPU size that shows the effect

Writes `loss_curves.png`, `similarity_<run>.png` (E×E expert-subspace similarity heatmaps before/after, on W_u for
SD-MoE and the raw experts for the baseline) and `summary.json` (final train/held-out losses, similarity and
router alignment per run) into --output-dir.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from hf_lowbit.corpus import SOURCES


def build_config(args, vocab_size: int):
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=max(512, args.block), tie_word_embeddings=False,
                  moe_intermediate_size=args.moe_intermediate, num_experts=args.experts,
                  num_experts_per_tok=args.top_k, output_router_logits=True, router_aux_loss_coef=0.01,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if args.family == "qwen2_moe":
        return Qwen2MoeConfig(**common, shared_expert_intermediate_size=args.moe_intermediate)
    return Qwen3MoeConfig(**common, head_dim=args.hidden // 4, norm_topk_prob=True)


def evaluate(model, blocks: torch.Tensor, device, batch: int) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            ids = blocks[i: i + batch].to(device)
            total += model(ids, labels=ids).loss.float().item() * len(ids)  # includes the (small) aux loss
    model.train()
    return total / len(blocks)


def similarity_summary(model, k: int) -> dict:
    from hf_lowbit.diagnostics.experts import expert_similarity, router_alignment

    sim = expert_similarity(model, k=k)
    align = router_alignment(model, k=k)
    return {"sim": sim, "mean": sim["weights"]["mean"], "by_type": sim["weights"]["by_type"],
            "router_alignment_diag": align["diag"], "router_alignment_mean": align["mean"],
            "router_alignment_random": align["random"]}


def train_run(name: str, base_model, sd: bool, lr: float, train: torch.Tensor, held: torch.Tensor, args, device):
    from hf_lowbit.model_patches.sd_moe import after_optimizer_step, apply_sd_moe, project_gradients

    torch.manual_seed(args.seed)
    model = copy.deepcopy(base_model)
    if sd:
        apply_sd_moe(model, rank=args.rank, init="scratch", refresh_every=args.refresh_every, seed=args.seed)
    model.to(device).train()
    before = similarity_summary(model, args.rank)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)  # same batch order for every run
    losses, evals, t0 = [], [], time.time()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    for step in range(args.steps):
        idx = torch.randint(0, len(train), (args.batch,), generator=gen)
        ids = train[idx].to(device)
        with autocast:
            loss = model(ids, labels=ids).loss
        loss.backward()
        if sd:
            project_gradients(model)  # SD-MoE rule: after backward, before clipping
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if sd:
            after_optimizer_step(model)  # refresh U_k, V_k every `refresh_every` steps
        losses.append(loss.item() if math.isfinite(loss.item()) else float("nan"))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evals.append((step + 1, evaluate(model, held, device, args.batch)))
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"[{name}] step {step + 1}/{args.steps} loss {losses[-1]:.4f} "
                  f"({time.time() - t0:.1f}s)", flush=True)
    after = similarity_summary(model, args.rank)
    tail = [x for x in losses[-max(1, args.steps // 10):] if math.isfinite(x)]
    result = {"sd_moe": sd, "lr": lr, "train_loss_final": sum(tail) / max(1, len(tail)),
              "held_out_loss": evals[-1][1], "eval": evals, "losses": losses, "seconds": time.time() - t0,
              "similarity_before": before["mean"], "similarity_after": after["mean"],
              "similarity_after_by_type": after["by_type"],
              "router_alignment_before": before["router_alignment_diag"],
              "router_alignment_after": after["router_alignment_diag"],
              "router_alignment_random": after["router_alignment_random"]}
    return result, before["sim"], after["sim"]


def plot_curves(results: dict, path: Path, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        x = torch.tensor(r["losses"], dtype=torch.float64)
        if smooth > 1 and len(x) >= smooth:
            x = torch.nn.functional.avg_pool1d(x[None, None], smooth, 1)[0, 0]
        style = "-" if r["sd_moe"] else "--"
        a.plot(range(smooth, smooth + len(x)) if smooth > 1 else range(1, len(x) + 1), x.numpy(), style, label=name)
        steps, vals = zip(*r["eval"])
        b.plot(steps, vals, style + "o", label=name, markersize=3)
    a.set(title=f"train loss (moving average {smooth})", xlabel="step", ylabel="loss")
    b.set(title="held-out loss", xlabel="step", ylabel="loss")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU toy size (< ~2 minutes)")
    p.add_argument("--output-dir", default="sd_moe_pretrain_out")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --output-dir")
    p.add_argument("--family", default="qwen3_moe", choices=["qwen3_moe", "qwen2_moe"])
    p.add_argument("--data", choices=SOURCES, help="text source (default: shakespeare with --tiny, else site-packages)")
    p.add_argument("--max-bytes", type=int, default=60_000_000, help="site-packages text to read (default 60 MB)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--block", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--moe-intermediate", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--lr-mult", type=float, default=4.0, help="the second LR is lr × lr-mult")
    p.add_argument("--rank", type=int, default=8, help="SD-MoE rank k (also the k of the similarity)")
    p.add_argument("--refresh-every", type=int, default=16)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.max_bytes < 1:
        p.error(f"--max-bytes={args.max_bytes} is not valid; allowed: an integer >= 1")
    if (Path(args.output_dir) / "summary.json").exists() and not args.overwrite:
        p.error(f"--output-dir={args.output_dir!r} holds an earlier run's summary.json; allowed: a new directory, or "
                "--overwrite to replace it (nothing was changed)")
    tiny = dict(steps=60, batch=8, block=64, hidden=64, layers=2, experts=8, top_k=2, moe_intermediate=64,
                vocab=512, lr=2e-3, eval_every=20, data="shakespeare")
    full = dict(steps=1500, batch=32, block=256, hidden=384, layers=6, experts=16, top_k=2, moe_intermediate=384,
                vocab=4096, lr=1e-3, eval_every=100, data="site-packages")
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM

    import hf_lowbit  # noqa: F401  (registers the package; SD-MoE lives in hf_lowbit.model_patches.sd_moe)
    from hf_lowbit.corpus import load_text, tokenize_chunked
    from hf_lowbit.demo import train_tokenizer
    from hf_lowbit.diagnostics.experts import plot_similarity

    t0 = time.time()
    text = load_text(args.data, args.max_bytes)
    tok = train_tokenizer(text[:4_000_000], vocab_size=args.vocab)
    ids = tokenize_chunked(tok, text)
    n = (len(ids) // args.block) * args.block
    blocks = ids[:n].reshape(-1, args.block)
    n_held = max(args.batch, len(blocks) // 20)
    train, held = blocks[:-n_held], blocks[-n_held:]
    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_config(build_config(args, len(tok)))
    epochs = args.steps * args.batch / max(1, len(train))
    print(f"{args.data}: tokens {len(ids)}, train blocks {len(train)} ({epochs:.1f} epochs), "
          f"held-out blocks {len(held)}, "
          f"params {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M, device {device}", flush=True)

    lrs = {"lr": args.lr, f"{args.lr_mult:g}xlr": args.lr * args.lr_mult}
    results, sims = {}, {}
    for tag, lr in lrs.items():
        for sd in (False, True):
            name = f"{'sd_moe' if sd else 'baseline'}@{tag}"
            r, before, after = train_run(name, base, sd, lr, train, held, args, device)
            results[name] = r
            sims[name] = (before, after)
            print(f"{name}: train {r['train_loss_final']:.4f} held-out {r['held_out_loss']:.4f} "
                  f"similarity {r['similarity_before']:.3f} -> {r['similarity_after']:.3f} "
                  f"router-align {r['router_alignment_after']:.3f} ({r['seconds']:.1f}s)", flush=True)
    plot_curves(results, out / "loss_curves.png", smooth=max(1, args.steps // 30))
    for name, (before, after) in sims.items():
        safe = name.replace("@", "_")
        plot_similarity(before, str(out / f"similarity_{safe}_before.png"), title=f"{name} before training")
        plot_similarity(after, str(out / f"similarity_{safe}_after.png"), title=f"{name} after training")
    summary = {"args": vars(args), "device": str(device), "seconds": time.time() - t0,
               "runs": {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in results.items()},
               "note": "similarity = mean pairwise principal-subspace similarity (k=rank, left+right, all layers "
                       "and matrix types), on W_u for SD-MoE and raw experts for the baseline; router alignment "
                       "= mean over experts of the fraction of the router row in the expert's top-k input "
                       "directions (random = k/H)"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}/summary.json, loss_curves.png, similarity_*.png ({summary['seconds']:.1f}s)")
    return summary


if __name__ == "__main__":
    main()
