"""Where the time of FP4 MoE experts fwd+bwd goes: a torch.profiler table of one call on the bench_moe.py problem.

    python scripts/profile_experts.py [--format nvfp4] [--tokens 8192] [--rows 25] [--out table.txt]

Runs the same 1-layer Qwen3-MoE experts, inputs and routing as `scripts/bench_moe.py` (BF16 weights), warms up, then
profiles one forward + backward and prints the kernels sorted by device time (CUDA) or CPU time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe  # noqa: E402  (same problem definition as the benchmark)
from hf_lowbit.cli import require_min_ints, require_new_path  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="nvfp4", choices=["nvfp4", "mxfp4"])
    parser.add_argument("--tokens", type=int, default=bench_moe.ExpertShape.tokens)
    parser.add_argument("--tiny", action="store_true", help="toy sizes (for a CPU check of the script)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    require_min_ints(parser, [("--tokens", args.tokens, 1), ("--rows", args.rows, 1)])
    require_new_path(parser, "--out", args.out)

    import hf_lowbit

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = bench_moe.TINY_EXPERTS if args.tiny else bench_moe.ExpertShape(tokens=args.tokens)
    model = hf_lowbit.convert(bench_moe.one_layer_model(shape, device, 0), hf_lowbit.LowBitConfig(format=args.format))
    run = bench_moe.fwd_bwd(bench_moe.experts_of(model), bench_moe.expert_inputs(shape, device, 0))
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
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60)
    header = f"{args.format} experts fwd+bwd, {shape}, device {device}\n"
    print(header + table)
    if args.out:
        args.out.write_text(header + table)


if __name__ == "__main__":
    main()
