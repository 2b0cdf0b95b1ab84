"""Triton kernels vs the reference numerics (hf_lowbit.numerics / hf_lowbit.averis).

Runs on the CPU under TRITON_INTERPRET=1 (tiny shapes) and, unchanged, on a CUDA GPU without the interpreter.
Skipped when neither is available.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import kernel_switch, kernel_test_device

DEV = kernel_test_device()
INTERPRET = DEV == "cpu"
triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from hf_lowbit.averis import averis_linear, packed_linear  # noqa: E402
from hf_lowbit.config import Recipe  # noqa: E402
from hf_lowbit.kernels._common import COMPILED, e4m3_rne, round_e2m1  # noqa: E402
from hf_lowbit.kernels.gemv import w4a16_linear  # noqa: E402
from hf_lowbit.kernels.linear import TritonBackend, triton_linear_train  # noqa: E402
from hf_lowbit.kernels.quantize import _nv_scaled, averis_quantize, fma_quotient, nv_inv_den  # noqa: E402
from hf_lowbit.numerics import dequantize, fake_quantize, quantize, round_to_e2m1  # noqa: E402

SHAPES = [(64, 64), (37, 50), (16, 100)] + ([(1000, 1536)] if DEV == "cuda" else [])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _act(m, k, seed, dtype=torch.bfloat16):
    g = _gen(seed)
    x = torch.randn(m, k, generator=g) * 2 + torch.randn(k, generator=g) * 4
    x[0, 0] = 40.0  # an outlier
    return x.to(dtype).to(DEV)


@triton.jit
def _e4m3_probe(x_ptr, v_ptr, b_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    v, b = e4m3_rne(x)
    tl.store(v_ptr + offs, v, mask=m)
    tl.store(b_ptr + offs, b.to(tl.uint8), mask=m)


def test_e4m3_rounding_matches_torch_cast_including_ties():
    codes = torch.arange(0, 127, dtype=torch.uint8)  # every finite non-negative E4M3 value
    vals = codes.view(torch.float8_e4m3fn).float()
    mids = (vals[:-1] + vals[1:]) / 2  # exact ties (round half to even)
    near = torch.cat([mids * (1 + 2 ** -20), mids * (1 - 2 ** -20)])
    rnd = torch.rand(4000, generator=_gen(0)) * 448
    tiny = torch.rand(1000, generator=_gen(1)) * 2 ** -6
    x = torch.cat([vals, mids, near, rnd, tiny, torch.tensor([0.0, 448.0, 2 ** -10, 3 * 2 ** -10])])
    x = x.clamp(max=448.0).to(DEV)
    v = torch.empty_like(x)
    b = torch.empty(x.shape, dtype=torch.uint8, device=DEV)
    _e4m3_probe[(triton.cdiv(x.numel(), 1024),)](x, v, b, x.numel(), BLOCK=1024)
    ref = x.to(torch.float8_e4m3fn)
    assert torch.equal(b.cpu(), ref.view(torch.uint8).cpu())
    assert torch.equal(v.cpu(), ref.float().cpu())


@triton.jit
def _div_probe(r_ptr, d_ptr, quot_ptr, code_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    r = tl.load(r_ptr + offs, mask=m, other=0.0)
    den = tl.load(d_ptr + offs, mask=m, other=1.0)
    y, bad = nv_inv_den(den)
    if COMPILED:  # the interpreter's FMA is not fused: the quotient is only checked compiled
        tl.store(quot_ptr + offs, fma_quotient(r, den, y), mask=m)
    tl.store(code_ptr + offs, round_e2m1(_nv_scaled(r, den, y, bad, False, True), False, 0.0).to(tl.uint8), mask=m)


def _quotient_cases(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, d) pairs as the quantizer forms them (d = E4M3 block scale × FP32 tensor scale, rounded): quotients within
    a few ulps of every E2M1 boundary, on the rounded boundary products and their neighbours, anywhere in [0, 7),
    tiny and huge divisors, zeros, one divisor outside the proven range and a NaN."""
    g = _gen(seed)
    sb = (torch.rand(n, generator=g) * 448).to(torch.float8_e4m3fn).float().clamp(min=2.0 ** -9)
    ts = torch.rand(n, generator=g) * 10.0 ** torch.randint(-28, 28, (n,), generator=g).float()
    den = sb * ts
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0])
    t = mids[torch.randint(0, len(mids), (n,), generator=g)]
    k = torch.randint(-40, 41, (n,), generator=g).float()
    r = (t.double() * den.double() * (1 + k.double() * 2.0 ** -24)).float()  # within a few ulps of a boundary
    r2 = (torch.rand(n, generator=g) * 7) * den                              # anywhere
    r3 = t * den                                                              # on (rounded) boundary products
    rr = torch.cat([r, -r2, r3, torch.nextafter(r3, torch.full_like(r3, 1e30)), torch.zeros(4)])
    dd = torch.cat([den, den, den, den, torch.tensor([0.0, 1e-38, 2.0, float("nan")])])
    rr[-3] = 3e-38  # a divisor outside the proven range → the tile takes the IEEE division
    rr[-2] = -1e-45
    return rr, dd


