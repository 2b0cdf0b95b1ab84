#!/usr/bin/env python
"""Continual-learning run: MH-MoE / LoRAMoE adapters on a frozen (optionally packed FP4) base, tasks in order.

Examples:
    # built-in Shakespeare sequence on a tiny pretrained base (built and cached on first use), MH-MoE H=8
    python scripts/continual.py --output-dir runs/mhmoe --num-heads 8 --r 2
    # LoRAMoE (H=1) at matched activated parameters
    python scripts/continual.py --output-dir runs/loramoe --num-heads 1 --r 9
    # TRACE from its released local layout, on a packed NVFP4 Qwen3-0.6B
    python scripts/continual.py --model Qwen/Qwen3-0.6B --trace /data/TRACE --quantize infer --lr 1e-4 \\
        --steps 500 --max-length 2048 --output-dir runs/trace-mhmoe

Writes results.json (score matrix, OP, BWT, step time, peak memory, adapter parameter counts, optional routing N_eff)
and accuracy_matrix.png to --output-dir.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("model and tasks")
    src.add_argument("--model", help="base model (hub id or path); default: the tiny built-in base")
    src.add_argument("--tiny-base-dir", default="runs/tiny_base", help="where the tiny base is built/cached")
    src.add_argument("--tiny-base-steps", type=int, default=300)
    src.add_argument("--trace", metavar="ROOT", help="TRACE root (one folder per task); default: built-in tasks")
    src.add_argument("--trace-tasks", nargs="+", help="TRACE task folders in order (default: the paper's 8)")
    src.add_argument("--builtin-tasks", nargs="+", help="subset/order of the built-in tasks")
    src.add_argument("--hf-dataset", nargs="+", metavar="PATH[:SPLIT_TRAIN:SPLIT_EVAL]",
                     help="datasets with prompt/answer columns, one task each (needs `datasets`)")
    src.add_argument("--max-train", type=int, default=256)
    src.add_argument("--max-eval", type=int, default=64)
    src.add_argument("--quantize", choices=["none", "infer", "train"], default="none",
                     help="load the base with hf_lowbit.LowBitConfig(mode=...)")
    ad = p.add_argument_group("adapter (num_heads=1 is LoRAMoE)")
    ad.add_argument("--adapter", choices=["mhmoe", "none"], default="mhmoe")
    ad.add_argument("--num-heads", type=int, default=8)
    ad.add_argument("--num-experts", type=int, default=4)
    ad.add_argument("--top-k", type=int, default=1)
    ad.add_argument("--r", type=int, default=2)
    ad.add_argument("--lora-alpha", type=float, default=None, help="default: 2·r")
    ad.add_argument("--gate-mode", choices=["full_softmax", "topk_softmax"], default="full_softmax")
    ad.add_argument("--placement", choices=["mlp", "projections"], default="mlp")
    ad.add_argument("--load-balancing-coef", type=float, default=0.0)
    tr = p.add_argument_group("training")
    tr.add_argument("--steps", type=int, default=60, help="optimizer steps per task")
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--weight-decay", type=float, default=0.01)
    tr.add_argument("--max-length", type=int, default=128)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--neff", action="store_true", help="routing N_eff on old-task tokens per task transition")
    tr.add_argument("--log-every", type=int, default=0)
    tr.add_argument("--output-dir", required=True)
    return p.parse_args(argv)


def load_tasks(args: argparse.Namespace):
    from hf_lowbit import continual

    if args.trace:
        return continual.load_trace(args.trace, args.trace_tasks or continual.TRACE_ORDER,
                                    max_train=args.max_train, max_eval=args.max_eval)
    if args.hf_dataset:
        tasks = []
        for spec in args.hf_dataset:
            path, *splits = spec.split(":")
            train_split, eval_split = (splits + ["train", "test"][len(splits):])[:2]
            tasks.append(continual.load_hf_task(path, train_split=train_split, eval_split=eval_split,
                                                max_train=args.max_train, max_eval=args.max_eval))
        return tasks
    names = args.builtin_tasks or ("last_letter", "cloze", "first_letter", "ending")
    return continual.builtin_tasks(args.max_train, args.max_eval, args.seed, names)


def build_model(args: argparse.Namespace):
    """Frozen base (optionally hf_lowbit-quantized) + the MH-MoE/LoRAMoE adapter; returns (model, tokenizer, info)."""
    import hf_lowbit
    from hf_lowbit.continual import build_tiny_base
    from hf_lowbit.model_patches.mhmoe import MHMoEConfig, activated_params, mhmoe_banks
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model or build_tiny_base(args.tiny_base_dir, steps=args.tiny_base_steps, seed=args.seed)
    kwargs = {} if args.quantize == "none" else {"quantization_config": hf_lowbit.LowBitConfig(mode=args.quantize)}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = {"model": path, "quantize": args.quantize, "device": device}
    if args.adapter == "none":
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
        return model, tokenizer, info
    torch.manual_seed(args.seed)
    cfg = MHMoEConfig(num_heads=args.num_heads, num_experts=args.num_experts, top_k=args.top_k, r=args.r,
                      lora_alpha=args.lora_alpha or 2 * args.r, gate_mode=args.gate_mode, placement=args.placement,
                      load_balancing_coef=args.load_balancing_coef, task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    banks = mhmoe_banks(model)
    counts = [activated_params(cfg, b.d_in, b.d_out) for b in banks.values()]
    info["adapter"] = {k: v for k, v in cfg.to_dict().items() if k in (
        "num_heads", "num_experts", "top_k", "r", "lora_alpha", "gate_mode", "placement", "load_balancing_coef")}
    info["adapter"].update(modules=len(banks), total_params=sum(c["total"] for c in counts),
                           activated_params_per_token=sum(c["activated"] for c in counts))
    return model, tokenizer, info


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from hf_lowbit.continual import ContinualConfig, run_continual, save_results

    torch.manual_seed(args.seed)
    tasks = load_tasks(args)
    model, tokenizer, info = build_model(args)
    cfg = ContinualConfig(steps_per_task=args.steps, batch_size=args.batch_size, lr=args.lr,
                          weight_decay=args.weight_decay, max_length=args.max_length, seed=args.seed,
                          track_neff=args.neff, log_every=args.log_every, max_eval=args.max_eval)
    result = run_continual(model, tokenizer, tasks, cfg, info=info)
    paths = save_results(result, args.output_dir)
    out = Path(args.output_dir)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    print(f"OP {result.op:.2f}  BWT {result.bwt:+.2f}  step {1000 * result.step_time_s:.1f} ms  "
          f"peak {result.peak_memory_mb:.0f} MB ({result.memory_kind})  → {paths}")
    return result.to_dict()


if __name__ == "__main__":
    main()
