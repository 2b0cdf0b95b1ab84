"""The Triton backend: Averis W4A4G4 linear (fused quantizers + BF16 tensor-core GEMMs) and the W4A16 decode path.

`TritonAverisLinear` computes what `hf_lowbit.averis.AverisLinearFunction` computes for
``block_axis="reduction"``, ``weight_blocks="1d"`` (NVFP4 and MXFP4, RTN or SR, with or without the random Hadamard
rotation of the wgrad operands), with FP32 arithmetic outside the quantizers:

    fprop  Y  = s_x s_w · R̂_X Ŵ_rᵀ + (Q(μ_X)·Q(W)ᵀ + bias)              R̂, Ŵ: code × block scale, BF16 (exact)
    dgrad  dX = s_d s_w · R̂_D Ŵ_c  + Q(μ_D)·Q(W_c)
    wgrad  dW = s_d s_x · R̂_Dᵀ R̂_X + a ⊗ Q(μ_X) + Q(μ_D) ⊗ (b + l·Q(μ_X))     a = Q(R_D)ᵀ1, b = 1ᵀQ(R_X)

Every operand is quantized along the reduction axis of the GEMM it feeds; the per-tensor scales and all rank-1
terms are applied in the GEMM epilogue on the device. With ``hadamard=True`` the two wgrad operands are T·R_D and
T·R_X (`kernels/token_axis.py`, each with its own tensor scale), 1 becomes the rotated ones-vector T·1 in a and b, and
l = ‖T·1‖² stays the token count. Differences from the reference: FP32 summation order inside
the GEMMs, and SR draws from Philox instead of torch's generator (same distribution, reproducible per seed).
For backward it keeps the BF16 dequantized wgrad operand of X and the dgrad operand of W (same bytes as the X that
nn.Linear keeps); the reference keeps packed codes.
"""

from __future__ import annotations


import torch

from hf_lowbit.averis import hadamard_sign_bits
from hf_lowbit.backend import TorchBackend
from hf_lowbit.config import Recipe
from hf_lowbit.kernels._common import env_choice
from hf_lowbit.kernels.gemm import gemm_fn, matvec
from hf_lowbit.kernels.gemv import MAX_TOKENS, w4a16_linear
from hf_lowbit.kernels.grouped import prepare_grouped_weight, supports_grouped, triton_grouped_linear_train
from hf_lowbit.kernels.mx_fp8 import mx_fp8_linear_train
from hf_lowbit.kernels.quantize import averis_quantize, quantize_2d, seed31
from hf_lowbit.kernels.token_axis import hadamard_col_quantize, split_col_kernel, token_axis_quantize
from hf_lowbit.numerics import PackedTensor

__all__ = ["TritonBackend", "TritonAverisLinear", "supports_recipe", "triton_linear_train"]


def supports_recipe(recipe: Recipe) -> bool:
    return (recipe.block_axis == "reduction" and recipe.weight_blocks == "1d"
            and recipe.format in ("nvfp4", "mxfp4"))


def quantize_operand(z: torch.Tensor, recipe: Recipe, center: bool, rounding: str, seed: int, row: bool, col: bool,
                     col_sum: bool, hadamard_seed: int | None = None) -> tuple:
    """Quantize a GEMM input z for the linear: the row-axis `AverisQuant` (BF16 dq along the hidden axis, mean,
    Q(μ), tensor scale) and the column-axis operand (BF16 dq along the first axis, column sums, its tensor scale)
    or Nones. `hadamard_seed` (the wgrad operands X and dY): rotated when `recipe.hadamard`; W's column operand
    (dgrad) never is."""
    rotate = col and recipe.hadamard and hadamard_seed is not None
    split = col and (rotate or split_col_kernel())
    q = averis_quantize(z, recipe.format, center=center, rounding=rounding, seed=seed31(seed, 1), row=row,
                        row_packed=False, row_dq=True, col=col and not split, col_packed=False, col_dq=True,
                        col_sum=col_sum, mx_scale=recipe.mx_scale)
    if rotate:
        c = hadamard_col_quantize(z, q.mean, hadamard_sign_bits(hadamard_seed), recipe.format, rounding,
                                  seed31(seed, 2), recipe.mx_scale)
    elif split:
        c = token_axis_quantize(z, q.mean, q.tensor_scale, recipe.format, rounding, seed31(seed, 2),
                                recipe.mx_scale, col_sum=col_sum)
    else:
        c = (q.col_dq, q.col_sum, q.tensor_scale)
    return q, tuple(c)


class TritonAverisLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: Recipe,
                seed: int) -> torch.Tensor:
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.work = x2d.shape[0] * weight.shape[0] * weight.shape[1]
        gemm = gemm_fn(work=ctx.work)
        qx, x_col = quantize_operand(x2d, recipe, recipe.center_activations, "sr" if recipe.sr_activations else "rtn",
                                     seed31(seed, 11), True, need_wgrad, True, seed)
        qw, w_col = quantize_operand(weight, recipe, False, "sr" if recipe.sr_weights else "rtn", seed31(seed, 12),
                                     True, need_dgrad, False)
        ts_x, ts_w = qx.tensor_scale, qw.tensor_scale
        vrow = None
        if qx.mean_q is not None:
            vrow = matvec(qw.row_dq, qx.mean_q, scale=ts_w)
        if bias is not None:
            vrow = bias.float() if vrow is None else vrow + bias.float()
        y = gemm(qx.row_dq, qw.row_dq, x2d.dtype, ts_x, ts_w, vrow)
        ctx.recipe, ctx.seed, ctx.has_bias, ctx.n_tokens = recipe, seed, bias is not None, x2d.shape[0]
        ctx.w_dtype = weight.dtype
        saved = [*x_col, qx.mean_q, w_col[0], ts_w]
        ctx.has = [t is not None for t in saved]
        ctx.save_for_backward(*[t for t in saved if t is not None])
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        it = iter(ctx.saved_tensors)
        xc, xsum, ts_x, mu_x_q, wc, ts_w = [next(it) if h else None for h in ctx.has]
        recipe = ctx.recipe
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gemm = gemm_fn(work=ctx.work)
        dy = dy.contiguous() if dy.stride(-1) != 1 else dy
        qd, (d_col, d_sum, ts_dc) = quantize_operand(dy, recipe, recipe.center_gradients,
                                                     "sr" if recipe.sr_gradients else "rtn", seed31(ctx.seed, 13),
                                                     need_dgrad, need_wgrad, True, ctx.seed)
        ts_d = qd.tensor_scale
        mu_d_q = qd.mean_q
        dx = dw = db = None
        if need_dgrad:
            vrow = matvec(wc, mu_d_q, scale=ts_w, transpose=True) if mu_d_q is not None else None
            dx = gemm(qd.row_dq, wc.t(), dy.dtype, ts_d, ts_w, vrow)
        if need_wgrad:  # a = s_d·Q(R_D)ᵀ1, b = s_x·1ᵀQ(R_X) + n·Q(μ_X): formed in the GEMM epilogue
            r1 = None if mu_x_q is None else (d_sum, mu_x_q)
            r2 = None if mu_d_q is None else (mu_d_q, xsum)
            dw = gemm(d_col.t(), xc.t(), ctx.w_dtype, ts_dc, ts_x, None, r1, r2, wgrad_tokens=ctx.n_tokens)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.float().sum(0).to(dy.dtype)
        return dx, dw, db, None, None


def triton_linear_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: Recipe,
                        seed: int = 0) -> torch.Tensor:
    lead = x.shape[:-1]
    y = TritonAverisLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, recipe, seed)
    return y.reshape(*lead, weight.shape[0])


class TritonBackend(TorchBackend):
    """Triton kernels for Hopper; recipes or shapes it does not cover fall back to the torch reference."""

    name = "triton"

    def linear_train(self, x, weight, bias, recipe, seed):
        if not supports_recipe(recipe) or x.shape[-1] == 0 or x.numel() == 0:
            return super().linear_train(x, weight, bias, recipe, seed)
        # MXFP4 on FP8 tensor cores (exact, measured no faster than the default path: benchmarks/NOTES.md), opt-in
        fn = mx_fp8_linear_train if (recipe.format == "mxfp4" and not recipe.hadamard
                                     and env_choice("HF_LOWBIT_MX_FP8", ("0", "1")) == "1") else triton_linear_train
        if torch.is_autocast_enabled(x.device.type):  # the op's arithmetic is FP32/BF16 by itself (as reference)
            with torch.autocast(x.device.type, enabled=False):
                return fn(x, weight, bias, recipe, seed)
        return fn(x, weight, bias, recipe, seed)

    def _grouped(self, weight, recipe, x=None) -> bool:
        # default since its H200 run (4.3x faster than the reference, benchmarks/NOTES.md); =0 forces the reference
        return env_choice("HF_LOWBIT_GROUPED_TRITON", ("1", "0")) == "1" and supports_grouped(x, weight, recipe)

    def prepare_grouped_weight(self, weight, recipe, seed, need_dgrad):
        if not self._grouped(weight, recipe):
            return None
        return prepare_grouped_weight(weight, recipe, seed, need_dgrad)

    def grouped_linear_train(self, x, weight, mask, recipe, seed, prepared=None):
        if not self._grouped(weight, recipe, x):
            return super().grouped_linear_train(x, weight, mask, recipe, seed)
        with torch.autocast(x.device.type, enabled=False):  # the op's arithmetic is FP32/BF16 by itself
            return triton_grouped_linear_train(x, weight, mask, recipe, seed, prepared)

    def linear_packed(self, x, packed_weight: PackedTensor, bias, recipe):
        tokens = x.numel() // max(1, x.shape[-1])
        if (recipe.activations == "none" and not packed_weight.block_2d and packed_weight.axis == 1
                and 0 < tokens <= MAX_TOKENS and x.dtype in (torch.bfloat16, torch.float16, torch.float32)):
            b = None if bias is None else bias.to(x.dtype)
            return w4a16_linear(x, packed_weight, b)
        return super().linear_packed(x, packed_weight, bias, recipe)

    def quantize(self, x, format, axis=-1, rounding="rtn", generator=None, block_2d=False, mx_scale="floor"):
        if block_2d or x.dim() != 2 or axis not in (-1, 0, 1, -2) or x.numel() == 0:
            return super().quantize(x, format, axis, rounding, generator, block_2d, mx_scale)
        seed = 0
        if rounding == "sr":
            g = generator
            seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g, device=g.device if g else "cpu").item())
        return quantize_2d(x, format, axis, rounding, seed, mx_scale)