def test_fma_quotient_equals_the_ieee_division():
    """fl(r/d) from RN(1/d) and four FMAs equals the IEEE quotient bit for bit (compiled), and the E2M1 codes of the
    FMA_QUOT path equal the reference's on boundary-heavy inputs (both devices; the interpreter divides)."""
    rr, dd = _quotient_cases(4096, 21)
    with torch.no_grad():
        q_ref = torch.where(dd == 0, 0.0, rr / torch.where(dd == 0, 1.0, dd))
    ref = round_to_e2m1(q_ref)
    quot = torch.zeros(rr.shape, device=DEV)
    code = torch.empty(rr.shape, dtype=torch.uint8, device=DEV)
    _div_probe[(triton.cdiv(rr.numel(), 1024),)](rr.to(DEV), dd.to(DEV), quot, code, rr.numel(), BLOCK=1024)
    assert torch.equal(code.cpu(), ref)
    if not INTERPRET:
        ok = (dd >= 2.0 ** -100) & (dd <= 2.0 ** 100)  # the proven range (the tile falls back outside it)
        exact = (rr.to(DEV) / dd.to(DEV))[ok.to(DEV)]  # CUDA's FP32 division is IEEE round-to-nearest
        assert torch.equal(quot[ok.to(DEV)].view(torch.int32), exact.view(torch.int32))


def _rn32(x: "Fraction") -> "Fraction":
    """The FP32 value nearest the rational x (ties to even), subnormals included, exactly (no double rounding)."""
    from fractions import Fraction

    if x == 0:
        return Fraction(0)
    sign, a = (-1 if x < 0 else 1), abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    quantum = Fraction(2) ** (max(e, -126) - 23)  # ulp of the binade (the subnormal ulp below 2^-126)
    m, rem = divmod(a / quantum, 1)
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and m % 2 == 1):
        m += 1
    return sign * m * quantum


def test_fma_quotient_sequence_is_correctly_rounded_in_exact_arithmetic():
    """The four-FMA sequence of `fma_quotient` with each FMA rounded once (exact rational arithmetic, no GPU): it
    gives RN(r/d) for every case, adversarial boundary quotients included, with d in the proven range."""
    import numpy as np
    from fractions import Fraction

    rr, dd = _quotient_cases(512, 5)
    ok = (dd >= 2.0 ** -100) & (dd <= 2.0 ** 100) & (dd == dd)
    rr, dd = rr[ok].tolist(), dd[ok].tolist()
    lcg = np.random.default_rng(7)  # plus random FP32 bit patterns of both operands (normal range)
    bits = lcg.integers(0x0D800000, 0x72800000, size=(600, 2), dtype=np.int64).astype(np.int32)
    f = bits.view(np.float32).astype(np.float64)
    rr += (f[:, 0] * np.where(lcg.random(600) < 0.5, -1, 1)).tolist()
    dd += f[:, 1].tolist()
    for r, d in zip(rr, dd):
        R, D = Fraction(r), Fraction(d)
        y = _rn32(1 / D)
        q0 = _rn32(R * y)
        q1 = _rn32(q0 + _rn32(R - D * q0) * y)
        q = _rn32(q1 + _rn32(R - D * q1) * y)
        assert q == _rn32(R / D), (r, d)


