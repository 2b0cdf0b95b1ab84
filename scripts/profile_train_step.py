"""Where a training step's time goes: host (CPU) vs device (CUDA) time and the top kernels, BF16 vs an FP4 recipe.

    python scripts/profile_train_step.py [--config qwen3-0.6b-shape] [--precisions bf16,nvfp4-averis]
                                         [--batch 8 --seq 1024] [--warmup 6] [--steps 3] [--out prof.json]

The model of `train.py --from-config` (random init, FP32 master weights, BF16 autocast on a GPU as `train.py` does),
AdamW, fixed random tokens. After `--warmup` steps (JIT compilation, autotuning), `--steps` steps are timed wall-clock
with a device sync, then one more step runs under torch.profiler. A step whose wall time is far above its device
time is host-bound (launch and Python cost), which is what the P4 ratio of PERFORMANCE.md needs to know.
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


class _VocabOnly:
    """What `named_config` reads from a tokenizer, for a model without one."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.eos_token_id, self.pad_token_id = vocab, 0, 0

    def __len__(self) -> int:
        return self.vocab


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_precision(precision: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Build, warm up, time and profile the training step of one precision."""
    import hf_lowbit
    from hf_lowbit.train import lowbit_config, named_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(named_config(args.config, _VocabOnly(args.vocab)), dtype=torch.float32)
    cfg = lowbit_config(precision)
    if cfg is not None:
        hf_lowbit.convert(model, cfg)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                     enabled=False)

    def step() -> None:
        with amp:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        _sync(device)
    events = prof.key_averages()
    device_us = kernel_time_us(prof.events()) if device.type == "cuda" else None
    key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=key, row_limit=args.rows, max_name_column_width=60)
    host = None
    if args.host_rows:
        host = host_profile(step, device, args.host_rows)
    step_s = statistics.median(times)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel"))
    return {"precision": precision, "step_s_median": step_s, "step_s": times,
            "tokens_per_s": args.batch * args.seq / step_s,
            "device_time_s": None if device_us is None else device_us / 1e6,
            "kernel_launches_per_step": launches or None, "table": table, "host_table": host}


def kernel_time_us(events: Any) -> float:
    """Summed duration of the device-side events (kernels, memcpy/memset) of one profile, in µs.

    Only device events count: an operator's `self_device_time_total` repeats the time of the kernels it launched
    (a Triton kernel appears both under the autograd Function that launched it and as itself), so summing it over
    `key_averages()` double-counts."""
    cuda = torch.autograd.DeviceType.CUDA
    return float(sum(e.device_time_total for e in events if e.device_type == cuda))


def host_profile(step: Any, device: torch.device, rows: int) -> str:
    """cProfile of one call of `step`: the Python functions that cost host time (a host-bound step's breakdown)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    step()
    _sync(device)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from hf_lowbit.train import NAMED_CONFIGS, PRECISIONS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="qwen3-0.6b-shape", choices=NAMED_CONFIGS)
    p.add_argument("--precisions", default="bf16,nvfp4-averis", help=f"comma list of {', '.join(PRECISIONS)}")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=20, help="kernels listed per precision")
    p.add_argument("--host-rows", type=int, default=0,
                   help="also cProfile one step and list this many Python functions by own host time (0: off)")
    p.add_argument("--out", type=Path, help="also write the results (without the tables) as JSON; must not exist")
    args = p.parse_args(argv)
    precisions = [x for x in args.precisions.split(",") if x]
    bad = [x for x in precisions if x not in PRECISIONS]
    if bad or not precisions:
        p.error(f"--precisions={args.precisions!r} is not valid; allowed: comma list of {', '.join(PRECISIONS)}")
    require_min_ints(p, [("--batch", args.batch, 1), ("--seq", args.seq, 1), ("--steps", args.steps, 1),
                         ("--vocab", args.vocab, 1), ("--warmup", args.warmup, 0), ("--rows", args.rows, 1),
                         ("--host-rows", args.host_rows, 0)])
    require_new_path(p, "--out", args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for precision in precisions:
        r = profile_precision(precision, args, device)
        results.append(r)
        dev = "-" if r["device_time_s"] is None else f"{r['device_time_s'] * 1e3:.1f} ms"
        print(f"\n== {precision}: step {r['step_s_median'] * 1e3:.1f} ms wall, {dev} device, "
              f"{r['tokens_per_s']:.0f} tokens/s, kernel launches {r['kernel_launches_per_step']}\n{r['table']}")
        if r["host_table"]:
            print(f"-- host time by Python function ({precision}, one step under cProfile)\n{r['host_table']}")
    if len(results) > 1:
        base = results[0]["tokens_per_s"]
        for r in results[1:]:
            print(f"{r['precision']} / {results[0]['precision']} tokens/s = {r['tokens_per_s'] / base:.3f}")
    if args.out is not None:
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
                "config": args.config, "batch": args.batch, "seq": args.seq}
        kept = [{k: v for k, v in r.items() if k not in ("table", "host_table")} for r in results]
        args.out.write_text(json.dumps({**meta, "results": kept}, indent=2))
    return results


if __name__ == "__main__":
    main()
