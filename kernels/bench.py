"""hf_lowbit kernel benchmark (importable as `hf_lowbit.kernels.bench`; `scripts/bench.py` is the CLI wrapper): fused quantizer, decode GEMV, GEMM, full LowBitLinear fwd+bwd vs BF16 and the torch
reference backend, all in one run. Prints a table and writes JSON.

    python scripts/bench.py --out results.json [--quick]

`run_bench(...)` is the same as a function (for `hf-lowbit bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def _versions() -> dict:
    import torch

    v = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "transformers"):
        try:
            v[name] = __import__(name).__version__
        except Exception:
            v[name] = None
    return v


def _bench(fn, warmup=25, rep=200) -> float:
    """Median milliseconds (triton.testing.do_bench, CUDA events)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def run_bench(out: str | None = None, quick: bool = False, m: int = 8192, shapes=None, formats=("nvfp4", "mxfp4"),
              reference: bool = True, print_table: bool = True) -> dict:
    import torch
    import torch.nn.functional as F

    from hf_lowbit.averis import packed_linear
    from hf_lowbit.config import Recipe
    from hf_lowbit.kernels.gemm import cublas_epilogue, scaled_gemm
    from hf_lowbit.kernels.gemv import w4a16_linear
    from hf_lowbit.kernels.quantize import averis_quantize
    from hf_lowbit.layers import LowBitLinear
    from hf_lowbit.numerics import quantize

    if not torch.cuda.is_available():
        raise RuntimeError("the benchmark needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = shapes or ([(4096, 4096)] if quick else [(4096, 4096), (4096, 14336), (14336, 4096)])
    rows: list[dict] = []
    res = {"device": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
           "versions": _versions(), "m": m, "shapes_kn": shapes, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "gemm_impl_default": os.environ.get("HF_LOWBIT_GEMM", "triton"), "rows": rows}

    def add(group, name, ms, **kw):
        r = {"group": group, "name": name, "ms": ms, **kw}
        rows.append(r)
        if print_table:
            extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items())
            print(f"{group:10s} {name:58s} {ms * 1e3:10.1f} us  {extra}", flush=True)
        return r

    # ---- ceilings ----------------------------------------------------------------------------------------------
    a = torch.empty(256 * 1024 * 1024, device=dev, dtype=torch.bfloat16)  # 512 MB
    b = torch.empty_like(a)
    ms = _bench(lambda: b.copy_(a))
    copy_tbs = 2 * a.numel() * 2 / ms / 1e9
    add("ceiling", "device copy 512MB (read+write)", ms, tbs=copy_tbs)
    del a, b
    ga = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    gb = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = _bench(lambda: ga @ gb)
    bf16_tflops = 2 * 8192 ** 3 / ms / 1e9
    add("ceiling", "BF16 GEMM 8192^3 (cuBLAS)", ms, tflops=bf16_tflops)
    del ga, gb
    res["ceilings"] = {"copy_tbs": copy_tbs, "bf16_tflops": bf16_tflops}

    # ---- P1: fused quantizer -----------------------------------------------------------------------------------
    M, K = m, 4096
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16) + torch.randn(K, device=dev, dtype=torch.bfloat16) * 3
    for fmt in formats:
        B = 16 if fmt == "nvfp4" else 32
        packed_bytes = M * K // 2 + M * K // B
        for label, kw, nbytes in [
            ("row axis (hidden), packed", dict(row=True, col=False), M * K * 2 + packed_bytes),
            ("col axis (tokens), packed", dict(row=False, col=True), M * K * 2 + packed_bytes),
            ("both axes, packed", dict(row=True, col=True), M * K * 2 + 2 * packed_bytes),
            ("both axes, BF16 dq (linear path)", dict(row=True, col=True, row_packed=False, row_dq=True,
                                                      col_packed=False, col_dq=True, col_sum=True),
             M * K * 2 * 3),
        ]:
            for rnd in ("rtn", "sr"):
                fn = lambda: averis_quantize(x, fmt, center=True, rounding=rnd, seed=1, **kw)  # noqa: E731
                ms = _bench(fn)
                add("P1", f"averis quantize {fmt} {rnd} {label}", ms, tbs=nbytes / ms / 1e9,
                    pct_copy=100 * nbytes / ms / 1e9 / copy_tbs, shape=f"{M}x{K}")
        if reference:
            def ref():
                xf = x.float()
                mu = xf.mean(0)
                quantize(xf - mu, fmt, -1)
            ms = _bench(ref, warmup=3, rep=50)
            add("P1", f"torch reference centre+quantize {fmt} row axis", ms,
                tbs=(M * K * 2 + packed_bytes) / ms / 1e9)
    del x

    # ---- P5: decode GEMV ---------------------------------------------------------------------------------------
    for (N, K) in [(14336, 4096), (4096, 14336)]:
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        for fmt in formats:
            p = quantize(w.float(), fmt, 1)
            for bsz in (1, 16):
                xx = torch.randn(bsz, K, device=dev, dtype=torch.bfloat16)
                ms_bf = _bench(lambda: F.linear(xx, w))
                ms_q = _bench(lambda: w4a16_linear(xx, p))
                wbytes = p.codes.numel() + p.scales.numel()
                r = {"bf16_us": ms_bf * 1e3, "ratio_speedup": ms_bf / ms_q, "tbs": wbytes / ms_q / 1e9}
                if reference and bsz == 1:
                    rec = Recipe(format=fmt, activations="none")
                    r["torch_ref_us"] = _bench(lambda: packed_linear(xx, p, None, rec), warmup=3, rep=50) * 1e3
                add("P5", f"W4A16 decode {fmt} N={N} K={K} batch={bsz}", ms_q, **r)
        del w

    # ---- GEMM alone: fused Triton epilogue vs cuBLAS (+ epilogue pass) ------------------------------------------
    for (K, N) in shapes[:1] if quick else shapes:
        A = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
        Bm = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        s1 = torch.ones((), device=dev)
        vr = torch.randn(N, device=dev)
        fl = 2 * m * K * N
        ms_cu = _bench(lambda: A @ Bm.t())
        ms_tr = _bench(lambda: scaled_gemm(A, Bm, torch.bfloat16, s1, s1, vr))
        ms_ce = _bench(lambda: cublas_epilogue(A, Bm, torch.bfloat16, s1, s1, vr))
        add("GEMM", f"cuBLAS bf16 M={m} K={K} N={N}", ms_cu, tflops=fl / ms_cu / 1e9)
        add("GEMM", f"Triton scaled_gemm (fused epilogue) M={m} K={K} N={N}", ms_tr, tflops=fl / ms_tr / 1e9,
            vs_cublas=ms_tr / ms_cu)
        add("GEMM", f"cuBLAS + epilogue pass M={m} K={K} N={N}", ms_ce, tflops=fl / ms_ce / 1e9,
            vs_cublas=ms_ce / ms_cu)
        del A, Bm

    # ---- P2 / P3: full layer fwd+bwd ---------------------------------------------------------------------------
    for (K, N) in shapes:
        x = (torch.randn(m, K, device=dev, dtype=torch.bfloat16) + 0.5).requires_grad_()
        dy = torch.randn(m, N, device=dev, dtype=torch.bfloat16)
        lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)

        def step(layer):
            x.grad = None
            layer.weight.grad = None
            layer(x).backward(dy)

        ms_bf = _bench(lambda: step(lin))
        fl = 6 * m * K * N
        add("P2", f"BF16 nn.Linear fwd+bwd M={m} K={K} N={N}", ms_bf, tflops=fl / ms_bf / 1e9)
        for fmt in formats:
            layer = LowBitLinear(K, N, bias=False, device=dev, dtype=torch.bfloat16, recipe=Recipe(format=fmt),
                                 backend="triton")
            layer.weight.data.copy_(lin.weight.data)
            impls = ("triton", "cublas")
            for impl in impls:
                os.environ["HF_LOWBIT_GEMM"] = impl
                ms = _bench(lambda: step(layer))
                add("P2" if fmt == "nvfp4" else "P3", f"LowBitLinear {fmt} triton backend (gemm={impl}) "
                    f"K={K} N={N}", ms, ratio_bf16=ms / ms_bf, tflops=fl / ms / 1e9)
            os.environ["HF_LOWBIT_GEMM"] = "triton"
            if reference:
                layer_ref = LowBitLinear(K, N, bias=False, device=dev, dtype=torch.bfloat16,
                                         recipe=Recipe(format=fmt), backend="torch")
                layer_ref.weight.data.copy_(lin.weight.data)
                ms_r = _bench(lambda: step(layer_ref), warmup=2, rep=30)
                fast = min(r["ms"] for r in rows if r["name"].startswith(f"LowBitLinear {fmt} triton")
                           and f"K={K} N={N}" in r["name"])
                add("P2" if fmt == "nvfp4" else "P3", f"LowBitLinear {fmt} torch reference K={K} N={N}", ms_r,
                    ratio_bf16=ms_r / ms_bf, speedup_triton_vs_ref=ms_r / fast)
                del layer_ref
            del layer
        del x, dy, lin
        torch.cuda.empty_cache()

    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--quick", action="store_true", help="one layer shape only")
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) torch reference timings")
    a = ap.parse_args(argv)
    run_bench(a.out, quick=a.quick, m=a.m, reference=not a.no_reference)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