@pytest.mark.parametrize("fmt", ["nvfp4"])
@pytest.mark.parametrize("qdiv", ["ieee", "fma"])
def test_rtn_bit_exact_tie_heavy(fmt, qdiv, monkeypatch):
    """Inputs on a coarse grid put many quotients exactly on rounding boundaries (where a quotient off by one ulp
    would change the code)."""
    monkeypatch.setenv("HF_LOWBIT_QDIV", qdiv)
    g = _gen(33)
    x = (torch.randint(-48, 49, (64, 96), generator=g).float() / 8).to(DEV)
    for center in (False, True):
        q = averis_quantize(x, fmt, center=center, row=True, col=True)
        r = x.float() - q.mean if center else x.float()
        for axis, p in ((1, q.row), (0, q.col)):
            ref = quantize(r, fmt, axis)
            assert torch.equal(p.codes, ref.codes) and torch.equal(p.scales, ref.scales)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("qdiv", ["ieee", "fma"])
def test_rtn_bit_exact_both_axes(fmt, shape, center, qdiv, monkeypatch):
    if qdiv == "fma" and fmt == "mxfp4":
        pytest.skip("MXFP4 scales are powers of two: no division either way")
    monkeypatch.setenv("HF_LOWBIT_QDIV", qdiv)
    m, k = shape
    x = _act(m, k, seed=m + k)
    q = averis_quantize(x, fmt, center=center, row=True, col=True, row_dq=True, col_dq=True, col_sum=True)
    if center:
        torch.testing.assert_close(q.mean, x.float().mean(0), rtol=1e-5, atol=1e-5)
        r = x.float() - q.mean  # the kernel's own mean, the reference's centring and quantizer
        assert torch.equal(q.mean_q, fake_quantize(q.mean, fmt, -1))
    else:
        r = x.float()
        assert q.mean is None and q.mean_q is None
    for axis, p in ((1, q.row), (0, q.col)):
        ref = quantize(r, fmt, axis)
        assert torch.equal(p.codes, ref.codes), f"codes differ along axis {axis}"
        assert torch.equal(p.scales, ref.scales), f"scales differ along axis {axis}"
        if fmt == "nvfp4":
            assert torch.equal(p.tensor_scale.reshape(()), ref.tensor_scale.reshape(()))
        assert torch.equal(dequantize(p), dequantize(ref))
    ts = 1.0 if q.tensor_scale is None else q.tensor_scale
    assert torch.equal(q.row_dq.float() * ts, fake_quantize(r, fmt, 1))
    assert torch.equal(q.col_dq.float() * ts, fake_quantize(r, fmt, 0))
    torch.testing.assert_close(q.col_sum, q.col_dq.float().sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_non_contiguous_fp32_and_mx_ceil(fmt):
    base = _act(48, 80, seed=3, dtype=torch.float32)
    x = base.t()  # [80, 48], strides (1, 80)
    assert not x.is_contiguous()
    q = averis_quantize(x, fmt, center=True, row=True, col=True, mx_scale="ceil")
    r = x.float() - q.mean
    for axis, p in ((1, q.row), (0, q.col)):
        ref = quantize(r, fmt, axis, mx_scale="ceil")
        assert torch.equal(p.codes, ref.codes) and torch.equal(p.scales, ref.scales)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_special_values(fmt):
    z = torch.zeros(32, 64, device=DEV)
    for center in (True, False):  # centred: statistics + finalize; uncentred: the one-pass absmax kernel
        q = averis_quantize(z, fmt, center=center, row=True, col=True)
        for axis, p in ((1, q.row), (0, q.col)):
            ref = quantize(z, fmt, axis)
            assert torch.equal(p.codes, ref.codes) and torch.equal(p.scales, ref.scales)
    for specials in ([("nan", 3, 7), ("inf", 5, 40)], [("nan", 31, 63)], [("-inf", 0, 0)]):
        x = _act(32, 64, seed=5, dtype=torch.float32)
        for value, i, j in specials:
            x[i, j] = float(value)
        q = averis_quantize(x, fmt, center=False, row=True, col=True)
        for axis, p in ((1, q.row), (0, q.col)):
            ref = quantize(x, fmt, axis)
            assert torch.equal(p.codes, ref.codes) and torch.equal(p.scales, ref.scales)
            if fmt == "nvfp4":
                assert torch.isnan(p.tensor_scale) and torch.isnan(ref.tensor_scale)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_sr_unbiased_and_seeded(fmt):
    g = _gen(11)
    m, k = (256, 64) if DEV == "cpu" else (2048, 512)
    x = (torch.rand(m, k, generator=g) * 2 - 1).to(DEV)
    x[:, 0] = 1.0  # pins every row block's scale
    x[0, :] = 1.0  # pins every column block's scale
    q1 = averis_quantize(x, fmt, center=False, rounding="sr", seed=7, row=True, col=True)
    q2 = averis_quantize(x, fmt, center=False, rounding="sr", seed=7, row=True, col=True)
    q3 = averis_quantize(x, fmt, center=False, rounding="sr", seed=8, row=True, col=True)
    assert torch.equal(q1.row.codes, q2.row.codes) and torch.equal(q1.col.codes, q2.col.codes)
    assert not torch.equal(q1.row.codes, q3.row.codes)
    rtn = dequantize(quantize(x, fmt, 1))
    for p in (q1.row, q1.col):
        d = dequantize(p)
        # each value lands on one of its two neighbouring grid points
        assert (d - x).abs().max() <= (rtn - x).abs().max() * 2 + 1e-6
        err = (d - x)[1:, 1:]
        # unbiased: the mean error is far below the rounding step (SE ≈ step / sqrt(n))
        assert err.mean().abs() < 0.01, err.mean()
        assert err.abs().mean() > 0.0
    # SR through averis (mean + residual) keeps reproducibility
    qa = averis_quantize(x, fmt, center=True, rounding="sr", seed=3, row=True, col=True)
    qb = averis_quantize(x, fmt, center=True, rounding="sr", seed=3, row=True, col=True)
    assert torch.equal(qa.mean_q, qb.mean_q) and torch.equal(qa.row.codes, qb.row.codes)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("tokens", [1, 2, 3, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("round_w", ["0", "1"])
def test_w4a16_decode_matches_reference(fmt, tokens, dtype, round_w, monkeypatch):
    monkeypatch.setenv("HF_LOWBIT_W4A16_ROUND_W", round_w)
    if round_w == "1" and (tokens > 4 or dtype == torch.float32):
        pytest.skip("ROUND_W only changes the ≤ 4-token BF16 kernel")
    n, k = (48, 200) if DEV == "cpu" else (1000, 1536)
    w = torch.randn(n, k, generator=_gen(2)).to(DEV)
    p = quantize(w, fmt, 1)
    x = torch.randn(tokens, k, generator=_gen(3)).to(dtype).to(DEV)
    bias = torch.randn(n, generator=_gen(4)).to(dtype).to(DEV)
    recipe = Recipe(format=fmt, activations="none")
    y = TritonBackend().linear_packed(x, p, bias, recipe)
    ref = packed_linear(x, p, bias, recipe)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert ((y.float() - ref.float()).norm() / ref.float().norm()) < tol
    y2 = w4a16_linear(x.unsqueeze(0), p, None)
    assert y2.shape == (1, tokens, n)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_streaming_gemv_equals_the_fma_kernel_and_propagates_nan(fmt, monkeypatch):
    """The 1-token streaming kernel (default) against the older FMA kernel (HF_LOWBIT_GEMV=fma) on a ragged K that
    splits over several programs; a NaN activation reaches every output, as in the reference."""
    from hf_lowbit.kernels._common import reload_env_settings

    n, k = (40, 328) if DEV == "cpu" else (3000, 4200)
    p = quantize(torch.randn(n, k, generator=_gen(12)).to(DEV), fmt, 1)
    x = torch.randn(1, k, generator=_gen(13)).to(DEV)
    bias = torch.randn(n, generator=_gen(14)).to(DEV)
    outs = []
    for impl in ("stream", "fma"):
        monkeypatch.setenv("HF_LOWBIT_GEMV", impl)
        reload_env_settings()
        outs.append(w4a16_linear(x, p, bias))
    monkeypatch.delenv("HF_LOWBIT_GEMV")
    reload_env_settings()
    # both are FP32 sums of the same exact products in different orders (on the H200: max 2e-5 absolute at
    # K=4200, where an output cancels to ~0.06): compare against the output's norm
    assert ((outs[0] - outs[1]).norm() / outs[1].norm()) < 1e-6
    x[0, k // 2] = float("nan")
    assert w4a16_linear(x, p, bias).isnan().all()


def test_unknown_quotient_switch_is_refused(monkeypatch):
    """HF_LOWBIT_QDIV takes "fma" or "ieee"; the old "fast" (a boundary-check path, removed) is refused by name."""
    x = _act(32, 64, seed=3)
    with kernel_switch(monkeypatch, "HF_LOWBIT_QDIV", "fast"), \
            pytest.raises(ValueError, match="HF_LOWBIT_QDIV='fast'.*allowed.*fma.*ieee"):
        averis_quantize(x, "nvfp4", row=True, col=False)


def test_unknown_gemv_switch_is_refused(monkeypatch):
    p = quantize(torch.randn(32, 64, generator=_gen(18)).to(DEV), "nvfp4", 1)
    with kernel_switch(monkeypatch, "HF_LOWBIT_GEMV", "fast"), \
            pytest.raises(ValueError, match="HF_LOWBIT_GEMV='fast'.*allowed"):
        w4a16_linear(torch.randn(1, 64, device=DEV), p)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("center_x,center_d", [(True, True), (False, False), (False, True), (True, False)])
def test_linear_fwd_bwd_matches_reference(fmt, center_x, center_d):
    """Every combination of the wgrad epilogue's rank-1 terms (a ⊗ Q(μ_X) with centred activations, Q(μ_D) ⊗ b
    with centred gradients, b's n·Q(μ_X) part with both)."""
    rec = Recipe(format=fmt, sr_gradients=False, center_activations=center_x, center_gradients=center_d)
    center = center_x or center_d
    m, k, n = (48, 64, 32) if DEV == "cpu" else (512, 768, 384)
    g = _gen(9)
    x = (torch.randn(m, k, generator=g) + torch.randn(k, generator=g) * 3).to(DEV).requires_grad_()
    w = torch.randn(n, k, generator=g).to(DEV).requires_grad_()
    b = torch.randn(n, generator=g).to(DEV).requires_grad_()
    dy = (torch.randn(m, n, generator=g) + torch.randn(n, generator=g)).to(DEV)
    y = triton_linear_train(x, w, b, rec, 0)
    y.backward(dy)
    got = (y.detach(), x.grad, w.grad, b.grad)
    x.grad = w.grad = b.grad = None
    if DEV == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    yr = averis_linear(x, w, b, rec, 0)
    yr.backward(dy)
    # Without centring the quantized operands are bit-identical, so only FP32 summation order differs. With
    # centring the kernel's mean (another summation order) can flip a few codes sitting exactly on a rounding
    # boundary (the quantizer itself is tested bit-exact given the same mean above).
    tol = 1e-5 if not center else 2e-3
    for a, r in zip(got, (yr.detach(), x.grad, w.grad, b.grad)):
        assert ((a - r).norm() / r.norm()) < tol


def test_auto_gemm_takes_cublas_for_large_layers_only(monkeypatch):
    """HF_LOWBIT_GEMM=auto (the default): cuBLAS at or above AUTO_CUBLAS_MIN_WORK multiply-adds per fprop, the
    Triton GEMM below it and when the size is unknown; an explicit choice is taken whatever the size."""
    from hf_lowbit.kernels import gemm
    from hf_lowbit.kernels._common import reload_env_settings

    monkeypatch.delenv("HF_LOWBIT_GEMM", raising=False)
    reload_env_settings()
    big = gemm.AUTO_CUBLAS_MIN_WORK
    assert gemm.gemm_fn(work=big) is gemm._cublas32
    assert gemm.gemm_fn(work=big - 1) is gemm.scaled_gemm
    assert gemm.gemm_fn() is gemm.scaled_gemm
    assert 8192 * 3072 * 1024 < big <= 8192 * 4096 * 4096  # the P4 widths below, the P2 layers above
    monkeypatch.setenv("HF_LOWBIT_GEMM", "triton")
    reload_env_settings()
    assert gemm.gemm_fn(work=big) is gemm.scaled_gemm
    monkeypatch.delenv("HF_LOWBIT_GEMM")
    reload_env_settings()


def test_linear_through_the_cublas_gemms_matches_the_triton_gemm(monkeypatch):
    """HF_LOWBIT_GEMM=cublas32 (cuBLAS FP32 product + the epilogue as one pass, wgrad terms included) gives the fused
    Triton GEMM's results up to FP32 summation order; =cublas up to the BF16 rounding of the product before the
    epilogue; anything else is refused by name."""
    from hf_lowbit.kernels._common import reload_env_settings

    rec = Recipe(format="nvfp4", sr_gradients=False)
    m, k, n = (48, 64, 32) if DEV == "cpu" else (512, 768, 384)
    g = _gen(19)
    x = (torch.randn(m, k, generator=g) + torch.randn(k, generator=g) * 3).to(DEV)
    w = torch.randn(n, k, generator=g).to(DEV)
    dy = (torch.randn(m, n, generator=g) + torch.randn(n, generator=g)).to(DEV)
    results = {}
    for impl in ("triton", "cublas32", "cublas"):
        monkeypatch.setenv("HF_LOWBIT_GEMM", impl)
        reload_env_settings()
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = triton_linear_train(xi, wi, None, rec, 0)
        y.backward(dy)
        results[impl] = (y.detach(), xi.grad, wi.grad)
    for impl, tol in (("cublas32", 1e-5), ("cublas", 1e-2)):
        for a, r in zip(results[impl], results["triton"]):
            assert ((a - r).norm() / r.norm()) < tol, impl
    monkeypatch.delenv("HF_LOWBIT_GEMM")
    with kernel_switch(monkeypatch, "HF_LOWBIT_GEMM", "cutlass"), pytest.raises(ValueError, match="allowed"):
        triton_linear_train(x, w, None, rec, 0)


def test_linear_bf16_and_sr_seeded():
    rec = Recipe(format="nvfp4")  # SR gradients (default)
    m, k, n = (32, 64, 48) if DEV == "cpu" else (512, 768, 384)
    x = _act(m, k, 4).requires_grad_()
    w = (torch.randn(n, k, generator=_gen(5)) * 0.05).to(torch.bfloat16).to(DEV).requires_grad_()
    outs = []
    for _ in range(2):
        y = triton_linear_train(x, w, None, rec, 123)
        y.float().square().sum().backward()
        outs.append((y.detach(), x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    for a, b in zip(*outs):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    yr = averis_linear(x, w, None, rec, 123)
    assert ((outs[0][0].float() - yr.float()).norm() / yr.float().norm()) < 1e-2


def test_backend_quantize_and_registration():
    import hf_lowbit.kernels as hk
    from hf_lowbit.backend import available_backends

    assert not hk.is_available(torch.device("cpu"))
    assert "triton" not in available_backends("cpu")
    x = _act(40, 96, 8, dtype=torch.float32)
    for axis in (-1, 0):
        p = TritonBackend().quantize(x, "nvfp4", axis)
        ref = quantize(x, "nvfp4", axis)
        assert torch.equal(p.codes, ref.codes) and torch.equal(p.scales, ref.scales) and p.axis == ref.axis
    # unsupported recipes fall back to the reference
    rec = Recipe(block_axis="last", sr_gradients=False)
    xx = x.clone().requires_grad_()
    w = torch.randn(16, 96, generator=_gen(1)).to(DEV)
    torch.testing.assert_close(TritonBackend().linear_train(xx, w, None, rec, 0), averis_linear(xx, w, None, rec, 0))


def test_top_level_import_is_safe():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys; sys.path.insert(0, %r); import kernels; print('ok')" % root
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_per_call_integers_are_not_specialized_on():
    """Seeds (new every call) and the MoE capacity (new every step: M of the expert fprop/dgrad GEMMs, K of their
    wgrad, whose trip count NUM_K is a runtime argument, not a constexpr) must not be Triton specialization keys:
    each new value class would compile another kernel variant in the middle of training. Checked on the compiled
    (non-interpreter) kernel objects, in a subprocess without TRITON_INTERPRET."""
    code = ("from hf_lowbit.kernels import quantize as q, gemm as g, token_axis as h\n"
            "for k in (q._quant_kernel, g._gemm_kernel, h._hadamard_amax_kernel, h._token_axis_quant_kernel):\n"
            "    print(sorted(p.name for p in k.params if p.do_not_specialize))\n"
            "print([p.is_constexpr for p in g._gemm_kernel.params if p.name == 'NUM_K'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["['N_MT', 'seed_col', 'seed_mean', 'seed_row']", "['M', 'NUM_K']", "['bits']",
                                "['bits', 'seed']", "[False]"]


def test_dense_gemm_config_is_tuned_once_per_row_bucket(monkeypatch):
    """The dense GEMM picks its tile config by measuring on first use of a shape class and reuses it for every M in
    the same power-of-two bucket (a ragged last batch or a new sequence length must not re-benchmark every GEMM of
    the model inside training); results equal the torch product for every config it may pick."""
    import triton.testing

    from hf_lowbit.kernels import gemm

    calls = []

    def fake_bench(fn, warmup, rep):
        calls.append(1)
        fn()  # runs the candidate config for real
        return [3.0, 1.0, 2.0, 5.0, 4.0][(len(calls) - 1) % 5]  # the second config is "fastest"

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(gemm, "_BEST", {})
    g = _gen(3)
    n, k = 24, 64
    b = torch.randn(n, k, generator=g).to(torch.bfloat16).to(DEV)
    for m, expect_calls in ((100, 5), (128, 5), (65, 5), (129, 10)):
        a = torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEV)
        args = (a[None], b[None], torch.empty(1, m, n, device=DEV), m, n, k, a.stride(0), a.stride(1),
                b.stride(0), b.stride(1), n, 1) + (torch.ones(1, device=DEV),) * 8 + (0, 0, 0, 0.0)
        common = dict(HAS_SCALE=False, HAS_VROW=False, HAS_R1=False, HAS_R2=False, WGRAD=False, HAS_RMASK=False,
                      ROUND_BF16=False)
        gemm._launch_tuned(args, m, n, k, 1, common)
        assert len(calls) == expect_calls, (m, len(calls))
        torch.testing.assert_close(args[2][0], a.float() @ b.float().t(), rtol=1e-5, atol=1e-4)
    assert [gemm.m_bucket(m) for m in (1, 64, 65, 128, 129, 8192, 8193)] == [64, 64, 128, 128, 256, 8192, 16384]
    assert all(cfg is gemm._CONFIGS[1] for cfg in gemm._BEST.values()) and len(gemm._BEST) == 2


@pytest.mark.parametrize("bad", ["64,64", "64,x,4", "0,64,4", ""])
def test_tile_overrides_refuse_malformed_values_by_name(monkeypatch, bad):
    """The sweep overrides (HF_LOWBIT_QCFG, _SCFG, _GSTATS: three integers ≥ 1; _GCFG, _GEMV_CFG: four, SPLIT ≥ 0)
    are parsed by one helper: a malformed value is refused with the variable's name and what is allowed; a valid one
    is returned as integers; unset gives None."""
    from hf_lowbit.kernels._common import env_ints

    for name, lows in (("HF_LOWBIT_QCFG", (1, 1, 1)), ("HF_LOWBIT_SCFG", (1, 1, 1)), ("HF_LOWBIT_GSTATS", (1, 1, 1)),
                       ("HF_LOWBIT_GCFG", (1, 1, 1, 0)), ("HF_LOWBIT_GEMV_CFG", (1, 1, 1, 0))):
        with kernel_switch(monkeypatch, name, bad), pytest.raises(ValueError, match=f"{name}=.*allowed: {len(lows)}"):
            env_ints(name, lows)
        good = ",".join(str(max(low, 1) * 16) for low in lows)
        with kernel_switch(monkeypatch, name, good):
            assert env_ints(name, lows) == tuple(max(low, 1) * 16 for low in lows)
        assert env_ints(name, lows) is None
    from hf_lowbit.kernels.grouped import stats_config

    with kernel_switch(monkeypatch, "HF_LOWBIT_GSTATS", "64,x"), pytest.raises(ValueError, match="HF_LOWBIT_GSTATS"):
        stats_config(True)  # the grouped statistics read it through the helper


def test_kernel_switches_are_read_once_until_reloaded(monkeypatch):
    """`env_setting` caches HF_LOWBIT_* switches (an environment lookup per launch cost ~3 µs, dozens per linear
    step); a change is seen after `reload_env_settings()`, and defaults apply to unset switches."""
    from hf_lowbit.kernels._common import env_setting, reload_env_settings

    monkeypatch.setenv("HF_LOWBIT_QDIV", "ieee")
    reload_env_settings()
    assert env_setting("HF_LOWBIT_QDIV", "fma") == "ieee"
    monkeypatch.setenv("HF_LOWBIT_QDIV", "fma")
    assert env_setting("HF_LOWBIT_QDIV", "fma") == "ieee"  # cached
    monkeypatch.delenv("HF_LOWBIT_QDIV")
    reload_env_settings()
    assert env_setting("HF_LOWBIT_QDIV", "fma") == "fma" and env_setting("HF_LOWBIT_QDIV") is None


def test_public_reload_reaches_the_kernel_settings(monkeypatch):
    """`hf_lowbit.kernels.reload_env_settings()` (the name the README gives) re-reads the cached switches."""
    import hf_lowbit.kernels as hk
    from hf_lowbit.kernels._common import env_setting

    monkeypatch.setenv("HF_LOWBIT_GEMM", "cublas")
    hk.reload_env_settings()
    assert env_setting("HF_LOWBIT_GEMM", "triton") == "cublas"
    monkeypatch.delenv("HF_LOWBIT_GEMM")
    hk.reload_env_settings()
    assert env_setting("HF_LOWBIT_GEMM", "triton") == "triton"


def test_kernel_benchmark_refuses_unknown_groups(capsys):
    """`scripts/bench.py --only` names the groups it accepts (before any GPU work)."""
    from hf_lowbit.kernels.bench import main

    with pytest.raises(SystemExit):
        main(["--only", "P2,P9"])
    assert "--only='P2,P9' is not valid; allowed" in capsys.readouterr().err


@pytest.mark.parametrize("name,call", [
    ("HF_LOWBIT_MX_FP8", "dense_mxfp4"), ("HF_LOWBIT_GROUPED_TRITON", "grouped"), ("HF_LOWBIT_GEMV_ACC", "decode"),
    ("HF_LOWBIT_W4A16_ROUND_W", "decode")])
def test_switches_refuse_values_they_do_not_know(name, call, monkeypatch):
    """A mistyped switch (e.g. "true" for "1") is refused by name instead of silently meaning off."""
    g = _gen(30)
    with kernel_switch(monkeypatch, name, "true"), \
            pytest.raises(ValueError, match=f"{name}='true' is not supported; allowed"):
        if call == "dense_mxfp4":
            x = torch.randn(16, 64, generator=g).to(DEV)
            TritonBackend().linear_train(x, torch.randn(32, 64, generator=g).to(DEV), None, Recipe(format="mxfp4"), 0)
        elif call == "grouped":
            x = torch.randn(2, 16, 32, generator=g).to(DEV)
            TritonBackend().grouped_linear_train(x, torch.randn(2, 32, 32, generator=g).to(DEV),
                                                 torch.ones(2, 16, device=DEV), Recipe(format="nvfp4"), 0)
        else:
            p = quantize(torch.randn(32, 64, generator=g).to(DEV), "nvfp4", 1)
            w4a16_linear(torch.randn(1, 64, generator=g).to(DEV).to(torch.bfloat16), p)
