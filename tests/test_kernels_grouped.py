"""Grouped (MoE experts) Triton path against the reference grouped Averis op.

Runs on the CPU under TRITON_INTERPRET=1 (tiny shapes) and, unchanged, on a CUDA GPU without the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from conftest import kernel_test_device

DEV = kernel_test_device()

from hf_lowbit.averis import center, grouped_averis_linear  # noqa: E402
from hf_lowbit.backend import TorchBackend  # noqa: E402
from hf_lowbit.config import LowBitConfig  # noqa: E402
from hf_lowbit.kernels._common import reload_env_settings  # noqa: E402
from hf_lowbit.kernels.grouped import group_stats, triton_grouped_linear_train  # noqa: E402
from hf_lowbit.kernels.linear import TritonBackend  # noqa: E402
from hf_lowbit.kernels.quantize import grouped_quantize_dq  # noqa: E402
from hf_lowbit.numerics import dequantize, get_format, quantize  # noqa: E402


def _inputs(g, length, k, seed, dtype=torch.bfloat16):
    """Ragged routed tokens: group 0 partly filled, group 1 with a hole, last group empty; zeros on padding."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(g, length)
    mask[0, length // 2 + 1:] = 0
    mask[1 % g, 3] = 0
    mask[-1] = 0
    x = (torch.randn(g, length, k, generator=gen) * 2 + torch.randn(g, 1, k, generator=gen) * 3)
    x[0, 0, 0] = 40.0  # an outlier
    return (x * mask[..., None]).to(dtype).to(DEV), mask.to(DEV)


def _recipe(fmt, **kw):
    return LowBitConfig(format=fmt, **kw).recipe()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape", [(3, 32, 48), (2, 64, 40)])
@pytest.mark.parametrize("centred", [True, False])
def test_grouped_quantizer_is_bit_exact(fmt, shape, centred):
    g, length, k = shape
    x, mask = _inputs(g, length, k, seed=sum(shape))
    counts = mask.sum(1)
    is_nv = get_format(fmt).scale_kind == "e4m3"
    mu, ts = group_stats(x, mask, counts, centred, is_nv)
    r, mu_ref = center(x, centred, mask, counts)  # the reference's residual, (Z − 1·μ)·mask in FP32
    if centred:
        torch.testing.assert_close(mu, mu_ref, rtol=1e-6, atol=1e-6)
        r = (x.float() - mu[:, None, :]) * mask[..., None]  # the same residual with the kernel's μ
    row, col, sums = grouped_quantize_dq(x.reshape(g * length, k), length, mask.reshape(-1) != 0, mu, ts, fmt,
                                         row=True, col=True, col_sum=True)
    # the token sums of the token-axis values, from the same launch: FP32, up to summation order
    torch.testing.assert_close(sums, col.float().reshape(g, length, k).sum(1), rtol=1e-6, atol=1e-5)
    for axis, dq in ((-1, row), (1, col)):
        ref = quantize(r, fmt, axis, slices=True)
        if is_nv:
            assert torch.equal(ts, ref.tensor_scale.reshape(-1))
        got = dq.float().reshape(g, length, k) * (ts[:, None, None] if is_nv else 1.0)
        assert torch.equal(got, dequantize(ref)), f"axis {axis}"


def test_grouped_quantizer_nan_stays_in_its_group():
    x, mask = _inputs(3, 32, 32, seed=5, dtype=torch.float32)
    x[1, 2, 7] = float("nan")
    mu, ts = group_stats(x, mask, mask.sum(1), True, True)
    assert torch.isnan(ts[1]) and torch.isfinite(ts[0]) and ts[2] == 0
    row, _ = grouped_quantize_dq(x.reshape(96, 32), 32, mask.reshape(-1) != 0, mu, ts, "nvfp4")
    row = row.float().reshape(3, 32, 32)
    assert torch.isnan(row[1, :2]).all() and torch.isfinite(row[0]).all() and (row[2] == 0).all()


@pytest.mark.parametrize("masked", [True, False])
def test_group_stats_match_torch_on_edge_groups(masked):
    """μ and the NVFP4 tensor scale per group against plain torch: an all-zero group, a group with +Inf (NaN scale),
    a tiny one (1e-30: subnormal scale), a huge one (3e30); uncentred without a mask is the weights' case."""
    gen = torch.Generator().manual_seed(11)
    g, length, k = 7, 64, 300  # k: more than one column chunk of the finalize, ragged
    x = torch.randn(g, length, k, generator=gen)
    x[0] = 0
    x[1, 5, 17] = float("inf")
    x[5, 9, 33] = float("nan")  # a step whose rows are all real (select-free branch); unmasked: the abs-max pass, outside the first split
    x[2] *= 1e-30
    x[3] *= 3e30
    mask = torch.ones(g, length)
    mask[4, 40:] = 0
    # a NaN in a select-free step followed, in the same program, by a step with masked rows (the GPU's plain max
    # dropped the NaN there; the CPU suite runs that max with the GPU's semantics, see conftest)
    x[6, 5, 7] = float("nan")
    mask[6, 24:] = 0
    x = (x * mask[..., None]).to(DEV)
    mask = mask.to(DEV)
    counts = mask.sum(1)
    for center in (True, False):
        mu, ts = group_stats(x, mask if masked else None, counts if masked else torch.full_like(counts, length),
                             center, True)
        real = mask.bool()[..., None] if masked else torch.ones_like(x, dtype=torch.bool)
        n = real.sum(1).clamp(min=1)
        mu_ref = torch.where(real, x, 0).sum(1) / n if center else torch.zeros(g, k, device=DEV)
        size = x.abs().nan_to_num().amax((1, 2)).clamp(min=1e-38)[:, None]  # summation order: relative to size
        torch.testing.assert_close(mu / size, mu_ref / size, rtol=0, atol=1e-6, equal_nan=True)
        r = torch.where(real, x - mu[:, None, :], 0)  # the scale of the residual about the kernel's μ: exact
        amax = r.abs().amax((1, 2))
        ts_ref = torch.where(torch.isfinite(amax), amax / torch.tensor(2688.0, device=DEV), float("nan"))
        assert torch.isnan(ts[1]) and torch.isnan(ts[5]) and torch.isnan(ts[6]) and ts[0] == 0
        assert torch.equal(ts[[0, 2, 3, 4]], ts_ref[[0, 2, 3, 4]])
    w = torch.randn(3, 32, 40, generator=gen).to(DEV)
    w[2, 3, 5] = float("nan")  # the weights' path (no mask, no mean): a NaN makes its group's scale NaN, only its
    _, ts = group_stats(w, None, None, False, True)
    assert torch.isnan(ts[2]) and torch.equal(ts[:2], w[:2].abs().amax((1, 2)) / torch.tensor(2688.0, device=DEV))


def test_grouped_quantizer_rejects_straddling_groups():
    x = torch.zeros(48, 32, device=DEV)
    with pytest.raises(ValueError, match="group_rows=24"):
        grouped_quantize_dq(x, 24, torch.ones(48, dtype=torch.bool, device=DEV), torch.zeros(2, 32, device=DEV),
                            torch.ones(2, device=DEV), "nvfp4")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hadamard", [False, True])
def test_grouped_linear_matches_reference(fmt, centred, dtype, hadamard):
    """RTN everywhere: forward, dX and dW equal the reference up to FP32 accumulation order (L = 21: padded); with
    the Hadamard rotation of the wgrad operands too."""
    g, length, k, n = 3, 21, 40, 32
    x0, mask = _inputs(g, length, k, seed=11, dtype=dtype)
    w0 = (torch.randn(g, n, k, generator=torch.Generator().manual_seed(12)) * 0.1).to(dtype).to(DEV)
    dy = torch.randn(g, length, n, generator=torch.Generator().manual_seed(13)).to(dtype).to(DEV)
    recipe = _recipe(fmt, stochastic_rounding="none", mean_center=centred, hadamard=hadamard)
    outs = []
    for fn in (grouped_averis_linear, triton_grouped_linear_train):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fn(x, w, mask, recipe, 3)
        y.backward(dy)
        outs.append((y, x.grad, w.grad))
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # BF16: outputs and gradients are rounded to BF16
    for name, got, ref in zip(("y", "dx", "dw"), outs[1], outs[0]):
        assert got.dtype == ref.dtype, name
        err = (got.float() - ref.float()).norm() / ref.float().norm()
        assert err < tol, (name, err.item())
    assert (outs[1][0][-1] == 0).all() and (outs[1][1][-1] == 0).all()  # the empty group


def test_stochastic_gradients_are_unbiased():
    """SR on the gradient operands (the default recipe): the mean over seeds approaches the RTN result."""
    g, length, k, n = 2, 16, 32, 32
    x0, mask = _inputs(g, length, k, seed=21, dtype=torch.float32)
    w0 = torch.randn(g, n, k, generator=torch.Generator().manual_seed(22)).to(DEV) * 0.1
    dy = torch.randn(g, length, n, generator=torch.Generator().manual_seed(23)).to(DEV)

    def grads(recipe, seed):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        triton_grouped_linear_train(x, w, mask, recipe, seed).backward(dy)
        return w.grad

    exact = torch.einsum("gln,glk->gnk", dy * mask[..., None], x0)
    sr = _recipe("nvfp4")
    draws = torch.stack([grads(sr, s) for s in range(24)])
    assert not torch.equal(draws[0], draws[1])  # seeds matter
    # averaging removes most of the SR noise: the mean's error against a typical single draw's (not one draw's,
    # which varies by ±30% with the seed); what stays is the deterministic RTN error of the activations (~0.55)
    single = torch.stack([(d - exact).norm() for d in draws]).mean()
    assert (draws.mean(0) - exact).norm() < 0.7 * single


def test_backend_uses_it_by_default_and_not_when_disabled(monkeypatch):
    x, mask = _inputs(2, 16, 32, seed=31, dtype=torch.float32)
    w = torch.randn(2, 32, 32, device=DEV) * 0.1
    recipe = _recipe("nvfp4", stochastic_rounding="none")
    calls = []
    import hf_lowbit.kernels.linear as lin

    monkeypatch.setattr(lin, "triton_grouped_linear_train",
                        lambda *a: calls.append(1) or grouped_averis_linear(*a[:5]))
    monkeypatch.setenv("HF_LOWBIT_GROUPED_TRITON", "0")
    reload_env_settings()
    TritonBackend().grouped_linear_train(x, w, mask, recipe, 0)
    assert calls == []
    monkeypatch.delenv("HF_LOWBIT_GROUPED_TRITON", raising=False)
    reload_env_settings()
    TritonBackend().grouped_linear_train(x, w, mask, recipe, 0)
    TritonBackend().grouped_linear_train(x, w, mask, _recipe("nvfp4", weight_blocks="2d"), 0)  # not covered
    assert calls == [1]


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_prepared_weight_gives_the_same_bits(fmt):
    """The weight operands prepared ahead of the call (the experts enqueue them before the routing sync) give the
    same output and gradients bit for bit; a prepared weight without the dgrad copy is completed when needed."""
    from hf_lowbit.kernels.grouped import prepare_grouped_weight

    x, mask = _inputs(2, 32, 32, seed=41, dtype=torch.bfloat16)
    w = (torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(3)) * 0.1).to(DEV, torch.bfloat16)
    dy = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(4)).to(DEV, torch.bfloat16)
    recipe = _recipe(fmt)
    results = []
    for prepared in (None, prepare_grouped_weight(w, recipe, 7, True), prepare_grouped_weight(w, recipe, 7, False)):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = triton_grouped_linear_train(xi, wi, mask, recipe, 7, prepared)
        y.backward(dy)
        results.append((y, xi.grad, wi.grad))
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


