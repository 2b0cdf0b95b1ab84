"""The MoE experts' gated activation h = SiLU(gate) · up · mask in one pass each way (Triton).

In the expert-major layout (`model_patches.experts`), `act_fn(gate) * up * mask` ran as three elementwise torch ops
forward and five backward over [E·C, I] tensors (~1.5 ms of the 14.6 ms P8 step on an H200). These kernels read the
gate_up rows once and write h (forward) or the gate_up gradient (backward) once, with the numerics of that torch
chain on CUDA: SiLU in FP32 as x / (1 + exp(−x)) (libdevice `expf`, IEEE division) rounded to the activation dtype,
each product of two such values rounded once, and the backward's SiLU derivative dy·s·(1 + x·(1 − s)) with
s = 1 / (1 + exp(−x)) and the inner term as one FMA, as ATen's kernels compute them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from hf_lowbit.kernels._common import COMPILED, cdiv, interpreting, round_to

_BI = 1024


@triton.jit
def _round(v, ptr):
    """FP32 rounded to the element type of `ptr` and kept in FP32: the value a torch op in that dtype produces."""
    return round_to(v, ptr).to(tl.float32)


@triton.jit
def _exp(x):
    if COMPILED:
        return libdevice.exp(x)  # expf, as ATen's CUDA kernels call it (tl.exp is ex2.approx-based)
    return tl.exp(x)


@triton.jit
def _act_kernel(gu_ptr, mask_ptr, dh_ptr, out_ptr, I, NUM_I, BACKWARD: tl.constexpr, BI: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    m = tl.load(mask_ptr + r)
    for it in range(NUM_I):
        cols = it * BI + tl.arange(0, BI)
        cm = cols < I
        g = tl.load(gu_ptr + r * 2 * I + cols, mask=cm, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + r * 2 * I + I + cols, mask=cm, other=0.0).to(tl.float32)
        e = _exp(-g)
        a = _round(tl.math.div_rn(g, 1.0 + e), out_ptr)           # act_fn(gate) in the activation dtype
        if BACKWARD:
            dt = _round(tl.load(dh_ptr + r * I + cols, mask=cm, other=0.0).to(tl.float32) * m, out_ptr)
            da = _round(dt * u, out_ptr)                            # d(a·u)/da, rounded like torch's mul backward
            du = _round(dt * a, out_ptr)
            s = tl.math.div_rn(tl.full([BI], 1.0, tl.float32), 1.0 + e)
            dg = (da * s) * tl.fma(g, 1.0 - s, 1.0)                 # ATen's silu_backward in opmath
            tl.store(out_ptr + r * 2 * I + cols, _round(dg, out_ptr).to(out_ptr.dtype.element_ty), mask=cm)
            tl.store(out_ptr + r * 2 * I + I + cols, du.to(out_ptr.dtype.element_ty), mask=cm)
        else:
            h = _round(a * u, out_ptr) * m
            tl.store(out_ptr + r * I + cols, h.to(out_ptr.dtype.element_ty), mask=cm)


def _launch(gate_up: torch.Tensor, mask: torch.Tensor, dh: torch.Tensor | None) -> torch.Tensor:
    rows, two_i = gate_up.shape
    i = two_i // 2
    out = torch.empty((rows, two_i if dh is not None else i), device=gate_up.device, dtype=gate_up.dtype)
    bi = min(_BI, triton.next_power_of_2(i))
    n = cdiv(i, bi)
    _act_kernel[(rows,)](gate_up, mask, dh if dh is not None else gate_up, out, i,
                         tl.constexpr(n) if interpreting() else n, BACKWARD=dh is not None, BI=bi)
    return out


class _GatedSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up, mask)
        return _launch(gate_up, mask, None)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate_up, mask = ctx.saved_tensors
        return _launch(gate_up, mask, dh.contiguous()), None


def gated_silu(gate_up: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) · up · mask of expert-major rows `gate_up` [..., 2I] (gate columns first) and a 0/1 row mask
    [...] → [..., I] in gate_up's dtype, differentiable with respect to gate_up."""
    lead = gate_up.shape[:-1]
    flat = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
    return _GatedSiLU.apply(flat, mask.reshape(-1).float().contiguous()).view(*lead, flat.shape[-1] // 2)
