"""Averis mean-residual FP4 linear (W4A4G4): the reference autograd op in plain PyTorch.

For a GEMM input Z (tokens × channels) Averis quantizes ``Q_A(Z) = 1·Q(μ_Z) + Q(Z − 1·μ_Z)`` with μ_Z the mean over
all tokens, recomputed on every call, and the mean vector quantized on its own (ALGORITHMS.md §2):

    Y  = Q_A(X) · Q(W)ᵀ   = Q(R_X)·Q(W)ᵀ + 1·(Q(μ_X)·Q(W)ᵀ)
    dX = Q_A(D) · Q(W)    = Q(R_D)·Q(W)  + 1·(Q(μ_D)·Q(W))
    dW = Q_A(D)ᵀ · Q_A(X) = Q(R_D)ᵀQ(R_X) + (Q(R_D)ᵀ1)·Q(μ_X) + Q(μ_D)ᵀ·(1ᵀQ(R_X)) + l·Q(μ_D)ᵀQ(μ_X)

Every operand is quantized along the reduction axis of the GEMM it feeds (``block_axis="reduction"``) or once along
its last axis (``"last"``). The weight gradient flows to the master weight unchanged (straight-through). Arithmetic
outside the quantizers runs in FP32. For backward the op keeps the packed FP4 wgrad operand of X (codes + scales),
not a full-precision copy.
"""

from __future__ import annotations

import torch

from .config import Recipe
from .numerics import PackedTensor, dequantize, fake_quantize, quantize

_SEED_MASK = (1 << 63) - 1


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded with `seed` (stochastic-rounding streams repeat bit for bit)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed & _SEED_MASK)
    return g


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (SplitMix-style), so layers and steps get independent streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _SEED_MASK


def _rounding(stochastic: bool) -> str:
    return "sr" if stochastic else "rtn"


def center(z: torch.Tensor, enabled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Z − 1·μ, μ) in FP32 with μ the mean over rows, or (Z, None) when centring is off."""
    zf = z.float()
    if not enabled:
        return zf, None
    mu = zf.mean(dim=0)
    return zf - mu, mu


def quantize_mean(mu: torch.Tensor | None, recipe: Recipe, stochastic: bool,
                  generator: torch.Generator | None) -> torch.Tensor | None:
    """The mean vector quantized on its own (its own tensor and block scales), FP32 values."""
    if mu is None:
        return None
    return fake_quantize(mu, recipe.format, -1, _rounding(stochastic), generator, mx_scale=recipe.mx_scale)


def quantize_weight(weight: torch.Tensor, recipe: Recipe, axis: int, generator: torch.Generator | None
                    ) -> PackedTensor:
    """Q(W) with blocks along `axis` (1 = in-features, 0 = out-features) or in 2-D tiles."""
    return quantize(weight.float(), recipe.format, axis, _rounding(recipe.sr_weights), generator,
                    block_2d=recipe.weight_block_2d, mx_scale=recipe.mx_scale)


# ---------------------------------------------------------------------------------------------------------------
# Random Hadamard transform over tokens (wgrad operands)
# ---------------------------------------------------------------------------------------------------------------

def _hadamard16(device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < 16:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / 4.0).to(device)


def hadamard_signs(seed: int) -> torch.Tensor:
    """16 random ±1 signs drawn on the CPU from `seed` (the same on every device)."""
    g = torch.Generator().manual_seed(mix_seed(seed, 0x4AD))
    return torch.randint(0, 2, (16,), generator=g).float() * 2 - 1


def hadamard_tokens(z: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Apply (H16·diag(signs)) to each group of 16 rows of `z` (rows zero-padded to a multiple of 16).

    The transform is orthogonal, so ``(T·D)ᵀ(T·X) = DᵀX``: applying it to both wgrad operands leaves the exact
    product unchanged while spreading outliers across 16 tokens before quantization.
    """
    l = z.shape[0]
    pad = (-l) % 16
    if pad:
        z = torch.nn.functional.pad(z, (0, 0, 0, pad))
    t = _hadamard16(z.device) * signs.to(z.device)[None, :]
    return torch.einsum("ij,bjc->bic", t, z.reshape(-1, 16, z.shape[-1])).reshape(z.shape)


# ---------------------------------------------------------------------------------------------------------------
# The three GEMMs, written as explicit sums of residual and rank-1 mean terms
# ---------------------------------------------------------------------------------------------------------------

