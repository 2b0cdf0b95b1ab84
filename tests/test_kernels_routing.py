"""MoE experts' row moves (kernels/routing.py) against the torch path of `Routing` and an FP64 reference: the gather
into the expert-major layout, the slot sums of its backward, and the weighted combine with both of its gradients;
the gated SiLU (kernels/expert_act.py) against the torch chain it replaces.

Runs on the CPU under TRITON_INTERPRET=1 (tiny shapes) and, unchanged, on a CUDA GPU without the interpreter.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import kernel_switch, kernel_test_device

DEV = kernel_test_device()

import hf_lowbit.model_patches.experts as experts_mod  # noqa: E402
from hf_lowbit.model_patches import Routing  # noqa: E402


@contextlib.contextmanager
def routing_path(monkeypatch, kernels: bool):
    """Routing moves through the Triton kernels (also on CPU tensors) or through torch ops, for the block."""
    monkeypatch.setattr(experts_mod, "ROUTING_KERNELS_ON_CPU", kernels)
    with kernel_switch(monkeypatch, "HF_LOWBIT_ROUTING", "triton" if kernels else "torch"):
        yield


def _routing(t: int, k: int, e: int, seed: int) -> tuple[Routing, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    idx[3, 2] = e  # another rank's expert: a dropped slot
    return Routing.from_top_k(idx.to(DEV), e), idx


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_and_its_backward_equal_the_torch_path(dtype, monkeypatch):
    t, k, e, h = 24, 8, 9, 40  # h: a ragged last chunk
    r, _ = _routing(t, k, e, seed=1)
    gen = torch.Generator().manual_seed(2)
    hidden = (torch.randn(t, h, generator=gen) * 50).to(dtype).to(DEV)
    grad_rows = (torch.randn(e * r.capacity, h, generator=gen) * 50).to(dtype).to(DEV)
    grad_rows[0] = float("inf")  # row 0: the torch path's fallback index of a dropped slot; never summed
    got = {}
    for kernels in (True, False):
        with routing_path(monkeypatch, kernels):
            x = hidden.clone().requires_grad_(True)
            out = r.gather(x)
            out.backward(grad_rows.view(e, r.capacity, h))
            got[kernels] = (out.detach(), x.grad)
    assert torch.equal(got[True][0], got[False][0])  # a copy: bit for bit, zeros on padding rows
    want = torch.zeros(t, h, dtype=torch.float64, device=DEV).index_add_(0, r.token,
                                                                         grad_rows[r.rows].double())
    mag = torch.zeros_like(want).index_add_(0, r.token, grad_rows[r.rows].double().abs())
    finite = torch.isfinite(want).all(1)  # the token that really owns row 0 sums its Inf
    assert finite[3] and not finite.all()
    for kernels in (True, False):
        g = got[kernels][1]
        assert g.dtype == dtype and torch.isfinite(g[finite]).all()
        err = (g[finite].double() - want[finite]).abs()
        # FP32 sums (k roundings at most 2^-24 of the running magnitude), then one rounding to the output dtype
        bound = 2.0 ** -8 * want[finite].abs() if dtype == torch.bfloat16 else 0.0
        assert (err <= bound + k * 2.0 ** -24 * mag[finite] + 1e-30).all()


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_combine_and_its_gradients_equal_the_torch_path(wdtype, monkeypatch):
    t, k, e, h = 24, 8, 9, 72
    r, idx = _routing(t, k, e, seed=3)
    gen = torch.Generator().manual_seed(4)
    y0 = (torch.randn(e * r.capacity, h, generator=gen) * 100).to(torch.bfloat16).to(DEV)
    w0 = torch.rand(t, k, generator=gen).to(wdtype).to(DEV)
    g0 = torch.randn(t, h, generator=gen).to(torch.bfloat16).to(DEV)
    like = torch.empty(1, dtype=torch.bfloat16, device=DEV)
    got = {}
    for kernels in (True, False):
        with routing_path(monkeypatch, kernels):
            y, w = y0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
            out = r.combine(y.view(e, r.capacity, h), w, like)
            out.backward(g0)
            got[kernels] = (out.detach(), y.grad, w.grad)
    ref = torch.zeros(t, h, dtype=torch.float64, device=DEV)
    ref.index_add_(0, r.token, y0[r.rows].double() * w0[r.token, r.slot].double()[:, None])
    for kernels in (True, False):
        out, gy, gw = got[kernels]
        assert out.dtype == torch.bfloat16 and gy.dtype == torch.bfloat16 and gw.dtype == wdtype
        assert ((out.double() - ref).abs() <= 2.0 ** -8 * ref.abs() + 1e-30).all()
    out_k, gy_k, gw_k = got[True]
    out_t, gy_t, gw_t = got[False]
    # one FP32 product per (token, slot) rounded once to BF16 in both paths: the row gradients agree bit for bit,
    # and rows no slot picks (padding, the dropped slot's fallback row 0 when it is padding) get exact zeros
    assert torch.equal(gy_k, gy_t)
    picked = torch.zeros(e * r.capacity, dtype=torch.bool, device=DEV)
    picked[r.rows] = True
    assert (gy_k[~picked] == 0).all()
    assert (gw_k[3, 2] == 0) and torch.allclose(gw_k.float(), gw_t.float(), rtol=1e-2 if wdtype == torch.bfloat16
                                                  else 1e-5, atol=1e-3)
    assert ((out_k.double() - out_t.double()).abs() <= 2.0 ** -7 * out_t.double().abs() + 1e-30).all()


def test_unknown_routing_switch_is_refused(monkeypatch):
    r, _ = _routing(8, 4, 5, seed=5)
    monkeypatch.setattr(experts_mod, "ROUTING_KERNELS_ON_CPU", True)
    with kernel_switch(monkeypatch, "HF_LOWBIT_ROUTING", "cuda"), pytest.raises(ValueError, match="allowed"):
        r.gather(torch.zeros(8, 16, device=DEV))
    from torch import nn

    from hf_lowbit.model_patches.experts import gated_activation

    with kernel_switch(monkeypatch, "HF_LOWBIT_EXPERT_ACT", "fused"), pytest.raises(ValueError,
                                                                                    match="HF_LOWBIT_EXPERT_ACT"):
        gated_activation(torch.zeros(2, 32, 8, device=DEV), torch.ones(2, 32, device=DEV), nn.SiLU())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gated_silu_equals_the_torch_chain(dtype, monkeypatch):
    """h = SiLU(gate)·up·mask and its gate_up gradient: bit for bit the torch ops on CUDA (same expf, division,
    roundings and FMA); within one ulp of the activation dtype under the interpreter, whose exp is numpy's."""
    from torch import nn

    from hf_lowbit.model_patches.experts import gated_activation

    gen = torch.Generator().manual_seed(7)
    e, c, i = 3, 32, 40  # i: a ragged chunk
    gu0 = (torch.randn(e, c, 2 * i, generator=gen) * 3).to(dtype)
    gu0[0, 0, 0] = 90.0   # exp(-x) underflows
    gu0[0, 0, 1] = -90.0  # exp(-x) overflows to inf: SiLU → -0
    gu0 = gu0.to(DEV)
    mask = (torch.rand(e, c, generator=gen) > 0.25).float().to(DEV)
    dh = torch.randn(e, c, i, generator=gen).to(dtype).to(DEV)
    got = {}
    for kernels in (True, False):
        with routing_path(monkeypatch, kernels), kernel_switch(monkeypatch, "HF_LOWBIT_EXPERT_ACT",
                                                               "triton" if kernels else "torch"):
            gu = gu0.clone().requires_grad_(True)
            h = gated_activation(gu, mask, nn.SiLU())
            h.backward(dh)
            got[kernels] = (h.detach(), gu.grad)
    assert (got[True][0][mask == 0] == 0).all()
    for a, b in zip(got[True], got[False]):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        if DEV == "cuda":
            assert torch.equal(a, b)
        elif dtype == torch.bfloat16:  # one rounding to BF16 after FP32 math that may differ in its last bits
            diff = (a.float() - b.float()).abs()
            assert (diff <= 2.0 ** -7 * b.float().abs() + 1e-30).all() and (diff == 0).float().mean() > 0.97
        else:  # torch's CPU SiLU backward has its own operation order (no FMA)
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