def test_moe_model_trains_the_same_through_the_grouped_path(monkeypatch, tiny_model_dir):
    """A tiny Qwen3-MoE with FP4 experts: loss and expert gradients through the Triton grouped path equal the
    reference backend's (RTN recipe) up to FP32 accumulation order."""
    import hf_lowbit.kernels.linear as lin
    import hf_lowbit.model_patches.experts as experts_mod
    from conftest import load_checked

    calls = []
    real = lin.triton_grouped_linear_train
    monkeypatch.setattr(lin, "triton_grouped_linear_train", lambda *a: calls.append(1) or real(*a))

    recipe_cfg = LowBitConfig(stochastic_rounding="none")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for grouped in (False, True):
        model = load_checked(tiny_model_dir("qwen3_moe"), recipe_cfg)
        # the reference run must not resolve to the Triton backend ("auto" does on CUDA)
        backend = TritonBackend() if grouped else TorchBackend()
        monkeypatch.delenv("HF_LOWBIT_GROUPED_TRITON", raising=False)
        reload_env_settings()
        monkeypatch.setattr(experts_mod, "resolve_backend", lambda name, device, b=backend: b)
        model.to(DEV)
        out = model(ids.to(DEV), labels=ids.to(DEV))
        out.loss.backward()
        grad = model.model.layers[0].mlp.experts.gate_up_proj.grad
        results.append((out.loss.detach(), grad))
    (loss_ref, g_ref), (loss, g) = results
    assert len(calls) == 2 * 2  # two MoE layers × (gate_up, down) went through the grouped path
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert ((g - g_ref).norm() / g_ref.norm()) < 1e-4