def fprop(rx_q: torch.Tensor, mu_x_q: torch.Tensor | None, w_q: torch.Tensor,
          bias: torch.Tensor | None) -> torch.Tensor:
    """Y = Q(R_X)·Q(W)ᵀ + 1·(Q(μ_X)·Q(W)ᵀ) (+ bias), FP32."""
    y = rx_q @ w_q.t()
    if mu_x_q is not None:
        y = y + (mu_x_q @ w_q.t())
    if bias is not None:
        y = y + bias.float()
    return y


def dgrad(rd_q: torch.Tensor, mu_d_q: torch.Tensor | None, w_q: torch.Tensor) -> torch.Tensor:
    """dX = Q(R_D)·Q(W) + 1·(Q(μ_D)·Q(W)), FP32."""
    dx = rd_q @ w_q
    if mu_d_q is not None:
        dx = dx + (mu_d_q @ w_q)
    return dx


def wgrad(rd_q: torch.Tensor, mu_d_q: torch.Tensor | None, rx_q: torch.Tensor, mu_x_q: torch.Tensor | None,
          ones: torch.Tensor) -> torch.Tensor:
    """dW = Q_A(D)ᵀQ_A(X) expanded into the residual GEMM and three rank-1 terms, FP32.

    `ones` is the token-space vector that carries the means (all ones, or its Hadamard transform).
    """
    dw = rd_q.t() @ rx_q
    if mu_x_q is not None:
        dw = dw + torch.outer(rd_q.t() @ ones, mu_x_q)
    if mu_d_q is not None:
        dw = dw + torch.outer(mu_d_q, ones @ rx_q)
    if mu_x_q is not None and mu_d_q is not None:
        dw = dw + (ones @ ones) * torch.outer(mu_d_q, mu_x_q)
    return dw


def _pack_state(p: PackedTensor) -> tuple[list[torch.Tensor], tuple]:
    tensors = [p.codes, p.scales] + ([p.tensor_scale] if p.tensor_scale is not None else [])
    return tensors, (p.shape, p.axis, p.format, p.block_2d, p.tensor_scale is not None)


def _unpack_state(tensors: list[torch.Tensor], meta: tuple) -> PackedTensor:
    shape, axis, fmt, block_2d, has_ts = meta
    return PackedTensor(tensors[0], tensors[1], tensors[2] if has_ts else None, shape, axis, fmt, block_2d)


