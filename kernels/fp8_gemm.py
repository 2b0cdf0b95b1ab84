"""Exact row-scaled FP8 GEMM for folded MXFP4 operands (see `hf_lowbit.kernels.mx_fp8`), and its matvec.

    C[m, n] = sa[m] · sb[n] · Σ_k A[m, k] B[n, k]  (+ vn[n] + vm[m] + u1[m] v1[n] + u2[m] v2[n])   FP32, then cast

A [M, K] and B [N, K] are E4M3 (K-contiguous, K a multiple of 32), sa/sb FP32 row scales.

Why it is exact. Hopper's FP8 tensor cores (wgmma) add the products of one instruction (K = 32) and the incoming
accumulator after aligning them to the largest exponent and keeping ~13-14 bits, so a long FP8 dot product that
accumulates in the tensor core loses low bits (DeepSeek-V3 §3.3.2; `torch._scaled_mm` showed ~6e-5 relative error
here). `tl.dot(..., max_num_imprecise_acc=32)` makes Triton issue each K = 32 wgmma into a zeroed partial
accumulator and add that into the FP32 accumulator with ordinary FP32 adds. A 32-wide K chunk starting at a
multiple of 32 is exactly one MX block: every A element of a row is an E2M1 value times one power of two 2^α and
every B element of a column one times 2^β, so each product is an integer multiple of 0.25·2^(α+β) of magnitude
≤ 36·2^(α+β), and the chunk's sum a multiple of 0.25·2^(α+β) bounded by 32·36·2^(α+β) (≤ 13 significant bits):
the tensor core computes it exactly. The kernel therefore equals the FP32 reference up to FP32 accumulation order.
The row scales are powers of two (exact multiplications). Measured on an H200
(`benchmarks/results/2026-11-29b-h200/mx-fp8-gemm-call.log`): equal to the FP32 reference at rtol 1e-6;
8192×4096×4096 in 402-445 µs by tile choice (BF16 cuBLAS 367 µs, the imprecise `_scaled_mm` 208 µs).

Under TRITON_INTERPRET=1 the interpreter's `tl.dot` widens FP8 to FP16 and multiplies in FP32 (also exact), so
the same kernel runs on a CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_lowbit.kernels._common import add_outer, bf16_rne, cdiv, interpreting, tile_offsets

__all__ = ["fp8_rowscaled_gemm", "fp8_rowscaled_matvec", "mx_row_scales", "IMPRECISE_ACC", "MX_BLOCK"]

#: K elements per tensor-core partial sum before promotion to the FP32 accumulator: one MX block (see above).
IMPRECISE_ACC = 32
MX_BLOCK = 32



def use_triton(t: torch.Tensor) -> bool:
    """Triton path on CUDA tensors or under the interpreter; else the torch fallback."""
    return t.is_cuda or interpreting()


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, vn_ptr, vm_ptr, u1_ptr, v1_ptr, u2_ptr, v2_ptr,
                     M, N, sam, sbn, scm, NUM_K: tl.constexpr,
                     HAS_VN: tl.constexpr, HAS_VM: tl.constexpr, HAS_R1: tl.constexpr, HAS_R2: tl.constexpr,
                     ROUND_BF16: tl.constexpr, IMPRECISE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    offs_m, offs_n = tile_offsets(M, N, BM, BN, GROUP_M)
    # ragged M, N: wrap the loads onto valid rows (no masks in the K loop), mask only the store
    am = offs_m % M
    bn = offs_n % N
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + am[:, None].to(tl.int64) * sam + offs_k[None, :]
    b_ptrs = b_ptr + bn[None, :].to(tl.int64) * sbn + offs_k[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for _ in range(NUM_K):  # K = NUM_K·BK: the 32-wide chunks stay aligned to the MX blocks
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=IMPRECISE)
        a_ptrs += BK
        b_ptrs += BK
    mm = offs_m < M
    nm = offs_n < N
    acc = acc * tl.load(sa_ptr + offs_m, mask=mm, other=1.0)[:, None] * tl.load(sb_ptr + offs_n, mask=nm,
                                                                                other=1.0)[None, :]
    if HAS_VN:
        acc += tl.load(vn_ptr + offs_n, mask=nm, other=0.0)[None, :]
    if HAS_VM:
        acc += tl.load(vm_ptr + offs_m, mask=mm, other=0.0)[:, None]
    if HAS_R1:
        acc = add_outer(acc, u1_ptr, v1_ptr, offs_m, offs_n, mm, nm)
    if HAS_R2:
        acc = add_outer(acc, u2_ptr, v2_ptr, offs_m, offs_n, mm, nm)
    if ROUND_BF16:
        acc = bf16_rne(acc)
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * scm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


@triton.jit
def _fp8_matvec_kernel(w_ptr, s_ptr, v_ptr, out_ptr, R, K, KV, swr, NUM_K: tl.constexpr, BR: tl.constexpr,
                       BK: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = rows < R
    acc = tl.zeros([BR, BK], dtype=tl.float32)
    for kt in range(NUM_K):
        ks = kt * BK + tl.arange(0, BK)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * swr + ks[None, :], mask=rm[:, None] & (ks < K)[None, :],
                    other=0.0)
        v = tl.load(v_ptr + ks, mask=ks < KV, other=0.0)
        acc += w.to(tl.float32) * v[None, :]
    out = tl.sum(acc, axis=1) * tl.load(s_ptr + rows, mask=rm, other=1.0)
    tl.store(out_ptr + rows, out, mask=rm)


@triton.jit
def _pow2(e):
    """2^e (int32 e in [-149, 254]) exactly, subnormals too: a product of two normal powers of two."""
    h = e // 2
    return ((h + 127) << 23).to(tl.float32, bitcast=True) * (((e - h) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _mx_row_scale_kernel(scales_ptr, emax_ptr, rs_ptr, R, NB, NUM_B: tl.constexpr, OFFSET: tl.constexpr,
                         BR: tl.constexpr, BB: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = rows < R
    emax = tl.zeros([BR], dtype=tl.int32)
    nan = tl.zeros([BR], dtype=tl.int32)
    for bt in range(NUM_B):
        cols = bt * BB + tl.arange(0, BB)
        e = tl.load(scales_ptr + rows[:, None].to(tl.int64) * NB + cols[None, :],
                    mask=rm[:, None] & (cols < NB)[None, :], other=0).to(tl.int32)
        isnan = e == 255
        nan = tl.maximum(nan, tl.max(isnan.to(tl.int32), axis=1))
        emax = tl.maximum(emax, tl.max(tl.where(isnan, 0, e), axis=1))
    rs = _pow2(emax - OFFSET)
    tl.store(emax_ptr + rows, emax, mask=rm)
    tl.store(rs_ptr + rows, tl.where(nan != 0, float("nan"), rs), mask=rm)


def mx_row_scales(scales: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of biased E8M0 block exponents [R, NB] (uint8, 255 = NaN): the largest finite one (int32 [R]) and
    ``2^(emax − offset)`` (FP32 [R], NaN where the row holds a NaN block), in one Triton pass."""
    R, NB = scales.shape
    emax = torch.empty(R, device=scales.device, dtype=torch.int32)
    rs = torch.empty(R, device=scales.device, dtype=torch.float32)
    if R:
        BR, BB = 64, 32 if interpreting() else 128
        _mx_row_scale_kernel[(cdiv(R, BR),)](scales.contiguous(), emax, rs, R, NB, NUM_B=cdiv(NB, BB),
                                                    OFFSET=offset, BR=BR, BB=BB, num_warps=4)
    return emax, rs


