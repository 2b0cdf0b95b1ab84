"""Grouped (MoE experts) W4A4G4 Averis linear on the Triton quantizer: x [G, L, K] · weight [G, N, K]ᵀ.

Same math as the reference `hf_lowbit.averis.GroupedAverisLinearFunction` (per-group mean over the group's real
tokens, per-group tensor scales, padding rows masked): the per-group statistics are a few torch reductions, the
quantization of every operand is one `grouped_quantize_dq` launch writing BF16 ``code × block scale`` (exact), the
per-group means are quantized by one `group_mean_quantized` launch, and each GEMM is one batched Triton GEMM
(`gemm.scaled_gemm`, FP32 accumulation) with the tensor scales, the rank-1 mean terms, the padding mask and the
output cast fused in its epilogue (no FP32 [G, L, N] intermediates). Quantized operands match the reference bit for
bit (RTN); outputs differ only by FP32 accumulation order; SR draws from Philox instead of torch's generator. With ``hadamard=True`` the wgrad operands are each group's
rotated residual (`kernels/token_axis.py`, per-group tensor scales) and the token sums of the rank-1 terms are
weighted by the rotated mask. Recipes the kernels do not cover (2-D weight blocks, block_axis="last", group sizes
that are not a multiple of the block) fall back to the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hf_lowbit.averis import hadamard_sign_bits, hadamard_signs, hadamard_tokens
from hf_lowbit.config import Recipe
from hf_lowbit.kernels._common import COMPILED, cdiv, env_ints, interpreting, max_nan
from hf_lowbit.kernels.gemm import fp32_mm, gemm_fn
from hf_lowbit.kernels.quantize import group_mean_quantized, grouped_quantize_dq, seed31
from hf_lowbit.kernels.token_axis import grouped_token_axis_quantize, split_col_kernel
from hf_lowbit.numerics import get_format

@triton.jit
def _group_col_stats_kernel(z_ptr, szg, szl, szk, ok_ptr, L, K, sum_ptr, max_ptr, min_ptr, HAS_MASK: tl.constexpr,
                            ROWS_PER: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr):
    """Partial (row split s, group, column) sum, max and min over the group's real rows (ok != 0; every row without
    HAS_MASK) in rows [s·ROWS_PER, (s+1)·ROWS_PER): one read of z. NaN counts as +inf in the max (a NaN group gets a
    non-finite tensor scale, as in the reference). Steps whose rows are all real skip the per-element selects (the
    masked pass ran at 1.67 TB/s on an H200, bound by its ~8 operations per element)."""
    grp = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    cmask = cols < K
    acc_s = tl.zeros([BL, BK], dtype=tl.float32)
    acc_max = tl.full([BL, BK], float("-inf"), tl.float32)
    acc_min = tl.full([BL, BK], float("inf"), tl.float32)
    for i in range(0, ROWS_PER, BL):
        rows = split * ROWS_PER + i + tl.arange(0, BL)
        if HAS_MASK:
            ok = tl.load(ok_ptr + grp * L + rows, mask=rows < L, other=0.0) != 0
        else:
            ok = rows < L
        ptrs = z_ptr + grp * szg + rows[:, None].to(tl.int64) * szl + cols[None, :] * szk
        if tl.min(ok.to(tl.int32), axis=0) > 0:
            # every row of the step is real (all but a group's last step): no per-element selects
            x = tl.load(ptrs, mask=cmask[None, :], other=0.0).to(tl.float32)
            x_hi = x
            x_lo = x
        else:
            m = ok[:, None] & cmask[None, :]
            x = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
            x_hi = tl.where(m, x, float("-inf"))
            x_lo = tl.where(m, x, float("inf"))
        # NaN propagated through the running max and min in both branches (made +inf / −inf below): a compiled
        # max without propagation drops a NaN that an earlier step left in the accumulator
        acc_s += x
        acc_max = tl.maximum(acc_max, x_hi, propagate_nan=tl.PropagateNan.ALL)
        acc_min = tl.minimum(acc_min, x_lo, propagate_nan=tl.PropagateNan.ALL)
    acc_max = tl.where(acc_max != acc_max, float("inf"), acc_max)
    acc_min = tl.where(acc_min != acc_min, float("-inf"), acc_min)
    out = (split * tl.num_programs(1) + grp) * K + cols
    tl.store(sum_ptr + out, tl.sum(acc_s, axis=0), mask=cmask)
    tl.store(max_ptr + out, tl.max(acc_max, axis=0), mask=cmask)
    tl.store(min_ptr + out, tl.min(acc_min, axis=0), mask=cmask)


@triton.jit
def _group_col_absmax_kernel(z_ptr, szg, szl, szk, L, K, max_ptr, min_ptr, ROWS_PER: tl.constexpr,
                             BL: tl.constexpr, BK: tl.constexpr):
    """Partial (row split, group, column) max |z| over every row (the weights: no mask, no mean), written as the
    column max and its negation as the column min, the layout `_group_finalize_kernel` reads. A NaN is written as
    +inf (the group's scale becomes NaN), as in the statistics pass. Two operations per element instead of eight."""
    grp = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    cmask = cols < K
    acc = tl.zeros([BL, BK], dtype=tl.float32)
    for i in range(0, ROWS_PER, BL):
        rows = split * ROWS_PER + i + tl.arange(0, BL)
        m = (rows < L)[:, None] & cmask[None, :]
        x = tl.load(z_ptr + grp * szg + rows[:, None].to(tl.int64) * szl + cols[None, :] * szk, mask=m,
                    other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
    if COMPILED:
        amax = tl.reduce(acc, 0, max_nan)
    else:  # the same values (a custom combine runs element by element in Python under the interpreter)
        amax = tl.where(tl.sum((acc != acc).to(tl.int32), axis=0) > 0, float("nan"), tl.max(acc, axis=0))
    amax = tl.where(amax != amax, float("inf"), amax)  # stored as +inf: the finalize's max over splits skips NaN
    out = (split * tl.num_programs(1) + grp) * K + cols
    tl.store(max_ptr + out, amax, mask=cmask)
    tl.store(min_ptr + out, -amax, mask=cmask)


@triton.jit
def _group_finalize_kernel(part_ptr, SPLITS, G, K, NUM_K, counts_ptr, mu_ptr, ts_ptr, CENTER: tl.constexpr,
                           IS_NV: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr):
    """One program per group: the splits' partials [3, SPLITS, G, K] → μ = Σ / max(count, 1) (CENTER; else 0) and the
    NVFP4 tensor scale max_k max(colmax − μ, μ − colmin) / 2688 of the centred residual (exact: FP32 subtraction is
    monotone). A non-finite column (NaN or Inf in the data, or a NaN μ) gives NaN; a group with no rows gives 0."""
    grp = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BS)
    smask = s < SPLITS
    if CENTER:
        cnt = tl.maximum(tl.load(counts_ptr + grp), 1.0)
    amax = tl.zeros([BK], dtype=tl.float32)
    bad = tl.zeros([BK], dtype=tl.int32)
    for it in range(NUM_K):
        cols = it * BK + tl.arange(0, BK)
        cmask = cols < K
        m2 = smask[:, None] & cmask[None, :]
        off = (s[:, None] * G + grp) * K + cols[None, :]
        if CENTER:
            tot = tl.sum(tl.load(part_ptr + off, mask=m2, other=0.0), axis=0)
            mu = tl.math.div_rn(tot, tl.zeros_like(tot) + cnt)
        else:
            mu = tl.zeros([BK], dtype=tl.float32)
        tl.store(mu_ptr + grp * K + cols, mu, mask=cmask)
        if IS_NV:
            mx = tl.max(tl.load(part_ptr + SPLITS * G * K + off, mask=m2, other=float("-inf")), axis=0)
            mn = tl.min(tl.load(part_ptr + 2 * SPLITS * G * K + off, mask=m2, other=float("inf")), axis=0)
            ca = tl.maximum(mx - mu, mu - mn)  # −inf for a column without rows: counts as 0 below
            bad = bad | (cmask & ((ca != ca) | (ca == float("inf")))).to(tl.int32)
            amax = tl.maximum(amax, tl.where(cmask & (ca > 0), ca, 0.0))
    if IS_NV:
        a = tl.max(amax, axis=0)
        ts = tl.where(tl.max(bad, axis=0) > 0, float("nan"), tl.math.div_rn(a, 2688.0 + tl.zeros_like(a)))
        tl.store(ts_ptr + grp, ts)


def masked_col_stats(z: torch.Tensor, mask: torch.Tensor | None, center: bool = True) -> tuple[torch.Tensor, int]:
    """FP32 partial column sums, maxima and minima [3, splits, G, K] of z [G, L, K] over the rows where mask [G, L]
    is nonzero, per split of a fixed number of rows (so that a changing L, the MoE capacity, never recompiles the
    kernel), and the split count. One Triton pass. Without a mask and without centring (the weights) only the
    extrema are written, as ±max |z| (the sums are not needed)."""
    g, length, k = z.shape
    weights = mask is None and not center
    # interpreter: two row steps per split (a step after another, as on the GPU's 256-row splits of 8-32-row steps)
    bl, bk, warps = (16, 64, 4) if interpreting() else stats_config(weights)
    rows_per = 32 if interpreting() else 256
    splits = cdiv(length, rows_per)
    part = torch.empty(3, splits, g, k, device=z.device, dtype=torch.float32)
    grid = (cdiv(k, bk), g, splits)
    if weights:
        _group_col_absmax_kernel[grid](z, z.stride(0), z.stride(1), z.stride(2), length, k, part[1], part[2],
                                       ROWS_PER=rows_per, BL=bl, BK=bk, num_warps=warps)
        return part, splits
    ok = mask.float().contiguous() if mask is not None else z
    _group_col_stats_kernel[grid](
        z, z.stride(0), z.stride(1), z.stride(2), ok, length, k, part[0], part[1], part[2], HAS_MASK=mask is not None,
        ROWS_PER=rows_per, BL=bl, BK=bk, num_warps=warps)
    return part, splits


def stats_config(weights: bool) -> tuple[int, int, int]:
    """(rows per loop step, columns, warps) of the grouped statistics kernels; HF_LOWBIT_GSTATS="BL,BK,W" overrides
    (benchmark sweeps). Measured on an H200 at P8 shapes (benchmarks/NOTES.md, fifth session): the masked
    sum/max/min pass is fastest with 8-row steps (1.66 TB/s; 32-row steps took 254 registers, 1.34 TB/s), the
    weights' abs-max pass with 32-row steps (3.66 TB/s; torch's aminmax 3.0)."""
    return env_ints("HF_LOWBIT_GSTATS", (1, 1, 1)) or ((32, 128, 4) if weights else (8, 128, 4))


def group_stats(z: torch.Tensor, mask: torch.Tensor | None, counts: torch.Tensor | None, center: bool, is_nv: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group mean over real rows (zeros when not centring) and NVFP4 tensor scale of the centred residual: two
    launches (the column statistics, then one program per group for μ and the scale).

    `mask` [G, L] marks real rows (None: all rows are real); `counts` [G] real rows per group (only read when
    centring). ``max |z − μ|`` over a column is ``max(colmax − μ, μ − colmin)`` exactly (FP32 subtraction is
    monotone), so no centred copy is built; a non-finite maximum gives a NaN tensor scale, as in the reference.
    """
    g, _, k = z.shape
    mu = torch.empty(g, k, device=z.device, dtype=torch.float32)
    if not (center or is_nv):
        return mu.zero_(), None
    part, splits = masked_col_stats(z, mask, center)
    ts = torch.empty(g, device=z.device, dtype=torch.float32) if is_nv else mu
    bk = min(256, triton.next_power_of_2(k))
    n_k = cdiv(k, bk)
    cnt = counts.float().contiguous() if center else mu
    _group_finalize_kernel[(g,)](part, splits, g, k, tl.constexpr(n_k) if interpreting() else n_k, cnt, mu, ts,
                                 CENTER=center, IS_NV=is_nv, BS=triton.next_power_of_2(splits), BK=bk, num_warps=4)
    return mu, ts if is_nv else None


#: spare rows per group in the fprop / dgrad row operand: row `length` carries the quantized mean (16 keeps each
#: group's rows 16-row aligned)
MEAN_ROWS = 16


def _gemm_rows(z_row: torch.Tensor, g: int, lp: int, length: int, k: int, mean_u: torch.Tensor | None
               ) -> torch.Tensor:
    """The fprop / dgrad A operand: the first `length` rows of each group, and with a mean also row `length` set to
    its quantized values (BF16, no tensor scale; a padding row or a spare row of the operand, which nothing else
    reads): the GEMM's extra output row is then the Averis rank-1 row Q(μ)·Q(W)ᵀ, without a GEMV re-reading W."""
    rows = z_row.view(g, lp + MEAN_ROWS, k)
    if mean_u is None:
        return rows[:, :length]
    rows[:, length] = mean_u.to(rows.dtype)
    return rows[:, :length + 1]


def _token_sums(col: torch.Tensor, mp: torch.Tensor, recipe: Recipe, seed: int) -> torch.Tensor:
    """Σ over each group's tokens of its wgrad operand [G, L, K] (zero on padding rows), FP32 [G, K]; with the
    Hadamard rotation weighted by the rotated mask T·m (multiples of 1/4: exact in BF16)."""
    if not recipe.hadamard:
        return col.sum(1, dtype=torch.float32)
    ones = hadamard_tokens(mp[..., None].float(), hadamard_signs(seed))[..., 0]
    return fp32_mm(ones[:, None, :].to(col.dtype), col)[:, 0]


def _wgrad_operand(z: torch.Tensor, lp: int, rowok: torch.Tensor, mu: torch.Tensor, ts: torch.Tensor | None,
                   recipe: Recipe, rounding: str, seed: int, seed_part: int, row: bool, col: bool, want_sum: bool
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(row-axis operand, token-axis wgrad operand, the latter's tensor scales, its per-group token sums or None) of
    z [G·lp, K]: the token axis from the same launch as the row axis (with the sums when `want_sum`), or from its own
    (`kernels/token_axis.py`): always for the rotated residual (``hadamard=True``, its own tensor scales), else with
    HF_LOWBIT_COL_KERNEL=split; the sums are then None (see `_token_sums`). The row-axis operand has MEAN_ROWS spare
    rows per group, [G·(lp + MEAN_ROWS), K] (see `_gemm_rows`)."""
    split = col and (recipe.hadamard or split_col_kernel())
    z_row = z_col = z_sum = None
    if row or (col and not split):
        z_row, z_col, *rest = grouped_quantize_dq(z, lp, rowok, mu, ts, recipe.format, rounding,
                                                  seed31(seed, seed_part), row=row, col=col and not split,
                                                  mx_scale=recipe.mx_scale, col_sum=want_sum and col and not split,
                                                  row_extra=MEAN_ROWS)
        z_sum = rest[0] if rest else None
    ts_col = ts
    if split:
        z_col, ts_col = grouped_token_axis_quantize(z, lp, rowok, mu, ts,
                                                    hadamard_sign_bits(seed) if recipe.hadamard else None,
                                                    recipe.format, rounding, seed31(seed, seed_part + 10),
                                                    recipe.mx_scale)
    return z_row, z_col, ts_col, z_sum


@dataclass
class PreparedWeight:
    """A grouped weight's FP4 operands: BF16 code × block scale along K (fprop) and along N (dgrad, or None), and
    the per-group NVFP4 tensor scales (None for MXFP4)."""

    row: torch.Tensor                  # [G, N, K]
    col: torch.Tensor | None           # [G·N, K]
    tensor_scale: torch.Tensor | None  # [G]


_ONES: dict[tuple, torch.Tensor] = {}


def _all_rows(n: int, device: torch.device) -> torch.Tensor:
    """A cached [n] uint8 tensor of ones (the weights' rows are all real): no fill launch per step."""
    key = (n, str(device))
    if key not in _ONES:
        _ONES[key] = torch.ones(n, device=device, dtype=torch.uint8)
    return _ONES[key]


def prepare_grouped_weight(weight: torch.Tensor, recipe: Recipe, seed: int, need_dgrad: bool) -> PreparedWeight:
    """Quantize weight [G, N, K] for the grouped linear (per-group tensor scales; the dgrad copy if `need_dgrad`):
    three launches (column statistics, scales, the quantizer)."""
    is_nv = get_format(recipe.format).scale_kind == "e4m3"
    g, n, k = weight.shape
    w_mu, ts_w = group_stats(weight, None, None, False, is_nv)
    w_row, w_col = grouped_quantize_dq(weight.reshape(g * n, k), n, _all_rows(g * n, weight.device), w_mu, ts_w,
                                       recipe.format, "sr" if recipe.sr_weights else "rtn", seed31(seed, 22),
                                       row=True, col=need_dgrad, mx_scale=recipe.mx_scale)
    return PreparedWeight(w_row.view(g, n, k), w_col, ts_w)


class TritonGroupedAverisLinear(torch.autograd.Function):
    """W4A4G4 Averis linear over G groups with the Triton quantizer (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, recipe: Recipe,
                seed: int, prepared: PreparedWeight | None) -> torch.Tensor:
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fmt = get_format(recipe.format)
        is_nv = fmt.scale_kind == "e4m3"
        g, length, k = x.shape
        n = weight.shape[1]
        lp = -(-length // fmt.block_size) * fmt.block_size
        xp, mp = (F.pad(x, (0, 0, 0, lp - length)), F.pad(mask, (0, lp - length))) if lp != length else (x, mask)
        counts = mp.sum(1)
        rowok = mp.reshape(-1) != 0
        mu_x, ts_x = group_stats(xp, mp, counts, recipe.center_activations, is_nv)
        x_row, x_col, ts_xc, x_sum = _wgrad_operand(xp.reshape(g * lp, k), lp, rowok, mu_x, ts_x, recipe,
                                                    "sr" if recipe.sr_activations else "rtn", seed, 21, True,
                                                    need_wgrad, True)
        if prepared is None or (need_dgrad and prepared.col is None):
            prepared = prepare_grouped_weight(weight, recipe, seed, need_dgrad)
        w_row, w_col, ts_w = prepared.row, prepared.col, prepared.tensor_scale
        mu_x_q = mu_x_u = None
        mean_kw = {}
        if recipe.center_activations:
            mu_x_q, mu_x_u, ts_mu = group_mean_quantized(mu_x, recipe.format, "sr" if recipe.sr_activations else "rtn",
                                                         seed31(seed, 24), recipe.mx_scale)
            mean_kw = dict(mean_last_row=True, mean_scale=ts_mu)
        # tensor scales, the rank-1 mean row (from the mean row of the operand), the padding mask and the output cast
        # in the epilogue
        y = gemm_fn(grouped=True)(_gemm_rows(x_row, g, lp, length, k, mu_x_u), w_row, x.dtype, ts_x, ts_w,
                                  row_mask=mp[:, :length], **mean_kw)
        if need_wgrad and x_sum is None:
            x_sum = _token_sums(x_col.view(g, lp, k), mp, recipe, seed)
        saved = [x_col, x_sum, ts_xc, mu_x_q, w_col, ts_w, mp, counts]
        ctx.has = [t is not None for t in saved]
        ctx.save_for_backward(*[t for t in saved if t is not None])
        ctx.meta = (recipe, seed, length, lp, n, k, weight.dtype)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        it = iter(ctx.saved_tensors)
        x_col, x_sum, ts_x, mu_x_q, w_col, ts_w, mp, counts = [next(it) if h else None for h in ctx.has]
        recipe, seed, length, lp, n, k, w_dtype = ctx.meta
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gemm = gemm_fn(grouped=True)
        is_nv = get_format(recipe.format).scale_kind == "e4m3"
        g = dy.shape[0]
        # padding rows need no zeroing here: the stats skip them and the quantizer writes them as 0 (rowok)
        d = F.pad(dy, (0, 0, 0, lp - length)) if lp != length else dy
        mu_d, ts_d = group_stats(d, mp, counts, recipe.center_gradients, is_nv)
        d_row, d_col, ts_dc, d_sum = _wgrad_operand(d.reshape(g * lp, n), lp, mp.reshape(-1) != 0, mu_d, ts_d,
                                                    recipe, "sr" if recipe.sr_gradients else "rtn", seed, 23,
                                                    need_dgrad, need_wgrad, mu_x_q is not None)
        mu_d_q = mu_d_u = ts_mud = None
        if recipe.center_gradients:
            mu_d_q, mu_d_u, ts_mud = group_mean_quantized(mu_d, recipe.format, "sr" if recipe.sr_gradients else "rtn",
                                                          seed31(seed, 25), recipe.mx_scale)
        dx = dw = None
        if need_dgrad:
            mean_kw = {} if mu_d_u is None else dict(mean_last_row=True, mean_scale=ts_mud)
            dx = gemm(_gemm_rows(d_row, g, lp, length, n, mu_d_u), w_col.view(g, n, k).transpose(1, 2), dy.dtype,
                      ts_d, ts_w, row_mask=mp[:, :length], **mean_kw)
        if need_wgrad:
            dc = d_col.view(g, lp, n)
            x_sum_s = x_sum * (1.0 if ts_x is None else ts_x[:, None])
            r1 = r2 = None
            if mu_x_q is not None:
                d_sum = _token_sums(dc, mp, recipe, seed) if d_sum is None else d_sum
                r1 = (d_sum * (1.0 if ts_dc is None else ts_dc[:, None]), mu_x_q)
            if mu_d_q is not None:  # counts = Σ m² = ‖T·m‖² (the rotation is orthogonal; exact for 0/1 masks)
                r2 = (mu_d_q, x_sum_s if mu_x_q is None else x_sum_s + counts[:, None] * mu_x_q)
            dw = gemm(dc.transpose(1, 2), x_col.view(g, lp, k).transpose(1, 2), w_dtype, ts_dc, ts_x,
                             None, r1, r2)
        return dx, dw, None, None, None, None


def supports_grouped(x: torch.Tensor | None, weight: torch.Tensor, recipe: Recipe) -> bool:
    """Shapes and recipes the grouped Triton path covers (else the reference runs); x=None: the weight's part."""
    b = get_format(recipe.format).block_size
    return (recipe.block_axis == "reduction" and recipe.weight_blocks == "1d" and weight.dim() == 3
            and (x is None or (x.dim() == 3 and x.numel() > 0)) and weight.shape[1] % b == 0
            and weight.shape[-1] > 0)


def triton_grouped_linear_train(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, recipe: Recipe,
                                seed: int = 0, prepared: PreparedWeight | None = None) -> torch.Tensor:
    """x [G, L, K], weight [G, N, K], mask [G, L] (1 = real token) → [G, L, N] with autograd; `prepared`: the
    weight's operands from `prepare_grouped_weight(weight, recipe, seed, ...)` (else computed here)."""
    return TritonGroupedAverisLinear.apply(x, weight, mask.to(torch.float32), recipe, seed, prepared)
