"""The weight-gradient operands: centre, (optionally) rotate, quantize along the token axis, in registers.

The wgrad GEMM reduces over tokens, so its operands are quantized in blocks of B tokens. `token_axis_quantize`
writes the exact BF16 ``code × block scale`` of R = Z − 1·μ (tensor scale given: the one of the row-axis launch)
and its per-column sums (the wgrad rank-1 mean terms), from [BM, BK] tiles viewed as [BM/B, B, BK]: one read of Z.
Opt-in (``HF_LOWBIT_COL_KERNEL=split``): on an H200 it was slower for NVFP4 than the column branch of the combined
row + column kernel of `kernels/quantize.py` (benchmarks/NOTES.md, 2026-11-30 call 5), which stays the default.

With ``LowBitConfig(hadamard=True)`` both operands are ``T·R`` (T = H16·diag(signs)/4 applied to each 16-token
group, `hf_lowbit.averis.hadamard_tokens`): `hadamard_col_quantize` runs two launches, each reading Z once, neither
writing a full-precision copy:

1. ``_hadamard_amax_kernel``: the global amax of T·R (NVFP4's tensor scale is taken from the rotated tensor, so it
   needs its own pass; MXFP4 skips it).
2. ``_token_axis_quant_kernel``: T·R again, its blocks of B tokens quantized (RTN or Philox SR), the exact BF16
   ``code × block scale`` stored, and the per-column sums Σ_m t_m·q_m weighted by the rotated ones-vector t = T·1
   (`hf_lowbit.averis.wgrad`'s `ones`).

The rotation is the reference's butterfly in the same order (±1/4 first, then distances 1, 2, 4, 8), so the BF16
operand equals the reference's bit for bit under RTN, as does the plain one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hf_lowbit.averis import HADAMARD_BLOCK
from hf_lowbit.kernels._common import (abs_max, cdiv, dummy_tensors, e2m1_rounded, e8m0_from_amax, e8m0_inv_scale,
                                       e8m0_scale, env_choice, interpreting)
from hf_lowbit.kernels.quantize import _fma_quotient_on, _nv_scaled, _nv_scales, _nv_tensor_scale, check_rounding_args
from hf_lowbit.numerics import NVFP4_TENSOR_SCALE_DIVISOR, divide_exactly, get_format

__all__ = ["TokenAxisOperand", "grouped_token_axis_quantize", "hadamard_col_quantize", "split_col_kernel",
           "token_axis_quantize"]

COL_KERNELS = ("fused", "split")  # the first is the default


def split_col_kernel() -> bool:
    """HF_LOWBIT_COL_KERNEL: the token-axis (wgrad / dgrad-weight) operand from the combined row + column launch of
    `kernels/quantize.py` ("fused", default) or from its own launch here ("split": measured slower on an H200 for
    NVFP4, 374 vs 332 µs per 8192×4096 operand pair, benchmarks/NOTES.md; the rotated operand always uses it)."""
    return env_choice("HF_LOWBIT_COL_KERNEL", COL_KERNELS) == "split"


@triton.jit
def _butterfly(t, NB: tl.constexpr, G: tl.constexpr, H: tl.constexpr, C: tl.constexpr):
    """One FWHT stage over axis 1 of t [NB, 16, C]: rows i and i + H (bit H of i clear) → (sum, difference)."""
    a, b = tl.split(tl.permute(tl.reshape(t, [NB, G, 2, H, C]), (0, 1, 3, 4, 2)))
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 4, 2, 3)), [NB, 16, C])


@triton.jit
def hadamard16(t, bits, NB: tl.constexpr, C: tl.constexpr):
    """(H16·diag(signs))/4 applied along axis 1 of t [NB, 16, C] (sign i is −1 where bit i of `bits` is set)."""
    i = tl.arange(0, 16)
    t = t * tl.where(((bits >> i) & 1) != 0, -0.25, 0.25)[None, :, None]
    t = _butterfly(t, NB, 8, 1, C)
    t = _butterfly(t, NB, 4, 2, C)
    t = _butterfly(t, NB, 2, 4, C)
    return _butterfly(t, NB, 1, 8, C)


@triton.jit
def _centred_tile(x_ptr, sxm, sxk, M, K, mean_ptr, rowok_ptr, GL, bits, CENTER: tl.constexpr,
                  GROUPED: tl.constexpr, ROTATE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """(T·)(Z − 1·μ) of this program's [BM, BK] tile (rows ≥ M are the zero padding), FP32, with its row and
    column indices. GROUPED: Z stacks groups of GL rows (MoE experts; GL a multiple of 16), each centred by its own
    mean (mean_ptr [G, K]), rows with rowok == 0 (capacity padding) are zero."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    cmask = cols < K
    rmask = rows < M
    if GROUPED:
        rmask = rmask & (tl.load(rowok_ptr + rows, mask=rmask, other=0) != 0)
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxm + cols[None, :] * sxk, mask=mask, other=0.0).to(tl.float32)
    if GROUPED:
        mu = tl.load(mean_ptr + (rows // GL)[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0)
        x = tl.where(mask, x - mu, 0.0)
    elif CENTER:
        x = tl.where(mask, x - tl.load(mean_ptr + cols, mask=cmask, other=0.0)[None, :], 0.0)
    if ROTATE:
        x = tl.reshape(hadamard16(tl.reshape(x, [BM // 16, 16, BK]), bits, BM // 16, BK), [BM, BK])
    return x, rows, cols


@triton.jit(do_not_specialize=["bits"])
def _hadamard_amax_kernel(x_ptr, sxm, sxk, M, K, mean_ptr, rowok_ptr, GL, bits, amax_ptr, CENTER: tl.constexpr,
                          GROUPED: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Global amax of T·R as int bits, atomically maxed into amax_ptr[0] (GROUPED: amax_ptr[group])."""
    t, rows, cols = _centred_tile(x_ptr, sxm, sxk, M, K, mean_ptr, rowok_ptr, GL, bits, CENTER, GROUPED, True,
                                  BM, BK)
    a = tl.where(t != t, float("inf"), tl.abs(t))  # NaN counts as +inf: a non-finite tensor scale, as reference
    if GROUPED:  # 16-row groups never straddle two experts (GL is a multiple of 16)
        a16 = tl.max(tl.reshape(tl.max(a, axis=1), [BM // 16, 16]), axis=1)
        grp = (tl.program_id(0) * BM + tl.arange(0, BM // 16) * 16) // GL
        tl.atomic_max(amax_ptr + grp, a16.to(tl.int32, bitcast=True), mask=grp < M // GL)
    else:
        tl.atomic_max(amax_ptr, tl.max(tl.max(a, axis=1), axis=0).to(tl.int32, bitcast=True))


@triton.jit(do_not_specialize=["bits", "seed"])
def _token_axis_quant_kernel(x_ptr, sxm, sxk, M, K, MP, mean_ptr, rowok_ptr, GL, bits, amax_ptr, ts_ptr, dq_ptr,
                             csum_ptr, seed, ts_out_ptr, BM: tl.constexpr, BK: tl.constexpr, B: tl.constexpr,
                             IS_NV: tl.constexpr, CENTER: tl.constexpr, GROUPED: tl.constexpr,
                             ROTATE: tl.constexpr, TS_GIVEN: tl.constexpr, SR: tl.constexpr,
                             MX_CEIL: tl.constexpr, FMA_QUOT: tl.constexpr, COL_SUM: tl.constexpr):
    """Blocks of B tokens of (T·)R → BF16 code × block scale [MP, K] (+ per-tile column sums). NVFP4 tensor scale:
    GROUPED ts_ptr[group]; TS_GIVEN ts_ptr[0]; else from the amax bits at amax_ptr (stored to ts_out_ptr)."""
    t, rows, cols = _centred_tile(x_ptr, sxm, sxk, M, K, mean_ptr, rowok_ptr, GL, bits, CENTER, GROUPED, ROTATE,
                                  BM, BK)
    NBQ: tl.constexpr = BM // B
    tq = tl.reshape(t, [NBQ, B, BK])
    amax_b = abs_max(tq, 1)
    if SR:
        rnd = tl.reshape(tl.rand(seed, rows[:, None] * K + cols[None, :]), [NBQ, B, BK])
    else:
        rnd = 0.0
    if IS_NV:
        if GROUPED:  # the group's tensor scale per block (blocks never straddle groups: GL is a multiple of B)
            grp = (tl.program_id(0) * BM + tl.arange(0, NBQ) * B) // GL
            ts = tl.load(ts_ptr + grp, mask=grp < M // GL, other=1.0)[:, None]
        elif TS_GIVEN:
            ts = tl.load(ts_ptr)
        else:
            ts = _nv_tensor_scale(amax_ptr)
            if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
                tl.store(ts_out_ptr, ts)
        sbf, sbyte, den, y, bad = _nv_scales(amax_b, ts)
        q = _nv_scaled(tq, den[:, None, :], y[:, None, :], bad[:, None, :], SR, FMA_QUOT)
    else:
        sbyte = e8m0_from_amax(amax_b, MX_CEIL)
        sbf = e8m0_scale(sbyte)
        q = tq * e8m0_inv_scale(sbyte)[:, None, :]
    v = tl.reshape(e2m1_rounded(q, SR, rnd) * sbf[:, None, :], [BM, BK])
    cmask = cols < K
    tl.store(dq_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], v.to(tl.bfloat16),
             mask=(rows < MP)[:, None] & cmask[None, :])
    if COL_SUM:
        v = tl.where(cmask[None, :], v, 0.0)
        if ROTATE:  # weighted by the rotated ones-vector (the same butterfly on the real-token indicator)
            ones = hadamard16(tl.reshape(tl.where(rows < M, 1.0, 0.0), [BM // 16, 16, 1]), bits, BM // 16, 1)
            v = tl.reshape(ones, [BM, 1]) * v
        tl.store(csum_ptr + tl.program_id(0) * K + cols, tl.sum(v, axis=0), mask=cmask)


class TokenAxisOperand(NamedTuple):
    """A wgrad operand of Z [M, K]: BF16 code × block scale [MP, K] (MP = M padded to the block; with the rotation
    the rows past M hold the rotation of the zero padding), per-column sums [K] (FP32, no tensor scale; with the
    rotation weighted by T·1), and the NVFP4 tensor scale (0-d; None for MXFP4)."""

    dq: torch.Tensor
    col_sum: torch.Tensor | None
    tensor_scale: torch.Tensor | None


def _check_args(x: torch.Tensor, rounding: str, mx_scale: str, format: str) -> tuple[int, bool]:
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"the token-axis operand needs a non-empty 2-D tensor, got shape {tuple(x.shape)}")
    check_rounding_args(rounding, mx_scale)
    fmt = get_format(format)
    if fmt.block_size % HADAMARD_BLOCK:
        raise ValueError(f"format={format!r} has blocks of {fmt.block_size}; the token-axis operand needs a "
                         f"multiple of {HADAMARD_BLOCK}")
    return fmt.block_size, fmt.scale_kind == "e4m3"


def _launch(x: torch.Tensor, rows_out: int, mean: torch.Tensor | None, rowok: torch.Tensor | None, group_rows: int,
            bits: int | None, B: int, is_nv: bool, rounding: str, seed: int, mx_scale: str, col_sum: bool,
            ts: torch.Tensor | None) -> TokenAxisOperand:
    """The launches for x [M, K]: `bits` None = no rotation (`ts`: the NVFP4 tensor scale(s) to use), else the
    amax pass of the rotated tensor first (NVFP4), whose scale(s) it returns. `rowok` given: grouped (MoE)."""
    M, K = x.shape
    BM, BK, nw = (32, 32, 4) if interpreting() else (64, 64, 4)
    BM = max(BM, B)
    grid = (cdiv(rows_out, BM), cdiv(K, BK))
    dev = x.device
    dummy_u8, _, dummy_f = dummy_tensors(dev)
    grouped = rowok is not None
    rotate = bits is not None
    args = (x, x.stride(0), x.stride(1), M, K)
    common = (mean if mean is not None else dummy_f, rowok if grouped else dummy_u8, group_rows, bits or 0)
    amax = dummy_f
    if is_nv and rotate:
        amax = torch.zeros(M // group_rows if grouped else 1, device=dev, dtype=torch.int32)
        _hadamard_amax_kernel[grid](*args, *common, amax, CENTER=mean is not None, GROUPED=grouped, BM=BM, BK=BK,
                                    num_warps=nw)
        if grouped:  # per-group tensor scales, as the reference's (NaN where the amax is not finite)
            a = amax.view(torch.float32)
            ts = torch.where(torch.isfinite(a), divide_exactly(a, NVFP4_TENSOR_SCALE_DIVISOR),
                             torch.full_like(a, float("nan")))
    dq = torch.empty((rows_out, K), device=dev, dtype=torch.bfloat16)
    csum = torch.empty((grid[0], K), device=dev, dtype=torch.float32) if col_sum else dummy_f
    ts_out = torch.empty(1, device=dev, dtype=torch.float32) if is_nv and rotate and not grouped else dummy_f
    ts_given = ts is not None and not grouped
    _token_axis_quant_kernel[grid](
        *args, rows_out, *common, amax, ts if ts is not None else dummy_f, dq, csum, seed, ts_out, BM=BM, BK=BK, B=B,
        IS_NV=is_nv, CENTER=mean is not None, GROUPED=grouped, ROTATE=rotate, TS_GIVEN=ts_given,
        SR=rounding == "sr", MX_CEIL=mx_scale == "ceil", FMA_QUOT=_fma_quotient_on(), COL_SUM=col_sum, num_warps=nw)
    if not is_nv:
        ts = None
    elif rotate and not grouped:
        ts = ts_out[0]
    return TokenAxisOperand(dq, csum.sum(0) if col_sum else None, ts)


def token_axis_quantize(x: torch.Tensor, mean: torch.Tensor | None, tensor_scale: torch.Tensor | None,
                        format: str = "nvfp4", rounding: str = "rtn", seed: int = 0, mx_scale: str = "floor",
                        col_sum: bool = True) -> TokenAxisOperand:
    """Quantize R = x − 1·μ (`mean` None: x) in blocks along tokens with the NVFP4 `tensor_scale` given (0-d or [1]:
    the one of R's row-axis launch, `AverisQuant.tensor_scale`; None for MXFP4): BF16 code × block scale [M, K]
    and the column sums, bit-exact with the reference quantizer along axis 0 under RTN."""
    B, is_nv = _check_args(x, rounding, mx_scale, format)
    if is_nv and tensor_scale is None:
        raise ValueError("token_axis_quantize: an NVFP4 operand needs the tensor scale of its row-axis launch")
    return _launch(x, x.shape[0], mean, None, 1, None, B, is_nv, rounding, seed, mx_scale, col_sum,
                   tensor_scale if is_nv else None)


def hadamard_col_quantize(x: torch.Tensor, mean: torch.Tensor | None, bits: int, format: str = "nvfp4",
                          rounding: str = "rtn", seed: int = 0, mx_scale: str = "floor") -> TokenAxisOperand:
    """Quantize T·(x − 1·μ) along tokens (`mean` None: no centring) for the weight-gradient GEMM, T the random
    16-token Hadamard rotation whose signs are the 16 low bits of `bits` (`hf_lowbit.averis.hadamard_sign_bits`),
    with its own NVFP4 tensor scale (returned)."""
    B, is_nv = _check_args(x, rounding, mx_scale, format)
    return _launch(x, cdiv(x.shape[0], B) * B, mean, None, 1, bits, B, is_nv, rounding, seed, mx_scale, True, None)


def grouped_token_axis_quantize(x: torch.Tensor, group_rows: int, rowok: torch.Tensor, mean: torch.Tensor,
                                tensor_scales: torch.Tensor | None, bits: int | None, format: str = "nvfp4",
                                rounding: str = "rtn", seed: int = 0, mx_scale: str = "floor"
                                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The wgrad operand of G stacked groups x [G·group_rows, K] (MoE experts in capacity layout; `group_rows` a
    multiple of the block), each centred by its mean [G, K], rows with rowok == 0 zero; `bits` given: rotated
    within the group with per-group tensor scales from the rotated tensor, else `tensor_scales` [G] (NVFP4) are
    used → (BF16 code × block scale [G·group_rows, K], NVFP4 tensor scales [G] or None)."""
    B, is_nv = _check_args(x, rounding, mx_scale, format)
    if group_rows % B or x.shape[0] % group_rows:
        raise ValueError(f"group_rows={group_rows} must be a multiple of the block ({B}) dividing {x.shape[0]} rows")
    if is_nv and bits is None and tensor_scales is None:
        raise ValueError("grouped_token_axis_quantize: NVFP4 without rotation needs the groups' tensor scales")
    ts = tensor_scales.float().contiguous() if (is_nv and bits is None) else None
    out = _launch(x, x.shape[0], mean.float().contiguous(), rowok.contiguous(), group_rows, bits, B, is_nv,
                  rounding, seed, mx_scale, False, ts)
    return out.dq, out.tensor_scale