class AverisLinearFunction(torch.autograd.Function):
    """W4A4G4 linear with Averis mean-residual splitting (reference numerics, FP32 arithmetic)."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: Recipe,
                seed: int) -> torch.Tensor:
        with torch.autocast(x2d.device.type, enabled=False):  # the op's FP32 arithmetic is part of its numerics
            return AverisLinearFunction._forward(ctx, x2d, weight, bias, recipe, seed)

    @staticmethod
    def _forward(ctx, x2d, weight, bias, recipe, seed):
        need_wgrad = ctx.needs_input_grad[1]
        need_dgrad = ctx.needs_input_grad[0]
        gen = make_generator(mix_seed(seed, 1), x2d.device) if (recipe.sr_activations or recipe.sr_weights) else None
        rx, mu_x = center(x2d, recipe.center_activations)
        pw = quantize_weight(weight, recipe, 1, gen)
        w_q = dequantize(pw)
        rnd = _rounding(recipe.sr_activations)
        mu_x_q = quantize_mean(mu_x, recipe, recipe.sr_activations, gen)
        saved: list[torch.Tensor] = []
        px_meta = pw_meta = None
        if recipe.block_axis == "last":
            px = quantize(rx, recipe.format, -1, rnd, gen, mx_scale=recipe.mx_scale)
            rx_q = dequantize(px)
        else:
            rx_q = fake_quantize(rx, recipe.format, -1, rnd, gen, mx_scale=recipe.mx_scale)
            px = None
            if need_wgrad:
                rx_t = hadamard_tokens(rx, hadamard_signs(seed)) if recipe.hadamard else rx
                px = quantize(rx_t, recipe.format, 0, rnd, gen, mx_scale=recipe.mx_scale)
        y = fprop(rx_q, mu_x_q, w_q, bias)
        if need_wgrad and px is not None:
            t, px_meta = _pack_state(px)
            saved += t
        reuse_weight = recipe.block_axis == "last" or recipe.weight_block_2d
        if need_dgrad and reuse_weight:  # dgrad reuses this very Q(W) (same blocks, same SR draw)
            t, pw_meta = _pack_state(pw)
            saved += t
        ctx.save_for_backward(weight, *saved, *([mu_x_q] if mu_x_q is not None else []))
        ctx.meta = (recipe, seed, px_meta, pw_meta, mu_x_q is not None, bias is not None, x2d.shape[0])
        return y.to(x2d.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        with torch.autocast(dy.device.type, enabled=False):
            return AverisLinearFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        recipe, seed, px_meta, pw_meta, has_mu_x, has_bias, n_tokens = ctx.meta
        weight, *rest = ctx.saved_tensors
        px = pw = None
        if px_meta is not None:
            k = 3 if px_meta[-1] else 2
            px, rest = _unpack_state(rest[:k], px_meta), rest[k:]
        if pw_meta is not None:
            k = 3 if pw_meta[-1] else 2
            pw, rest = _unpack_state(rest[:k], pw_meta), rest[k:]
        mu_x_q = rest[0] if has_mu_x else None

        gen = make_generator(mix_seed(seed, 2), dy.device)
        rnd = _rounding(recipe.sr_gradients)
        rd, mu_d = center(dy, recipe.center_gradients)
        mu_d_q = quantize_mean(mu_d, recipe, recipe.sr_gradients, gen)
        rd_last = None
        if ctx.needs_input_grad[0] or recipe.block_axis == "last":
            rd_last = fake_quantize(rd, recipe.format, -1, rnd, gen, mx_scale=recipe.mx_scale)

        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if pw is not None:
                w_q = dequantize(pw)
            else:  # fresh quantization of W along out-features, the reduction axis of dX = D·W
                w_q = dequantize(quantize_weight(weight, recipe, 0, gen))
            dx = dgrad(rd_last, mu_d_q, w_q).to(dy.dtype)
        if ctx.needs_input_grad[1]:
            rx_q = dequantize(px)
            if recipe.block_axis == "last":
                rd_q = rd_last
                ones = torch.ones(n_tokens, device=dy.device)
            else:
                signs = hadamard_signs(seed) if recipe.hadamard else None
                rd_t = hadamard_tokens(rd, signs) if recipe.hadamard else rd
                rd_q = fake_quantize(rd_t, recipe.format, 0, rnd, gen, mx_scale=recipe.mx_scale)
                ones = torch.ones(n_tokens, device=dy.device)
                if recipe.hadamard:
                    ones = hadamard_tokens(ones[:, None], signs)[:, 0]
            dw = wgrad(rd_q, mu_d_q, rx_q, mu_x_q, ones).to(weight.dtype)
        if has_bias and ctx.needs_input_grad[2]:
            db = dy.float().sum(0).to(dy.dtype)
        return dx, dw, db, None, None


def averis_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: Recipe,
                  seed: int = 0) -> torch.Tensor:
    """Apply the W4A4G4 Averis linear to `x` (..., in_features) → (..., out_features)."""
    lead = x.shape[:-1]
    y = AverisLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, recipe, seed)
    return y.reshape(*lead, weight.shape[0])


def packed_linear(x: torch.Tensor, packed_weight: PackedTensor, bias: torch.Tensor | None,
                  recipe: Recipe) -> torch.Tensor:
    """Inference forward on a packed weight: W4A4 with Averis (exactly the training forward with RTN) or W4A16."""
    with torch.autocast(x.device.type, enabled=False):
        return _packed_linear(x, packed_weight, bias, recipe)


def _packed_linear(x, packed_weight, bias, recipe):
    w_q = dequantize(packed_weight)
    if recipe.activations == "none":
        return torch.nn.functional.linear(x, w_q.to(x.dtype), None if bias is None else bias.to(x.dtype))
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    rx, mu_x = center(x2d, recipe.center_activations)
    rx_q = fake_quantize(rx, recipe.format, -1, "rtn", mx_scale=recipe.mx_scale)
    mu_x_q = quantize_mean(mu_x, recipe, False, None)
    y = fprop(rx_q, mu_x_q, w_q, bias)
    return y.to(x.dtype).reshape(*lead, w_q.shape[0])

