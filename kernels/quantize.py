"""Fused Averis quantizer: per-channel mean over tokens, centring, NVFP4/MXFP4 (RTN or Philox SR), packing.

Three launches for a 2-D tensor X [M, K]:

1. ``_col_stats_kernel``: one read of X; per (row-chunk, column) partial sum, max, min.
   (Uncentred tensors, e.g. weights: ``_absmax_kernel`` instead, the global amax in one pass and no finalize.)
2. ``_finalize_kernel``: μ = Σ/M, the centred column amax ``max(colmax − μ, μ − colmin)`` (exact: FP32 subtraction
   is monotone, so ``max_i fl(x_i − μ) = fl(max_i x_i − μ)``), the global amax of R and of μ (atomic max on the bit
   pattern of non-negative floats: deterministic). NaN/Inf anywhere maps to +inf → tensor scale NaN, as the
   reference does.
3. ``_quant_kernel``: second read of X; centres a [BM, BK] tile in registers (no centred copy in memory) and
   quantizes it with blocks along K (row axis, the fprop/dgrad operand) and/or along M (column axis, the wgrad
   operand), writing packed codes + block scales and/or the exactly-dequantized BF16 values ``q·s_b`` (no tensor
   scale) that the BF16 GEMM path reads, and per-column sums of the column-axis values (wgrad rank-1 terms).
   With centring, the first row tile of each column block also quantizes μ (Q(μ) with its own tensor and block
   scales, `_quantize_mean_block`): no separate launch for the mean vector.

Numerics are `hf_lowbit.numerics` bit for bit (RTN) given the same mean. The NVFP4 quotient r / (s_b·s_t) comes
from the block's rounded reciprocal and four FMAs (default, ``HF_LOWBIT_QDIV=fma``, `fma_quotient`: Markstein's
correction, the IEEE value without a per-element reciprocal, range check or slow-path branch) or from the
per-element IEEE division (``HF_LOWBIT_QDIV=ieee``). Row blocks are loaded as [BM, K/B, B/2, 2] (pairs split in
registers for packing), column blocks as even/odd rows [BM/B, B/2, BK]; SR draws one Philox call per code pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hf_lowbit.kernels._common import (COMPILED, abs_max, cdiv, dummy_tensors, e2m1_rounded, e2m1_value, e4m3_rne,
                                       e8m0_from_amax, e8m0_inv_scale, e8m0_scale, env_choice, env_ints, env_setting,
                                       interpreting, next_pow2, round_e2m1)
from hf_lowbit.numerics import PackedTensor, get_format

__all__ = ["AverisQuant", "averis_quantize", "group_mean_quantized", "grouped_quantize_dq", "quantize_2d", "seed31"]


def seed31(*parts: int) -> int:
    """A 31-bit Philox seed derived from integers (SplitMix-style mixing)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return int(h & 0x7FFFFFFF)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def col_stats_update(x, mask, acc_s, acc_max, acc_min):
    """Add one loaded tile to running column sums / maxima / minima (`x` holds 0 where `mask` is off); NaN counts as
    +inf in the max, so a NaN column gets a non-finite scale."""
    acc_max = tl.maximum(acc_max, tl.where(mask, tl.where(x != x, float("inf"), x), float("-inf")))
    return acc_s + x, acc_max, tl.minimum(acc_min, tl.where(mask, x, float("inf")))


@triton.jit
def _absmax_kernel(x_ptr, sxm, sxk, M, K, amax_ptr, ROWS_PER: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """max |x| over a [ROWS_PER, BK] chunk, atomically maxed (as int bits) into amax_ptr[0], which the caller zeroed:
    the global amax of an uncentred tensor in one launch (NaN counts as +inf, as in the statistics pass)."""
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    cmask = cols < K
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    r0 = tl.program_id(1) * ROWS_PER
    for i in range(0, ROWS_PER, BM):
        rows = r0 + i + tl.arange(0, BM)
        mask = (rows < M)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxm + cols[None, :] * sxk, mask=mask,
                    other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.where(x != x, float("inf"), tl.abs(x)))
    tl.atomic_max(amax_ptr, tl.max(tl.max(acc, axis=1), axis=0).to(tl.int32, bitcast=True))


@triton.jit
def _col_stats_kernel(x_ptr, sxm, sxk, M, K, part_ptr, amax_ptr, ROWS_PER: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr):
    # part_ptr: [3, SPLIT, K] partial sums, maxima, minima (SPLIT = the grid's second axis)
    pk = tl.program_id(0)
    ps = tl.program_id(1)
    psum_ptr = part_ptr
    pmax_ptr = part_ptr + tl.num_programs(1) * K
    pmin_ptr = pmax_ptr + tl.num_programs(1) * K
    if (pk == 0) & (ps == 0):  # zero the [amax(R), amax(μ)] bits that _finalize_kernel atomically maxes into
        tl.store(amax_ptr + tl.arange(0, 2), tl.zeros([2], dtype=tl.int32))
    cols = pk * BK + tl.arange(0, BK)
    cmask = cols < K
    acc_s = tl.zeros([BM, BK], dtype=tl.float32)
    acc_max = tl.full([BM, BK], float("-inf"), tl.float32)
    acc_min = tl.full([BM, BK], float("inf"), tl.float32)
    r0 = ps * ROWS_PER
    for i in range(0, ROWS_PER, BM):
        rows = r0 + i + tl.arange(0, BM)
        mask = (rows < M)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxm + cols[None, :] * sxk, mask=mask,
                    other=0.0).to(tl.float32)
        acc_s, acc_max, acc_min = col_stats_update(x, mask, acc_s, acc_max, acc_min)
    tl.store(psum_ptr + ps * K + cols, tl.sum(acc_s, axis=0), mask=cmask)
    tl.store(pmax_ptr + ps * K + cols, tl.max(acc_max, axis=0), mask=cmask)
    tl.store(pmin_ptr + ps * K + cols, tl.min(acc_min, axis=0), mask=cmask)