@pytest.mark.parametrize("impl", ["triton", "cublas32"])
def test_batched_gemm_epilogue_equals_per_group_torch(impl):
    """`scaled_gemm` (and cuBLAS with an FP32 product + the epilogue pass) over G groups (strided, transposed
    operands, ragged M, N): scales, row vector, two rank-1 terms and the row mask per group, as the torch formula on
    the same BF16 operands."""
    from hf_lowbit.kernels.gemm import cublas_epilogue
    from hf_lowbit.kernels.gemm import scaled_gemm as triton_gemm

    def scaled_gemm(*args, **kw):
        return triton_gemm(*args, **kw) if impl == "triton" else cublas_epilogue(*args, fp32_product=True, **kw)

    gen = torch.Generator().manual_seed(41)
    g, m, n, k = 3, 37, 45, 64

    def r(*s):
        return torch.randn(*s, generator=gen).to(DEV)

    a = r(g, m + 5, k).to(torch.bfloat16)[:, :m]                  # strided rows (padding cut off)
    b = r(g, k, n).to(torch.bfloat16).transpose(1, 2)             # [G, N, K], transposed storage
    sa, sb, vrow = r(g).abs(), r(g).abs(), r(g, n)
    r1, r2 = (r(g, m), r(g, n)), (r(g, m), r(g, n))
    mask = (torch.rand(g, m, generator=gen) > 0.3).float().to(DEV)
    got = scaled_gemm(a, b, torch.float32, sa, sb, vrow, r1, r2, row_mask=mask)
    ref = torch.bmm(a.float(), b.float().transpose(1, 2)) * (sa * sb)[:, None, None] + vrow[:, None, :]
    ref = ref + r1[0][..., None] * r1[1][:, None, :] + r2[0][..., None] * r2[1][:, None, :]
    ref = ref * mask[..., None]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    assert (got[mask == 0] == 0).all()
    dense = scaled_gemm(a[1], b[1], torch.float32, sa[1], sb[1], vrow[1], (r1[0][1], r1[1][1]),
                        (r2[0][1], r2[1][1]), row_mask=mask[1])
    # the Triton GEMM runs one group like the dense case bit for bit; cuBLAS may pick other kernels for mm and bmm
    exact = dict(rtol=0, atol=0) if impl == "triton" else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dense, got[1], **exact)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_gradient_values_on_padding_rows_are_ignored(fmt):
    """Whatever arrives on the capacity-padding rows of dY (garbage, Inf, NaN) does not reach dX or dW: the stats
    skip those rows and the quantizer writes them as zero, so backward needs no masking copy of dY."""
    g, length, k, n = 3, 32, 48, 64
    x, mask = _inputs(g, length, k, seed=5)
    w = (torch.randn(g, n, k, generator=torch.Generator().manual_seed(6)) * 0.1).to(DEV)
    recipe = _recipe(fmt, stochastic_rounding="none")
    dy = torch.randn(g, length, n, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16).to(DEV)
    clean = dy * mask[..., None].to(dy.dtype)
    dirty = clean.clone()
    pad = mask == 0
    dirty[pad] = 1e4
    dirty[pad.nonzero()[0].tolist()[0], pad.nonzero()[0].tolist()[1], 0] = float("nan")
    dirty[pad.nonzero()[-1].tolist()[0], pad.nonzero()[-1].tolist()[1], 1] = float("inf")
    grads = []
    for d in (clean, dirty):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        triton_grouped_linear_train(xi, wi, mask, recipe, 0).backward(d)
        grads.append((xi.grad, wi.grad))
    (dx0, dw0), (dx1, dw1) = grads
    assert torch.isfinite(dx1).all() and torch.isfinite(dw1).all()
    assert torch.equal(dx0, dx1) and torch.equal(dw0, dw1)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_group_mean_quantized_matches_the_reference_per_slice(fmt):
    """One launch quantizes every group's mean vector with its own tensor scale: bit for bit the reference's
    `quantize(mu, slices=True)` with RTN (values, code × block scale in BF16, tensor scales), ragged K, a zero
    group, a huge and a NaN group; SR is unbiased and reproducible per seed."""
    from hf_lowbit.kernels.quantize import group_mean_quantized

    g = torch.Generator().manual_seed(41)
    mu = torch.randn(5, 200, generator=g) * torch.tensor([1.0, 0.0, 1e30, 3e-3, 1.0])[:, None]
    mu[4, 17] = float("nan")
    mu = mu.to(DEV)
    vals, unscaled, ts = group_mean_quantized(mu, fmt)
    p = quantize(mu, fmt, -1, "rtn", slices=True)
    import dataclasses

    ref_unscaled = dequantize(dataclasses.replace(p, tensor_scale=None)).to(torch.bfloat16)
    assert torch.allclose(vals, dequantize(p), equal_nan=True, rtol=0, atol=0)  # exact, NaN group included
    assert torch.allclose(unscaled.float(), ref_unscaled.float(), equal_nan=True, rtol=0, atol=0)
    if fmt == "nvfp4":
        assert torch.allclose(ts, p.tensor_scale.float().reshape(-1), equal_nan=True, rtol=0, atol=0)
        assert torch.isnan(ts[4]) and ts[1] == 0
    else:
        assert ts is None
    # SR: mean over seeds approaches the exact values (finite groups), same seed → same bits
    x = (torch.rand(3, 64, generator=g) * 2 - 1).to(DEV)
    x[:, ::16] = 1.0  # pins every block's scale (an MX floor scale would otherwise clip a block's top values)
    draws = torch.stack([group_mean_quantized(x, fmt, "sr", seed=s)[0] for s in range(200)])
    err = (draws.mean(0) - x).abs().max()
    assert err < 0.06
    a, b = group_mean_quantized(x, fmt, "sr", seed=7)[0], group_mean_quantized(x, fmt, "sr", seed=7)[0]
    assert torch.equal(a, b) and not torch.equal(a, group_mean_quantized(x, fmt, "sr", seed=8)[0])
    for bad, match in ((x[0], r"shape \(64,\).*\[G, K\]"), (x[:, :0], r"shape \(3, 0\)")):
        with pytest.raises(ValueError, match=match):
            group_mean_quantized(bad, fmt)
    with pytest.raises(ValueError, match="rounding='up'.*allowed"):
        group_mean_quantized(x, fmt, "up")


