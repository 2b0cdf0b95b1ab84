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



def _setenv(name: str, value: str | None) -> None:
    """Set (or with None remove) a kernel switch for the next launches (the kernels cache what they read)."""
    from hf_lowbit.kernels._common import reload_env_settings

    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    reload_env_settings()

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


def run_sweep(add, m: int = 8192, copy_tbs: float = 1.0) -> None:
    """Tile / launch-config sweeps of the v2 kernels (env overrides), to pick the defaults from measurements."""
    import torch

    from hf_lowbit.kernels.gemv import w4a16_linear
    from hf_lowbit.kernels.quantize import _stats, averis_quantize
    from hf_lowbit.numerics import quantize

    dev = torch.device("cuda")
    M, K = m, 4096
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16) + torch.randn(K, device=dev, dtype=torch.bfloat16) * 3
    for scfg in ("32,128,4", "64,128,8", "16,256,4", "32,256,8"):
        _setenv("HF_LOWBIT_SCFG", scfg)
        ms = _bench(lambda: _stats(x, True))
        add("sweep", f"stats pass (sum/max/min) cfg={scfg}", ms, tbs=M * K * 2 / ms / 1e9)
    _setenv("HF_LOWBIT_SCFG", None)
    packed = M * K // 2 + M * K // 16
    modes = [("row", dict(row=True, col=False), M * K * 2 + packed),
             ("col", dict(row=False, col=True), M * K * 2 + packed),
             ("both-dq", dict(row=True, col=True, row_packed=False, row_dq=True, col_packed=False, col_dq=True,
                              col_sum=True), M * K * 6)]
    cfgs = {"row": ("32,128,4", "64,128,8", "16,256,4", "32,256,8", "64,64,4", "128,128,8"),
            "col": ("64,64,4", "32,128,4", "64,128,8", "128,64,8", "32,256,8", "128,128,8"),
            "both-dq": ("64,64,4", "32,128,4", "64,128,8", "128,64,8")}
    for label, kw, nbytes in modes:
        for cfg in cfgs[label]:
            _setenv("HF_LOWBIT_QCFG", cfg)
            for div in (("fma", "ieee") if cfg == cfgs[label][0] else ("fma",)):
                _setenv("HF_LOWBIT_QDIV", div)
                ms = _bench(lambda: averis_quantize(x, "nvfp4", center=True, rounding="rtn", **kw))
                add("sweep", f"quantize nvfp4 rtn {label} cfg={cfg} div={div}", ms, tbs=nbytes / ms / 1e9)
        _setenv("HF_LOWBIT_QDIV", "fma")
        _setenv("HF_LOWBIT_QCFG", cfgs[label][0])
        ms = _bench(lambda: averis_quantize(x, "nvfp4", center=True, rounding="sr", seed=1, **kw))
        add("sweep", f"quantize nvfp4 sr {label} cfg={cfgs[label][0]}", ms, tbs=nbytes / ms / 1e9)
    _setenv("HF_LOWBIT_QCFG", None)
    _setenv("HF_LOWBIT_QDIV", None)
    del x
    for (N, K) in [(14336, 4096), (4096, 14336)]:
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        p = quantize(w.float(), "nvfp4", 1)
        xx = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
        for g in ("16,512,4,0", "8,512,4,0", "32,512,4,0", "16,1024,4,0", "16,256,4,0", "32,1024,8,0",
                  "16,512,2,0", "64,512,8,0", "16,512,4,1", "16,512,4,2"):
            _setenv("HF_LOWBIT_GCFG", g)
            ms = _bench(lambda: w4a16_linear(xx, p))
            add("sweep", f"W4A16 nvfp4 N={N} K={K} b=1 cfg={g}", ms, tbs=(p.codes.numel() + p.scales.numel()) / ms / 1e9)
        _setenv("HF_LOWBIT_GCFG", None)
        _setenv("HF_LOWBIT_W4A16_ROUND_W", "1")
        ms = _bench(lambda: w4a16_linear(xx, p))
        add("sweep", f"W4A16 nvfp4 N={N} K={K} b=1 default cfg, ROUND_W=1", ms)
        _setenv("HF_LOWBIT_W4A16_ROUND_W", None)
        del w