def _block_k(k: int) -> int:
    for bk in (128, 64, 32):
        if k % bk == 0:
            return bk
    raise ValueError(f"FP8 GEMM: the reduction size {k} is not a multiple of the MX block ({MX_BLOCK})")


def _k_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _as_f32(v: torch.Tensor | None, n: int, name: str) -> torch.Tensor | None:
    if v is None:
        return None
    if v.shape != (n,):
        raise ValueError(f"fp8_rowscaled_gemm: {name} must have shape ({n},), got {tuple(v.shape)}")
    return v.float().contiguous()


def fp8_rowscaled_gemm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, *,
                       vec_n: torch.Tensor | None = None, vec_m: torch.Tensor | None = None,
                       r1: tuple[torch.Tensor, torch.Tensor] | None = None,
                       r2: tuple[torch.Tensor, torch.Tensor] | None = None,
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``sa[:,None]·sb[None,:]·(A·Bᵀ) + vec_n[None,:] + vec_m[:,None] + u1⊗v1 + u2⊗v2`` in FP32, cast to `out_dtype`.

    A [M, K], B [N, K]: float8_e4m3fn, K-contiguous, K a multiple of 32; sa [M], sb [N], vectors FP32. Exact per
    MX block on Hopper (module docstring); Triton on CUDA or under TRITON_INTERPRET=1, else FP32 torch."""
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fp8_rowscaled_gemm needs float8_e4m3fn operands, got {a.dtype} and {b.dtype}")
    (M, K), (N, K2) = a.shape, b.shape
    if K != K2:
        raise ValueError(f"fp8_rowscaled_gemm: reduction sizes differ ({K} vs {K2})")
    bk = _block_k(K)
    sa, sb = _as_f32(sa, M, "sa"), _as_f32(sb, N, "sb")
    vec_n, vec_m = _as_f32(vec_n, N, "vec_n"), _as_f32(vec_m, M, "vec_m")
    u1, v1 = (None, None) if r1 is None else (_as_f32(r1[0], M, "u1"), _as_f32(r1[1], N, "v1"))
    u2, v2 = (None, None) if r2 is None else (_as_f32(r2[0], M, "u2"), _as_f32(r2[1], N, "v2"))
    if not use_triton(a):
        c = (a.float() @ b.float().T) * sa[:, None] * sb[None, :]
        for v in (vec_n[None, :] if vec_n is not None else None, vec_m[:, None] if vec_m is not None else None,
                  u1[:, None] * v1[None, :] if u1 is not None else None,
                  u2[:, None] * v2[None, :] if u2 is not None else None):
            if v is not None:
                c = c + v
        return c.to(out_dtype)
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return c
    a, b = _k_contiguous(a), _k_contiguous(b)
    if interpreting():
        BM, BN, BK, warps, stages = 32, 32, min(bk, 64), 4, 1
    else:  # H200, 8192×4096×4096: 366 µs (750 TFLOP/s); 128×128 tiles with 8 warps 443 µs, BK=64 386 µs
        BM, BN, BK, warps, stages = 64, 128, bk, 4, 3 if bk == 128 else 4
    grid = (cdiv(M, BM) * cdiv(N, BN),)
    _fp8_gemm_kernel[grid](
        a, b, c, sa, sb, *(t if t is not None else sa for t in (vec_n, vec_m, u1, v1, u2, v2)),
        M, N, a.stride(0), b.stride(0), c.stride(0), NUM_K=K // BK,
        HAS_VN=vec_n is not None, HAS_VM=vec_m is not None, HAS_R1=u1 is not None, HAS_R2=u2 is not None,
        ROUND_BF16=out_dtype == torch.bfloat16, IMPRECISE=IMPRECISE_ACC,
        BM=BM, BN=BN, BK=BK, GROUP_M=8, num_warps=warps, num_stages=stages)
    return c


def fp8_rowscaled_matvec(w: torch.Tensor, scale: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FP32 ``scale · (W · v)`` for E4M3 W [R, K] (K-contiguous), FP32 scale [R] and v [≤ K] (zero-extended).

    Reads the FP8 bytes once (no FP32 copy of W): the rank-1 mean terms W·μ of the Averis linear."""
    R, K = w.shape
    if v.dim() != 1 or v.shape[0] > K:
        raise ValueError(f"fp8_rowscaled_matvec: v must be 1-D with at most {K} elements, got {tuple(v.shape)}")
    v = v.float().contiguous()
    if not use_triton(w):
        return torch.mv(w[:, :v.shape[0]].float(), v) * scale
    out = torch.empty(R, device=w.device, dtype=torch.float32)
    if R == 0:
        return out
    w = _k_contiguous(w)
    BR, BK = (16, 64) if interpreting() else (16, 256)
    _fp8_matvec_kernel[(cdiv(R, BR),)](w, scale.float().contiguous(), v, out, R, K, v.shape[0], w.stride(0),
                                              NUM_K=cdiv(K, BK), BR=BR, BK=BK, num_warps=4)
    return out
