"""BF16 tensor-core GEMM with the FP4 epilogue fused: per-tensor scales from device memory, a row vector
(bias + rank-1 mean term of fprop/dgrad) and up to two rank-1 outer products (the Averis wgrad terms).

    C[m, n] = (sa · sb) · Σ_k A[m, k] B[n, k] + vrow[n] + u1[m] v1[n] + u2[m] v2[n]     (FP32, then cast)

A and B are the exactly-dequantized FP4 operands ``code × block scale`` in BF16 (E2M1 × E4M3 and E2M1 × 2^e are
exact in BF16), so the product is the FP4 GEMM up to FP32 summation order; the tensor scales never leave the
device (no host sync). Any strides: transposed operands cost nothing. `matvec` does the rank-1 mean GEMVs.

Also here: ``cublas_epilogue`` (cuBLAS, dense or batched, with an FP32 or a BF16 product, then the same epilogue as
one extra pass) and ``gemm_fn``, which picks between them by the HF_LOWBIT_GEMM / HF_LOWBIT_GROUPED_GEMM switches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_lowbit.kernels._common import (add_outer, bf16_rne, cdiv, dummy_tensors, env_choice, interpreting, next_pow2,
                                       tile_offsets)

__all__ = ["scaled_gemm", "matvec", "cublas_epilogue", "gemm_fn"]



@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sb_ptr, vrow_ptr, u1_ptr, v1_ptr, u2_ptr, v2_ptr, n_tok,
              HAS_SCALE: tl.constexpr, HAS_VROW: tl.constexpr, HAS_R1: tl.constexpr, HAS_R2: tl.constexpr,
              WGRAD: tl.constexpr):
    """acc · (sa·sb) + vrow + u1⊗v1 + u2⊗v2 for one [BM, BN] tile (pointers already at the tile's group).

    WGRAD (the Averis wgrad terms from the quantizers' raw outputs, no torch ops in between): u1 is taken as
    sa·u1 and v2 as sb·v2 + n_tok·v1 (v1 only with HAS_R1; the scales only with HAS_SCALE)."""
    mm = offs_m < M
    nm = offs_n < N
    if HAS_SCALE:
        sa = tl.load(sa_ptr)
        sb = tl.load(sb_ptr)
        acc = acc * (sa * sb)
    if HAS_VROW:
        acc += tl.load(vrow_ptr + offs_n, mask=nm, other=0.0)[None, :]
    if WGRAD:
        if HAS_R1:
            u1 = tl.load(u1_ptr + offs_m, mask=mm, other=0.0)
            if HAS_SCALE:
                u1 = u1 * sa
            acc += u1[:, None] * tl.load(v1_ptr + offs_n, mask=nm, other=0.0)[None, :]
        if HAS_R2:
            v2 = tl.load(v2_ptr + offs_n, mask=nm, other=0.0)
            if HAS_SCALE:
                v2 = v2 * sb
            if HAS_R1:
                v2 = v2 + n_tok * tl.load(v1_ptr + offs_n, mask=nm, other=0.0)
            acc += tl.load(u2_ptr + offs_m, mask=mm, other=0.0)[:, None] * v2[None, :]
    else:
        if HAS_R1:
            acc = add_outer(acc, u1_ptr, v1_ptr, offs_m, offs_n, mm, nm)
        if HAS_R2:
            acc = add_outer(acc, u2_ptr, v2_ptr, offs_m, offs_n, mm, nm)
    return acc


@triton.jit
def _group_vectors(grp, M, N, sa_ptr, sb_ptr, vrow_ptr, u1_ptr, v1_ptr, u2_ptr, v2_ptr, rmask_ptr):
    """The epilogue's pointers moved to group `grp`: scales at [g], N-vectors at [g·N], M-vectors at [g·M]."""
    return (sa_ptr + grp, sb_ptr + grp, vrow_ptr + grp * N, u1_ptr + grp * M, v1_ptr + grp * N, u2_ptr + grp * M,
            v2_ptr + grp * N, rmask_ptr + grp * M)


@triton.jit
def _finish_tile(acc, offs_m, M, rmask_ptr, HAS_RMASK: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Rows of padding (capacity layout) → 0, as the reference's `y * mask`; then the single BF16 rounding."""
    if HAS_RMASK:
        acc = acc * tl.load(rmask_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if ROUND_BF16:
        acc = bf16_rne(acc)
    return acc


# M is the MoE capacity in the batched case (a new value every step): not specialized on (no recompiles mid-run)
@triton.jit(do_not_specialize=["M", "NUM_K"])
def _gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sam, sak, sbn, sbk, scm, scn,
                 sa_ptr, sb_ptr, vrow_ptr, u1_ptr, v1_ptr, u2_ptr, v2_ptr, rmask_ptr, sag, sbg, scg, n_tok, NUM_K,
                 EVEN_K: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_VROW: tl.constexpr,
                 HAS_R1: tl.constexpr, HAS_R2: tl.constexpr, WGRAD: tl.constexpr, HAS_RMASK: tl.constexpr,
                 ROUND_BF16: tl.constexpr,
                 DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr):
    # axis 1 of the grid: the group (MoE expert) of a batched GEMM; its operands sit at group strides sag/sbg/scg,
    # its scales at [g], its vectors at [g·N] / [g·M] (a dense GEMM is the one-group case)
    grp = tl.program_id(1).to(tl.int64)
    a_ptr += grp * sag
    b_ptr += grp * sbg
    c_ptr += grp * scg
    sa_ptr, sb_ptr, vrow_ptr, u1_ptr, v1_ptr, u2_ptr, v2_ptr, rmask_ptr = _group_vectors(
        grp, M, N, sa_ptr, sb_ptr, vrow_ptr, u1_ptr, v1_ptr, u2_ptr, v2_ptr, rmask_ptr)
    offs_m, offs_n = tile_offsets(M, N, BM, BN, GROUP_M)
    am = offs_m % M
    bn = offs_n % N
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + am[:, None].to(tl.int64) * sam + offs_k[None, :].to(tl.int64) * sak
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * sbk + bn[None, :].to(tl.int64) * sbn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    # NUM_K = cdiv(K, BK) is a runtime trip count: K is an MoE expert's capacity in the wgrad GEMM, and as a
    # constexpr it recompiled the kernel (~0.5 s) for every new capacity (3 stalled steps in bench_moe, 2026-11-30)
    for kt in range(NUM_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = offs_k < K - kt * BK
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BK * sak
        b_ptrs += BK * sbk
    acc = _epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sb_ptr, vrow_ptr, u1_ptr, v1_ptr, u2_ptr, v2_ptr, n_tok,
                    HAS_SCALE, HAS_VROW, HAS_R1, HAS_R2, WGRAD)
    acc = _finish_tile(acc, offs_m, M, rmask_ptr, HAS_RMASK, ROUND_BF16)
    cmask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * scm + offs_n[None, :] * scn, acc.to(c_ptr.dtype.element_ty),
             mask=cmask)


_CONFIGS = [
    triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BM": 256, "BN": 128, "BK": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
]

#: small tiles with an FP32 dot: the CPU interpreter (whose BF16 dot is not exact) and FP32 operands
_SMALL_CONFIG = triton.Config({"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4}, num_stages=3, num_warps=4)
#: MoE experts: M (the capacity) changes every step, so one fixed config rather than tuning keyed on it
_BATCHED_CONFIG = triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_stages=4, num_warps=8)
#: also tried by the grouped "auto" choice: BK = 32 divides every MoE capacity (a multiple of 32), so the wgrad GEMMs
#: (K = the capacity) run without a masked K tail
_GROUPED_EXTRA_CONFIGS = [
    triton.Config({"BM": 128, "BN": 256, "BK": 32, "GROUP_M": 8}, num_stages=5, num_warps=8),
    triton.Config({"BM": 128, "BN": 128, "BK": 32, "GROUP_M": 8}, num_stages=5, num_warps=4),
]

#: best config per (M bucket, N, K, operand layouts, epilogue flags): measured once, then launched directly
_BEST: dict[tuple, triton.Config] = {}


def m_bucket(m: int) -> int:
    """The row count a tuned GEMM config is shared by: the next power of two (at least 64). Tuning per exact M
    re-benchmarked every GEMM of a model for each new batch shape (a ragged last batch, variable-length fine-tuning),
    seconds of stall inside training each time."""
    return max(64, next_pow2(m))


def _launch_tuned(args: tuple, M: int, N: int, K: int, G: int, common: dict) -> None:
    """Launch the dense GEMM with the config measured best for this shape class (benchmarked on first use)."""
    key = (m_bucket(M), N, K, *args[6:10], args[0].dtype, args[1].dtype, args[2].dtype,
           *common.values(), args[0].get_device())  # `common` is always built in one key order
    cfg = _BEST.get(key)
    if cfg is None:
        from triton.testing import do_bench

        dot_f32 = interpreting()  # only reached there by the tuning test
        times = [do_bench(lambda c=c: _launch_config(args, M, N, K, G, common, c, dot_f32), warmup=5, rep=20)
                 for c in _CONFIGS]
        cfg = _CONFIGS[min(range(len(_CONFIGS)), key=times.__getitem__)]
        _BEST[key] = cfg
    _launch_config(args, M, N, K, G, common, cfg, interpreting())


def _launch_config(args: tuple, M: int, N: int, K: int, G: int, common: dict, cfg: triton.Config,
                   dot_f32: bool) -> None:
    """One launch of the GEMM kernel with tile config `cfg` over G groups."""
    kw = cfg.kwargs
    grid = (cdiv(M, kw["BM"]) * cdiv(N, kw["BN"]), G)
    num_k = cdiv(K, kw["BK"])
    # the interpreter of Triton 3.6 turns a runtime int into a 1-element array that `range` cannot take with
    # numpy >= 2.4; a constexpr-wrapped value passes through as a plain int there
    _gemm_kernel[grid](*args, tl.constexpr(num_k) if interpreting() else num_k, EVEN_K=K % kw["BK"] == 0,
                       DOT_F32=dot_f32, **kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)


def _f32_vector(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """An epilogue vector or scale as contiguous FP32 (`dummy` for an absent one)."""
    if t is None:
        return dummy
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def scaled_gemm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, sa: torch.Tensor | None = None,
                sb: torch.Tensor | None = None, vrow: torch.Tensor | None = None,
                r1: tuple[torch.Tensor, torch.Tensor] | None = None,
                r2: tuple[torch.Tensor, torch.Tensor] | None = None,
                row_mask: torch.Tensor | None = None, wgrad_tokens: int | None = None,
                config: triton.Config | None = None) -> torch.Tensor:
    """C = (sa·sb·(a @ bᵀ) + vrow + u1⊗v1 + u2⊗v2) · row_mask, FP32 epilogue, any strides. `config`: the tile
    config of a batched launch (default `_BATCHED_CONFIG`; the grouped "auto" choice passes the measured best).

    Dense: a [M, K], b [N, K], scales 0-d/[1], vrow/v [N], u/row_mask [M]. Batched (MoE experts, one launch):
    a [G, M, K], b [G, N, K], scales [G], vrow/v [G, N], u/row_mask [G, M] → C [G, M, N].
    `wgrad_tokens` = n (the Averis wgrad, dense): the epilogue uses sa·u1 and sb·v2 + n·v1 in place of u1, v2."""
    batched = a.dim() == 3
    if not batched:
        a, b = a[None], b[None]
    G, M, K = a.shape
    G2, N, K2 = b.shape
    assert K == K2 and G == G2, (a.shape, b.shape)
    dev = a.device
    c = torch.empty((G, M, N), device=dev, dtype=out_dtype)
    dummy = dummy_tensors(dev)[2]
    u1, v1 = r1 if r1 is not None else (dummy, dummy)
    u2, v2 = r2 if r2 is not None else (dummy, dummy)
    common = dict(HAS_SCALE=sa is not None, HAS_VROW=vrow is not None, HAS_R1=r1 is not None,
                  HAS_R2=r2 is not None, WGRAD=wgrad_tokens is not None, HAS_RMASK=row_mask is not None,
                  ROUND_BF16=out_dtype == torch.bfloat16)

    def vec(t: torch.Tensor | None) -> torch.Tensor:
        return _f32_vector(t, dummy)

    args = (a, b, c, M, N, K, a.stride(1), a.stride(2), b.stride(1), b.stride(2), c.stride(1), c.stride(2),
            vec(sa), vec(sb), vec(vrow), vec(u1), vec(v1), vec(u2), vec(v2), vec(row_mask),
            a.stride(0) if G > 1 else 0, b.stride(0) if G > 1 else 0, c.stride(0) if G > 1 else 0,
            float(wgrad_tokens or 0))
    if interpreting() or a.dtype == torch.float32:
        _launch_config(args, M, N, K, G, common, _SMALL_CONFIG, True)
    elif batched:
        _launch_config(args, M, N, K, G, common, config or _BATCHED_CONFIG, False)
    else:
        _launch_tuned(args, M, N, K, G, common)
    return c if batched else c[0]


@triton.jit(do_not_specialize=["M"])
def _epilogue_kernel(c_ptr, o_ptr, M, N, scg, sog, sa_ptr, sb_ptr, vrow_ptr, u1_ptr, v1_ptr, u2_ptr, v2_ptr,
                     rmask_ptr, ms_ptr, n_tok, HAS_SCALE: tl.constexpr, HAS_VROW: tl.constexpr, HAS_R1: tl.constexpr,
                     HAS_R2: tl.constexpr, WGRAD: tl.constexpr, HAS_RMASK: tl.constexpr, HAS_MEAN: tl.constexpr,
                     ROUND_BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """`_gemm_kernel`'s epilogue as a pass over a finished product c [G, M(+1), N] (rows contiguous, group stride scg;
    the output's sog; groups on grid axis 2, their scales at [g], vectors at [g·N] / [g·M], as there). HAS_MEAN:
    c's row M is the mean row's product v·bᵀ; the row vector added is that row times (ms[g]·sb[g]), where ms_ptr is
    the mean's tensor scale (with HAS_SCALE; else the row as it is): the rank-1 term without a GEMV of its own."""
    grp = tl.program_id(2).to(tl.int64)
    c_ptr += grp * scg
    o_ptr += grp * sog
    sa_ptr, sb_ptr, vrow_ptr, u1_ptr, v1_ptr, u2_ptr, v2_ptr, rmask_ptr = _group_vectors(
        grp, M, N, sa_ptr, sb_ptr, vrow_ptr, u1_ptr, v1_ptr, u2_ptr, v2_ptr, rmask_ptr)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptr = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    acc = tl.load(c_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    acc = _epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sb_ptr, vrow_ptr, u1_ptr, v1_ptr, u2_ptr, v2_ptr, n_tok,
                    HAS_SCALE, HAS_VROW, HAS_R1, HAS_R2, WGRAD)
    if HAS_MEAN:  # the same arithmetic as the separate rank-1: P · (ms·sb), then added to the scaled tile
        vr = tl.load(c_ptr + M * N + offs_n, mask=offs_n < N, other=0.0)
        if HAS_SCALE:
            vr = vr * (tl.load(ms_ptr + grp) * tl.load(sb_ptr))
        acc += vr[None, :]
    acc = _finish_tile(acc, offs_m, M, rmask_ptr, HAS_RMASK, ROUND_BF16)
    tl.store(o_ptr + ptr, acc.to(o_ptr.dtype.element_ty), mask=mask)


_HAS_MM_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
_HAS_BMM_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")


def fp32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with FP32 accumulation and FP32 output (no BF16 rounding of the product): cuBLAS on CUDA; batched
    when a, b are 3-D."""
    if a.dim() == 3:
        if a.is_cuda and _HAS_BMM_DTYPE:
            return torch.ops.aten.bmm.dtype(a, b, torch.float32)
        return torch.bmm(a.float(), b.float())
    if a.is_cuda and _HAS_MM_DTYPE:
        return torch.ops.aten.mm.dtype(a, b, torch.float32)
    return torch.mm(a.float(), b.float())


def cublas_epilogue(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, sa=None, sb=None, vrow=None, r1=None,
                    r2=None, row_mask: torch.Tensor | None = None, wgrad_tokens: int | None = None,
                    fp32_product: bool = False, mean_last_row: bool = False,
                    mean_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `scaled_gemm` (dense or batched), via cuBLAS + one epilogue pass. `fp32_product`: cuBLAS
    writes the FP32 product and the epilogue rounds once (the reference's numerics, up to summation order, like
    `scaled_gemm`); else the product is rounded to BF16 before the epilogue (half the bytes between the two).
    `mean_last_row` (batched): a's last row per group is a quantized mean row v; the output is the other rows' and
    gets the row vector (v·bᵀ)·(mean_scale·sb) added: the Averis rank-1 term from the same GEMM."""
    batched = a.dim() == 3
    if mean_last_row and (not batched or vrow is not None or r1 is not None or r2 is not None
                          or (sa is not None) != (mean_scale is not None)):
        raise ValueError("cublas_epilogue: mean_last_row needs batched operands, no vrow/r1/r2, and a mean_scale "
                         "exactly when the operands have tensor scales")
    bt = b.transpose(-1, -2)
    c = fp32_mm(a, bt) if fp32_product else (torch.bmm(a, bt) if batched else torch.mm(a, bt))
    c3 = c if batched else c[None]
    G, MC, N = c3.shape
    M = MC - 1 if mean_last_row else MC
    dev = a.device
    dummy = dummy_tensors(dev)[2]

    def vec(t: torch.Tensor | None) -> torch.Tensor:
        return _f32_vector(t, dummy)

    u1, v1 = r1 if r1 is not None else (None, None)
    u2, v2 = r2 if r2 is not None else (None, None)
    in_place = out_dtype == c3.dtype and not mean_last_row
    out = c3 if in_place else torch.empty((G, M, N), device=dev, dtype=out_dtype)
    BM, BN = 32, 128
    _epilogue_kernel[(cdiv(M, BM), cdiv(N, BN), G)](
        c3, out, M, N, MC * N, M * N, vec(sa), vec(sb), vec(vrow), vec(u1), vec(v1), vec(u2), vec(v2), vec(row_mask),
        vec(mean_scale), float(wgrad_tokens or 0), HAS_SCALE=sa is not None, HAS_VROW=vrow is not None,
        HAS_R1=r1 is not None, HAS_R2=r2 is not None, WGRAD=wgrad_tokens is not None,
        HAS_RMASK=row_mask is not None, HAS_MEAN=mean_last_row, ROUND_BF16=out_dtype == torch.bfloat16, BM=BM, BN=BN)
    return out if batched else out[0]


GEMM_IMPLS = ("auto", "cublas32", "triton", "cublas")  # dense default first
GROUPED_GEMM_IMPLS = ("auto", "cublas32", "triton")   # grouped (MoE experts) default first
# "auto": a layer whose fprop does at least this many multiply-adds (M·N·K) takes cuBLAS, a smaller one the Triton GEMM.
# cuBLAS + the epilogue pass is 18-23% faster on the device at M=8192, K, N ≥ 4096 (≥ 1.4e11), but its extra launches
# cost host time, and at the Qwen3-0.6B width (M=8192, K, N ≤ 3072: ≤ 2.6e10) training is host-bound: 16.8k tokens/s
# with cuBLAS vs 21.2k with Triton on an H200 (benchmarks/NOTES.md, 2026-11-30 fifth session).
AUTO_CUBLAS_MIN_WORK = 2 ** 36


def _cublas32(*args, **kw):
    return cublas_epilogue(*args, fp32_product=True, **kw)


def _can_time(a: torch.Tensor) -> bool:
    """Whether candidates can be timed on a's device (a compiled CUDA run, not the interpreter)."""
    return a.is_cuda and not interpreting()


def _device_ms(fn) -> float:
    """Device milliseconds of one call of `fn` (triton's do_bench: warm-up, L2 flushed, median of repeats)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=3, rep=15)


#: grouped "auto": (M bucket, N, K, G, operand layouts, epilogue flags, dtypes, device) → ("cublas32", None) or
#: ("triton", tile config), measured on first use of the key
_GROUPED_CHOICE: dict[tuple, tuple[str, triton.Config | None]] = {}


def grouped_auto(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, sa=None, sb=None, vrow=None, r1=None,
                 r2=None, row_mask=None, wgrad_tokens=None, mean_last_row: bool = False,
                 mean_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The batched GEMM with the FP4 epilogue through whichever of cuBLAS + the pass or the Triton GEMM (at its best
    tile config) was faster on this shape class when first seen. Per GEMM of one P8 step on an H200 the winner
    differs (Triton 0.86-0.98× cuBLAS for the down fprop and both dgrads, 1.07-1.15× for the gate_up fprop,
    1.3-1.4× for the wgrads), so one fixed choice leaves time on the table. With `mean_last_row` (see
    `cublas_epilogue`) each candidate is timed with its way of adding the mean's rank-1 row: cuBLAS from the same
    GEMM, the Triton GEMM after a GEMV that re-reads b. The interpreter (CPU) takes cuBLAS's path."""
    kw = dict(sa=sa, sb=sb, vrow=vrow, r1=r1, r2=r2, row_mask=row_mask, wgrad_tokens=wgrad_tokens)
    mean = (mean_last_row, mean_scale)
    if not _can_time(a):
        return _run_grouped(("cublas32", None), a, b, out_dtype, kw, mean)
    G, M, K = a.shape
    N = b.shape[1]
    key = (m_bucket(M), N, K, G, a.stride(2) == 1, b.stride(2) == 1, a.dtype, b.dtype, out_dtype,
           *(t is not None for t in (sa, vrow, r1, r2, row_mask, wgrad_tokens, mean_scale)), mean_last_row,
           a.get_device())
    choice = _GROUPED_CHOICE.get(key)
    if choice is None:
        candidates = [("cublas32", None)] + [("triton", c) for c in grouped_configs()]
        try:
            times = [_device_ms(lambda c=c: _run_grouped(c, a, b, out_dtype, kw, mean)) for c in candidates]
            choice = candidates[min(range(len(candidates)), key=times.__getitem__)]
        except torch.OutOfMemoryError:  # timing needs scratch memory (outputs, do_bench's L2 flush buffer): a
            choice = candidates[0]      # training run that fills the GPU keeps the cuBLAS path instead of failing
        _GROUPED_CHOICE[key] = choice
    return _run_grouped(choice, a, b, out_dtype, kw, mean)


def grouped_configs() -> list[triton.Config]:
    """The Triton tile configs the grouped "auto" choice times."""
    return [_BATCHED_CONFIG, *_CONFIGS, *_GROUPED_EXTRA_CONFIGS]


def mean_row_vector(v: torch.Tensor, b: torch.Tensor, mean_scale: torch.Tensor | None,
                    sb: torch.Tensor | None) -> torch.Tensor:
    """(v·bᵀ)·(mean_scale·sb) per group, FP32 [G, N] (v [G, K], b [G, N, K]): the rank-1 row as its own GEMV."""
    prod = fp32_mm(v[:, None, :], b.transpose(1, 2))[:, 0]
    return prod if mean_scale is None else prod * (mean_scale * sb)[:, None]


def _run_grouped(choice: tuple[str, triton.Config | None], a, b, out_dtype, kw,
                 mean: tuple[bool, torch.Tensor | None] = (False, None)) -> torch.Tensor:
    (impl, config), (mean_last_row, mean_scale) = choice, mean
    if impl == "cublas32":
        return _cublas32(a, b, out_dtype, mean_last_row=mean_last_row, mean_scale=mean_scale, **kw)
    if mean_last_row:
        m = a.shape[1] - 1
        kw = dict(kw, vrow=mean_row_vector(a[:, m], b, mean_scale, kw["sb"]))
        a = a[:, :m]
    return scaled_gemm(a, b, out_dtype, config=config, **kw)


def _grouped_fixed(impl: str):
    """The grouped GEMM through one implementation (HF_LOWBIT_GROUPED_GEMM=cublas32 / triton), `grouped_auto`'s
    signature."""
    def run(a, b, out_dtype, sa=None, sb=None, vrow=None, r1=None, r2=None, row_mask=None, wgrad_tokens=None,
            mean_last_row=False, mean_scale=None):
        kw = dict(sa=sa, sb=sb, vrow=vrow, r1=r1, r2=r2, row_mask=row_mask, wgrad_tokens=wgrad_tokens)
        return _run_grouped((impl, None), a, b, out_dtype, kw, (mean_last_row, mean_scale))
    return run


def gemm_fn(grouped: bool = False, work: int | None = None):
    """The GEMM with the FP4 epilogue (`scaled_gemm`'s contract). Dense (HF_LOWBIT_GEMM): "auto" (default) picks by
    the layer's size `work` (= M·N·K of its fprop; see AUTO_CUBLAS_MIN_WORK); cuBLAS with an FP32 product + one
    epilogue pass ("cublas32": device-faster on large layers, more host time), the Triton GEMM with its fused
    epilogue ("triton": the same numerics up to summation order, fewer launches), or cuBLAS with a BF16-rounded
    product + the pass ("cublas": one extra rounding). Grouped MoE experts (HF_LOWBIT_GROUPED_GEMM): "auto"
    (default, `grouped_auto`: the faster of the two below per shape class, measured on first use), batched cuBLAS
    with an FP32 product + the pass ("cublas32": +1.3 GB of transient FP32 products at P8) or the batched Triton
    GEMM ("triton"); the grouped functions also take `mean_last_row` / `mean_scale` (see `cublas_epilogue`)."""
    if grouped:
        impl = env_choice("HF_LOWBIT_GROUPED_GEMM", GROUPED_GEMM_IMPLS)
        return grouped_auto if impl == "auto" else _grouped_fixed(impl)
    impl = env_choice("HF_LOWBIT_GEMM", GEMM_IMPLS)
    if impl == "auto":
        impl = "cublas32" if work is not None and work >= AUTO_CUBLAS_MIN_WORK else "triton"
    return {"triton": scaled_gemm, "cublas32": _cublas32, "cublas": cublas_epilogue}[impl]


@triton.jit
def _matvec_kernel(a_ptr, sj, si, v_ptr, o_ptr, scale_ptr, J, I, NUM_I: tl.constexpr, HAS_SCALE: tl.constexpr,
                   BJ: tl.constexpr, BI: tl.constexpr):
    offs_j = tl.program_id(0) * BJ + tl.arange(0, BJ)
    jm = offs_j < J
    acc = tl.zeros([BJ, BI], dtype=tl.float32)
    for it in range(NUM_I):
        offs_i = it * BI + tl.arange(0, BI)
        im = offs_i < I
        a = tl.load(a_ptr + offs_j[:, None].to(tl.int64) * sj + offs_i[None, :].to(tl.int64) * si,
                    mask=jm[:, None] & im[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs_i, mask=im, other=0.0)
        acc += a * v[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_SCALE:
        out = out * tl.load(scale_ptr)
    tl.store(o_ptr + offs_j, out, mask=jm)


def matvec(a: torch.Tensor, v: torch.Tensor, scale: torch.Tensor | None = None, transpose: bool = False
           ) -> torch.Tensor:
    """FP32 (scale ·) a @ v (a [J, I]) or (scale ·) aᵀ @ v with `transpose`; a in any float dtype, FP32 accumulate."""
    if transpose:
        J, I = a.shape[1], a.shape[0]
        sj, si = a.stride(1), a.stride(0)
        BJ, BI = (32, 32) if interpreting() else (128, 32)
    else:
        J, I = a.shape
        sj, si = a.stride(0), a.stride(1)
        BJ, BI = (32, 32) if interpreting() else (16, 256)
    out = torch.empty(J, device=a.device, dtype=torch.float32)
    _matvec_kernel[(cdiv(J, BJ),)](a, sj, si, v.float().contiguous(), out,
                                          scale if scale is not None else out, J, I,
                                          NUM_I=cdiv(I, BI), HAS_SCALE=scale is not None, BJ=BJ, BI=BI,
                                          num_warps=4)
    return out
