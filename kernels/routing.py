"""Token ↔ expert-major row movement of the MoE experts in one pass each (Triton), forward and backward.

The FP4 experts compute on an expert-major layout ``[E·C, H]``; moving tokens into it and summing the expert outputs
back were five to seven torch ops per direction over the ``[T·k, H]`` assignment rows (index_select, index_copy, an
FP32 product tensor, a sum, a cast, and in the backward a BF16 `index_add`), ~5 ms of the 21 ms P8 step on an H200.
Each kernel here reads its rows once and writes its result once, in a fixed order (no atomics: the bits do not vary
from run to run), with the numerics of the torch path (`model_patches.experts.Routing`):

* `gather_rows`:   out[r] = hidden[row_token[r]] (zeros where row_token is −1: padding rows);
* `sum_slots`:     out[t] = Σ_j (w[t, j]·) rows[slot_rows[t, j]] over kept slots (slot_rows ≥ 0), FP32 products
                   and sum, one rounding (unweighted: the gather's backward; weighted: the combine);
* `combine_rows_backward`: grad_y[slot_rows[t, j]] = g[t]·w[t, j] (zeros elsewhere), grad_w[t, j] = Σ_h g·y.

One program per output row, a loop over the hidden dimension in chunks; sums over the k slots run in slot order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_lowbit.kernels._common import cdiv, interpreting, round_to

_BH = 1024  # hidden-dimension chunk per loop step (16-byte vectors, 4 warps)


def _chunks(h: int) -> tuple[int, int]:
    """(chunk width, chunk count) over the hidden dimension; the interpreter needs the count as a constexpr."""
    bh = min(_BH, triton.next_power_of_2(h))
    n = cdiv(h, bh)
    return bh, (tl.constexpr(n) if interpreting() else n)


@triton.jit
def _gather_rows_kernel(src_ptr, idx_ptr, out_ptr, H, NUM_H, BH: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    t = tl.load(idx_ptr + r).to(tl.int64)
    for it in range(NUM_H):
        cols = it * BH + tl.arange(0, BH)
        m = cols < H
        v = tl.load(src_ptr + tl.maximum(t, 0) * H + cols, mask=m & (t >= 0), other=0.0)
        tl.store(out_ptr + r * H + cols, v, mask=m)


@triton.jit
def _slot_sum_kernel(rows_ptr, slot_ptr, w_ptr, out_ptr, H, NUM_H, K: tl.constexpr, WEIGHTED: tl.constexpr,
                     BH: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    for it in range(NUM_H):
        cols = it * BH + tl.arange(0, BH)
        m = cols < H
        acc = tl.zeros([BH], dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(slot_ptr + t * K + j).to(tl.int64)
            v = tl.load(rows_ptr + tl.maximum(row, 0) * H + cols, mask=m & (row >= 0), other=0.0).to(tl.float32)
            if WEIGHTED:
                v = v * tl.load(w_ptr + t * K + j).to(tl.float32)
            acc += v
        tl.store(out_ptr + t * H + cols, round_to(acc, out_ptr), mask=m)


@triton.jit
def _combine_backward_kernel(g_ptr, y_ptr, slot_ptr, w_ptr, gy_ptr, gw_ptr, H, NUM_H, K: tl.constexpr,
                             KP: tl.constexpr, BH: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, KP)
    dots = tl.zeros([KP], dtype=tl.float32)
    for it in range(NUM_H):
        cols = it * BH + tl.arange(0, BH)
        m = cols < H
        g = tl.load(g_ptr + t * H + cols, mask=m, other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            row = tl.load(slot_ptr + t * K + j).to(tl.int64)
            keep = row >= 0
            w = tl.load(w_ptr + t * K + j).to(tl.float32)
            y = tl.load(y_ptr + tl.maximum(row, 0) * H + cols, mask=m & keep, other=0.0).to(tl.float32)
            tl.store(gy_ptr + tl.maximum(row, 0) * H + cols, round_to(g * w, gy_ptr), mask=m & keep)
            dots += tl.where(ks == j, tl.sum(g * y, axis=0), 0.0)
    tl.store(gw_ptr + t * K + ks, dots, mask=ks < K)


def gather_rows(src: torch.Tensor, row_token: torch.Tensor) -> torch.Tensor:
    """[R] rows of `src` [T, H] picked by `row_token` (int, −1: a zero row) → [R, H] in src's dtype."""
    src = src.contiguous()
    out = torch.empty((row_token.numel(), src.shape[1]), device=src.device, dtype=src.dtype)
    bh, n = _chunks(src.shape[1])
    _gather_rows_kernel[(row_token.numel(),)](src, row_token, out, src.shape[1], n, BH=bh)
    return out


def sum_slots(rows: torch.Tensor, slot_rows: torch.Tensor, weights: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[T, H]: per token, Σ over its k slots of (weight ×) `rows`[slot_rows[t, j]] (slot_rows [T, k], −1: dropped),
    summed in FP32 in slot order and rounded once to `out_dtype` (default: the rows' dtype)."""
    rows = rows.contiguous()
    t, k = slot_rows.shape
    out = torch.empty((t, rows.shape[1]), device=rows.device, dtype=out_dtype or rows.dtype)
    bh, n = _chunks(rows.shape[1])
    w = weights.contiguous() if weights is not None else slot_rows
    _slot_sum_kernel[(t,)](rows, slot_rows, w, out, rows.shape[1], n, K=k, WEIGHTED=weights is not None, BH=bh)
    return out


def combine_rows_backward(grad: torch.Tensor, y: torch.Tensor, slot_rows: torch.Tensor,
                          weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `sum_slots(y, slot_rows, weights)` for the output gradient `grad` [T, H]: (grad_y in y's dtype,
    zeros on rows no slot picks; grad_w [T, k] FP32, the dot products summed over H chunks in order)."""
    grad, y = grad.contiguous(), y.contiguous()
    t, k = slot_rows.shape
    gy = torch.zeros_like(y)
    gw = torch.empty((t, k), device=y.device, dtype=torch.float32)
    bh, n = _chunks(y.shape[1])
    _combine_backward_kernel[(t,)](grad, y, slot_rows, weights.contiguous(), gy, gw, y.shape[1], n, K=k,
                                   KP=triton.next_power_of_2(k), BH=bh)
    return gy, gw
