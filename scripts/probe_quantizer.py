"""Where does the fused quantizer's time go? Device times (CUDA-graph replays) of the quantizer next to kernels that
move the same bytes with the same tiling and no arithmetic, on one [M, K] BF16 tensor (default 8192×4096, the P1
shape). If the plain tiled copy is as slow as the quantizer, the tiling / memory access pattern is what limits it;
if the copy runs near the device's copy speed, the arithmetic and layout conversions inside the quantizer do.

    python scripts/probe_quantizer.py --out probe.json        (CUDA only)
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from hf_lowbit.cli import require_min_ints, require_new_path


@triton.jit
def _tiled_copy_kernel(x_ptr, y_ptr, z_ptr, M, K, BM: tl.constexpr, BK: tl.constexpr, TWO: tl.constexpr,
                       REREAD: tl.constexpr):
    """Read one [BM, BK] tile, write it to y (and z): the quantizer's data movement (BF16 in, one or two BF16
    outputs) without its arithmetic. REREAD: the second output reads the tile again (from L1/L2),
    as the quantizer's column axis does with its even / odd rows."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    off = rows[:, None].to(tl.int64) * K + cols[None, :]
    x = tl.load(x_ptr + off, mask=mask, other=0.0)
    tl.store(y_ptr + off, x, mask=mask)
    if TWO:
        if REREAD:
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) * 2.0
        tl.store(z_ptr + off, x.to(z_ptr.dtype.element_ty), mask=mask)


def graph_ms(fn, reps: int = 20) -> float:
    """Median ms per call of a CUDA graph holding `reps` calls (no host launch overhead)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return float(triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median")) / reps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--out", help="write the rows as JSON here (must not exist)")
    a = ap.parse_args(argv)
    require_min_ints(ap, [("--m", a.m, 1), ("--k", a.k, 1)])
    if a.out:
        require_new_path(ap, "--out", a.out)
    if not torch.cuda.is_available():
        ap.error("no CUDA device: this script times GPU kernels; allowed: a machine with a CUDA GPU")
    from hf_lowbit.kernels.quantize import _stats, averis_quantize

    M, K = a.m, a.k
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) + 1.0
    y = torch.empty_like(x)
    z = torch.empty_like(x)
    mb = M * K * 2 / 1e6
    rows = []

    def add(name: str, ms: float, moved_mb: float) -> None:
        tbs = moved_mb / ms / 1e3  # MB per ms = GB/s; / 1e3 = TB/s
        rows.append({"name": name, "us": ms * 1e3, "tbs": tbs})
        print(f"{name:64s} {ms * 1e3:8.1f} us {tbs:6.2f} TB/s", flush=True)

    add("torch copy (read X, write X)", graph_ms(lambda: y.copy_(x)), 2 * mb)
    for bm, bk, w in ((64, 64, 4), (32, 128, 4), (64, 128, 4), (64, 128, 8), (128, 128, 8), (16, 256, 4)):
        grid = (triton.cdiv(M, bm), triton.cdiv(K, bk))
        for two, again, label in ((False, False, "read X, write 1"), (True, False, "read X, write 2"),
                                  (True, True, "read X twice, write 2")):
            ms = graph_ms(lambda: _tiled_copy_kernel[grid](x, y, z, M, K, BM=bm, BK=bk, TWO=two,
                                                            REREAD=again, num_warps=w))
            add(f"tiled copy {bm}x{bk} w{w}: {label}", ms, mb * (2 + two))
    add("stats pass alone (read X)", graph_ms(lambda: _stats(x, True)), mb)
    for label, kw, out_mb in (("row axis BF16 dq", dict(row=True, row_packed=False, row_dq=True), mb),
                              ("col axis BF16 dq + col sums", dict(row=False, col=True, col_packed=False,
                                                                   col_dq=True, col_sum=True), mb),
                              ("both axes BF16 dq (the linear path)", dict(row=True, row_packed=False, row_dq=True,
                                                                          col=True, col_packed=False, col_dq=True,
                                                                          col_sum=True), 2 * mb),
                              ("row axis packed", dict(row=True), mb * 0.28)):
        ms = graph_ms(lambda: averis_quantize(x, "nvfp4", center=True, **kw))
        add(f"averis_quantize nvfp4 rtn {label} (stats + quantize)", ms, 2 * mb + out_mb)
    from hf_lowbit.kernels.token_axis import token_axis_quantize

    def split_both() -> None:  # what the linear runs now: row launch + the token-axis launch
        q = averis_quantize(x, "nvfp4", center=True, row=True, row_packed=False, row_dq=True)
        token_axis_quantize(x, q.mean, q.tensor_scale, "nvfp4")

    add("split: row launch + token-axis launch, both BF16 dq + col sums", graph_ms(split_both), 3 * mb + 2 * mb)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "m": M, "k": K, "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
