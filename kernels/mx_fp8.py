"""MXFP4 GEMMs on FP8 tensor cores, exactly (ALGORITHMS.md §1, PERFORMANCE.md P3).

An E2M1 value times a power of two is exact in FP8 E4M3 while it stays in E4M3's range. For one row of a GEMM
operand (blocks along the reduction axis), fold each block's E8M0 scale relative to the row's largest one into the
FP8 value and keep ``2^(e_max − 6)`` as the row's FP32 scale: ``fp8 × row_scale == dequantize(MXFP4)`` bit for bit,
except in blocks more than 14 binades below the row maximum (their small codes fall under E4M3's subnormals), which
`fold_mxfp4` counts. The product then runs as one row-wise-scaled FP8 GEMM with FP32 output
(`hf_lowbit.kernels.fp8_gemm`: Triton, each 32-wide MX block's partial sum promoted to an FP32 accumulator, which is
exact on Hopper where `torch._scaled_mm` is not), so it equals the reference MXFP4 GEMM up to FP32 accumulation
order. The bias, the rank-1 mean terms and the output cast run in the GEMM's epilogue; nothing syncs with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_lowbit.kernels._common import interpreting
from hf_lowbit.kernels.fp8_gemm import fp8_rowscaled_gemm, fp8_rowscaled_matvec, mx_row_scales
from hf_lowbit.numerics import E8M0_BIAS, PackedTensor, e2m1_codes_to_values, get_format, unpack_codes

#: E2M1 magnitudes × 2^SHIFT stay ≤ 448 (6·64 = 384); the smallest, 0.5·2^(SHIFT+d), is an E4M3 subnormal
#: (≥ 2^-9) for d ≥ -14, and so is 1.5·2^(SHIFT+d) = 3·2^(SHIFT+d-1): both exact down to d = -14.
SHIFT = 6
MIN_EXACT_DELTA = -14


@dataclass
class FoldedFP8:
    """A 2-D MXFP4 GEMM operand as E4M3 values [rows, K_padded] and FP32 row scales [rows]."""

    values: torch.Tensor
    row_scale: torch.Tensor
    #: 0-d int64 device tensor (no host sync): nonzero blocks more than -MIN_EXACT_DELTA binades below their row's
    #: largest block scale (inexact in FP8); None where not counted (operands saved for backward)
    underflow_blocks: torch.Tensor | None = None


def fold_mxfp4(p: PackedTensor, use_kernel: bool | None = None, count_underflow: bool = True) -> FoldedFP8:
    """Fold a packed 2-D MXFP4 tensor (blocks along its last stored axis) into FP8 values and row scales.

    `use_kernel` (default: on CUDA, or under TRITON_INTERPRET=1) writes the E4M3 bytes with one Triton pass over the
    packed codes; otherwise torch ops do it. Both give the same bytes. `count_underflow=False` skips the count
    (`underflow_blocks` None; the layer does not read it)."""
    fmt = get_format(p.format)
    if fmt.scale_kind != "e8m0" or p.block_2d or p.codes.dim() != 2:
        raise ValueError(f"fold_mxfp4 needs a 2-D MXFP4 tensor with 1-D blocks, got format={p.format!r}, "
                         f"block_2d={p.block_2d}, codes of shape {tuple(p.codes.shape)}")
    rows = p.codes.shape[0]
    b = fmt.block_size
    if use_kernel is None:
        use_kernel = p.codes.is_cuda or interpreting()
    if use_kernel:  # two launches: row exponents + scales, then the bytes
        from hf_lowbit.kernels.quantize import fold_mxfp4_bytes

        emax, row_scale = mx_row_scales(p.scales, E8M0_BIAS + SHIFT)
        values = fold_mxfp4_bytes(p.codes, p.scales, emax, SHIFT).view(torch.float8_e4m3fn)
        underflow = None
        if count_underflow:
            delta = p.scales.to(torch.int32) - emax[:, None]
            underflow = ((delta < MIN_EXACT_DELTA) & (p.scales != 0) & (p.scales != 255)
                         & row_scale.isfinite()[:, None]).sum()
        return FoldedFP8(values, row_scale, underflow)
    exps = p.scales.to(torch.int32)                                   # biased E8M0 exponents, 255 = NaN
    nan_rows = (exps == 255).any(dim=1)
    emax = torch.where(exps == 255, torch.zeros_like(exps), exps).amax(dim=1)
    row_scale = torch.ldexp(torch.ones(rows, device=exps.device), emax - E8M0_BIAS - SHIFT)
    row_scale = torch.where(nan_rows, torch.full_like(row_scale, float("nan")), row_scale)
    vals = e2m1_codes_to_values(unpack_codes(p.codes)).reshape(rows, -1, b)
    delta = (exps - emax[:, None]).clamp(max=0)                        # ≤ 0 per block (NaN blocks: their row is NaN)
    factor = torch.ldexp(torch.ones_like(delta, dtype=torch.float32), (delta + SHIFT).clamp(min=-60))
    scaled = vals * factor[..., None]                                  # exact in FP32
    values = scaled.reshape(rows, -1).to(torch.float8_e4m3fn)
    nonzero = (vals != 0).any(dim=-1)
    underflow = ((delta < MIN_EXACT_DELTA) & nonzero & ~nan_rows[:, None]).sum() if count_underflow else None
    return FoldedFP8(values, row_scale, underflow)


def fp8_gemm_padded(a: FoldedFP8, b: FoldedFP8, *, vec_n: torch.Tensor | None = None,
                    vec_m: torch.Tensor | None = None, r1: tuple[torch.Tensor, torch.Tensor] | None = None,
                    r2: tuple[torch.Tensor, torch.Tensor] | None = None,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``A · Bᵀ`` (+ vec_n[None, :] + vec_m[:, None] + u1⊗v1 + u2⊗v2) for folded A [M, K], B [N, K] (the same
    padded K, any row counts), FP32 then cast to `out_dtype`: `fp8_rowscaled_gemm` (no padding copies)."""
    if a.values.shape[1] != b.values.shape[1]:
        raise ValueError(f"fp8_gemm: reduction sizes differ ({a.values.shape[1]} vs {b.values.shape[1]})")
    return fp8_rowscaled_gemm(a.values, a.row_scale, b.values, b.row_scale, vec_n=vec_n, vec_m=vec_m, r1=r1, r2=r2,
                              out_dtype=out_dtype)