@pytest.mark.parametrize("scaled", [True, False])
def test_mean_row_from_the_gemm_equals_the_separate_rank1_row(scaled):
    """cuBLAS with the quantized mean as each group's last row of A: the output rows equal the Triton GEMM given the
    rank-1 row from its own GEMV ((v·bᵀ)·(ts_v·sb)), up to FP32 summation order; the fixed-path functions agree;
    inconsistent arguments are refused."""
    from hf_lowbit.kernels import gemm

    gen = torch.Generator().manual_seed(9)
    a = torch.randn(3, 33, 64, generator=gen).to(DEV, torch.bfloat16)  # 32 rows + the mean row
    b = torch.randn(3, 48, 64, generator=gen).to(DEV, torch.bfloat16)
    mask = (torch.rand(3, 32, generator=gen) > 0.2).float().to(DEV)
    sa, sb, sv = ((torch.rand(3, generator=gen) + 0.5).to(DEV) for _ in range(3))
    if not scaled:
        sa = sb = sv = None
    got = gemm.cublas_epilogue(a, b, torch.float32, sa, sb, row_mask=mask, fp32_product=True, mean_last_row=True,
                               mean_scale=sv)
    vrow = gemm.mean_row_vector(a[:, 32], b, sv, sb)
    ref = gemm.scaled_gemm(a[:, :32], b, torch.float32, sa, sb, vrow, row_mask=mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    for impl in ("cublas32", "triton"):
        out = gemm._grouped_fixed(impl)(a, b, torch.float32, sa, sb, row_mask=mask, mean_last_row=True,
                                        mean_scale=sv)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="mean_last_row"):
        gemm.cublas_epilogue(a, b, torch.float32, sa, sb, vrow=vrow, fp32_product=True, mean_last_row=True,
                             mean_scale=sv)