@triton.jit
def _finalize_kernel(part_ptr, SPLIT, Mf, K, out_ptr, amax_ptr,
                     CENTER: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr):
    # part_ptr: [3, SPLIT, K] from _col_stats_kernel; out_ptr: mean [K] then centred column amax [K]
    pk = tl.program_id(0)
    psum_ptr = part_ptr
    pmax_ptr = part_ptr + SPLIT * K
    pmin_ptr = pmax_ptr + SPLIT * K
    mean_ptr = out_ptr
    camax_ptr = out_ptr + K
    cols = pk * BK + tl.arange(0, BK)
    cmask = cols < K
    s = tl.arange(0, BS)
    m2 = (s < SPLIT)[:, None] & cmask[None, :]
    off = s[:, None] * K + cols[None, :]
    tot = tl.sum(tl.load(psum_ptr + off, mask=m2, other=0.0), axis=0)
    mx = tl.max(tl.load(pmax_ptr + off, mask=m2, other=float("-inf")), axis=0)
    mn = tl.min(tl.load(pmin_ptr + off, mask=m2, other=float("inf")), axis=0)
    if CENTER:
        mu = tl.math.div_rn(tot, tl.zeros_like(tot) + Mf)
        ca = tl.maximum(mx - mu, mu - mn)
        ok = (tot == tot) & (tl.abs(tot) < float("inf"))
        ca = tl.where(ok, ca, float("inf"))
        tl.store(mean_ptr + cols, mu, mask=cmask)
        amu = tl.where(mu != mu, float("inf"), tl.abs(mu))
        amu = tl.where(cmask, amu, 0.0)
        tl.atomic_max(amax_ptr + 1, tl.max(amu, axis=0).to(tl.int32, bitcast=True))
    else:
        ca = tl.maximum(mx, -mn)
    ca = tl.where(cmask, ca, 0.0)
    tl.store(camax_ptr + cols, ca, mask=cmask)
    tl.atomic_max(amax_ptr, tl.max(ca, axis=0).to(tl.int32, bitcast=True))


@triton.jit
def _nv_tensor_scale(amax_ptr):
    gam = tl.load(amax_ptr).to(tl.float32, bitcast=True)
    g = tl.zeros([1], dtype=tl.float32) + gam
    ts = tl.where(g < float("inf"), tl.math.div_rn(g, tl.zeros_like(g) + 2688.0), float("nan"))
    return tl.sum(ts, axis=0)  # back to a scalar


@triton.jit
def _nv_block_scale(amax_b, ts):
    """E4M3 block scale for block maxima `amax_b` under tensor scale `ts` → (decoded FP32, byte int32)."""
    safe_ts = tl.where(ts == 0, 1.0, ts)
    s = tl.math.div_rn(tl.math.div_rn(amax_b, tl.zeros_like(amax_b) + 6.0), tl.zeros_like(amax_b) + safe_ts)
    s = tl.where(ts == 0, 0.0, s)
    s = tl.where(s > 448.0, 448.0, s)
    sbf, sbyte = e4m3_rne(s)
    return sbf, sbyte


@triton.jit
def _nv_scales(amax_b, ts):
    """A tile's NVFP4 block scales under tensor scale `ts` (NaN where `ts` is): decoded FP32, byte, the divisor
    s_b·s_t and its rounded reciprocal with the division-free path's flag (`nv_inv_den`)."""
    sbf, sbyte = _nv_block_scale(amax_b, ts)
    sbf = tl.where(ts != ts, float("nan"), sbf)
    den = sbf * ts
    y, bad = nv_inv_den(den)
    return sbf, sbyte, den, y, bad


@triton.jit
def nv_inv_den(den):
    """Per-block reciprocal y = RN(1/d) of the NVFP4 divisor d = s_b·s_t (0 where d = 0) and a flag for blocks whose
    d lies outside [2^-100, 2^100] (NaN included), where the FMA quotient's exactness is not proven."""
    ok = (den >= 7.888609052210118e-31) & (den <= 1.2676506002282294e30)
    y = tl.math.div_rn(tl.zeros_like(den) + 1.0, tl.where(ok, den, 1.0))
    y = tl.where(den == 0, 0.0, y)
    bad = (den != 0) & (ok == 0)
    return y, bad


@triton.jit
def fma_quotient(r, den, y):
    """fl(r / den) from the block's correctly rounded reciprocal y = RN(1/den) with four FMAs and no per-element
    division (den in [2^-100, 2^100], r finite): q0 = RN(r·y) is within 1.5 ulp of r/den; one correction
    q1 = RN(q0 + (r − den·q0)·y) is faithful; Markstein's theorem (y within ½ ulp of 1/den, q1 within 1 ulp of r/den)
    makes the remainder r − den·q1 exact in one FMA and RN(q1 + remainder·y) the correctly rounded quotient
    (proof and checks: benchmarks/NOTES.md, 2026-11-30 sixth session; tests/test_kernels.py, exact rational
    arithmetic)."""
    q0 = r * y
    q1 = tl.fma(tl.fma(-den, q0, r), y, q0)
    return tl.fma(tl.fma(-den, q1, r), y, q1)


@triton.jit
def _nv_scaled(r, den, y, bad, SR: tl.constexpr, FMA_QUOT: tl.constexpr):
    """The scaled residual whose E2M1 rounding gives the reference's codes: fl(r / den) (0 where den = 0), with
    `den`, `y`, `bad` already broadcast against `r`.

    FMA_QUOT (RTN, compiled): `fma_quotient`, the same FP32 value as the IEEE division in half its instructions
    (no per-element reciprocal, range check and slow-path branch); a tile with a block outside the proven divisor
    range takes the IEEE division. The CPU interpreter's FMA is not fused, so there the division runs. SR needs no
    bit-exactness (its noise is not the reference's): always the multiply."""
    if SR:
        q = r * y
    elif FMA_QUOT and COMPILED:
        if tl.max(bad.to(tl.int32)) > 0:
            q = _ieee_quotient(r, den)
        else:
            q = fma_quotient(r, den, y)
    else:
        q = _ieee_quotient(r, den)
    return q


@triton.jit
def _ieee_quotient(r, den):
    """fl(r / den) by IEEE division, 0 where den = 0 (an all-zero block)."""
    return tl.where(den == 0, 0.0, tl.math.div_rn(r, tl.where(den == 0, 1.0, den)))


@triton.jit
def _uniform(x):
    return tl.random.uint_to_uniform_float(x)


@triton.jit
def _group_tensor_scale(tsg_ptr, grp, mask):
    """Per-row (or per-block-row) tensor scale of a GROUPED launch, shaped [n, 1] to broadcast over blocks."""
    return tl.load(tsg_ptr + grp, mask=mask, other=1.0)[:, None]


