"""Step time and peak memory of MH-MoE vs LoRAMoE adapters at matched activated parameters, interleaved in one run.

    python scripts/bench_mhmoe.py --out results.json [--tiny] [--rounds 6 --steps-per-round 10]

Both adapters sit on identical frozen random-init Qwen3 bases (placement "mlp", 4 experts per slice, top-1):
LoRAMoE is ``num_heads=1, r=9``, MH-MoE ``num_heads=8, r=2``, which activate the same number of adapter parameters
per token (``r·(d + H·d)``). Training steps (forward, backward, AdamW) alternate between the two in blocks, so clock
and launch-rate drift hit both alike; the medians of the per-step times are compared (issue 5's target ≤ 1.05×).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from hf_lowbit.cli import require_min_ints, require_new_path

VARIANTS = {"loramoe": {"num_heads": 1, "r": 9}, "mhmoe": {"num_heads": 8, "r": 2}}
TARGET_RATIO = 1.05


def base_config(tiny: bool):
    from transformers import Qwen3Config

    if tiny:
        return Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    return Qwen3Config(vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=64, max_position_embeddings=2048)


def build(variant: dict[str, int], tiny: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen random-init Qwen3 base (same seed for every variant) with one MH-MoE adapter."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_lowbit.model_patches.mhmoe import MHMoEConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(base_config(tiny), dtype=dtype).to(device)
    cfg = MHMoEConfig(num_experts=4, top_k=1, lora_alpha=2 * variant["r"], task_type="CAUSAL_LM", **variant)
    return get_peft_model(model, cfg).train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One adapted model, its optimizer and a fixed batch; `step()` returns the wall time of one training step."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor) -> None:
        self.model, self.ids = model, ids
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.times: list[float] = []

    def step(self) -> float:
        device = self.ids.device
        _sync(device)
        t0 = time.perf_counter()
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0

    def peak_memory_mb(self) -> float | None:
        """Peak allocated memory of one more step (CUDA only)."""
        if self.ids.device.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        self.step()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (must not exist)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes for a CPU check")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; tiny 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512; tiny 32)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    require_min_ints(parser, [("--rounds", args.rounds, 1), ("--steps-per-round", args.steps_per_round, 1),
                              ("--warmup", args.warmup, 0), ("--batch", args.batch, 1), ("--seq", args.seq, 1)])
    require_new_path(parser, "--out", args.out)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, seq = args.batch or (2 if args.tiny else 8), args.seq or (32 if args.tiny else 512)
    vocab = base_config(args.tiny).vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    runners = {name: Runner(build(v, args.tiny, device, dtype), ids) for name, v in VARIANTS.items()}
    for r in runners.values():
        for _ in range(args.warmup):
            r.step()
    for _ in range(args.rounds):
        for r in runners.values():
            r.times += [r.step() for _ in range(args.steps_per_round)]
    rows = {}
    for name, r in runners.items():
        trainable = sum(p.numel() for p in r.model.parameters() if p.requires_grad)
        rows[name] = {**VARIANTS[name], "median_step_ms": 1e3 * statistics.median(r.times),
                      "mean_step_ms": 1e3 * statistics.fmean(r.times), "steps": len(r.times),
                      "peak_step_memory_mb": r.peak_memory_mb(), "trainable_params": trainable}
    ratio = rows["mhmoe"]["median_step_ms"] / rows["loramoe"]["median_step_ms"]
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype), "batch": batch, "seq": seq,
              "base": base_config(args.tiny).to_dict() | {"torch_dtype": None}, "results": rows,
              "ratio_mhmoe_over_loramoe": ratio, "target_ratio": TARGET_RATIO, "meets_target": ratio <= TARGET_RATIO}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    for name, row in rows.items():
        print(f"{name:8s} H={row['num_heads']} r={row['r']}: median {row['median_step_ms']:.2f} ms/step "
              f"(mean {row['mean_step_ms']:.2f}), peak {row['peak_step_memory_mb']} MB, {row['trainable_params']} "
              "trainable")
    print(f"MH-MoE / LoRAMoE step time = {ratio:.3f} (target <= {TARGET_RATIO})")
    return result


if __name__ == "__main__":
    main()
