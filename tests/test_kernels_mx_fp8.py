"""MXFP4 on FP8 tensor cores: the fold is exact, the FP8 GEMM equals the reference MXFP4 GEMM, the layer equals the
reference Averis linear. The fold runs anywhere; the layer needs the Triton quantizer (TRITON_INTERPRET=1 on a CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from hf_lowbit.averis import averis_linear
from hf_lowbit.config import LowBitConfig
from hf_lowbit.numerics import dequantize, quantize

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _wide(rows, cols, seed, decades=3.5):
    """Rows whose magnitudes span `decades` decades (~12 binades: many block scales below each row's maximum)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * torch.logspace(-decades / 2, decades / 2, cols)).to(DEV)


@pytest.mark.parametrize("shape", [(48, 96), (5, 70), (33, 32)])
@pytest.mark.parametrize("mx_scale", ["floor", "ceil"])
def test_fold_is_exact_and_gemm_equals_reference(shape, mx_scale):
    from hf_lowbit.kernels.mx_fp8 import fold_mxfp4, fp8_gemm_padded

    a, w = _wide(*shape, seed=1), _wide(24, shape[1], seed=2, decades=2)
    pa, pw = quantize(a, "mxfp4", -1, mx_scale=mx_scale), quantize(w, "mxfp4", -1, mx_scale=mx_scale)
    fa, fw = fold_mxfp4(pa), fold_mxfp4(pw)
    assert int(fa.underflow_blocks) == 0 and fa.values.dtype == torch.float8_e4m3fn
    assert torch.equal(fa.values.float()[:, :shape[1]] * fa.row_scale[:, None], dequantize(pa))
    ref = dequantize(pa) @ dequantize(pw).T
    torch.testing.assert_close(fp8_gemm_padded(fa, fw), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gemm_ragged_rows_and_epilogue_vectors(out_dtype):
    """M=5, N=70 (no padding copies), K=224 (7 blocks), every epilogue term, cast in the epilogue; and the matvec."""
    from hf_lowbit.kernels.mx_fp8 import fold_mxfp4, folded_matvec, fp8_gemm_padded

    g = torch.Generator().manual_seed(7)
    m, n, k = 5, 70, 200
    pa = quantize(_wide(m, k, seed=4), "mxfp4", -1)
    pw = quantize(_wide(n, k, seed=5, decades=2), "mxfp4", -1)
    fa, fw = fold_mxfp4(pa), fold_mxfp4(pw)
    assert fa.underflow_blocks.dim() == 0 and fa.underflow_blocks.device == fa.values.device
    vn, u1, u2 = (torch.randn(n, generator=g).to(DEV) for _ in range(3))
    vm, v1, v2 = (torch.randn(m, generator=g).to(DEV) for _ in range(3))
    ref = dequantize(pa) @ dequantize(pw).T
    tol = dict(rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    torch.testing.assert_close(fp8_gemm_padded(fa, fw), ref, **tol)
    full = ref + vn[None, :] + vm[:, None] + vm[:, None] * u1[None, :] + v2[:, None] * u2[None, :]
    got = fp8_gemm_padded(fa, fw, vec_n=vn, vec_m=vm, r1=(vm, u1), r2=(v2, u2), out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    if out_dtype == torch.float32:
        torch.testing.assert_close(got, full, **tol)
    else:  # one rounding of the FP32 result
        assert (got.float() - full).abs().max() <= 2 ** -8 * full.abs().max()
    mu = torch.randn(k, generator=g).to(DEV)
    torch.testing.assert_close(folded_matvec(fw, mu), dequantize(pw) @ mu, rtol=1e-5, atol=1e-5)


def test_gemm_promotes_every_mx_block_to_fp32():
    """The Triton GEMM asks for max_num_imprecise_acc = 32 (one MX block per tensor-core partial sum)."""
    import inspect

    from hf_lowbit.kernels import fp8_gemm

    assert fp8_gemm.IMPRECISE_ACC == fp8_gemm.MX_BLOCK == 32
    kernel = fp8_gemm._fp8_gemm_kernel  # JITFunction on a GPU, InterpretedFunction under the interpreter
    while not inspect.isfunction(kernel):
        kernel = kernel.fn
    assert "max_num_imprecise_acc=IMPRECISE" in inspect.getsource(kernel)
    with pytest.raises(ValueError, match="multiple of the MX block"):
        fp8_gemm._block_k(48)


def test_underflow_is_counted_and_nan_poisons_the_row():
    from hf_lowbit.kernels.mx_fp8 import MIN_EXACT_DELTA, fold_mxfp4

    x = torch.ones(3, 96, device=DEV)
    x[0, 32:64] = 2.0 ** (MIN_EXACT_DELTA - 6)  # one block 20 binades below its row's maximum
    x[1, 64:] = 2.0 ** (MIN_EXACT_DELTA)        # exactly at the limit: still exact
    x[2, 5] = float("nan")
    p = quantize(x, "mxfp4", -1)
    f = fold_mxfp4(p)
    assert int(f.underflow_blocks) == 1
    assert torch.isnan(f.row_scale[2]) and torch.isfinite(f.row_scale[:2]).all()
    exact = f.values.float()[:2] * f.row_scale[:2, None]
    assert torch.equal(exact[1], dequantize(p)[1]) and torch.equal(exact[0, :32], dequantize(p)[0, :32])
    assert not torch.equal(exact[0, 32:64], dequantize(p)[0, 32:64])


def test_fold_rejects_nvfp4():
    from hf_lowbit.kernels.mx_fp8 import fold_mxfp4

    with pytest.raises(ValueError, match="MXFP4"):
        fold_mxfp4(quantize(torch.randn(4, 32), "nvfp4", -1))


triton_needed = pytest.mark.skipif(not (DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"),
                                   reason="the layer uses the Triton quantizer: TRITON_INTERPRET=1 or a CUDA GPU")


@triton_needed
@pytest.mark.parametrize("axis", [-1, 0])
def test_fold_kernel_writes_the_same_bytes_as_torch(axis):
    """One Triton pass over the packed codes == the torch fold, byte for byte (signs, -0, zero rows, underflow)."""
    pytest.importorskip("triton")
    from hf_lowbit.kernels.mx_fp8 import fold_mxfp4

    x = _wide(37, 200, seed=3, decades=8)
    x[3, 7] = float("nan")
    x[5] = 0
    p = quantize(x, "mxfp4", axis)
    ref, got = fold_mxfp4(p, use_kernel=False), fold_mxfp4(p, use_kernel=True)
    finite = torch.isfinite(ref.row_scale)
    assert torch.equal(got.values.view(torch.uint8)[finite], ref.values.view(torch.uint8)[finite])
    assert torch.equal(got.row_scale.nan_to_num(), ref.row_scale.nan_to_num())
    assert int(got.underflow_blocks) == int(ref.underflow_blocks) and (axis == 0 or int(ref.underflow_blocks) > 0)


@triton_needed
@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("shape", [(37, 50, 24), (64, 64, 48)])
def test_layer_equals_reference_averis_linear(centred, shape):
    pytest.importorskip("triton")
    from hf_lowbit.kernels.mx_fp8 import mx_fp8_linear_train

    m, k, n = shape
    g = torch.Generator().manual_seed(m + k)
    x0 = (torch.randn(m, k, generator=g) + torch.randn(k, generator=g) * 3).to(DEV)
    w0 = (torch.randn(n, k, generator=g) * 0.1).to(DEV)
    b0, dy = torch.randn(n, generator=g).to(DEV), torch.randn(m, n, generator=g).to(DEV)
    recipe = LowBitConfig(format="mxfp4", stochastic_rounding="none", mean_center=centred).recipe()
    outs = []
    for fn in (averis_linear, mx_fp8_linear_train):
        x, w, b = x0.clone().requires_grad_(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = fn(x, w, b, recipe, 0)
        y.backward(dy)
        outs.append((y, x.grad, w.grad, b.grad))
    for name, got, ref in zip(("y", "dx", "dw", "db"), outs[1], outs[0]):
        assert ((got - ref).norm() / ref.norm()) < 1e-6, name


@triton_needed
def test_backend_uses_it_only_when_enabled(monkeypatch):
    pytest.importorskip("triton")
    import hf_lowbit.kernels.linear as lin
    from hf_lowbit.kernels._common import reload_env_settings

    calls = []
    monkeypatch.setattr(lin, "mx_fp8_linear_train", lambda *a: calls.append(1) or averis_linear(*a))
    x, w = torch.randn(16, 32, device=DEV), torch.randn(16, 32, device=DEV)
    mx = LowBitConfig(format="mxfp4").recipe()
    monkeypatch.delenv("HF_LOWBIT_MX_FP8", raising=False)
    reload_env_settings()
    lin.TritonBackend().linear_train(x, w, None, mx, 0)
    assert calls == []
    monkeypatch.setenv("HF_LOWBIT_MX_FP8", "1")
    reload_env_settings()
    lin.TritonBackend().linear_train(x, w, None, mx, 0)
    lin.TritonBackend().linear_train(x, w, None, LowBitConfig().recipe(), 0)  # NVFP4: not this path
    assert calls == [1]