# Seeds change every call, and N_MT (the row-tile count) every step in the grouped MoE mode (the capacity changes):
# specializing on them (Triton specializes ints on `% 16 == 0` and `== 1`) would compile more variants of the
# kernel, each at a random later training step (a multi-second stall each time).
@triton.jit(do_not_specialize=["seed_row", "seed_col", "seed_mean", "N_MT"])
def _quant_kernel(x_ptr, sxm, sxk, M, K, MP, KP, mean_ptr, amax_ptr,
                  rc_ptr, rs_ptr, rdq_ptr, cc_ptr, cs_ptr, cdq_ptr, csum_ptr,
                  seed_row, seed_col, N_MT, ts_out_ptr, GL, ROW_EXTRA, tsg_ptr, rowok_ptr, meanq_ptr, seed_mean,
                  BM: tl.constexpr, BK: tl.constexpr, B: tl.constexpr, IS_NV: tl.constexpr,
                  CENTER: tl.constexpr, SR: tl.constexpr, MX_CEIL: tl.constexpr, FMA_QUOT: tl.constexpr,
                  ROW: tl.constexpr, ROW_PACK: tl.constexpr, ROW_DQ: tl.constexpr,
                  COL: tl.constexpr, COL_PACK: tl.constexpr, COL_DQ: tl.constexpr, COL_SUM: tl.constexpr,
                  GROUPED: tl.constexpr, MEAN_Q: tl.constexpr):
    # GROUPED: x is G stacked groups of GL rows (MoE experts, GL a multiple of B); each group has its own mean
    # (mean_ptr [G, K]) and tensor scale (tsg_ptr [G]); rows with rowok == 0 (capacity padding) quantize as 0; the
    # row-axis output holds GL + ROW_EXTRA rows per group (room for a row the caller appends, e.g. the mean's)
    # MEAN_Q: the first row tile of each column block also quantizes μ's columns (Q(μ) into meanq_ptr; no launch)
    # tiles in reverse row order: the stats pass ended on the last rows, which may still sit in L2
    pm = N_MT - 1 - tl.program_id(0)
    pk = tl.program_id(1)
    HB: tl.constexpr = B // 2
    NBK: tl.constexpr = BK // B
    NBM: tl.constexpr = BM // B
    if IS_NV:
        if not GROUPED:
            ts = _nv_tensor_scale(amax_ptr)
            if (pm == N_MT - 1) & (pk == 0):
                tl.store(ts_out_ptr, ts)  # the tensor scale for the host side (no extra torch ops)
    if MEAN_Q:
        if pm == N_MT - 1:
            _quantize_mean_block(mean_ptr, K, pk, amax_ptr, meanq_ptr, seed_mean, ts_out_ptr, BK, B, IS_NV, SR,
                                 MX_CEIL)

    if ROW:
        # [BM, BK] load (16-byte vectors), viewed as [BM, NBK, HB, 2]: block nb of row m, pair j, element p
        rows = pm * BM + tl.arange(0, BM)
        cols = pk * BK + tl.arange(0, BK)
        nb = tl.arange(0, NBK)
        jj = tl.arange(0, HB)
        rmask = rows < M
        cmask = cols < K
        mask2 = rmask[:, None] & cmask[None, :]
        x2 = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxm + cols[None, :] * sxk, mask=mask2,
                     other=0.0).to(tl.float32)
        if GROUPED:
            grp = rows // GL
            ok = rmask & (tl.load(rowok_ptr + rows, mask=rmask, other=0) != 0)
            valid2 = ok[:, None] & cmask[None, :]
            mu = tl.load(mean_ptr + grp[:, None].to(tl.int64) * K + cols[None, :], mask=valid2, other=0.0)
            r2 = tl.where(valid2, x2 - mu, 0.0)
        elif CENTER:
            mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
            r2 = tl.where(mask2, x2 - mu[None, :], 0.0)
        else:
            r2 = x2
        r = tl.reshape(r2, [BM, NBK, HB, 2])
        amax_b = abs_max(tl.reshape(r, [BM, NBK, B]), 2)
        if SR:
            # one Philox call per 4 elements (all four words used): element (pair jj = 2q + s, p) takes word 2p + s
            QB: tl.constexpr = HB // 2
            qq = tl.arange(0, QB)
            qoff = rows[:, None, None] * (KP // 4) + (pk * (BK // 4) + nb[:, None] * QB + qq[None, :])[None, :, :]
            u0, u1, u2, u3 = tl.randint4x(seed_row, qoff)
            rnd = tl.reshape(tl.join(tl.join(_uniform(u0), _uniform(u1)), tl.join(_uniform(u2), _uniform(u3))),
                             [BM, NBK, HB, 2])
        else:
            rnd = 0.0
        if IS_NV:
            if GROUPED:
                tsr = _group_tensor_scale(tsg_ptr, grp, rmask)
            else:
                tsr = ts
            sbf, sbyte, den, y, bad = _nv_scales(amax_b, tsr)
            q = _nv_scaled(r, den[:, :, None, None], y[:, :, None, None], bad[:, :, None, None], SR, FMA_QUOT)
        else:
            sbyte = e8m0_from_amax(amax_b, MX_CEIL)
            sbf = e8m0_scale(sbyte)
            q = r * e8m0_inv_scale(sbyte)[:, :, None, None]
        if ROW_PACK:
            lo, hi = tl.split(round_e2m1(q, SR, rnd))
            byte = (lo | (hi << 4)).to(tl.uint8)
            kk = pk * (BK // 2) + nb[:, None] * HB + jj[None, :]
            tl.store(rc_ptr + rows[:, None, None].to(tl.int64) * (KP // 2) + kk[None, :, :], byte,
                     mask=rmask[:, None, None] & (kk < KP // 2)[None, :, :])
            kb = pk * NBK + nb
            tl.store(rs_ptr + rows[:, None].to(tl.int64) * (KP // B) + kb[None, :], sbyte.to(tl.uint8),
                     mask=rmask[:, None] & (kb < KP // B)[None, :])
        if ROW_DQ:
            v = tl.reshape(e2m1_rounded(q, SR, rnd) * sbf[:, :, None, None], [BM, BK])
            orow = rows + (rows // GL) * ROW_EXTRA if GROUPED else rows
            tl.store(rdq_ptr + orow[:, None].to(tl.int64) * K + cols[None, :], v.to(tl.bfloat16), mask=mask2)

    if COL:
        # even / odd rows of each column block as two [NBM, HB, BK] tensors (the second load hits L1/L2)
        cols = pk * BK + tl.arange(0, BK)
        cmask = cols < K
        mb = tl.arange(0, NBM)
        jm = tl.arange(0, HB)
        rowe = pm * BM + mb[:, None] * B + jm[None, :] * 2
        me = (rowe < M)[:, :, None] & cmask[None, None, :]
        mo = (rowe + 1 < M)[:, :, None] & cmask[None, None, :]
        pe = x_ptr + rowe[:, :, None].to(tl.int64) * sxm + cols[None, None, :] * sxk
        xe = tl.load(pe, mask=me, other=0.0).to(tl.float32)
        xo = tl.load(pe + sxm, mask=mo, other=0.0).to(tl.float32)
        if GROUPED:
            G = M // GL
            grp_b = (pm * BM + mb * B) // GL  # blocks never straddle groups: GL is a multiple of B
            oke = (rowe < M) & (tl.load(rowok_ptr + rowe, mask=rowe < M, other=0) != 0)
            oko = (rowe + 1 < M) & (tl.load(rowok_ptr + rowe + 1, mask=rowe + 1 < M, other=0) != 0)
            gmask = (grp_b < G)[:, None, None] & cmask[None, None, :]
            muc = tl.load(mean_ptr + grp_b[:, None, None].to(tl.int64) * K + cols[None, None, :], mask=gmask,
                          other=0.0)
            re = tl.where(oke[:, :, None] & cmask[None, None, :], xe - muc, 0.0)
            ro = tl.where(oko[:, :, None] & cmask[None, None, :], xo - muc, 0.0)
        elif CENTER:
            muc = tl.load(mean_ptr + cols, mask=cmask, other=0.0)[None, None, :]
            re = tl.where(me, xe - muc, 0.0)
            ro = tl.where(mo, xo - muc, 0.0)
        else:
            re = xe
            ro = xo
        amax_c = abs_max(tl.maximum(tl.abs(re), tl.abs(ro), propagate_nan=tl.PropagateNan.ALL), 1)
        if SR:
            # one Philox call per 2 rows × 2 columns: even row (v0, v1), odd row (v2, v3) for columns 2c, 2c + 1
            cq = pk * (BK // 2) + tl.arange(0, BK // 2)
            coff = (rowe // 2)[:, :, None] * ((K + 1) // 2) + cq[None, None, :]
            v0, v1, v2, v3 = tl.randint4x(seed_col, coff)
            rnd_e = tl.reshape(tl.join(_uniform(v0), _uniform(v1)), [NBM, HB, BK])
            rnd_o = tl.reshape(tl.join(_uniform(v2), _uniform(v3)), [NBM, HB, BK])
        else:
            rnd_e = 0.0
            rnd_o = 0.0
        if IS_NV:
            if GROUPED:
                tsc = _group_tensor_scale(tsg_ptr, grp_b, grp_b < G)
            else:
                tsc = ts
            sbf_c, sbyte_c, den_c, y_c, bad_c = _nv_scales(amax_c, tsc)
            d3 = den_c[:, None, :]
            y3 = y_c[:, None, :]
            b3 = bad_c[:, None, :]
            qe = _nv_scaled(re, d3, y3, b3, SR, FMA_QUOT)
            qo = _nv_scaled(ro, d3, y3, b3, SR, FMA_QUOT)
        else:
            sbyte_c = e8m0_from_amax(amax_c, MX_CEIL)
            sbf_c = e8m0_scale(sbyte_c)
            inv_c = e8m0_inv_scale(sbyte_c)[:, None, :]
            qe = re * inv_c
            qo = ro * inv_c
        if COL_PACK:
            ce = round_e2m1(qe, SR, rnd_e)
            co = round_e2m1(qo, SR, rnd_o)
            byte_c = tl.trans(tl.reshape((ce | (co << 4)).to(tl.uint8), [BM // 2, BK]))
            mm = pm * (BM // 2) + tl.arange(0, BM // 2)
            tl.store(cc_ptr + cols[:, None].to(tl.int64) * (MP // 2) + mm[None, :], byte_c,
                     mask=cmask[:, None] & (mm < MP // 2)[None, :])
            mbg = pm * NBM + mb
            tl.store(cs_ptr + cols[:, None].to(tl.int64) * (MP // B) + mbg[None, :],
                     tl.trans(sbyte_c).to(tl.uint8), mask=cmask[:, None] & (mbg < MP // B)[None, :])
        if COL_DQ or COL_SUM:
            s3 = sbf_c[:, None, :]
            ve = e2m1_rounded(qe, SR, rnd_e) * s3
            vo = e2m1_rounded(qo, SR, rnd_o) * s3
            if COL_DQ:
                pd = cdq_ptr + rowe[:, :, None].to(tl.int64) * K + cols[None, None, :]
                tl.store(pd, ve.to(tl.bfloat16), mask=me)
                tl.store(pd + K, vo.to(tl.bfloat16), mask=mo)
            if COL_SUM:
                blk = tl.sum(tl.where(me, ve, 0.0) + tl.where(mo, vo, 0.0), axis=1)  # [NBM, BK]: per row block
                if GROUPED:  # one row per block of B rows (blocks never straddle groups): the caller sums a group's
                    mbs = pm * NBM + mb
                    tl.store(csum_ptr + mbs[:, None].to(tl.int64) * K + cols[None, :], blk,
                             mask=(mbs < M // B)[:, None] & cmask[None, :])
                else:
                    tl.store(csum_ptr + pm * K + cols, tl.sum(blk, axis=0), mask=cmask)


@triton.jit
def _quantize_vector_block(mu, cols, ts, seed, BK: tl.constexpr, B: tl.constexpr, IS_NV: tl.constexpr,
                           SR: tl.constexpr, MX_CEIL: tl.constexpr):
    """Q(v) of one [BK] chunk of a vector (blocks of B) → (values with the tensor scale, values without it), FP32.
    `ts` is the NVFP4 tensor scale (ignored for MXFP4); SR draws Philox(seed, cols)."""
    NB: tl.constexpr = BK // B
    m2 = tl.reshape(mu, [NB, B])
    amax_b = abs_max(m2, 1)
    if IS_NV:
        sbf, sbyte = _nv_block_scale(amax_b, ts)
        sbf = tl.where(ts != ts, float("nan"), sbf)
        den = (sbf * ts)[:, None]
        scaled = _ieee_quotient(m2, den)
    else:
        b = e8m0_from_amax(amax_b, MX_CEIL)
        sbf = e8m0_scale(b)
        scaled = m2 * e8m0_inv_scale(b)[:, None]
    if SR:
        rnd = tl.reshape(tl.rand(seed, cols), [NB, B])
    else:
        rnd = 0.0
    vu = e2m1_rounded(scaled, SR, rnd) * sbf[:, None]
    if IS_NV:
        v = vu * ts
    else:
        v = vu
    return tl.reshape(v, [BK]), tl.reshape(vu, [BK])


@triton.jit
def _quantize_mean_block(mean_ptr, K, pk, amax_ptr, meanq_ptr, seed, ts_out_ptr, BK: tl.constexpr, B: tl.constexpr,
                         IS_NV: tl.constexpr, SR: tl.constexpr, MX_CEIL: tl.constexpr):
    """Q(μ) of columns [pk·BK, (pk+1)·BK) with μ's own tensor scale (from the amax bits at amax_ptr + 1) and block
    scales: dequantized into meanq_ptr[:K], without the tensor scale into meanq_ptr[K:2K]; column block 0 also
    stores μ's tensor scale at ts_out_ptr + 1. Blocks of B along K, so the result does not depend on BK."""
    cols = pk * BK + tl.arange(0, BK)
    cmask = cols < K
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    ts = 0.0
    if IS_NV:
        ts = _nv_tensor_scale(amax_ptr + 1)
        if pk == 0:
            tl.store(ts_out_ptr + 1, ts)
    v, vu = _quantize_vector_block(mu, cols, ts, seed, BK, B, IS_NV, SR, MX_CEIL)
    tl.store(meanq_ptr + cols, v, mask=cmask)
    tl.store(meanq_ptr + K + cols, vu, mask=cmask)


@triton.jit(do_not_specialize=["seed"])
def _group_mean_quant_kernel(mu_ptr, K, out_ptr, outu_ptr, ts_ptr, seed, NUM_K: tl.constexpr, BK: tl.constexpr,
                             B: tl.constexpr, IS_NV: tl.constexpr, SR: tl.constexpr, MX_CEIL: tl.constexpr):
    """Q(μ_g) of one group's mean vector μ [G, K] per program, with the group's own tensor scale (NVFP4: amax over
    the row / 2688, NaN when not finite): values into out [G, K], without the tensor scale into outu [G, K] (BF16,
    exact), the tensor scales into ts [G]. SR draws Philox(seed, g·K + column)."""
    g32 = tl.program_id(0)
    g = g32.to(tl.int64)
    ts = 0.0
    if IS_NV:
        amax = tl.zeros([BK], dtype=tl.float32)
        for it in range(NUM_K):
            cols = it * BK + tl.arange(0, BK)
            mu = tl.load(mu_ptr + g * K + cols, mask=cols < K, other=0.0)
            amax = tl.maximum(amax, tl.where(mu != mu, float("inf"), tl.abs(mu)))
        gam = tl.max(amax, axis=0)
        ts = tl.where(gam < float("inf"), tl.math.div_rn(gam, 2688.0), float("nan"))
        tl.store(ts_ptr + g, ts)
    for it in range(NUM_K):
        cols = it * BK + tl.arange(0, BK)
        cmask = cols < K
        mu = tl.load(mu_ptr + g * K + cols, mask=cmask, other=0.0)
        v, vu = _quantize_vector_block(mu, g32 * K + cols, ts, seed, BK, B, IS_NV, SR, MX_CEIL)
        tl.store(out_ptr + g * K + cols, v, mask=cmask)
        tl.store(outu_ptr + g * K + cols, vu.to(tl.bfloat16), mask=cmask)


def group_mean_quantized(mu: torch.Tensor, format: str, rounding: str = "rtn", seed: int = 0,
                         mx_scale: str = "floor") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Q(μ_g) of every group's mean μ [G, K] with per-group tensor scales, in one launch: (FP32 values, BF16
    code × block scale, FP32 tensor scales [G] or None for MXFP4) — `numerics.quantize(μ, slices=True)` bit for
    bit with RTN (the MoE experts' mean terms; a torch implementation costs dozens of small ops per call)."""
    if mu.dim() != 2 or mu.numel() == 0:
        raise ValueError(f"group_mean_quantized: mu has shape {tuple(mu.shape)}; allowed: a non-empty [G, K] tensor")
    if rounding not in ("rtn", "sr"):
        raise ValueError(f"group_mean_quantized: rounding={rounding!r} is not supported; allowed: ['rtn', 'sr']")
    fmt = get_format(format)
    g, k = mu.shape
    dev = mu.device
    mu = mu.float().contiguous()
    out = torch.empty((g, k), device=dev, dtype=torch.float32)
    outu = torch.empty((g, k), device=dev, dtype=torch.bfloat16)
    is_nv = fmt.scale_kind == "e4m3"
    ts = torch.empty(g, device=dev, dtype=torch.float32) if is_nv else None
    bk = max(fmt.block_size, min(1024, next_pow2(k)))
    _group_mean_quant_kernel[(g,)](mu, k, out, outu, ts if ts is not None else out, seed, NUM_K=cdiv(k, bk), BK=bk,
                                   B=fmt.block_size,
                                   IS_NV=is_nv, SR=rounding == "sr", MX_CEIL=mx_scale == "ceil", num_warps=4)
    return out, outu, ts


# ---------------------------------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class AverisQuant:
    """Everything the fused quantizer produced for one 2-D tensor Z [M, K] (R = Z − 1·μ, or Z if not centred)."""

    mean: torch.Tensor | None            # μ, FP32 [K]
    mean_q: torch.Tensor | None          # Q(μ) dequantized, FP32 [K] (== reference quantize_mean)
    mean_q_unscaled: torch.Tensor | None  # Q(μ) codes × block scales (no tensor scale), FP32 [K]
    mean_tensor_scale: torch.Tensor | None
    tensor_scale: torch.Tensor | None    # NVFP4 FP32 tensor scale of R (0-d), None for MXFP4
    row: PackedTensor | None             # blocks along K: codes [M, KP/2], scales [M, KP/B]
    col: PackedTensor | None             # blocks along M: codes [K, MP/2], scales [K, MP/B]
    row_dq: torch.Tensor | None          # BF16 [M, K] = code × block scale (row blocks), exact
    col_dq: torch.Tensor | None          # BF16 [M, K] = code × block scale (column blocks), exact
    col_sum: torch.Tensor | None         # FP32 [K]: Σ_m of the column-axis values (no tensor scale)
    camax: torch.Tensor | None           # FP32 [K]: max_m |R| per column (non-finite → inf); centred only


def _cfg(M: int, K: int, B: int, row: bool, col: bool) -> tuple[int, int, int]:
    """(BM, BK, num_warps) of the quantize launch; HF_LOWBIT_QCFG="BM,BK,W" overrides (benchmark sweeps)."""
    if interpreting():
        return max(B, 32), max(B, 32), 4
    env = env_ints("HF_LOWBIT_QCFG", (1, 1, 1))
    if env:
        bm, bk, w = env
        return max(bm, B), max(bk, B), w
    if row and not col:
        return 32, 128, 4
    if col and not row:
        return 64, 64, 4
    return 64, 64, 4


#: HF_LOWBIT_QDIV: how the NVFP4 RTN quotient is formed, default first. Both give the IEEE quotient bit for bit; "fma"
#: (block reciprocal + four FMAs) took P8 (MoE experts fwd+bwd, H200) from 11.44 to 11.10 ms (NOTES, sixth session)
QDIV_MODES = ("fma", "ieee")


def _fma_quotient_on() -> bool:
    """The FMA quotient (`fma_quotient`) instead of the per-element IEEE division: the same values, fewer
    instructions (HF_LOWBIT_QDIV, see QDIV_MODES)."""
    return env_choice("HF_LOWBIT_QDIV", QDIV_MODES) == "fma"


class _StatsPlan(NamedTuple):
    """Launch geometry of the statistics kernels (and of `_absmax_kernel`, which shares the first pass's)."""

    grid: tuple          # (column blocks, row splits) of the first pass
    consts: dict         # its BM, BK, num_warps
    rows_per: int
    split: int
    grid_finalize: tuple
    m_float: float
    consts_finalize: dict


_STATS_PLANS: dict[tuple, _StatsPlan] = {}


def _stats_plan(M: int, K: int) -> _StatsPlan:
    """Launch geometry of the two statistics kernels for an [M, K] input, computed once per shape (host time:
    this runs for every quantized activation and gradient)."""
    scfg = env_ints("HF_LOWBIT_SCFG", (1, 1, 1)) or (32, 128, 4)
    key = (M, K, scfg)
    plan = _STATS_PLANS.get(key)
    if plan is None:
        if interpreting():
            BMS, BKS, split, SW = 16, 32, 2, 4
        else:
            BMS, BKS, SW = scfg
            split = max(1, min(cdiv(M, BMS), (4 * 132) // max(1, cdiv(K, BKS)) + 1))
        # rows per program: a power of two (>= BMS), so that new token counts reuse a few compiled variants
        rows_per = max(BMS, next_pow2(cdiv(M, split)))
        split = cdiv(M, rows_per)
        BKF = 32 if interpreting() else 128
        plan = _STATS_PLANS[key] = _StatsPlan((cdiv(K, BKS), split), dict(BM=BMS, BK=BKS, num_warps=SW), rows_per,
                                              split, (cdiv(K, BKF),), float(M),
                                              dict(BK=BKF, BS=next_pow2(split), num_warps=4))
    return plan


def _launch_stats(x: torch.Tensor, center: bool, buf: torch.Tensor) -> torch.Tensor:
    """The statistics kernels: mean into ``buf[:K]``, centred column amax into ``buf[K:2K]``; returns the global
    amax bits [amax(R), amax(μ)] (int32, atomics)."""
    M, K = x.shape
    dev = x.device
    grid_s, cfg_s, rows_per, split, grid_f, mf, cfg_f = _stats_plan(M, K)
    part = torch.empty(3 * split * K, device=dev, dtype=torch.float32)
    amax = torch.empty(2, device=dev, dtype=torch.int32)  # zeroed by the stats kernel (no memset launch)
    _col_stats_kernel[grid_s](x, x.stride(0), x.stride(1), M, K, part, amax, rows_per, **cfg_s)
    _finalize_kernel[grid_f](part, split, mf, K, buf, amax, CENTER=center, **cfg_f)
    return amax


def _stats(x: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Column mean, centred column amax and the global amax bits [amax(R), amax(μ)] (int32) of `x` [M, K]."""
    buf = torch.empty(2 * x.shape[1], device=x.device, dtype=torch.float32)
    amax = _launch_stats(x, center, buf)
    return buf[:x.shape[1]], buf[x.shape[1]:], amax


@dataclass(frozen=True)
class _QuantPlan:
    """Everything about one quantize launch that depends only on the shape and the options (cached per key)."""

    fmt_name: str
    B: int
    is_nv: bool
    MP: int
    KP: int
    n_mt: int
    grid: tuple
    consts: dict          # the quantize kernel's constexpr arguments and num_warps


_QUANT_PLANS: dict[tuple, _QuantPlan] = {}


def _quant_plan(M: int, K: int, format: str, center: bool, sr: bool, row: bool, col: bool, row_packed: bool,
                row_dq: bool, col_packed: bool, col_dq: bool, col_sum: bool, mx_scale: str) -> _QuantPlan:
    key = (M, K, format, center, sr, row, col, row_packed, row_dq, col_packed, col_dq, col_sum, mx_scale,
           env_setting("HF_LOWBIT_QCFG"), _fma_quotient_on())
    plan = _QUANT_PLANS.get(key)
    if plan is not None:
        return plan
    fmt = get_format(format)
    B = fmt.block_size
    is_nv = fmt.scale_kind == "e4m3"
    MP = cdiv(M, B) * B
    KP = cdiv(K, B) * B
    BM, BK, nw = _cfg(M, K, B, row, col)
    n_mt = cdiv(MP, BM)
    consts = dict(BM=BM, BK=BK, B=B, IS_NV=is_nv, CENTER=center, SR=sr, MX_CEIL=mx_scale == "ceil",
                  FMA_QUOT=_fma_quotient_on(), ROW=row, ROW_PACK=row and row_packed, ROW_DQ=row and row_dq,
                  COL=col, COL_PACK=col and col_packed, COL_DQ=col and col_dq, COL_SUM=col and col_sum,
                  GROUPED=False, MEAN_Q=center, num_warps=nw)
    plan = _QUANT_PLANS[key] = _QuantPlan(fmt.name, B, is_nv, MP, KP, n_mt, (n_mt, cdiv(KP, BK)), consts)
    return plan


def check_rounding_args(rounding: str, mx_scale: str) -> None:
    """The quantizers' `rounding` and `mx_scale` arguments, refused by name before any launch."""
    if rounding not in ("rtn", "sr"):
        raise ValueError(f"rounding={rounding!r} is not supported; allowed: ['rtn', 'sr']")
    if mx_scale not in ("floor", "ceil"):
        raise ValueError(f"mx_scale={mx_scale!r} is not supported; allowed: ['floor', 'ceil']")


def averis_quantize(x: torch.Tensor, format: str = "nvfp4", center: bool = True, rounding: str = "rtn",
                    seed: int = 0, row: bool = True, col: bool = False, row_packed: bool = True,
                    row_dq: bool = False, col_packed: bool = True, col_dq: bool = False, col_sum: bool = False,
                    mx_scale: str = "floor") -> AverisQuant:
    """Fused mean / centre / quantize of a 2-D tensor `x` [M, K] (any strides, BF16/FP16/FP32).

    `rounding` applies to the residual and the mean; SR streams are Philox(seed, element index), one stream per
    axis and one for the mean. Returns an :class:`AverisQuant`.
    """
    if x.dim() != 2:
        raise ValueError(f"averis_quantize needs a 2-D tensor, got shape {tuple(x.shape)}")
    check_rounding_args(rounding, mx_scale)
    M, K = x.shape
    if M == 0 or K == 0:
        raise ValueError("averis_quantize needs a non-empty tensor")
    sr = rounding == "sr"
    plan = _quant_plan(M, K, format, center, sr, row, col, row_packed, row_dq, col_packed, col_dq, col_sum,
                       mx_scale)
    B, MP, KP = plan.B, plan.MP, plan.KP
    dev = x.device
    # one FP32 allocation for the small outputs: mean, camax, Q(μ), Q(μ) unscaled, tensor scales of R and μ
    buf = torch.empty(4 * K + 2, device=dev, dtype=torch.float32)
    mean, camax, mean_q, mean_qu, ts_buf = torch.split_with_sizes(buf, [K, K, K, K, 2])
    if center:
        amax = _launch_stats(x, center, buf)
    else:  # uncentred: only the global amax (NVFP4 tensor scale), one launch after a memset; MXFP4 needs none
        mean = camax = None
        amax = torch.zeros(2, device=dev, dtype=torch.int32)
        if plan.is_nv:
            plan_s = _stats_plan(M, K)
            _absmax_kernel[plan_s.grid](x, x.stride(0), x.stride(1), M, K, amax, plan_s.rows_per, **plan_s.consts)
    dummy_u8, dummy_bf, dummy_f = dummy_tensors(dev)
    rc = rs = cc = cs = rdq = cdq = csum = None
    if row and row_packed:
        rc = torch.empty((M, KP // 2), device=dev, dtype=torch.uint8)
        rs = torch.empty((M, KP // B), device=dev, dtype=torch.uint8)
    if row and row_dq:
        rdq = torch.empty((M, K), device=dev, dtype=torch.bfloat16)
    if col and col_packed:
        cc = torch.empty((K, MP // 2), device=dev, dtype=torch.uint8)
        cs = torch.empty((K, MP // B), device=dev, dtype=torch.uint8)
    if col and col_dq:
        cdq = torch.empty((M, K), device=dev, dtype=torch.bfloat16)
    if col and col_sum:
        csum = torch.empty((plan.n_mt, K), device=dev, dtype=torch.float32)
    _quant_kernel[plan.grid](
        x, x.stride(0), x.stride(1), M, K, MP, KP, mean if mean is not None else dummy_f, amax,
        rc if rc is not None else dummy_u8, rs if rs is not None else dummy_u8,
        rdq if rdq is not None else dummy_bf, cc if cc is not None else dummy_u8,
        cs if cs is not None else dummy_u8, cdq if cdq is not None else dummy_bf,
        csum if csum is not None else dummy_f, seed31(seed, 1), seed31(seed, 2), plan.n_mt, ts_buf, M, 0, dummy_f,
        dummy_u8, mean_q if center else dummy_f, seed31(seed, 3), **plan.consts)
    ts = mts = None
    if plan.is_nv:
        ts, mts = ts_buf.unbind()
    if not center:
        mean = mean_q = mean_qu = mts = None
    rowp = PackedTensor(rc, rs, ts, (M, K), 1, plan.fmt_name, False) if rc is not None else None
    colp = PackedTensor(cc, cs, ts, (M, K), 0, plan.fmt_name, False) if cc is not None else None
    return AverisQuant(mean, mean_q, mean_qu, mts, ts, rowp, colp, rdq, cdq,
                       None if csum is None else csum.sum(0), camax)


def _as_bytes(rowok: torch.Tensor) -> torch.Tensor:
    """A row mask as contiguous uint8 (a bool mask is reinterpreted in place: no copy launch)."""
    rowok = rowok.contiguous()
    return rowok.view(torch.uint8) if rowok.dtype == torch.bool else rowok.to(torch.uint8)


def grouped_quantize_dq(x: torch.Tensor, group_rows: int, rowok: torch.Tensor, mean: torch.Tensor,
                        tensor_scale: torch.Tensor | None, format: str = "nvfp4", rounding: str = "rtn",
                        seed: int = 0, row: bool = True, col: bool = False, mx_scale: str = "floor",
                        col_sum: bool = False, row_extra: int = 0) -> tuple[torch.Tensor | None, ...]:
    """Quantize G stacked groups `x` [G·group_rows, K] (MoE experts in capacity layout) → BF16 code × block scale
    along the hidden axis (`row`) and/or the token axis (`col`), as `(row_dq, col_dq)`; with `col_sum` (and `col`)
    also each group's FP32 column sums of the token-axis values [G, K] (`(row_dq, col_dq, col_sum)`), summed in the
    same launch per block of B rows and then over the group's blocks (no second read of the operand). `row_extra`:
    the row-axis output gets that many more (unwritten) rows per group, [G·(group_rows + row_extra), K], for a row
    the caller appends (the grouped linear's quantized mean, which its GEMM then multiplies along).

    Group g is centred on ``mean[g]`` (zeros: no centring) and uses ``tensor_scale[g]`` (NVFP4; computed by the
    caller, like the reference's per-slice tensor scales); rows with ``rowok == 0`` are padding and quantize to 0.
    `group_rows` must be a multiple of the block size so that token-axis blocks never straddle two groups.
    """
    fmt = get_format(format)
    B = fmt.block_size
    is_nv = fmt.scale_kind == "e4m3"
    M, K = x.shape
    if M == 0 or K == 0 or group_rows <= 0 or M % group_rows or group_rows % B:
        raise ValueError(f"grouped_quantize_dq: shape {tuple(x.shape)} is not G groups of group_rows={group_rows} "
                         f"rows; allowed: group_rows a positive multiple of {B} dividing the row count")
    if is_nv and tensor_scale is None:
        raise ValueError("grouped_quantize_dq: NVFP4 needs the per-group tensor scales")
    dev = x.device
    KP = cdiv(K, B) * B
    BM, BK, nw = _cfg(M, K, B, row, col)
    dummy_u8, dummy_bf, dummy_f = dummy_tensors(dev)
    if row_extra < 0:
        raise ValueError(f"grouped_quantize_dq: row_extra={row_extra} is not valid; allowed: an integer >= 0")
    rdq = (torch.empty((M // group_rows * (group_rows + row_extra), K), device=dev, dtype=torch.bfloat16) if row
           else None)
    cdq = torch.empty((M, K), device=dev, dtype=torch.bfloat16) if col else None
    n_mt = cdiv(M, BM)
    ts = tensor_scale.float().contiguous() if is_nv else dummy_f
    csum = torch.empty((M // B, K), device=dev, dtype=torch.float32) if col and col_sum else None
    _quant_kernel[(n_mt, cdiv(KP, BK))](
        x, x.stride(0), x.stride(1), M, K, M, KP, mean.float().contiguous(), dummy_f,
        dummy_u8, dummy_u8, rdq if rdq is not None else dummy_bf, dummy_u8, dummy_u8,
        cdq if cdq is not None else dummy_bf, dummy_f if csum is None else csum, seed31(seed, 1), seed31(seed, 2),
        n_mt, dummy_f,
        group_rows, row_extra, ts, _as_bytes(rowok), dummy_f, 0,
        BM=BM, BK=BK, B=B, IS_NV=is_nv, CENTER=True, SR=rounding == "sr", MX_CEIL=mx_scale == "ceil",
        FMA_QUOT=_fma_quotient_on(), ROW=row, ROW_PACK=False, ROW_DQ=row, COL=col, COL_PACK=False, COL_DQ=col,
        COL_SUM=csum is not None, GROUPED=True, MEAN_Q=False, num_warps=nw)
    if col_sum:
        return rdq, cdq, None if csum is None else csum.view(M // group_rows, group_rows // B, K).sum(1)
    return rdq, cdq


@triton.jit
def _mx_fold_kernel(codes_ptr, scales_ptr, emax_ptr, out_ptr, R, KH, NB, SHIFT: tl.constexpr,
                    BR: tl.constexpr, BKB: tl.constexpr):
    """Packed MXFP4 codes [R, KH] (two per byte) → E4M3 bytes [R, 2·KH] of code × 2^(e_b − e_max + SHIFT)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cb = tl.program_id(1) * BKB + tl.arange(0, BKB)
    m = (rows < R)[:, None] & (cb < KH)[None, :]
    byte = tl.load(codes_ptr + rows[:, None].to(tl.int64) * KH + cb[None, :], mask=m, other=0).to(tl.int32)
    sc = tl.load(scales_ptr + rows[:, None].to(tl.int64) * NB + (cb // 16)[None, :], mask=m, other=0).to(tl.int32)
    em = tl.load(emax_ptr + rows, mask=rows < R, other=0)
    shift = tl.maximum(tl.minimum(sc - em[:, None], 0) + SHIFT, -60)
    factor = ((shift + 127) << 23).to(tl.float32, bitcast=True)  # 2^shift, exact
    lo = byte & 15
    hi = byte >> 4
    _, blo = e4m3_rne(tl.abs(e2m1_value(lo) * factor))
    _, bhi = e4m3_rne(tl.abs(e2m1_value(hi) * factor))
    blo = blo | ((lo & 8) << 4)  # the sign bit
    bhi = bhi | ((hi & 8) << 4)
    out = tl.reshape(tl.join(blo, bhi), [BR, 2 * BKB]).to(tl.uint8)
    oc = tl.program_id(1) * 2 * BKB + tl.arange(0, 2 * BKB)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * (2 * KH) + oc[None, :], out,
             mask=(rows < R)[:, None] & (oc < 2 * KH)[None, :])


def fold_mxfp4_bytes(codes: torch.Tensor, scales: torch.Tensor, emax: torch.Tensor, shift: int) -> torch.Tensor:
    """E4M3 bit patterns (uint8 [R, 2·KH]) of packed MXFP4 codes [R, KH] folded against each row's largest block
    exponent `emax` [R] (see `hf_lowbit.kernels.mx_fp8`)."""
    r, kh = codes.shape
    out = torch.empty((r, 2 * kh), device=codes.device, dtype=torch.uint8)
    br, bkb = (16, 16) if interpreting() else (32, 64)
    _mx_fold_kernel[(cdiv(r, br), cdiv(kh, bkb))](
        codes.contiguous(), scales.contiguous(), emax.to(torch.int32).contiguous(), out, r, kh, scales.shape[1],
        SHIFT=shift, BR=br, BKB=bkb, num_warps=4)
    return out


def quantize_2d(x: torch.Tensor, format: str = "nvfp4", axis: int = -1, rounding: str = "rtn", seed: int = 0,
                mx_scale: str = "floor") -> PackedTensor:
    """Plain (uncentred) quantization of a 2-D tensor along axis 1 (-1) or 0, as `numerics.quantize`."""
    ax = axis % 2
    q = averis_quantize(x, format, center=False, rounding=rounding, seed=seed, row=ax == 1, col=ax == 0,
                        mx_scale=mx_scale)
    return q.row if ax == 1 else q.col