def run_bench(out: str | None = None, quick: bool = False, m: int = 8192, shapes=None, formats=("nvfp4", "mxfp4"),
              reference: bool = True, print_table: bool = True, sweep: bool = False, skip_gemm: bool = False,
              only: tuple[str, ...] | None = None) -> dict:
    import torch

    from hf_lowbit.config import Recipe
    from hf_lowbit.kernels.gemm import cublas_epilogue, scaled_gemm
    from hf_lowbit.kernels.token_axis import hadamard_col_quantize
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
           "gemm_impl_default": os.environ.get("HF_LOWBIT_GEMM", "cublas32"), "rows": rows}

    def want(group: str) -> bool:  # `only`: the groups to run (P1, P5, GEMM, P2 = P2 and P3); None: all
        return only is None or group in only

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
    if sweep:
        run_sweep(add, m, copy_tbs)

    # ---- P1: fused quantizer -----------------------------------------------------------------------------------
    if want("P1"):
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
            hbits = 0xA5C3
            mu = x.float().mean(0)
            ms = _bench(lambda: hadamard_col_quantize(x, mu, hbits, fmt))
            add("P1", f"Hadamard wgrad operand {fmt} rtn (2 reads + BF16 dq)", ms,
                tbs=M * K * 2 * 3 / ms / 1e9, shape=f"{M}x{K}")
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
    if want("P5"):
        run_decode(add, formats, reference=reference, sweep=sweep)

    # ---- GEMM alone: fused Triton epilogue vs cuBLAS (+ epilogue pass) ------------------------------------------
    for (K, N) in [] if skip_gemm or not want("GEMM") else shapes[:1] if quick else shapes:
        A = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
        Bm = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        s1 = torch.ones((), device=dev)
        vr = torch.randn(N, device=dev)
        fl = 2 * m * K * N
        ms_cu = _bench(lambda: A @ Bm.t())
        ms_tr = _bench(lambda: scaled_gemm(A, Bm, torch.bfloat16, s1, s1, vr))
        ms_ce = _bench(lambda: cublas_epilogue(A, Bm, torch.bfloat16, s1, s1, vr))
        ms_c32 = _bench(lambda: cublas_epilogue(A, Bm, torch.bfloat16, s1, s1, vr, fp32_product=True))
        add("GEMM", f"cuBLAS bf16 M={m} K={K} N={N}", ms_cu, tflops=fl / ms_cu / 1e9)
        add("GEMM", f"Triton scaled_gemm (fused epilogue) M={m} K={K} N={N}", ms_tr, tflops=fl / ms_tr / 1e9,
            vs_cublas=ms_tr / ms_cu)
        add("GEMM", f"cuBLAS + epilogue pass M={m} K={K} N={N}", ms_ce, tflops=fl / ms_ce / 1e9,
            vs_cublas=ms_ce / ms_cu)
        add("GEMM", f"cuBLAS FP32 product + epilogue pass M={m} K={K} N={N}", ms_c32, tflops=fl / ms_c32 / 1e9,
            vs_cublas=ms_c32 / ms_cu)
        del A, Bm

    # ---- P2 / P3: full layer fwd+bwd ---------------------------------------------------------------------------
    for (K, N) in shapes if want("P2") else []:
        x = (torch.randn(m, K, device=dev, dtype=torch.bfloat16) + 0.5).requires_grad_()
        dy = torch.randn(m, N, device=dev, dtype=torch.bfloat16)
        lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)

        def step(layer):
            x.grad = None
            layer.weight.grad = None
            layer(x).backward(dy)

        ms_bf = _bench(lambda: step(lin))
        ms_bf_g = _bench_graph(lambda: step(lin))
        fl = 6 * m * K * N
        add("P2", f"BF16 nn.Linear fwd+bwd M={m} K={K} N={N}", ms_bf, tflops=fl / ms_bf / 1e9, graph_ms=ms_bf_g)

        def graphed(layer) -> dict:  # device time (CUDA-graph replay) beside the eager time
            ms_g = _bench_graph(lambda: step(layer))
            return {"graph_ms": ms_g, "ratio_bf16_graph": ms_g / ms_bf_g}

        for fmt in formats:
            layer = LowBitLinear(K, N, bias=False, device=dev, dtype=torch.bfloat16, recipe=Recipe(format=fmt),
                                 backend="triton")
            layer.weight.data.copy_(lin.weight.data)
            impls = ("triton", "cublas32", "cublas")
            for impl in impls:
                _setenv("HF_LOWBIT_GEMM", impl)
                try:
                    ms = _bench(lambda: step(layer))
                except Exception as err:  # a first GPU run of an implementation: record why, keep benchmarking
                    add("P2" if fmt == "nvfp4" else "P3", f"LowBitLinear {fmt} gemm={impl} K={K} N={N} FAILED: "
                        f"{err!r}"[:300], float("nan"))
                    continue
                add("P2" if fmt == "nvfp4" else "P3", f"LowBitLinear {fmt} triton backend (gemm={impl}) "
                    f"K={K} N={N}", ms, ratio_bf16=ms / ms_bf, tflops=fl / ms / 1e9,
                    **(graphed(layer) if impl == "cublas32" else {}))
            _setenv("HF_LOWBIT_GEMM", None)
            _setenv("HF_LOWBIT_COL_KERNEL", "split")  # the column operands from their own launch (opt-in)
            ms = _bench(lambda: step(layer))
            add("P2" if fmt == "nvfp4" else "P3", f"LowBitLinear {fmt} (gemm=cublas32, col kernel=split) K={K} N={N}",
                ms, ratio_bf16=ms / ms_bf, tflops=fl / ms / 1e9)
            _setenv("HF_LOWBIT_COL_KERNEL", None)
            if fmt == "nvfp4":  # the random-Hadamard wgrad operands (kernels/token_axis.py): their extra cost
                layer_h = LowBitLinear(K, N, bias=False, device=dev, dtype=torch.bfloat16,
                                       recipe=Recipe(format=fmt, hadamard=True), backend="triton")
                layer_h.weight.data.copy_(lin.weight.data)
                ms = _bench(lambda: step(layer_h))
                add("P2", f"LowBitLinear {fmt} + Hadamard wgrad operands K={K} N={N}", ms, ratio_bf16=ms / ms_bf,
                    tflops=fl / ms / 1e9, **graphed(layer_h))
                del layer_h
            if fmt == "mxfp4":  # P3 proper: the exact MXFP4-on-FP8 path (kernels/mx_fp8.py, opt-in)
                _setenv("HF_LOWBIT_MX_FP8", "1")
                try:
                    ms = _bench(lambda: step(layer))
                    add("P3", f"LowBitLinear mxfp4 on FP8 tensor cores K={K} N={N}", ms, ratio_bf16=ms / ms_bf,
                        tflops=fl / ms / 1e9)
                except Exception as err:  # a first GPU run of this path: record why it failed, keep benchmarking
                    add("P3", f"LowBitLinear mxfp4 on FP8 tensor cores K={K} N={N} FAILED: {err!r}"[:300], float("nan"))
                finally:
                    _setenv("HF_LOWBIT_MX_FP8", None)
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

    _write_json(res, out)
    return res


