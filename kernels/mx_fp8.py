"""MXFP4 GEMMs on FP8 tensor cores, exactly (ALGORITHMS.md §1, PERFORMANCE.md P3).

An E2M1 value times a power of two is exact in FP8 E4M3 while it stays in E4M3's range. For one row of a GEMM
operand (blocks along the reduction axis), fold each block's E8M0 scale relative to the row's largest one into the
FP8 value and keep ``2^(e_max − 6)`` as the row's FP32 scale: ``fp8 × row_scale == dequantize(MXFP4)`` bit for bit,
except in blocks more than 14 binades below the row maximum (their small codes fall under E4M3's subnormals), which
`fold_mxfp4` counts. The product then runs as one row-wise-scaled FP8 GEMM (`torch._scaled_mm`, FP32 output) whose
products are exact, so it equals the reference MXFP4 GEMM up to FP32 accumulation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

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
    underflow_blocks: int  # nonzero blocks below MIN_EXACT_DELTA binades of their row's largest block scale


def fold_mxfp4(p: PackedTensor, use_kernel: bool | None = None) -> FoldedFP8:
    """Fold a packed 2-D MXFP4 tensor (blocks along its last stored axis) into FP8 values and row scales.

    `use_kernel` (default: on CUDA, or under TRITON_INTERPRET=1) writes the E4M3 bytes with one Triton pass over the
    packed codes; otherwise torch ops do it. Both give the same bytes."""
    fmt = get_format(p.format)
    if fmt.scale_kind != "e8m0" or p.block_2d or p.codes.dim() != 2:
        raise ValueError(f"fold_mxfp4 needs a 2-D MXFP4 tensor with 1-D blocks, got format={p.format!r}, "
                         f"block_2d={p.block_2d}, codes of shape {tuple(p.codes.shape)}")
    rows = p.codes.shape[0]
    b = fmt.block_size
    exps = p.scales.to(torch.int32)                                   # biased E8M0 exponents, 255 = NaN
    nan_rows = (exps == 255).any(dim=1)
    emax = torch.where(exps == 255, torch.zeros_like(exps), exps).amax(dim=1)
    row_scale = torch.ldexp(torch.ones(rows, device=exps.device), emax - E8M0_BIAS - SHIFT)
    row_scale = torch.where(nan_rows, torch.full_like(row_scale, float("nan")), row_scale)
    if use_kernel is None:
        use_kernel = p.codes.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if use_kernel:
        from hf_lowbit.kernels.quantize import fold_mxfp4_bytes

        values = fold_mxfp4_bytes(p.codes, p.scales, emax, SHIFT).view(torch.float8_e4m3fn)
        delta = exps - emax[:, None]
        underflow = int(((delta < MIN_EXACT_DELTA) & (p.scales != 0) & ~nan_rows[:, None]).sum())
        return FoldedFP8(values, row_scale, underflow)
    vals = e2m1_codes_to_values(unpack_codes(p.codes)).reshape(rows, -1, b)
    delta = (exps - emax[:, None]).clamp(max=0)                        # ≤ 0 per block (NaN blocks: their row is NaN)
    factor = torch.ldexp(torch.ones_like(delta, dtype=torch.float32), (delta + SHIFT).clamp(min=-60))
    scaled = vals * factor[..., None]                                  # exact in FP32
    values = scaled.reshape(rows, -1).to(torch.float8_e4m3fn)
    nonzero = (vals != 0).any(dim=-1)
    underflow = int(((delta < MIN_EXACT_DELTA) & nonzero & ~nan_rows[:, None]).sum())
    return FoldedFP8(values, row_scale, underflow)


def fp8_gemm(a: FoldedFP8, b: FoldedFP8) -> torch.Tensor:
    """``A · Bᵀ`` for folded operands A [M, K] and B [N, K] (the same padded K), FP32 [M, N]."""
    if a.values.shape[1] != b.values.shape[1]:
        raise ValueError(f"fp8_gemm: reduction sizes differ ({a.values.shape[1]} vs {b.values.shape[1]})")
    return torch._scaled_mm(a.values, b.values.t(), scale_a=a.row_scale[:, None].contiguous(),
                            scale_b=b.row_scale[None, :].contiguous(), out_dtype=torch.float32)


def _pad_rows(f: FoldedFP8, multiple: int = 16) -> FoldedFP8:
    """Zero rows up to a multiple of 16 (cuBLASLt FP8 GEMM shape rule); row scale 1 on the padding."""
    pad = (-f.values.shape[0]) % multiple
    if not pad:
        return f
    values = torch.cat([f.values, torch.zeros(pad, f.values.shape[1], dtype=f.values.dtype,
                                              device=f.values.device)])
    return FoldedFP8(values, torch.cat([f.row_scale, f.row_scale.new_ones(pad)]), f.underflow_blocks)


def fp8_gemm_padded(a: FoldedFP8, b: FoldedFP8) -> torch.Tensor:
    """`fp8_gemm` for any row counts (padded to multiples of 16 and cropped back)."""
    m, n = a.values.shape[0], b.values.shape[0]
    return fp8_gemm(_pad_rows(a), _pad_rows(b))[:m, :n]


def folded_matvec(f: FoldedFP8, v: torch.Tensor) -> torch.Tensor:
    """FP32 ``F · v`` for a folded operand F [rows, K_padded] and v [K ≤ K_padded] (the rank-1 mean terms)."""
    vp = torch.nn.functional.pad(v.float(), (0, f.values.shape[1] - v.shape[0]))
    return torch.mv(f.values.float(), vp) * f.row_scale


class MXFP8AverisLinear(torch.autograd.Function):
    """MXFP4 W4A4G4 Averis linear whose three GEMMs run as exact row-scaled FP8 GEMMs (see the module docstring).

    Operands come packed from the fused Triton quantizer (both axes), are folded to FP8, and multiplied with FP32
    output; the rank-1 mean terms are added in FP32 as in the reference `averis_linear`.
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
        w_row = fold_mxfp4(qw.row)
        y = fp8_gemm_padded(fold_mxfp4(qx.row), w_row)
        if qx.mean_q is not None:
            y = y + folded_matvec(w_row, qx.mean_q)[:n]
        if bias is not None:
            y = y + bias.float()
        x_col = fold_mxfp4(qx.col) if need_wgrad else None
        w_col = fold_mxfp4(qw.col) if need_dgrad else None
        saved = [None if x_col is None else x_col.values, None if x_col is None else x_col.row_scale,
                 None if w_col is None else w_col.values, None if w_col is None else w_col.row_scale,
                 qx.col_sum if need_wgrad else None, qx.mean_q]
        ctx.has = [t is not None for t in saved]
        ctx.save_for_backward(*[t for t in saved if t is not None])
        ctx.meta = (recipe, seed, bias is not None, x2d.shape[0], weight.dtype, k)
        return y.to(x2d.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from hf_lowbit.kernels.quantize import averis_quantize, seed31

        recipe, seed, has_bias, n_tokens, w_dtype, k = ctx.meta
        it = iter(ctx.saved_tensors)
        xv, xs, wv, ws, x_sum, mu_x_q = [next(it) if h else None for h in ctx.has]
        x_col = None if xv is None else FoldedFP8(xv, xs, 0)
        w_col = None if wv is None else FoldedFP8(wv, ws, 0)
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy = dy.contiguous()
        qd = averis_quantize(dy, "mxfp4", center=recipe.center_gradients,
                             rounding="sr" if recipe.sr_gradients else "rtn", seed=seed31(seed, 13),
                             row=need_dgrad, col=need_wgrad, col_sum=need_wgrad, mx_scale=recipe.mx_scale)
        mu_d_q = qd.mean_q
        dx = dw = db = None
        if need_dgrad:
            dx = fp8_gemm_padded(fold_mxfp4(qd.row), w_col)
            if mu_d_q is not None:
                dx = dx + folded_matvec(w_col, mu_d_q)[:k]
            dx = dx.to(dy.dtype)
        if need_wgrad:
            dw = fp8_gemm_padded(fold_mxfp4(qd.col), x_col)
            if mu_x_q is not None:
                dw = dw + qd.col_sum[:, None] * mu_x_q[None, :]
            if mu_d_q is not None:
                b = x_sum if mu_x_q is None else x_sum + float(n_tokens) * mu_x_q
                dw = dw + mu_d_q[:, None] * b[None, :]
            dw = dw.to(w_dtype)
        if has_bias and ctx.needs_input_grad[2]:
            db = dy.float().sum(0).to(dy.dtype)
        return dx, dw, db, None, None


def mx_fp8_linear_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe, seed: int = 0
                        ) -> torch.Tensor:
    """MXFP4 Averis linear on FP8 tensor cores: x [..., K] · weight [N, K]ᵀ (+ bias), with autograd."""
    lead = x.shape[:-1]
    y = MXFP8AverisLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, recipe, seed)
    return y.reshape(*lead, weight.shape[0])
