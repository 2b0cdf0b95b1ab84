"""The token-axis (wgrad operand) kernels of `kernels/token_axis.py` vs the reference quantizer, plain and with the
random Hadamard rotation, and the Triton linear with ``hadamard=True`` and with either column kernel vs the reference
Averis op. CPU under TRITON_INTERPRET=1, or a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import kernel_switch, kernel_test_device

DEV = kernel_test_device()
triton = pytest.importorskip("triton")

from hf_lowbit.averis import averis_linear, hadamard_sign_bits, hadamard_signs, hadamard_tokens  # noqa: E402
from hf_lowbit.config import Recipe  # noqa: E402
from hf_lowbit.kernels.quantize import averis_quantize  # noqa: E402
from hf_lowbit.kernels.token_axis import (grouped_token_axis_quantize, hadamard_col_quantize,  # noqa: E402
                                          token_axis_quantize)
from hf_lowbit.kernels.linear import TritonBackend, supports_recipe, triton_linear_train  # noqa: E402
from hf_lowbit.numerics import dequantize, quantize  # noqa: E402

SHAPES = [(64, 64), (37, 50), (5, 33)] + ([(1000, 1536)] if DEV == "cuda" else [])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(x: torch.Tensor, fmt: str, center: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dequantized T·R along tokens, T·1, R's mean) by the reference: centre in FP32, rotate, quantize."""
    xf = x.float()
    mean = xf.mean(0) if center else None
    r = xf - mean if center else xf
    signs = hadamard_signs(seed)
    ones = hadamard_tokens(torch.ones(x.shape[0], 1, device=x.device), signs)[:, 0]
    return dequantize(quantize(hadamard_tokens(r, signs), fmt, axis=0)), ones, mean


