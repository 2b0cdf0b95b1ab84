"""Where the time of FP4 MoE experts fwd+bwd goes: a torch.profiler table of one call on the bench_moe.py problem.

    python scripts/profile_experts.py [--format nvfp4] [--tokens 8192] [--rows 25] [--out table.txt]

Runs the same 1-layer Qwen3-MoE experts, inputs and routing as `scripts/bench_moe.py` (BF16 weights), warms up, then
profiles one forward + backward and prints the kernels sorted by device time (CUDA) or CPU time. Then the timeline:
host vs device milliseconds of the forward and of the backward (median of `--iters` runs, no profiler), and from the
profiled run the device's busy time, its idle time and the longest idle gaps (which kernel waited for the host). A
phase whose host time exceeds its device time leaves the GPU idle: launches, Python and the routing's host sync.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe  # noqa: E402  (same problem definition as the benchmark)
from hf_lowbit.cli import require_min_ints, require_new_path  # noqa: E402


def phase_times(module: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device,
                iters: int) -> dict[str, float]:
    """Median host ms (the Python call returning) and device ms (CUDA events around it) of forward and backward."""
    rows: list[dict[str, float]] = []
    for _ in range(iters):
        module.zero_grad(set_to_none=True)
        inputs["x"].grad = None
        bench_moe.synchronize(device)
        marks = bench_moe.Timeline(device)
        t0 = time.perf_counter()
        marks.mark()
        y = module(inputs["x"], inputs["index"], inputs["weights"])
        t1 = time.perf_counter()
        marks.mark()
        y.backward(inputs["dy"])
        t2 = time.perf_counter()
        marks.mark()
        marks.finish()
        row = {"host_fwd_ms": (t1 - t0) * 1e3, "host_bwd_ms": (t2 - t1) * 1e3}
        if device.type == "cuda":
            row |= {"device_fwd_ms": marks.elapsed_ms(0, 1), "device_bwd_ms": marks.elapsed_ms(1, 2)}
        rows.append(row)
    return {key: round(statistics.median(r[key] for r in rows), 3) for key in rows[0]}


def device_idle(prof: Any, top: int = 8) -> dict[str, Any]:
    """Busy and idle device time of a profiled run from its kernel intervals, and the `top` longest gaps (µs) with
    the kernel that ran after each and the innermost host ops running at the gap's middle: a gap is the device
    waiting for the host, and those ops are what the host was doing."""
    events = list(prof.events())
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    if not kernels:
        return {}
    host = [(e.time_range.start, e.time_range.end, e.name) for e in events
            if e.device_type == torch.autograd.DeviceType.CPU]
    busy, gaps, end = 0.0, [], kernels[0][0]
    for start, stop, name in kernels:
        if start > end:
            gaps.append((start - end, (start + end) / 2, name))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    gaps.sort(reverse=True)
    span = end - kernels[0][0]

    def doing(t: float) -> str:
        covering = sorted((stop - start, name) for start, stop, name in host if start <= t <= stop)
        return " < ".join(name[:40] for _, name in covering[:3])

    return {"span_ms": round(span / 1e3, 3), "busy_ms": round(busy / 1e3, 3), "idle_ms": round((span - busy) / 1e3, 3),
            "gaps": len(gaps), "longest_gaps_us": [(round(g, 1), name[:50], doing(mid)) for g, mid, name in gaps[:top]]}


def timeline_text(times: dict[str, float], idle: dict[str, Any]) -> str:
    lines = ["timeline (median, no profiler): " + ", ".join(f"{k} {v}" for k, v in times.items())]
    if idle:
        lines.append(f"profiled run: span {idle['span_ms']} ms, device busy {idle['busy_ms']}, idle {idle['idle_ms']} "
                     f"in {idle['gaps']} gaps; longest (µs, next kernel):")
        lines += [f"  {g:9.1f}  {name}  | host: {what}" for g, name, what in idle["longest_gaps_us"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="nvfp4", choices=["nvfp4", "mxfp4"])
    parser.add_argument("--tokens", type=int, default=bench_moe.ExpertShape.tokens)
    parser.add_argument("--tiny", action="store_true", help="toy sizes (for a CPU check of the script)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--iters", type=int, default=10, help="runs timed for the host/device timeline")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    require_min_ints(parser, [("--tokens", args.tokens, 1), ("--rows", args.rows, 1), ("--iters", args.iters, 1)])
    require_new_path(parser, "--out", args.out)

    import hf_lowbit

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = bench_moe.TINY_EXPERTS if args.tiny else bench_moe.ExpertShape(tokens=args.tokens)
    model = hf_lowbit.convert(bench_moe.one_layer_model(shape, device, 0), hf_lowbit.LowBitConfig(format=args.format))
    module, inputs = bench_moe.experts_of(model), bench_moe.expert_inputs(shape, device, 0)
    run = bench_moe.fwd_bwd(module, inputs)
    for _ in range(3):
        run()
    bench_moe.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run()
        bench_moe.synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=key, row_limit=args.rows, max_name_column_width=60)
    table += "\nhost (self CPU time):\n" + averages.table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                                          max_name_column_width=60)
    header = f"{args.format} experts fwd+bwd, {shape}, device {device}\n"
    text = header + table + "\n" + timeline_text(phase_times(module, inputs, device, args.iters), device_idle(prof))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
