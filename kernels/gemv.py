"""W4A16 decode kernel: Y = X · dequant(W)ᵀ for packed NVFP4/MXFP4 weights and a few tokens (batch 1-64).

The weight is read once in its packed form (codes uint8 [N, KP/2] low nibble first, scales uint8 [N, KP/B], NVFP4
FP32 tensor scale) and dequantized in registers exactly as the reference W4A16 path does
(``((code · s_b) · s_t).to(x.dtype)``), then multiplied on the tensor cores with FP32 accumulation. Split-K
partials (when the output has too few rows to fill the chip) are reduced deterministically by a second launch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hf_lowbit.kernels._common import bf16_rne, e2m1_value, e4m3_decode, e8m0_scale
from hf_lowbit.numerics import PackedTensor

__all__ = ["w4a16_linear", "MAX_TOKENS"]

MAX_TOKENS = 64


@triton.jit
def _w4a16_kernel(x_ptr, sxb, sxk, c_ptr, s_ptr, ts_ptr, bias_ptr, out_ptr, part_ptr, Bsz, N, K, KP,
                  NK_PER: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BB: tl.constexpr, B: tl.constexpr,
                  IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
                  ROUND_BF16: tl.constexpr):
    pn = tl.program_id(0)
    ps = tl.program_id(1)
    n = pn * BN + tl.arange(0, BN)
    nm = n < N
    bb = tl.arange(0, BB)
    bm = bb < Bsz
    acc = tl.zeros([BN, BB], dtype=tl.float32)
    if IS_NV:
        ts = tl.load(ts_ptr)
    for it in range(NK_PER):
        k0 = (ps * NK_PER + it) * BK
        kk = k0 // 2 + tl.arange(0, BK // 2)
        cb = tl.load(c_ptr + n[:, None].to(tl.int64) * (KP // 2) + kk[None, :],
                     mask=nm[:, None] & (kk < KP // 2)[None, :], other=0).to(tl.int32)
        w = tl.reshape(tl.join(e2m1_value(cb & 15), e2m1_value(cb >> 4)), [BN, BK // B, B])
        kb = k0 // B + tl.arange(0, BK // B)
        sb = tl.load(s_ptr + n[:, None].to(tl.int64) * (KP // B) + kb[None, :],
                     mask=nm[:, None] & (kb < KP // B)[None, :], other=0).to(tl.int32)
        if IS_NV:
            sf = e4m3_decode(sb)
        else:
            sf = e8m0_scale(sb)
        w = tl.reshape(w * sf[:, :, None], [BN, BK])
        if IS_NV:
            w = w * ts
        k = k0 + tl.arange(0, BK)
        xt = tl.load(x_ptr + bb[None, :] * sxb + k[:, None] * sxk, mask=bm[None, :] & (k < K)[:, None], other=0.0)
        if ROUND_BF16:  # explicit round-to-nearest-even to BF16 (the interpreter's cast truncates)
            w = bf16_rne(w)
        else:
            w = w.to(xt.dtype).to(tl.float32)
        if DOT_F32:
            acc += tl.dot(w, xt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(w.to(xt.dtype), xt)
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=nm, other=0.0).to(tl.float32)[:, None]
        if ROUND_BF16:
            acc = bf16_rne(acc)
        tl.store(out_ptr + bb[None, :] * N + n[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=nm[:, None] & bm[None, :])
    else:
        tl.store(part_ptr + ps * (BB * N) + bb[None, :] * N + n[:, None], acc, mask=nm[:, None] & bm[None, :])


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, N, Bsz, SPLIT: tl.constexpr, BB: tl.constexpr,
                          BN: tl.constexpr, HAS_BIAS: tl.constexpr,
                          ROUND_BF16: tl.constexpr):
    pn = tl.program_id(0)
    n = pn * BN + tl.arange(0, BN)
    b = tl.arange(0, BB)
    m = (n < N)[None, :] & (b < Bsz)[:, None]
    acc = tl.zeros([BB, BN], dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * (BB * N) + b[:, None] * N + n[None, :], mask=m, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    if ROUND_BF16:
        acc = bf16_rne(acc)
    tl.store(out_ptr + b[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(N: int, NK: int, bsz: int) -> tuple[int, int, int]:
    """(BN, BK, SPLIT) for the launch."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return 16, 64, (2 if NK >= 2 else 1)
    bn = 32 if bsz <= 16 else 64
    n_tiles = triton.cdiv(N, bn)
    split = 1
    while n_tiles * split < 3 * 132 and split * 2 <= NK:
        split *= 2
    return bn, 256, split


def w4a16_linear(x: torch.Tensor, w: PackedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (≤ MAX_TOKENS tokens) times the packed weight [N, K] (1-D blocks along K) → [..., N]."""
    if w.block_2d or w.axis != 1 or len(w.shape) != 2:
        raise ValueError("w4a16_linear needs a 1-D-blocked [out, in] packed weight (axis 1)")
    N, K = w.shape
    fmt = w.fmt
    B = fmt.block_size
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    bsz = x2.shape[0]
    if bsz > MAX_TOKENS or bsz == 0:
        raise ValueError(f"w4a16_linear handles 1..{MAX_TOKENS} tokens, got {bsz}")
    KP = w.codes.shape[1] * 2
    BB = max(16, triton.next_power_of_2(bsz))
    is_nv = fmt.has_tensor_scale
    dev = x.device
    ts = w.tensor_scale.float().reshape(1) if is_nv else torch.empty(1, device=dev, dtype=torch.float32)
    out = torch.empty((bsz, N), device=dev, dtype=x.dtype)
    bias_t = bias if bias is not None else out
    bk_default = _config(N, triton.cdiv(KP, 64), bsz)
    BN, BK, _ = bk_default
    BK = max(B, min(BK, triton.next_power_of_2(KP)))
    NK = triton.cdiv(KP, BK)
    _, _, split = _config(N, NK, bsz)
    nk_per = triton.cdiv(NK, split)
    split = triton.cdiv(NK, nk_per)
    part = torch.empty((split, BB, N), device=dev, dtype=torch.float32) if split > 1 else out
    _w4a16_kernel[(triton.cdiv(N, BN), split)](
        x2, x2.stride(0), x2.stride(1), w.codes, w.scales, ts, bias_t, out, part, bsz, N, K, KP,
        NK_PER=nk_per, BN=BN, BK=BK, BB=BB, B=B, IS_NV=is_nv, HAS_BIAS=bias is not None, SPLIT=split,
        DOT_F32=x.dtype == torch.float32 or _interp(),
        ROUND_BF16=x.dtype == torch.bfloat16, num_warps=4, num_stages=3)
    if split > 1:
        BNR = 128
        _splitk_reduce_kernel[(triton.cdiv(N, BNR),)](part, bias_t, out, N, bsz, SPLIT=split, BB=BB, BN=BNR,
                                                      HAS_BIAS=bias is not None,
                                                      ROUND_BF16=x.dtype == torch.bfloat16, num_warps=4)
    return out.reshape(*lead, N)