def _bench_graph_rotating(fns, rounds: int = 4, warmup=10, rep=100) -> float:
    """Median milliseconds per call of a CUDA graph that calls every fn of `fns` in turn, `rounds` times: device time
    of small kernels without host launch overhead, each call on other operands (give enough of them to exceed L2,
    as the layers of a decode step do: one weight read back-to-back would stay in L2)."""
    return _bench_graph(lambda: [f() for _ in range(rounds) for f in fns], warmup=warmup, rep=rep) / (rounds * len(fns))


def run_decode(add, formats=("nvfp4", "mxfp4"), reference: bool = True, sweep: bool = False,
               shapes=((14336, 4096), (4096, 14336)), device: str = "cuda") -> None:
    """P5: W4A16 decode vs BF16 F.linear, eager (with host launches) and as CUDA-graph device time over rotating
    weight copies (> 120 MB per variant, beyond L2); batch 1 with the streaming and the FMA kernel; `sweep`: the
    streaming kernel's configs (HF_LOWBIT_GEMV_CFG)."""
    import torch
    import torch.nn.functional as F

    from hf_lowbit.averis import packed_linear
    from hf_lowbit.config import Recipe
    from hf_lowbit.kernels.gemv import w4a16_linear
    from hf_lowbit.numerics import quantize

    dev = torch.device(device)
    for (N, K) in shapes:
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(4)]  # 4 × 117 MB
        for fmt in formats:
            ps = [quantize(w.float(), fmt, 1) for w in ws * 2]  # 8 × ~33 MB
            wbytes = ps[0].codes.numel() + ps[0].scales.numel()
            for bsz in (1, 16):
                xx = torch.randn(bsz, K, device=dev, dtype=torch.bfloat16)
                ms_bf = _bench(lambda: F.linear(xx, ws[0]))
                ms_bf_g = _bench_graph_rotating([lambda w=w: F.linear(xx, w) for w in ws])
                kernels = ("stream", "fma") if bsz == 1 else ("default",)
                for impl in kernels:
                    _setenv("HF_LOWBIT_GEMV", None if impl == "default" else impl)
                    ms_q = _bench(lambda: w4a16_linear(xx, ps[0]))
                    ms_g = _bench_graph_rotating([lambda p=p: w4a16_linear(xx, p) for p in ps])
                    r = {"bf16_us": ms_bf * 1e3, "ratio_speedup": ms_bf / ms_q, "graph_us": ms_g * 1e3,
                         "bf16_graph_us": ms_bf_g * 1e3, "ratio_speedup_graph": ms_bf_g / ms_g,
                         "tbs_graph": wbytes / ms_g / 1e9, "bf16_tbs_graph": N * K * 2 / ms_bf_g / 1e9}
                    if reference and bsz == 1 and impl == "stream":
                        rec = Recipe(format=fmt, activations="none")
                        r["torch_ref_us"] = _bench(lambda: packed_linear(xx, ps[0], None, rec), warmup=3, rep=50) * 1e3
                    add("P5", f"W4A16 decode {fmt} N={N} K={K} batch={bsz} kernel={impl}", ms_q, **r)
                _setenv("HF_LOWBIT_GEMV", None)
                if sweep and bsz == 1:
                    for acc in ("block", "elem"):
                        _setenv("HF_LOWBIT_GEMV_ACC", acc)
                        for cfg in ("16,256,4,0", "8,256,4,0", "16,128,4,0", "16,256,8,0", "8,512,4,0",
                                    "32,256,4,0", "4,512,4,0"):
                            _setenv("HF_LOWBIT_GEMV_CFG", cfg)
                            ms_g = _bench_graph_rotating([lambda p=p: w4a16_linear(xx, p) for p in ps])
                            add("P5sweep", f"  stream {fmt} N={N} K={K} cfg={cfg} acc={acc} [graph]", ms_g,
                                tbs_graph=wbytes / ms_g / 1e9, ratio_speedup_graph=ms_bf_g / ms_g)
                    _setenv("HF_LOWBIT_GEMV_CFG", None)
                    _setenv("HF_LOWBIT_GEMV_ACC", None)
            del ps
        del ws
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _bench_graph(fn, warmup=25, rep=200) -> float:
    """Median milliseconds of one CUDA-graph replay of `fn` (device time without host launch overhead)."""
    import torch
    import triton

    fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ms = float(triton.testing.do_bench(g.replay, warmup=warmup, rep=rep, return_mode="median"))
    del g
    return ms


