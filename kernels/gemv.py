"""W4A16 decode kernel: Y = X · dequant(W)ᵀ for packed NVFP4/MXFP4 weights and a few tokens (batch 1-64).

The weight is read once in its packed form (codes uint8 [N, KP/2] low nibble first, scales uint8 [N, KP/B], NVFP4
FP32 tensor scale) and dequantized in registers exactly as the reference W4A16 path does
(``((code · s_b) · s_t).to(x.dtype)``), then multiplied on the tensor cores with FP32 accumulation (5-64 tokens),
or with FP32 FMAs on unrounded weights (1 token: `_w4a16_gemv_kernel`, a streaming GEMV; 2-4 tokens:
`_w4a16_fma_kernel`). Split-K partials (when the output has too few rows to fill the chip) are reduced
deterministically by a second launch.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from hf_lowbit.kernels._common import (bf16_rne, cdiv, e2m1_value, e4m3_decode, e8m0_scale, env_choice, env_ints,
                                       interpreting, next_pow2)
from hf_lowbit.numerics import PackedTensor

__all__ = ["w4a16_linear", "MAX_TOKENS"]

MAX_TOKENS = 64
#: HF_LOWBIT_GEMV: "stream" (default: the streaming 1-token kernel) or "fma" (the older 1-4-token FMA kernel for one
#: token too). MXFP4 through tl.dot_scaled was measured 3.5-4x slower on an H200 and removed (benchmarks/NOTES.md).
GEMV_IMPLS = ("stream", "fma")


@triton.jit
def _store_outputs(acc, n, nm, bb, bm, ps, bias_ptr, out_ptr, part_ptr, N, BB: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SPLIT: tl.constexpr, ROUND_BF16: tl.constexpr):
    """acc [BN, BB] (outputs n × tokens bb) → out [tokens, N] (+ bias, rounded once), or this K split's FP32
    partials for `_splitk_reduce_kernel`."""
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
    _store_outputs(acc, n, nm, bb, bm, ps, bias_ptr, out_ptr, part_ptr, N, BB, HAS_BIAS, SPLIT, ROUND_BF16)


@triton.jit
def _e2m1_x2m14(c):
    """Low nibble of int32 `c` (an E2M1 code) → its value × 2^-14 as FP32, via the FP16 bit pattern
    sign | 0 e1 e0 | m (an FP16 subnormal for |code| ≤ 1; the FP16→FP32 conversion is exact)."""
    bits = ((c & 8) << 12) | ((c & 7) << 9)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _block_scales_x2p14(s_ptr, n, nm, blk, KP, B: tl.constexpr, IS_NV: tl.constexpr):
    """Decoded block scales [rows n, blocks blk] × 2^14 (undoing `_e2m1_x2m14`'s 2^-14), FP32."""
    sb = tl.load(s_ptr + n[:, None].to(tl.int64) * (KP // B) + blk[None, :],
                 mask=nm[:, None] & (blk < KP // B)[None, :], other=0).to(tl.int32)
    if IS_NV:
        return e4m3_decode(sb) * 16384.0
    return e8m0_scale(sb) * 16384.0


@triton.jit
def _w4a16_fma_kernel(x_ptr, sxb, sxk, c_ptr, s_ptr, ts_ptr, bias_ptr, out_ptr, part_ptr, Bsz, N, K, KP,
                      NK_PER: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TB: tl.constexpr,
                      B: tl.constexpr, IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                      ROUND_W: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Decode for ≤ 4 tokens: codes dequantized in registers, FP32 FMAs, one block-scale multiply per 16/32
    products: y = s_t · Σ_blocks s_b · Σ_j code_j x_j (ROUND_W: the reference's BF16-rounded weights instead)."""
    pn = tl.program_id(0)
    ps = tl.program_id(1)
    HB: tl.constexpr = B // 2
    NB: tl.constexpr = BK // B
    n = pn * BN + tl.arange(0, BN)
    nm = n < N
    nb = tl.arange(0, NB)
    tb = tl.arange(0, TB)
    tm = tb < Bsz
    if IS_NV:
        ts = tl.load(ts_ptr)
    acc = tl.zeros([TB, BN, NB], dtype=tl.float32)
    for it in range(NK_PER):
        k0 = (ps * NK_PER + it) * BK
        kb = k0 // 2 + tl.arange(0, BK // 2)
        cb = tl.load(c_ptr + n[:, None].to(tl.int64) * (KP // 2) + kb[None, :],
                     mask=nm[:, None] & (kb < KP // 2)[None, :], other=0)
        cb = tl.reshape(cb, [BN, NB, HB]).to(tl.int32)
        sf = _block_scales_x2p14(s_ptr, n, nm, k0 // B + nb, KP, B, IS_NV)
        ke = k0 + tl.arange(0, BK)
        xx = tl.load(x_ptr + tb[:, None] * sxb + ke[None, :] * sxk, mask=tm[:, None] & (ke < K)[None, :],
                     other=0.0).to(tl.float32)
        xe, xo = tl.split(tl.reshape(xx, [TB, NB, HB, 2]))
        wl = _e2m1_x2m14(cb)
        wh = _e2m1_x2m14(cb >> 4)
        if ROUND_W:
            f = sf[:, :, None]
            if IS_NV:
                f = f * ts
            wl = bf16_rne(wl * f)
            wh = bf16_rne(wh * f)
            acc += tl.sum(wl[None, :, :, :] * xe[:, None, :, :] + wh[None, :, :, :] * xo[:, None, :, :], axis=3)
        else:
            part = tl.sum(wl[None, :, :, :] * xe[:, None, :, :] + wh[None, :, :, :] * xo[:, None, :, :], axis=3)
            acc += part * sf[None, :, :]
    res = tl.sum(acc, axis=2)
    if IS_NV and not ROUND_W:
        res = res * ts
    if SPLIT == 1:
        if HAS_BIAS:
            res += tl.load(bias_ptr + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        if ROUND_BF16:
            res = bf16_rne(res)
        tl.store(out_ptr + tb[:, None] * N + n[None, :], res.to(out_ptr.dtype.element_ty),
                 mask=tm[:, None] & nm[None, :])
    else:
        tl.store(part_ptr + ps * (TB * N) + tb[:, None] * N + n[None, :], res, mask=tm[:, None] & nm[None, :])


@triton.jit
def _w4a16_gemv_kernel(x_ptr, sxk, c_ptr, s_ptr, ts_ptr, bias_ptr, out_ptr, part_ptr, N, K, KP, NK_PER,
                       BN: tl.constexpr, NBLK: tl.constexpr, B: tl.constexpr, IS_NV: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, ROUND_W: tl.constexpr,
                       ROUND_BF16: tl.constexpr, PER_BLOCK: tl.constexpr):
    """Decode for 1 token, streaming the packed weight: each iteration loads a [BN, NBLK·B/2] tile of code bytes as
    contiguous row segments (16-byte vectors) and the matching even / odd activations directly in the tile's
    broadcast shape (no per-iteration layout shuffles); per block Σ code·x in FP32, times s_b into a [BN, NBLK]
    accumulator; one reduction at the end, s_t once per output. ROUND_W: the reference's BF16-rounded weights."""
    pn = tl.program_id(0)
    ps = tl.program_id(1)
    HB: tl.constexpr = B // 2
    BKB: tl.constexpr = NBLK * HB  # code bytes per row and iteration
    n = pn * BN + tl.arange(0, BN)
    nm = n < N
    jb = tl.arange(0, BKB)
    blk = tl.arange(0, NBLK)
    if IS_NV:
        ts = tl.load(ts_ptr)
    if PER_BLOCK:
        acc = tl.zeros([BN, NBLK], dtype=tl.float32)
    else:
        acc = tl.zeros([BN, NBLK, HB], dtype=tl.float32)
    for it in range(NK_PER):
        kb0 = (ps * NK_PER + it) * BKB  # first code byte of this iteration
        byte = kb0 + jb
        cb = tl.load(c_ptr + n[:, None].to(tl.int64) * (KP // 2) + byte[None, :],
                     mask=nm[:, None] & (byte < KP // 2)[None, :], other=0).to(tl.int32)
        sf = _block_scales_x2p14(s_ptr, n, nm, kb0 // HB + blk, KP, B, IS_NV)
        ke = 2 * byte
        xe = tl.load(x_ptr + ke * sxk, mask=ke < K, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + (ke + 1) * sxk, mask=ke + 1 < K, other=0.0).to(tl.float32)
        wl = tl.reshape(_e2m1_x2m14(cb), [BN, NBLK, HB])
        wh = tl.reshape(_e2m1_x2m14(cb >> 4), [BN, NBLK, HB])
        xe3 = tl.reshape(xe, [NBLK, HB])[None, :, :]
        xo3 = tl.reshape(xo, [NBLK, HB])[None, :, :]
        if ROUND_W:
            f = sf[:, :, None]
            if IS_NV:
                f = f * ts
            t = bf16_rne(wl * f) * xe3 + bf16_rne(wh * f) * xo3
        else:
            t = wl * xe3 + wh * xo3
        if PER_BLOCK:  # the block's 8/16 bytes sit in one thread (16-byte loads): the block sum needs no shuffles
            acc += tl.sum(t, axis=2) if ROUND_W else tl.sum(t, axis=2) * sf
        else:  # per-element accumulators (more registers, one FMA per byte less)
            acc += t if ROUND_W else t * sf[:, :, None]
    if PER_BLOCK:
        res = tl.sum(acc, axis=1)
    else:
        res = tl.sum(tl.sum(acc, axis=2), axis=1)
    if IS_NV and not ROUND_W:
        res = res * ts
    if SPLIT == 1:
        if HAS_BIAS:
            res += tl.load(bias_ptr + n, mask=nm, other=0.0).to(tl.float32)
        if ROUND_BF16:
            res = bf16_rne(res)
        tl.store(out_ptr + n, res.to(out_ptr.dtype.element_ty), mask=nm)
    else:
        tl.store(part_ptr + ps * N + n, res, mask=nm)


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



def _config(N: int, NK: int, bsz: int) -> tuple[int, int, int]:
    """(BN, BK, SPLIT) for the launch."""
    if interpreting():
        return 16, 64, (2 if NK >= 2 else 1)
    bn = 32 if bsz <= 16 else 64
    return bn, 256, _auto_split(cdiv(N, bn), NK, 3 * 132)


def _auto_split(n_tiles: int, nk: int, programs: int) -> int:
    """Split-K factor (a power of two ≤ the K iterations `nk`) that brings the grid to about `programs` programs."""
    split = 1
    while n_tiles * split < programs and split * 2 <= nk:
        split *= 2
    return split


def _fma_config(N: int, KP: int, B: int) -> tuple[int, int, int, int]:
    """(BN, BK, num_warps, SPLIT) of the ≤ 4-token kernel; HF_LOWBIT_GCFG="BN,BK,W,SPLIT" overrides (SPLIT 0 = auto)."""
    if interpreting():
        return 16, 64, 4, (2 if KP >= 128 else 1)
    bn, bk, w, split = 16, 256, 4, 0  # v2 sweep on H100 (NOTES.md): 16×256, 4 warps, auto split
    bn, bk, w, split = env_ints("HF_LOWBIT_GCFG", (1, 1, 1, 0)) or (bn, bk, w, split)
    bk = max(B, min(bk, next_pow2(KP)))
    nk = cdiv(KP, bk)
    if split <= 0:
        split = _auto_split(cdiv(N, bn), nk, 4 * 132)
    return bn, bk, w, min(split, nk)


def _gemv_config(N: int, KP: int, B: int) -> tuple[int, int, int, int]:
    """(BN, code bytes per row and iteration, num_warps, SPLIT) of the 1-token kernel; HF_LOWBIT_GEMV_CFG="BN,BYTES,W,
    SPLIT" overrides (SPLIT 0 = auto: split K until the grid has ~2 programs per SM)."""
    if interpreting():
        return 16, max(B // 2, 32), 4, (2 if KP >= 128 else 1)
    bn, nbytes, w, split = 16, 256, 4, 0  # H200 sweep (NOTES.md, 2026-11-30 third session): 16×256 fastest
    bn, nbytes, w, split = env_ints("HF_LOWBIT_GEMV_CFG", (1, 1, 1, 0)) or (bn, nbytes, w, split)
    nbytes = max(B // 2, min(nbytes, next_pow2(KP // 2)))
    nk = cdiv(KP // 2, nbytes)
    if split <= 0:
        split = _auto_split(cdiv(N, bn), nk, 2 * 132)
    return bn, nbytes, w, min(split, nk)


def w4a16_linear(x: torch.Tensor, w: PackedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (≤ MAX_TOKENS tokens) times the packed weight [N, K] (1-D blocks along K) → [..., N].

    1 token: the streaming GEMV kernel (HF_LOWBIT_GEMV=fma selects the older one); 2-4 tokens: register dequant +
    FP32 FMA kernel (both: weights not rounded to BF16 unless HF_LOWBIT_W4A16_ROUND_W=1: more accurate than the
    reference's BF16 weights, within 2^-9 relative per weight); more tokens: tensor cores.
    """
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
    is_nv = fmt.has_tensor_scale
    dev = x.device
    ts = w.tensor_scale.float().reshape(1) if is_nv else torch.empty(1, device=dev, dtype=torch.float32)
    out = torch.empty((bsz, N), device=dev, dtype=x.dtype)
    bias_t = bias if bias is not None else out
    round_w = x.dtype != torch.float32 and env_choice("HF_LOWBIT_W4A16_ROUND_W", ("0", "1")) == "1"
    impl = env_choice("HF_LOWBIT_GEMV", GEMV_IMPLS)
    if bsz == 1 and impl == "stream":
        BN, nbytes, nw, split = _gemv_config(N, KP, B)
        NK = cdiv(KP // 2, nbytes)
        nk_per = cdiv(NK, split)
        split = cdiv(NK, nk_per)
        part = torch.empty((split, 1, N), device=dev, dtype=torch.float32) if split > 1 else out
        _w4a16_gemv_kernel[(cdiv(N, BN), split)](
            x2, x2.stride(1), w.codes, w.scales, ts, bias_t, out, part, N, K, KP,
            tl.constexpr(nk_per) if interpreting() else nk_per,  # the interpreter cannot range() over a runtime int
            BN=BN, NBLK=nbytes // (B // 2), B=B, IS_NV=is_nv, HAS_BIAS=bias is not None, SPLIT=split,
            ROUND_W=round_w, ROUND_BF16=x.dtype == torch.bfloat16,
            PER_BLOCK=env_choice("HF_LOWBIT_GEMV_ACC", ("block", "elem")) == "block", num_warps=nw)
        BB = 1
    elif bsz <= 4:
        TB = next_pow2(bsz)
        BN, BK, nw, split = _fma_config(N, KP, B)
        NK = cdiv(KP, BK)
        nk_per = cdiv(NK, split)
        split = cdiv(NK, nk_per)
        part = torch.empty((split, TB, N), device=dev, dtype=torch.float32) if split > 1 else out
        _w4a16_fma_kernel[(cdiv(N, BN), split)](
            x2, x2.stride(0), x2.stride(1), w.codes, w.scales, ts, bias_t, out, part, bsz, N, K, KP,
            NK_PER=nk_per, BN=BN, BK=BK, TB=TB, B=B, IS_NV=is_nv, HAS_BIAS=bias is not None, SPLIT=split,
            ROUND_W=round_w, ROUND_BF16=x.dtype == torch.bfloat16, num_warps=nw)
        BB = TB
    else:
        BB = max(16, next_pow2(bsz))
        bk_default = _config(N, cdiv(KP, 64), bsz)
        BN, BK, _ = bk_default
        BK = max(B, min(BK, next_pow2(KP)))
        NK = cdiv(KP, BK)
        _, _, split = _config(N, NK, bsz)
        nk_per = cdiv(NK, split)
        split = cdiv(NK, nk_per)
        part = torch.empty((split, BB, N), device=dev, dtype=torch.float32) if split > 1 else out
        _w4a16_kernel[(cdiv(N, BN), split)](
            x2, x2.stride(0), x2.stride(1), w.codes, w.scales, ts, bias_t, out, part, bsz, N, K, KP,
            NK_PER=nk_per, BN=BN, BK=BK, BB=BB, B=B, IS_NV=is_nv, HAS_BIAS=bias is not None, SPLIT=split,
            DOT_F32=x.dtype == torch.float32 or interpreting(),
            ROUND_BF16=x.dtype == torch.bfloat16, num_warps=4, num_stages=3)
    if split > 1:
        BNR = 128
        _splitk_reduce_kernel[(cdiv(N, BNR),)](part, bias_t, out, N, bsz, SPLIT=split, BB=BB, BN=BNR,
                                                      HAS_BIAS=bias is not None,
                                                      ROUND_BF16=x.dtype == torch.bfloat16, num_warps=4)
    return out.reshape(*lead, N)
