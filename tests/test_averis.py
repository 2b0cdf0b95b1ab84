"""The Averis W4A4G4 autograd op against explicit float64 formulas built from the reference numerics."""

import itertools

import pytest
import torch

from hf_lowbit import LowBitLinear
from hf_lowbit.averis import averis_linear, hadamard_signs, hadamard_tokens, packed_linear
from hf_lowbit.config import LowBitConfig
from hf_lowbit.numerics import fake_quantize

L, M, N = 37, 40, 24  # ragged: neither tokens nor features are multiples of the block


def _data(seed=0, mean_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, M, generator=g) + mean_scale * torch.randn(M, generator=g)  # planted channel means
    w = torch.randn(N, M, generator=g) * 0.2
    dy = torch.randn(L, N, generator=g) + 0.5 * torch.randn(N, generator=g)
    return x, w, dy


def _run(recipe, x, w, dy, seed=7, bias=None):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = averis_linear(x, w, bias, recipe, seed)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _fq(t, r, axis, block_2d=False):
    return fake_quantize(t, r.format, axis, "rtn", block_2d=block_2d, mx_scale=r.mx_scale).double()


def _reference(recipe, x, w, dy):
    """Float64 Y, dX, dW from Q_A(Z) = 1·Q(mean) + Q(residual), each operand blocked as the recipe says."""
    r = recipe
    ca, cg = r.center_activations, r.center_gradients
    mu_x = x.float().mean(0) if ca else torch.zeros(M)
    rx = x.float() - mu_x if ca else x.float()
    mu_d = dy.float().mean(0) if cg else torch.zeros(N)
    rd = dy.float() - mu_d if cg else dy.float()
    q_mu_x = _fq(mu_x, r, -1) if ca else torch.zeros(M, dtype=torch.float64)
    q_mu_d = _fq(mu_d, r, -1) if cg else torch.zeros(N, dtype=torch.float64)
    two_d = r.weight_blocks == "2d"
    w_f = _fq(w, r, 1, two_d)
    w_d = w_f if (two_d or r.block_axis == "last") else _fq(w, r, 0)
    qa_x_f = _fq(rx, r, -1) + q_mu_x
    qa_d_d = _fq(rd, r, -1) + q_mu_d
    if r.block_axis == "last":
        qa_x_w, qa_d_w = qa_x_f, qa_d_d
    else:
        qa_x_w, qa_d_w = _fq(rx, r, 0) + q_mu_x, _fq(rd, r, 0) + q_mu_d
    return qa_x_f @ w_f.T, qa_d_d @ w_d, qa_d_w.T @ qa_x_w


RECIPES = [
    LowBitConfig(format=f, mean_center=c, block_axis=a, weight_blocks=b, stochastic_rounding="none").recipe()
    for f, c, a, b in itertools.product(["nvfp4", "mxfp4"], [True, False], ["reduction", "last"], ["1d", "2d"])
]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.format}-c{int(r.center_activations)}-"
                                                      f"{r.block_axis}-{r.weight_blocks}")
def test_three_gemms_equal_the_mean_residual_formulas(recipe):
    x, w, dy = _data()
    y, dx, dw = _run(recipe, x, w, dy)
    y_ref, dx_ref, dw_ref = _reference(recipe, x, w, dy)
    for got, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_mean_split_reduces_quantization_error_with_a_planted_mean():
    # A mean bias that sets every block's scale (one spiking channel per 16-block) crushes the other channels in
    # plain FP4; Averis quantizes the mean on its own and the residual with its own, small scales.
    x, w, dy = _data(mean_scale=0.0)
    x[:, ::16] += 20.0
    errs = {}
    for center in (True, False):
        r = LowBitConfig(mean_center=center, stochastic_rounding="none").recipe()
        exact = x.double() @ _fq(w, r, 1).T  # isolate the activation-quantization error
        y, _, _ = _run(r, x, w, dy)
        errs[center] = ((y.double() - exact).norm() / exact.norm()).item()
    assert errs[True] < 0.7 * errs[False]