def _write_json(res: dict, out: str | None) -> None:
    """Write the results JSON to `out` (no-op without a path)."""
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)


def _layer_pair(m: int, K: int, N: int, dev, fmt: str = "nvfp4"):
    """A BF16 nn.Linear and a Triton LowBitLinear with the same weights, and `step(layer)`: one fwd+bwd on fixed
    [m, K] inputs and [m, N] output gradients."""
    import torch

    from hf_lowbit.config import Recipe
    from hf_lowbit.layers import LowBitLinear

    xg = (torch.randn(m, K, device=dev, dtype=torch.bfloat16) + 0.5).requires_grad_()
    dy = torch.randn(m, N, device=dev, dtype=torch.bfloat16)
    lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)
    layer = LowBitLinear(K, N, bias=False, device=dev, dtype=torch.bfloat16, recipe=Recipe(format=fmt),
                         backend="triton")
    layer.weight.data.copy_(lin.weight.data)

    def step(mod):
        xg.grad = None
        mod.weight.grad = None
        mod(xg).backward(dy)

    return lin, layer, step


def run_final(out: str | None = None, m: int = 8192) -> dict:
    """Short v2 run: every headline number eager (host launches, as v1) and as a CUDA-graph replay (device time)."""
    import torch
    import torch.nn.functional as F

    from hf_lowbit.kernels.gemv import w4a16_linear
    from hf_lowbit.kernels.quantize import _stats, averis_quantize
    from hf_lowbit.numerics import quantize

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[dict] = []
    res = {"device": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
           "versions": _versions(), "m": m, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "final-v2",
           "rows": rows}

    def add(group, name, ms, **kw):
        r = {"group": group, "name": name, "ms": ms, **kw}
        rows.append(r)
        extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items())
        print(f"{group:8s} {name:62s} {ms * 1e3:9.1f} us  {extra}", flush=True)

    def both(group, name, fn, nbytes=None, **kw):
        out = {}
        for mode, b in (("eager", _bench), ("graph", _bench_graph)):
            try:
                ms = b(fn)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{group} {name} [{mode}] failed: {type(e).__name__}: {e}", flush=True)
                continue
            extra = dict(kw)
            if nbytes:
                extra["tbs"] = nbytes / ms / 1e9
            add(group, f"{name} [{mode}]", ms, **extra)
            out[mode] = ms
        return out

    a = torch.empty(256 * 1024 * 1024, device=dev, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = _bench(lambda: b.copy_(a))
    add("ceiling", "device copy 512MB (read+write)", ms, tbs=2 * a.numel() * 2 / ms / 1e9)
    del a, b

    M, K = m, 4096
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16) + torch.randn(K, device=dev, dtype=torch.bfloat16) * 3
    packed = M * K // 2 + M * K // 16
    for scfg in ("32,128,4", "16,256,4"):
        _setenv("HF_LOWBIT_SCFG", scfg)
        ms = _bench_graph(lambda: _stats(x, True))
        add("P1", f"stats pass alone cfg={scfg} [graph]", ms, tbs=M * K * 2 / ms / 1e9)
    _setenv("HF_LOWBIT_SCFG", None)
    modes = [("row", dict(row=True, col=False), M * K * 2 + packed, ("32,128,4", "32,256,8", "16,256,4", "64,64,4")),
             ("col", dict(row=False, col=True), M * K * 2 + packed, ("64,64,4", "32,128,4", "32,64,4", "64,128,8")),
             ("both-dq", dict(row=True, col=True, row_packed=False, row_dq=True, col_packed=False, col_dq=True,
                              col_sum=True), M * K * 6, ("64,64,4", "32,128,4"))]
    for label, kw, nbytes, cfgs in modes:
        both("P1", f"averis quantize nvfp4 rtn {label} default cfg",
             lambda: averis_quantize(x, "nvfp4", center=True, **kw), nbytes)
        for cfg in cfgs:
            _setenv("HF_LOWBIT_QCFG", cfg)
            for div in (("fma", "ieee") if cfg == cfgs[0] else ("fma",)):
                _setenv("HF_LOWBIT_QDIV", div)
                ms = _bench_graph(lambda: averis_quantize(x, "nvfp4", center=True, **kw))
                add("P1", f"  {label} cfg={cfg} div={div} [graph]", ms, tbs=nbytes / ms / 1e9)
        _setenv("HF_LOWBIT_QCFG", None)
        _setenv("HF_LOWBIT_QDIV", None)
        both("P1", f"averis quantize nvfp4 sr {label} default cfg",
             lambda: averis_quantize(x, "nvfp4", center=True, rounding="sr", seed=1, **kw), nbytes)
    both("P1", "averis quantize mxfp4 rtn row default cfg",
         lambda: averis_quantize(x, "mxfp4", center=True), M * K * 2 + M * K // 2 + M * K // 32)
    del x

    for (N, K) in [(14336, 4096), (4096, 14336)]:
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        p = quantize(w.float(), "nvfp4", 1)
        xx = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
        bf = both("P5", f"BF16 F.linear N={N} K={K} batch=1", lambda: F.linear(xx, w), N * K * 2)
        wb = p.codes.numel() + p.scales.numel()
        q = both("P5", f"W4A16 nvfp4 N={N} K={K} batch=1 default cfg", lambda: w4a16_linear(xx, p), wb)
        for k in q:
            if k in bf:
                rows[-(2 if k == "eager" else 1)][f"speedup_vs_bf16_{k}"] = bf[k] / q[k]
        print(f"P5 N={N} K={K}: speedup vs BF16 " + ", ".join(f"{k} {bf[k] / q[k]:.2f}x" for k in q if k in bf))
        for g in ("16,256,4,0", "8,256,4,0", "16,128,4,0", "16,256,4,2", "32,256,8,0"):
            _setenv("HF_LOWBIT_GCFG", g)
            ms = _bench_graph(lambda: w4a16_linear(xx, p))
            add("P5", f"  W4A16 N={N} K={K} cfg={g} [graph]", ms, tbs=wb / ms / 1e9)
        _setenv("HF_LOWBIT_GCFG", None)
        del w

    K = N = 4096
    lin, layer, step = _layer_pair(m, K, N, dev)
    bfs = both("P2", f"BF16 nn.Linear fwd+bwd M={m} K={K} N={N}", lambda: step(lin))
    lq = both("P2", f"LowBitLinear nvfp4 triton fwd+bwd K={K} N={N}", lambda: step(layer))
    print("P2 ratio vs BF16: " + ", ".join(f"{k} {lq[k] / bfs[k]:.2f}x" for k in lq if k in bfs))
    res["p2_ratio"] = {k: lq[k] / bfs[k] for k in lq if k in bfs}
    _write_json(res, out)
    return res


def run_short(out: str | None = None, m: int = 8192) -> dict:
    """Defaults check after the v2 sweep: stats configs, the quantizer and decode defaults, P2 at 4096² (graph+eager)."""
    import torch
    import torch.nn.functional as F

    from hf_lowbit.kernels.gemv import w4a16_linear
    from hf_lowbit.kernels.quantize import _stats, averis_quantize
    from hf_lowbit.numerics import quantize

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[dict] = []
    res = {"device": torch.cuda.get_device_name(dev), "versions": _versions(), "m": m, "mode": "short-v2-defaults",
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}

    def add(group, name, ms, **kw):
        rows.append({"group": group, "name": name, "ms": ms, **kw})
        extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items())
        print(f"{group:8s} {name:62s} {ms * 1e3:9.1f} us  {extra}", flush=True)

    M, K = m, 4096
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16) + torch.randn(K, device=dev, dtype=torch.bfloat16) * 3
    for scfg in ("32,128,4", "64,128,4", "128,128,8"):
        _setenv("HF_LOWBIT_SCFG", scfg)
        ms = _bench_graph(lambda: _stats(x, True))
        add("P1", f"stats pass alone cfg={scfg} [graph]", ms, tbs=M * K * 2 / ms / 1e9)
    _setenv("HF_LOWBIT_SCFG", None)
    packed = M * K // 2 + M * K // 16
    for label, kw, nbytes in [("row", dict(row=True, col=False), M * K * 2 + packed),
                              ("col", dict(row=False, col=True), M * K * 2 + packed),
                              ("both-dq", dict(row=True, col=True, row_packed=False, row_dq=True, col_packed=False,
                                               col_dq=True, col_sum=True), M * K * 6)]:
        ms = _bench_graph(lambda: averis_quantize(x, "nvfp4", center=True, **kw))
        add("P1", f"averis quantize nvfp4 rtn {label} defaults [graph]", ms, tbs=nbytes / ms / 1e9)
    del x
    for (N, K) in [(14336, 4096), (4096, 14336)]:
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        p = quantize(w.float(), "nvfp4", 1)
        xx = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
        mb = _bench_graph(lambda: F.linear(xx, w))
        mq = _bench_graph(lambda: w4a16_linear(xx, p))
        add("P5", f"W4A16 nvfp4 N={N} K={K} batch=1 defaults [graph]", mq, bf16_us=mb * 1e3, speedup=mb / mq)
        del w
    K = N = 4096
    lin, layer, step = _layer_pair(m, K, N, dev)
    for mode, b in (("eager", _bench), ("graph", _bench_graph)):
        mb = b(lambda: step(lin))
        mq = b(lambda: step(layer))
        add("P2", f"LowBitLinear nvfp4 fwd+bwd K=N=4096 defaults [{mode}]", mq, bf16_us=mb * 1e3, ratio_bf16=mq / mb)
    _write_json(res, out)
    return res