def _check_against_reference(x: torch.Tensor, fmt: str, center: bool, seed: int = 7) -> None:
    ref, ones, mean = _reference(x, fmt, center, seed)
    out = hadamard_col_quantize(x, mean, hadamard_sign_bits(seed), fmt)
    ts = out.tensor_scale if out.tensor_scale is not None else torch.ones((), device=x.device)
    rows = out.dq.shape[0]
    assert rows % (16 if fmt == "nvfp4" else 32) == 0 and rows >= x.shape[0]
    got = out.dq.float() * ts
    padded = torch.nn.functional.pad(ref, (0, 0, 0, rows - ref.shape[0]))
    assert torch.equal(got, padded), (got - padded).abs().max()
    col_sum = (ones[:, None] * ref[:ones.shape[0]]).sum(0)  # FP32, another summation order than the kernel's
    torch.testing.assert_close(out.col_sum * ts, col_sum, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("center", [True, False])
def test_plain_token_axis_operand_is_bit_exact(fmt, shape, center):
    """The split column kernel: R (centred by the row launch's mean) in blocks along tokens with the row launch's
    tensor scale equals the reference quantizer along axis 0; column sums equal the dq's up to summation order."""
    g = _gen(5)
    x = (torch.randn(*shape, generator=g) * 2 + torch.randn(shape[1], generator=g) * 4)
    x[1, 0] = -70.0
    x = x.to(torch.bfloat16).to(DEV)
    q = averis_quantize(x, fmt, center=center, row=True, row_packed=False, row_dq=True)
    r = x.float() - q.mean if center else x.float()
    out = token_axis_quantize(x, q.mean, q.tensor_scale, fmt)
    ref = quantize(r, fmt, axis=0)
    ts = q.tensor_scale if fmt == "nvfp4" else torch.ones((), device=DEV)
    if fmt == "nvfp4":
        assert torch.equal(ts.reshape(()), ref.tensor_scale.reshape(())) and out.tensor_scale is q.tensor_scale
    assert out.dq.shape == x.shape and torch.equal(out.dq.float() * ts, dequantize(ref))
    torch.testing.assert_close(out.col_sum, out.dq.float().sum(0), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="needs the tensor scale"):
        token_axis_quantize(x, q.mean, None, "nvfp4")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_plain_grouped_token_axis_operand_is_bit_exact(fmt):
    """MoE capacity layout without rotation: per-group mean, per-group tensor scale given, masked rows zero."""
    g, length, k = 3, 32, 40
    gen = _gen(21)
    mask = torch.ones(g, length)
    mask[0, 20:] = 0
    x = torch.randn(g, length, k, generator=gen) * 3 + torch.randn(g, 1, k, generator=gen)
    x[0, 25] = 1e4  # garbage on a masked row
    mean = ((x * mask[..., None]).sum(1) / mask.sum(1)[:, None]).float()
    x, mask, mean = x.to(torch.bfloat16).to(DEV), mask.to(DEV), mean.to(DEV)
    r = (x.float() - mean[:, None, :]) * mask[..., None]
    ref = quantize(r, fmt, 1, slices=True)
    ts = ref.tensor_scale.reshape(-1) if fmt == "nvfp4" else None
    dq, ts_out = grouped_token_axis_quantize(x.reshape(g * length, k), length, mask.reshape(-1) != 0, mean, ts,
                                             None, fmt)
    assert (ts_out is None) == (fmt == "mxfp4")
    got = dq.float().reshape(g, length, k) * (ts[:, None, None] if fmt == "nvfp4" else 1.0)
    assert torch.equal(got, dequantize(ref))


def test_reference_rotation_is_the_scaled_sylvester_matrix_with_the_seeds_signs():
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < 16:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    for seed in (0, 1, 12345):
        bits, signs = hadamard_sign_bits(seed), hadamard_signs(seed)
        assert 0 <= bits < 1 << 16 and signs.tolist() == [-1.0 if bits >> i & 1 else 1.0 for i in range(16)]
        z = torch.randn(37, 5, generator=_gen(seed), dtype=torch.float64)
        matrix = (h / 4) * signs.double()[None, :]
        ref = torch.einsum("ij,bjc->bic", matrix, torch.nn.functional.pad(z, (0, 0, 0, 11)).reshape(3, 16, 5))
        assert torch.allclose(hadamard_tokens(z, signs), ref.reshape(48, 5), atol=1e-14)
    assert hadamard_sign_bits(1) != hadamard_sign_bits(2)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("center", [True, False])
def test_rotated_operand_is_bit_exact(fmt, shape, center):
    g = _gen(3)
    x = (torch.randn(*shape, generator=g) * 2 + torch.randn(shape[1], generator=g) * 4)
    x[0, 0] = 60.0  # an outlier the rotation spreads over its 16 tokens
    _check_against_reference(x.to(torch.bfloat16).to(DEV), fmt, center)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_non_contiguous_fp32_tiny_and_huge(fmt):
    g = _gen(4)
    base = torch.randn(50, 80, generator=g).to(DEV)
    _check_against_reference(base.t(), fmt, center=True)  # [80, 50], strides (1, 80)
    _check_against_reference(base * 1e-30, fmt, center=True)
    _check_against_reference(base * 1e30, fmt, center=False)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_zeros_and_non_finite_inputs(fmt):
    zeros = torch.zeros(40, 32, device=DEV)
    _check_against_reference(zeros, fmt, center=True)
    out = hadamard_col_quantize(zeros, None, 5, fmt)
    assert not out.dq.float().abs().any()
    x = torch.randn(40, 32, generator=_gen(6)).to(DEV)
    x[3, 7] = float("nan")
    x[20, 9] = float("inf")
    out = hadamard_col_quantize(x, None, hadamard_sign_bits(2), fmt)
    ref = dequantize(quantize(hadamard_tokens(x, hadamard_signs(2)), fmt, axis=0))
    if fmt == "nvfp4":
        assert torch.isnan(out.tensor_scale)
    else:  # MXFP4 has no tensor scale: only the blocks holding NaN/Inf are lost, as in the reference
        got = out.dq.float()[:ref.shape[0]]
        assert torch.equal(got.isnan(), ref.isnan())
        fin = ref.isfinite()
        assert torch.equal(got[fin], ref[fin])


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape", [(3, 32, 48), (2, 64, 40)])
def test_grouped_rotated_operand_is_bit_exact(fmt, shape):
    """MoE capacity layout: each group centred by its own mean (zeros for group 2: no centring), masked rows zero
    before the rotation, rotation within the group, per-group tensor scales; a NaN stays in its group."""
    g, length, k = shape
    gen = _gen(sum(shape))
    mask = torch.ones(g, length)
    mask[0, length // 2 + 3:] = 0
    mask[1, 5] = 0
    x = torch.randn(g, length, k, generator=gen) * 2 + torch.randn(g, 1, k, generator=gen) * 3
    x[1, 5] = 1e4  # garbage on a masked row: must not leak into its group
    mean = ((x * mask[..., None]).sum(1) / mask.sum(1).clamp(min=1)[:, None]).float()
    mean[-1] = 0
    x, mask, mean = x.to(torch.bfloat16).to(DEV), mask.to(DEV), mean.to(DEV)
    seed = 4
    dq, ts = grouped_token_axis_quantize(x.reshape(g * length, k), length, mask.reshape(-1) != 0, mean, None,
                                         hadamard_sign_bits(seed), fmt)
    r = (x.float() - mean[:, None, :]) * mask[..., None]
    ref = quantize(hadamard_tokens(r, hadamard_signs(seed)), fmt, 1, slices=True)
    if fmt == "nvfp4":
        assert torch.equal(ts, ref.tensor_scale.reshape(-1))
    got = dq.float().reshape(g, length, k) * (ts[:, None, None] if fmt == "nvfp4" else 1.0)
    assert torch.equal(got, dequantize(ref))
    x[0, 1, 2] = float("nan")
    dq, ts = grouped_token_axis_quantize(x.reshape(g * length, k), length, mask.reshape(-1) != 0, mean, None,
                                         hadamard_sign_bits(seed), fmt)
    if fmt == "nvfp4":
        assert torch.isnan(ts[0]) and torch.isfinite(ts[1:]).all()
    assert torch.isfinite(dq.float().reshape(g, length, k)[1:]).all()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_stochastic_rounding_is_seeded_and_unbiased(fmt):
    m, k = (128, 64) if DEV == "cpu" else (2048, 512)
    x = torch.randn(m, k, generator=_gen(8)).to(DEV)
    bits = hadamard_sign_bits(9)
    mean = x.mean(0)
    a = hadamard_col_quantize(x, mean, bits, fmt, rounding="sr", seed=1)
    b = hadamard_col_quantize(x, mean, bits, fmt, rounding="sr", seed=1)
    c = hadamard_col_quantize(x, mean, bits, fmt, rounding="sr", seed=2)
    assert torch.equal(a.dq, b.dq) and not torch.equal(a.dq, c.dq)
    rotated = hadamard_tokens(x - mean, hadamard_signs(9))
    rtn = hadamard_col_quantize(x, mean, bits, fmt)
    ts = a.tensor_scale if a.tensor_scale is not None else 1.0
    err = a.dq.float() * ts - rotated
    rtn_err = rtn.dq.float() * ts - rotated
    assert err.abs().mean() > rtn_err.abs().mean()  # SR is noisier per element than RTN...
    assert err.mean().abs() < 0.1 * err.abs().mean()  # ...but unbiased: the mean error is far below its size


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("col_kernel", ["split", "fused"])
def test_linear_with_hadamard_matches_reference(fmt, center, col_kernel, monkeypatch):
    """fprop, dgrad and wgrad (rotated operands, rotated ones-vector in the rank-1 terms) against the reference;
    the plain linear beside it through either column kernel (HF_LOWBIT_COL_KERNEL)."""
    from hf_lowbit.kernels._common import reload_env_settings

    monkeypatch.setenv("HF_LOWBIT_COL_KERNEL", col_kernel)
    reload_env_settings()
    rec = Recipe(format=fmt, hadamard=True, sr_gradients=False, center_activations=center, center_gradients=center)
    assert supports_recipe(rec)  # the Triton path, not the reference fallback
    m, k, n = (45, 64, 32) if DEV == "cpu" else (509, 768, 384)  # ragged tokens: a partial 16-token group
    g = _gen(10)
    x = (torch.randn(m, k, generator=g) + torch.randn(k, generator=g) * 3).to(DEV).requires_grad_()
    w = torch.randn(n, k, generator=g).to(DEV).requires_grad_()
    dy = (torch.randn(m, n, generator=g) + torch.randn(n, generator=g)).to(DEV)
    y = TritonBackend().linear_train(x, w, None, rec, 3)
    y.backward(dy)
    got = (y.detach(), x.grad, w.grad)
    x.grad = w.grad = None
    if DEV == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    yr = averis_linear(x, w, None, rec, 3)
    yr.backward(dy)
    tol = 1e-5 if not center else 2e-3  # as the plain linear: the kernel's mean may flip a boundary code
    for a, r in zip(got, (yr.detach(), x.grad, w.grad)):
        assert ((a - r).norm() / r.norm()) < tol
    plain = Recipe(format=fmt, sr_gradients=False, center_activations=center, center_gradients=center)
    x.grad = None
    w2 = w.detach().clone().requires_grad_()
    y2 = triton_linear_train(x, w2, None, plain, 3)
    y2.backward(dy)
    assert not torch.equal(w2.grad, got[2])  # the rotation changes the quantized wgrad
    got_plain = (y2.detach(), x.grad, w2.grad)
    x.grad = w2.grad = None
    yr2 = averis_linear(x, w2, None, plain, 3)
    yr2.backward(dy)
    for a, r in zip(got_plain, (yr2.detach(), x.grad, w2.grad)):
        assert ((a - r).norm() / r.norm()) < tol
    monkeypatch.delenv("HF_LOWBIT_COL_KERNEL")
    with kernel_switch(monkeypatch, "HF_LOWBIT_COL_KERNEL", "both"), \
            pytest.raises(ValueError, match="HF_LOWBIT_COL_KERNEL='both'.*allowed"):
        triton_linear_train(x, w2, None, plain, 3)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_grouped_linear_through_the_split_column_kernel_matches_reference(fmt, monkeypatch):
    """MoE experts with HF_LOWBIT_COL_KERNEL=split (the wgrad operands from grouped_token_axis_quantize with the
    groups' tensor scales): forward, dX and dW equal the reference up to FP32 summation order."""
    from hf_lowbit.averis import grouped_averis_linear
    from hf_lowbit.kernels._common import reload_env_settings
    from hf_lowbit.kernels.grouped import triton_grouped_linear_train

    monkeypatch.setenv("HF_LOWBIT_COL_KERNEL", "split")
    reload_env_settings()
    g, length, k, n = 3, 21, 40, 32
    gen = _gen(40)
    mask = torch.ones(g, length)
    mask[0, 12:] = 0
    mask[-1] = 0
    x0 = ((torch.randn(g, length, k, generator=gen) + torch.randn(g, 1, k, generator=gen) * 3)
          * mask[..., None]).to(DEV)
    w0 = (torch.randn(g, n, k, generator=gen) * 0.1).to(DEV)
    dy = torch.randn(g, length, n, generator=gen).to(DEV)
    recipe = Recipe(format=fmt, sr_gradients=False)
    outs = []
    for fn in (grouped_averis_linear, triton_grouped_linear_train):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fn(x, w, mask.to(DEV), recipe, 3)
        y.backward(dy)
        outs.append((y, x.grad, w.grad))
    monkeypatch.delenv("HF_LOWBIT_COL_KERNEL")
    reload_env_settings()
    for got, ref in zip(outs[1], outs[0]):
        assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 2e-3