def test_hadamard_transform_is_orthogonal_and_used_in_wgrad():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(37, 5, generator=g), torch.randn(37, 6, generator=g)
    s = hadamard_signs(11)
    assert set(s.tolist()) <= {-1.0, 1.0}
    ta, tb = hadamard_tokens(a, s), hadamard_tokens(b, s)
    assert ta.shape == (48, 5)
    assert torch.allclose(ta.T @ tb, a.T @ b, atol=1e-5)
    # dW with the Hadamard option equals the float64 product of the rotated, quantized Q_A operands.
    x, w, dy = _data()
    seed = 5
    r = LowBitConfig(hadamard=True, stochastic_rounding="none").recipe()
    _, _, dw = _run(r, x, w, dy, seed=seed)
    s = hadamard_signs(seed)
    mu_x, mu_d = x.mean(0), dy.mean(0)
    ones = hadamard_tokens(torch.ones(L, 1), s)[:, 0].double()
    qx = _fq(hadamard_tokens(x - mu_x, s), r, 0) + ones[:, None] * _fq(mu_x, r, -1)
    qd = _fq(hadamard_tokens(dy - mu_d, s), r, 0) + ones[:, None] * _fq(mu_d, r, -1)
    ref = qd.T @ qx
    assert torch.allclose(dw.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    _, _, dw_plain = _run(LowBitConfig(stochastic_rounding="none").recipe(), x, w, dy, seed=seed)
    assert not torch.equal(dw, dw_plain)


def test_stochastic_rounding_of_gradients_is_seeded_and_unbiased():
    x, w, dy = _data()
    r = LowBitConfig(stochastic_rounding="gradients").recipe()
    _, dx1, dw1 = _run(r, x, w, dy, seed=1)
    _, dx1b, dw1b = _run(r, x, w, dy, seed=1)
    _, dx2, _ = _run(r, x, w, dy, seed=2)
    assert torch.equal(dx1, dx1b) and torch.equal(dw1, dw1b)
    assert not torch.equal(dx1, dx2)
    # E[Q_sr(D)] = D, so the mean dX over many draws approaches D·Q(W) (W quantized along out-features, RTN).
    w_d = _fq(w, r, 0)
    target = dy.double() @ w_d
    draws = torch.stack([_run(r, x, w, dy, seed=s)[1].double() for s in range(200)])
    single = (draws[0] - target).norm() / target.norm()
    mean_err = (draws.mean(0) - target).norm() / target.norm()
    assert mean_err < single / 5  # variance shrinks ~ 1/sqrt(200) ≈ 0.07 of a single draw


def test_backward_keeps_packed_activations_not_float_copies():
    x, w, dy = _data()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    xr = x.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = averis_linear(xr, wr, None, LowBitConfig().recipe(), 0)
    big_float = [t for t in saved if t.is_floating_point() and t.numel() >= L * M and t is not wr]
    big_float = [t for t in big_float if t.data_ptr() != wr.data_ptr()]
    assert big_float == []
    assert any(t.dtype == torch.uint8 and t.numel() >= L * M // 2 for t in saved)
    y.backward(dy)
    assert xr.grad is not None and wr.grad is not None


def test_layer_forward_backward_bias_and_edge_inputs():
    torch.manual_seed(0)
    layer = LowBitLinear(40, 24, bias=True, recipe=LowBitConfig(stochastic_rounding="none").recipe())
    x = torch.randn(3, 5, 40, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, 24)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.allclose(layer.bias.grad, dy.sum((0, 1)))
    assert x.grad.shape == x.shape
    with torch.no_grad():
        z = layer(torch.zeros(4, 40))
        assert torch.equal(z, layer.bias.expand(4, 24))  # zeros stay exact zeros
        bad = torch.randn(4, 40)
        bad[1, 3] = float("nan")
        assert torch.isnan(layer(bad)).all()  # NaN poisons the NVFP4 tensor scale: loud, not hidden
    assert layer(torch.randn(2, 40, dtype=torch.float32)).dtype == torch.float32


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_packed_w4a4_forward_equals_training_forward(fmt):
    torch.manual_seed(0)
    r = LowBitConfig(format=fmt, stochastic_rounding="gradients").recipe()
    layer = LowBitLinear(40, 24, bias=True, recipe=r)
    x = torch.randn(6, 40) + 2.0
    with torch.no_grad():
        y_train = layer(x)
        layer.to_infer()
        y_infer = layer(x)
        y_direct = packed_linear(x, layer.packed_weight(), layer.bias, r)
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert torch.equal(y_train, y_infer) and torch.equal(y_infer, y_direct)


def test_autocast_does_not_change_the_fp4_numerics():
    x, w, dy = _data()
    r = LowBitConfig(stochastic_rounding="none").recipe()
    y, dx, dw = _run(r, x, w, dy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2, dx2, dw2 = _run(r, x, w, dy)
    assert torch.equal(y, y2) and torch.equal(dx, dx2) and torch.equal(dw, dw2)