def test_grouped_quantizer_leaves_spare_rows_per_group():
    """row_extra: each group's row-axis values land at its own rows of a [G·(L + extra), K] output (the spare rows
    are the caller's), the same values as without spare rows; a negative count is refused by name."""
    x, mask = _inputs(3, 32, 48, seed=13)
    mu, ts = group_stats(x, mask, mask.sum(1), True, True)
    ok = mask.reshape(-1) != 0
    plain, _ = grouped_quantize_dq(x.reshape(96, 48), 32, ok, mu, ts, "nvfp4")
    spaced, _ = grouped_quantize_dq(x.reshape(96, 48), 32, ok, mu, ts, "nvfp4", row_extra=16)
    assert spaced.shape == (3 * 48, 48)
    assert torch.equal(spaced.view(3, 48, 48)[:, :32], plain.view(3, 32, 48))
    with pytest.raises(ValueError, match="row_extra=-1"):
        grouped_quantize_dq(x.reshape(96, 48), 32, ok, mu, ts, "nvfp4", row_extra=-1)


def test_grouped_auto_gemm_takes_the_faster_path_per_shape_class_once(monkeypatch):
    """HF_LOWBIT_GROUPED_GEMM=auto (default): on first use of a shape class every candidate (cuBLAS + the pass,
    the Triton GEMM at each tile config) is timed and the fastest is kept for that class; the result equals the
    chosen path's; the timing is not repeated for the same class (here with fake timings on the CPU)."""
    from hf_lowbit.kernels import gemm

    gen = torch.Generator().manual_seed(5)
    a = torch.randn(2, 32, 64, generator=gen).to(DEV, torch.bfloat16)
    b = torch.randn(2, 48, 64, generator=gen).to(DEV, torch.bfloat16)
    sa, sb = torch.rand(2, device=DEV) + 0.5, torch.rand(2, device=DEV) + 0.5
    for fake, expect in (([3.0, 2.0] + [5.0] * 20, "triton"), ([1.0] + [2.0] * 21, "cublas32")):
        gemm._GROUPED_CHOICE.clear()
        timed = []
        monkeypatch.setattr(gemm, "_can_time", lambda t: True)
        monkeypatch.setattr(gemm, "_device_ms", lambda fn: (timed.append(fn), fake[len(timed) - 1])[1])
        out = gemm.grouped_auto(a, b, torch.bfloat16, sa, sb)
        assert len(timed) == 1 + len(gemm.grouped_configs())
        (impl, config), = gemm._GROUPED_CHOICE.values()
        assert impl == expect and (config is gemm._BATCHED_CONFIG) == (expect == "triton")
        ref = (gemm._cublas32(a, b, torch.bfloat16, sa, sb) if expect == "cublas32"
               else gemm.scaled_gemm(a, b, torch.bfloat16, sa, sb))
        assert torch.equal(out, ref)
        gemm.grouped_auto(a, b, torch.bfloat16, sa, sb)  # same class: no new timing
        assert len(timed) == 1 + len(gemm.grouped_configs())
    gemm._GROUPED_CHOICE.clear()

    def out_of_memory(fn):
        raise torch.OutOfMemoryError("timing scratch")

    monkeypatch.setattr(gemm, "_device_ms", out_of_memory)  # no memory to time in: the cuBLAS path, no failure
    assert torch.equal(gemm.grouped_auto(a, b, torch.bfloat16, sa, sb), gemm._cublas32(a, b, torch.bfloat16, sa, sb))
    assert list(gemm._GROUPED_CHOICE.values()) == [("cublas32", None)]
    gemm._GROUPED_CHOICE.clear()


