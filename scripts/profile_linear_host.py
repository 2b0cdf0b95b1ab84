"""Host (CPU) vs device cost of one FP4 `LowBitLinear` step and of each launch inside it, on a GPU.

    python scripts/profile_linear_host.py [--m 8192 --k 1024 --n 3072] [--iters 100] [--host-rows 30] [--out r.json]

For each piece (the fused quantizer, the GEMM, the mean GEMV, a bare Triton launch, the whole Averis linear fwd+bwd
and BF16 `nn.Linear` fwd+bwd) it reports the host time per call (what the Python thread spends enqueueing it) and
the device time per call (GPU execution only; see `host_and_device_us`). A piece whose host time exceeds its
device time leaves the GPU idle when the model's layers are small: the P4 question of PERFORMANCE.md. With
`--host-rows` it also prints a cProfile of the fwd+bwd loop (which Python functions the host time goes to).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hf_lowbit.cli import add_linear_shape_args, linear_shape_checks, require_min_ints, require_new_path


def host_and_device_us(fn: Callable[[], Any], iters: int) -> tuple[float, float]:
    """(host µs per call, device µs per call) of `fn` after two warm-up calls.

    Host: median duration of single calls issued with the GPU idle (what the Python thread spends enqueueing).
    Device: CUDA events around `iters` back-to-back calls queued behind a sleep kernel long enough to cover their
    enqueueing, so the events measure GPU execution only, not host gaps."""
    import statistics

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    single = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        single.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    host = statistics.median(single)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(2e9 * (1.5 * host * iters + 2e-3)))  # ~2 GHz SM clock: cycles covering the enqueueing
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return host * 1e6, start.elapsed_time(end) * 1e3 / iters


def cuda_api_summary(fn: Callable[[], Any], calls: int = 5) -> dict[str, tuple[float, float]]:
    """CUDA runtime/driver API calls that `fn` makes: {name: (calls per fn call, host µs per fn call)}."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key: (e.count / calls, e.cpu_time_total / calls) for e in prof.key_averages()
            if e.key.startswith(("cuda", "cu")) and not e.key.startswith("cudaDeviceSynchronize")}


def sync_warnings(fn: Callable[[], Any]) -> list[str]:
    """Messages of the synchronizing CUDA calls that one call of `fn` makes (torch's sync debug mode)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch's own "sync debug mode is a prototype feature" warning is not a synchronizing call
    return [str(w.message).splitlines()[0] for w in caught
            if "synchroniz" in str(w.message) and "prototype feature" not in str(w.message)]


def pieces(m: int, k: int, n: int) -> dict[str, Callable[[], Any]]:
    """The callables to time, on fixed random CUDA tensors."""
    import triton
    import triton.language as tl

    from hf_lowbit.config import LowBitConfig
    from hf_lowbit.kernels.gemm import matvec, scaled_gemm
    from hf_lowbit.kernels.linear import triton_linear_train
    from hf_lowbit.kernels.quantize import averis_quantize

    @triton.jit
    def _noop(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    @triton.jit
    def _noop16(x_ptr, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(n, k, device=dev, generator=gen) * 0.02).requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16, generator=gen)
    recipe = LowBitConfig().recipe()
    qa = averis_quantize(x, "nvfp4", center=True, row=True, row_packed=False, row_dq=True)
    qb = averis_quantize(w.detach(), "nvfp4", center=False, row=True, row_packed=False, row_dq=True)
    small = torch.zeros(128, device=dev)
    lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
    vec = torch.randn(k, device=dev)

    def fp4_step() -> None:
        y = triton_linear_train(xg, w, None, recipe, 7)
        y.backward(dy)

    def bf16_step() -> None:
        lin(xg).backward(dy)

    y_kept = triton_linear_train(xg, w, None, recipe, 7)

    def fp4_fwd() -> None:
        triton_linear_train(xg, w, None, recipe, 7)

    def fp4_bwd() -> None:
        y_kept.backward(dy, retain_graph=True)

    ptrs = [torch.zeros(16, device=dev) for _ in range(15)]

    return {
        "triton noop launch": lambda: _noop[(1,)](small, 128, BLOCK=128),
        "triton noop, 16 pointer args": lambda: _noop16[(1,)](small, *ptrs, 128, BLOCK=128),
        "torch.empty": lambda: torch.empty(k, device=dev),
        "averis_quantize x (row+col)": lambda: averis_quantize(x, "nvfp4", center=True, row=True, row_packed=False,
                                                               row_dq=True, col=True, col_packed=False, col_dq=True,
                                                               col_sum=True),
        "averis_quantize w (row)": lambda: averis_quantize(w.detach(), "nvfp4", center=False, row=True,
                                                           row_packed=False, row_dq=True),
        "scaled_gemm fprop": lambda: scaled_gemm(qa.row_dq, qb.row_dq, torch.bfloat16, qa.tensor_scale,
                                                 qb.tensor_scale, None),
        "matvec W.mu": lambda: matvec(qb.row_dq, vec),
        "fp4 averis linear fwd": fp4_fwd,
        "fp4 averis linear bwd": fp4_bwd,
        "fp4 averis linear fwd+bwd": fp4_step,
        "bf16 nn.Linear fwd+bwd": bf16_step,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_linear_shape_args(p, m=8192, k=1024, n=3072, iters=100)
    p.add_argument("--host-rows", type=int, default=30, help="cProfile rows of the FP4 fwd+bwd loop (0: off)")
    p.add_argument("--out", type=Path, help="write the results as JSON; must not exist")
    args = p.parse_args(argv)
    require_min_ints(p, linear_shape_checks(args) + [("--host-rows", args.host_rows, 0)])
    require_new_path(p, "--out", args.out)
    if not torch.cuda.is_available():
        p.error("no CUDA device: this script measures GPU launch overhead; allowed: a machine with a CUDA GPU")
    rows = []
    fns = pieces(args.m, args.k, args.n)
    for name, fn in fns.items():
        host, device = host_and_device_us(fn, args.iters)
        rows.append({"name": name, "host_us": host, "device_us": device})
        print(f"{name:32s} host {host:9.1f} us/call   device {device:9.1f} us/call")
    api = cuda_api_summary(fns["fp4 averis linear fwd+bwd"])
    print("CUDA API calls per FP4 fwd+bwd (count, host µs):",
          ", ".join(f"{k} {c:.0f} / {t:.0f}" for k, (c, t) in sorted(api.items(), key=lambda kv: -kv[1][1])))
    syncs = sync_warnings(fns["fp4 averis linear fwd+bwd"])
    print(f"synchronizing CUDA calls in one FP4 fwd+bwd: {len(syncs)}" + "".join(f"\n  {m}" for m in syncs[:5]))
    if args.host_rows:
        from profile_train_step import host_profile  # scripts/ is on sys.path when a script runs

        fp4 = fns["fp4 averis linear fwd+bwd"]
        print(host_profile(lambda: [fp4() for _ in range(20)], torch.device("cuda"), args.host_rows))
    if args.out is not None:
        import triton

        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "m": args.m, "k": args.k, "n": args.n, "iters": args.iters}
        args.out.write_text(json.dumps({**meta, "rows": rows, "cuda_api_per_step": api, "sync_calls": syncs},
                                       indent=2))
    return rows


if __name__ == "__main__":
    main()
