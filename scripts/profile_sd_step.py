"""Where SD-MoE's step-time overhead goes, on a GPU: host vs device time of each SD-MoE piece of a training step.

    python scripts/profile_sd_step.py [--precisions bf16,autocast] [--iters 30] [--rows 12] [--out r.json]

On `scripts/bench_moe.py`'s small Qwen3-MoE LM (the SD-MoE overhead benchmark), for each precision: forward +
backward of the stock model, of `LowBitExperts(recipe=None)` ("hp") and of SD-MoE; then SD-MoE's gradient rule
(`project_gradients`, replayed as a CUDA graph, and its eager ops) and basis refresh (`refresh_bases`) alone. Each piece gets its host time per call (what the
Python thread spends enqueueing it), its device time per call (GPU execution only) and the number of GPU kernels it
launches, plus a table of the rule's and the refresh's kernels by device time. A piece whose host time exceeds its
device time costs host time in a host-bound step (this model's steps are).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe  # noqa: E402  (the SD-MoE benchmark's model and transforms)
from profile_linear_host import host_and_device_us  # noqa: E402

PRECISIONS = ("bf16", "autocast")


def kernels_per_call(fn: Callable[[], Any], rows: int, calls: int = 3) -> tuple[float, str]:
    """(GPU kernels launched per call of `fn`, a table of its kernels by device time)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    return launches / calls, table


def eager(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` with the SD-MoE rule's CUDA graph off (``HF_LOWBIT_SD_GRAPH=0``): the eager ops, for comparison."""
    previous = os.environ.get("HF_LOWBIT_SD_GRAPH")
    os.environ["HF_LOWBIT_SD_GRAPH"] = "0"
    try:
        return fn(*args)
    finally:
        if previous is None:
            del os.environ["HF_LOWBIT_SD_GRAPH"]
        else:
            os.environ["HF_LOWBIT_SD_GRAPH"] = previous


def pieces(precision: str, device: torch.device, shape: bench_moe.LMShape,
           settings: bench_moe.Settings) -> dict[str, Callable[[], Any]]:
    """The timed pieces of one precision: fwd+bwd of each variant, then SD-MoE's rule and refresh."""
    import hf_lowbit

    g = torch.Generator().manual_seed(settings.seed + 3)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).to(device)
    out: dict[str, Callable[[], Any]] = {}
    for name in ("stock", "hp", "sd"):
        model = bench_moe.build_lm(shape, device, precision, settings.seed)
        transform = bench_moe.LM_VARIANTS[name]
        if transform is not None:
            transform(model, settings)

        def fwd_bwd(model=model) -> None:
            with bench_moe.autocast_for(precision, device):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()

        out[f"fwd_bwd {name}"] = fwd_bwd
    sd_model = model
    out["fwd_bwd sd"]()  # gradients for the rule to project (idempotent: every call does the same work)
    out["project_gradients sd"] = lambda: hf_lowbit.project_gradients(sd_model)
    out["project_gradients sd eager"] = lambda: eager(hf_lowbit.project_gradients, sd_model)
    out["refresh_bases sd"] = lambda: hf_lowbit.refresh_bases(sd_model)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from hf_lowbit.cli import require_min_ints, require_new_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--rows", type=int, default=12, help="rows of the kernel tables")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    require_min_ints(parser, [("--iters", args.iters, 1), ("--rows", args.rows, 1)])
    precisions = [p for p in args.precisions.split(",") if p]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        parser.error(f"--precisions={args.precisions!r} is not valid; allowed: a comma list of {list(PRECISIONS)}")
    require_new_path(parser, "--out", args.out)
    if not torch.cuda.is_available():
        parser.error("profile_sd_step.py needs a CUDA GPU (host vs device time); none is available")

    device = torch.device("cuda")
    shape, settings = bench_moe.LMShape(), bench_moe.Settings(device="cuda")
    rows = []
    for precision in precisions:
        for name, fn in pieces(precision, device, shape, settings).items():
            host, dev = host_and_device_us(fn, args.iters)
            launches, table = kernels_per_call(fn, args.rows)
            row = {"precision": precision, "piece": name, "host_us": round(host, 1), "device_us": round(dev, 1),
                   "kernels_per_call": launches}
            print(f"{precision:9s} {name:24s} host {host:9.1f} µs  device {dev:9.1f} µs  kernels {launches:6.1f}")
            if not name.startswith("fwd_bwd"):
                row["kernel_table"] = table
                print(table)
            rows.append(row)
    if args.out:
        env = bench_moe.environment(device)
        args.out.write_text(json.dumps({"environment": env, "model": asdict(shape), "iters": args.iters,
                                        "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