def test_grouped_linear_through_batched_cublas_equals_the_triton_gemm(monkeypatch):
    """HF_LOWBIT_GROUPED_GEMM=cublas32: the experts' three batched GEMMs through cuBLAS with an FP32 product
    + the epilogue pass give the batched Triton GEMM's results up to summation order; unknown values are refused."""
    from conftest import kernel_switch

    x0, mask = _inputs(3, 21, 40, seed=51, dtype=torch.float32)
    w0 = (torch.randn(3, 32, 40, generator=torch.Generator().manual_seed(52)) * 0.1).to(DEV)
    dy = torch.randn(3, 21, 32, generator=torch.Generator().manual_seed(53)).to(DEV)
    recipe = _recipe("nvfp4", stochastic_rounding="none")
    outs = []
    for impl in ("triton", "cublas32"):
        with kernel_switch(monkeypatch, "HF_LOWBIT_GROUPED_GEMM", impl):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            y = triton_grouped_linear_train(x, w, mask, recipe, 3)
            y.backward(dy)
            outs.append((y, x.grad, w.grad))
    for got, ref in zip(outs[1], outs[0]):
        assert ((got - ref).norm() / ref.norm()) < 1e-5
    with kernel_switch(monkeypatch, "HF_LOWBIT_GROUPED_GEMM", "cublas"), pytest.raises(ValueError, match="allowed"):
        triton_grouped_linear_train(x0, w0, mask, recipe, 3)
