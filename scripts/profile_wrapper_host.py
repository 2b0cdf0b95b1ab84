#!/usr/bin/env python
"""Python-side host cost of the Triton FP4 linear's wrappers, measured on any CPU (no GPU needed).

    python scripts/profile_wrapper_host.py [--m 256 --k 128 --n 384] [--iters 300] [--rows 25] [--out r.json]

On an H200 host one FP4 `LowBitLinear` fwd+bwd enqueues for ~1.9 ms while the GPU runs it in ~1.1 ms
(`profile_linear_host.py`, benchmarks/NOTES.md): at hidden sizes ~1024 training is host-bound. Part of that host
time is Triton's launch path and the driver, part is our own Python around the ~16 launches (allocations, views,
environment reads, argument marshalling). This script isolates the second part: every Triton kernel of
`hf_lowbit.kernels` (and the cuBLAS product of the default GEMM) is replaced by a recorder that only counts
launches, the tensors live on the CPU, and the
Averis linear fwd+bwd runs as usual. What remains is the wrappers' cost, comparable before/after a change on one
machine (it does not predict the GPU host's absolute time). `--rows` prints a cProfile of the loop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from hf_lowbit.cli import add_linear_shape_args, linear_shape_checks, require_min_ints, require_new_path


class _Recorder:
    """Stands in for a `triton.jit` kernel: ``kernel[grid](*args)`` records the launch and does nothing."""

    def __init__(self, name: str, launches: list[str]) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid: Any):
        def launch(*args: Any, **kwargs: Any) -> None:
            self.launches.append(self.name)
        return launch


@contextlib.contextmanager
def stubbed_kernels(launches: list[str]) -> Iterator[None]:
    """Every Triton kernel defined in the kernel modules → `_Recorder` (restored on exit); the dense GEMM's config
    measurement picks the first config without timing."""
    import triton.testing
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from hf_lowbit.kernels import gemm, gemv, grouped, quantize, token_axis

    saved = []
    for mod in (quantize, gemm, gemv, grouped, token_axis):
        for name, obj in vars(mod).items():
            if isinstance(obj, (JITFunction, InterpretedFunction)):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(name, launches))

    def cublas_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # the cuBLAS product: a launch, no compute
        launches.append("cublas_mm")
        return torch.empty(a.shape[0], b.shape[1], dtype=torch.float32)

    saved.append((gemm, "fp32_mm", gemm.fp32_mm))
    gemm.fp32_mm = cublas_mm
    bench = triton.testing.do_bench
    triton.testing.do_bench = lambda fn, warmup=0, rep=0, **kw: (fn(), 1.0)[1]
    try:
        yield
    finally:
        triton.testing.do_bench = bench
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def measure(m: int, k: int, n: int, iters: int, rows: int = 0) -> dict[str, Any]:
    """Median host µs of the Averis linear's fwd, bwd and fwd+bwd with stubbed kernels, launches per fwd+bwd."""
    from hf_lowbit.config import Recipe
    from hf_lowbit.kernels.linear import triton_linear_train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(n, k, generator=g).requires_grad_(True)
    dy = torch.randn(m, n, generator=g).to(torch.bfloat16)
    recipe = Recipe()
    launches: list[str] = []
    with stubbed_kernels(launches):
        def step() -> tuple[float, float]:
            x.grad = w.grad = None  # as after zero_grad(): AccumulateGrad keeps the (unwritten) gradient as is
            t0 = time.perf_counter()
            y = triton_linear_train(x, w, None, recipe, seed=1)
            t1 = time.perf_counter()
            y.backward(dy)
            return t1 - t0, time.perf_counter() - t1

        for _ in range(10):
            step()
        launches.clear()
        step()
        per_step = list(launches)
        fwd, bwd, tot = [], [], []
        for _ in range(iters):
            a, b = step()
            fwd.append(a)
            bwd.append(b)
            tot.append(a + b)
        table = None
        if rows:
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(50):
                step()
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(rows)
            table = buf.getvalue()
    med = lambda v: statistics.median(v) * 1e6  # noqa: E731
    p10 = lambda v: sorted(v)[len(v) // 10] * 1e6  # noqa: E731  (robust to a noisy shared machine)
    return {"m": m, "k": k, "n": n, "iters": iters, "fwd_us": med(fwd), "bwd_us": med(bwd), "fwd_bwd_us": med(tot),
            "fwd_bwd_p10_us": p10(tot),
            "launches_per_step": len(per_step),
            "launches": {name: per_step.count(name) for name in sorted(set(per_step))}, "cprofile": table}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_linear_shape_args(p, m=256, k=128, n=384, iters=300)
    p.add_argument("--rows", type=int, default=0, help="cProfile rows (0: none)")
    p.add_argument("--out", type=Path, help="write the result as JSON; must not exist")
    args = p.parse_args(argv)
    require_min_ints(p, linear_shape_checks(args) + [("--rows", args.rows, 0)])
    require_new_path(p, "--out", args.out)
    result = measure(args.m, args.k, args.n, args.iters, args.rows)
    print(f"wrapper host time per FP4 linear (stubbed kernels, CPU): fwd {result['fwd_us']:.1f} us, "
          f"bwd {result['bwd_us']:.1f} us, fwd+bwd {result['fwd_bwd_us']:.1f} us (10th percentile "
          f"{result['fwd_bwd_p10_us']:.1f} us); "
          f"{result['launches_per_step']} launches {result['launches']}")
    if result["cprofile"]:
        print(result["cprofile"])
    if args.out is not None:
        import platform

        args.out.write_text(json.dumps({**{k: v for k, v in result.items() if k != "cprofile"},
                                        "cpu": platform.processor() or platform.machine(),
                                        "torch": torch.__version__}, indent=2))
    return result


if __name__ == "__main__":
    main()