fp8_gemm = fp8_gemm_padded


def folded_matvec(f: FoldedFP8, v: torch.Tensor) -> torch.Tensor:
    """FP32 ``F · v`` for a folded operand F [rows, K_padded] and v [K ≤ K_padded] (the rank-1 mean terms), read
    straight from the FP8 bytes."""
    return fp8_rowscaled_matvec(f.values, f.row_scale, v)


class MXFP8AverisLinear(torch.autograd.Function):
    """MXFP4 W4A4G4 Averis linear whose three GEMMs run as exact row-scaled FP8 GEMMs (see the module docstring).

    Operands come packed from the fused Triton quantizer (both axes), are folded to FP8, and multiplied with FP32
    accumulation; the rank-1 mean terms and the bias are added in FP32 in the GEMM epilogue (as in the reference
    `averis_linear`), which also casts to the output dtype. No host syncs.
    """

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe, seed: int
                ) -> torch.Tensor:
        from hf_lowbit.kernels.quantize import averis_quantize, seed31

        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, k = weight.shape
        qx = averis_quantize(x2d, "mxfp4", center=recipe.center_activations,
                             rounding="sr" if recipe.sr_activations else "rtn", seed=seed31(seed, 11), row=True,
                             col=need_wgrad, col_sum=need_wgrad, mx_scale=recipe.mx_scale)
        qw = averis_quantize(weight, "mxfp4", center=False, rounding="sr" if recipe.sr_weights else "rtn",
                             seed=seed31(seed, 12), row=True, col=need_dgrad, mx_scale=recipe.mx_scale)
        w_row = fold_mxfp4(qw.row, count_underflow=False)
        vec_n = None if qx.mean_q is None else folded_matvec(w_row, qx.mean_q)
        if bias is not None:
            vec_n = bias.float() if vec_n is None else vec_n + bias.float()
        y = fp8_gemm_padded(fold_mxfp4(qx.row, count_underflow=False), w_row, vec_n=vec_n, out_dtype=x2d.dtype)
        x_col = fold_mxfp4(qx.col, count_underflow=False) if need_wgrad else None
        w_col = fold_mxfp4(qw.col, count_underflow=False) if need_dgrad else None
        saved = [None if x_col is None else x_col.values, None if x_col is None else x_col.row_scale,
                 None if w_col is None else w_col.values, None if w_col is None else w_col.row_scale,
                 qx.col_sum if need_wgrad else None, qx.mean_q]
        ctx.has = [t is not None for t in saved]
        ctx.save_for_backward(*[t for t in saved if t is not None])
        ctx.meta = (recipe, seed, bias is not None, x2d.shape[0], weight.dtype, k)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from hf_lowbit.kernels.quantize import averis_quantize, seed31

        recipe, seed, has_bias, n_tokens, w_dtype, k = ctx.meta
        it = iter(ctx.saved_tensors)
        xv, xs, wv, ws, x_sum, mu_x_q = [next(it) if h else None for h in ctx.has]
        x_col = None if xv is None else FoldedFP8(xv, xs)
        w_col = None if wv is None else FoldedFP8(wv, ws)
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy = dy.contiguous()
        qd = averis_quantize(dy, "mxfp4", center=recipe.center_gradients,
                             rounding="sr" if recipe.sr_gradients else "rtn", seed=seed31(seed, 13),
                             row=need_dgrad, col=need_wgrad, col_sum=need_wgrad, mx_scale=recipe.mx_scale)
        mu_d_q = qd.mean_q
        dx = dw = db = None
        if need_dgrad:
            vec_k = None if mu_d_q is None else folded_matvec(w_col, mu_d_q)
            dx = fp8_gemm_padded(fold_mxfp4(qd.row, count_underflow=False), w_col, vec_n=vec_k, out_dtype=dy.dtype)
        if need_wgrad:
            r1 = None if mu_x_q is None else (qd.col_sum, mu_x_q)
            r2 = None
            if mu_d_q is not None:
                r2 = (mu_d_q, x_sum if mu_x_q is None else x_sum + float(n_tokens) * mu_x_q)
            dw = fp8_gemm_padded(fold_mxfp4(qd.col, count_underflow=False), x_col, r1=r1, r2=r2, out_dtype=w_dtype)
        if has_bias and ctx.needs_input_grad[2]:
            db = dy.float().sum(0).to(dy.dtype)
        return dx, dw, db, None, None


def mx_fp8_linear_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe, seed: int = 0
                        ) -> torch.Tensor:
    """MXFP4 Averis linear on FP8 tensor cores: x [..., K] · weight [N, K]ᵀ (+ bias), with autograd."""
    lead = x.shape[:-1]
    y = MXFP8AverisLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, recipe, seed)
    return y.reshape(*lead, weight.shape[0])