def run_only_decode(out: str | None = None, formats=("nvfp4", "mxfp4")) -> dict:
    """`--decode`: the P5 rows and the streaming kernel's config sweep, nothing else."""
    import torch

    dev = torch.device("cuda")
    rows: list[dict] = []
    res = {"device": torch.cuda.get_device_name(dev), "versions": _versions(), "mode": "decode",
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}

    def add(group, name, ms, **kw):
        rows.append({"group": group, "name": name, "ms": ms, **kw})
        extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items())
        print(f"{group:8s} {name:62s} {ms * 1e3:9.1f} us  {extra}", flush=True)

    run_decode(add, formats, reference=False, sweep=True)
    _write_json(res, out)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--quick", action="store_true", help="one layer shape only")
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) torch reference timings")
    ap.add_argument("--sweep", action="store_true", help="also sweep the kernels' tile configs (env overrides)")
    ap.add_argument("--skip-gemm", action="store_true", help="skip the GEMM-alone comparison")
    ap.add_argument("--formats", default="nvfp4,mxfp4")
    ap.add_argument("--only", default=None, help="comma-separated groups to run: P1, P5, GEMM, P2 (default: all)")
    ap.add_argument("--final", action="store_true", help="the short v2 run: eager and CUDA-graph timings")
    ap.add_argument("--short", action="store_true", help="defaults check: stats cfgs, quantizer/decode defaults, P2")
    ap.add_argument("--decode", action="store_true", help="P5 only (decode GEMV), with the config sweep")
    a = ap.parse_args(argv)
    if a.decode:
        run_only_decode(a.out, formats=tuple(a.formats.split(",")))
        return 0
    if a.short:
        run_short(a.out, m=a.m)
        return 0
    if a.final:
        run_final(a.out, m=a.m)
        return 0
    groups = ("P1", "P5", "GEMM", "P2")
    only = tuple(a.only.split(",")) if a.only else None
    if only and any(g not in groups for g in only):
        ap.error(f"--only={a.only!r} is not valid; allowed: a comma-separated subset of {list(groups)}")
    run_bench(a.out, quick=a.quick, m=a.m, reference=not a.no_reference, sweep=a.sweep, skip_gemm=a.skip_gemm,
              formats=tuple(a.formats.split(",")), only=only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
