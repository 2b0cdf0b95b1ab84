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

The op is written for G independent groups at once (``x [G, L, K]``, ``weight [G, N, K]``): a dense layer is G = 1;
the routed experts of an MoE layer are G = E with each expert's tokens in its own row block (``mask [G, L]`` marks
real tokens; padding rows are zero and carry no mean). Every group is its own tensor: its own mean, its own NVFP4
tensor scales, its own blocks.
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


def _fq(z: torch.Tensor, recipe: Recipe, axis: int, stochastic: bool, generator: torch.Generator | None,
        block_2d: bool = False) -> torch.Tensor:
    """Fake-quantize a grouped operand (dim 0 = groups, each with its own tensor scale), FP32 values."""
    return fake_quantize(z, recipe.format, axis, _rounding(stochastic), generator, block_2d=block_2d,
                         mx_scale=recipe.mx_scale, slices=True)


def _pack(z: torch.Tensor, recipe: Recipe, axis: int, stochastic: bool, generator: torch.Generator | None,
          block_2d: bool = False) -> PackedTensor:
    return quantize(z, recipe.format, axis, _rounding(stochastic), generator, block_2d=block_2d,
                    mx_scale=recipe.mx_scale, slices=True)


def center(z: torch.Tensor, enabled: bool, mask: torch.Tensor | None, counts: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Z − 1·μ, μ) per group in FP32, μ the mean over the group's real tokens; (Z, None) when centring is off."""
    zf = z.float()
    if not enabled:
        return zf, None
    mu = zf.sum(dim=1) / counts.clamp(min=1)[:, None] if mask is not None else zf.mean(dim=1)
    r = zf - mu[:, None, :]
    if mask is not None:
        r = r * mask[..., None]
    return r, mu


# ---------------------------------------------------------------------------------------------------------------
# Random Hadamard transform over tokens (wgrad operands)
# ---------------------------------------------------------------------------------------------------------------

HADAMARD_BLOCK = 16


def hadamard_sign_bits(seed: int) -> int:
    """The 16 random signs of the transform for `seed` as bits (bit i set: sign i is −1); the Triton kernels take
    this integer, the reference its `hadamard_signs` tensor, so both draw the same signs on every device."""
    return mix_seed(seed, 0x4AD) & 0xFFFF


def hadamard_signs(seed: int) -> torch.Tensor:
    """16 random ±1 signs (FP32, CPU) drawn from `seed`."""
    bits = hadamard_sign_bits(seed)
    return torch.tensor([-1.0 if (bits >> i) & 1 else 1.0 for i in range(HADAMARD_BLOCK)])


def hadamard_tokens(z: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Apply (H16·diag(signs))/4 to each group of 16 rows (dim -2) of `z`, rows zero-padded to a multiple of 16.

    The transform is orthogonal, so ``(T·D)ᵀ(T·X) = DᵀX``: applying it to both wgrad operands leaves the exact
    product unchanged while spreading outliers across 16 tokens before quantization. It is computed in a fixed
    order that the Triton kernel repeats bit for bit: scale by ±1/4 (exact), then the four butterfly stages of the
    fast Walsh-Hadamard transform (distance 1, 2, 4, 8; each (a, b) → (a + b, a − b)), Sylvester's natural order.
    """
    pad = (-z.shape[-2]) % HADAMARD_BLOCK
    if pad:
        z = torch.nn.functional.pad(z, (0, 0, 0, pad))
    lead, rows, cols = z.shape[:-2], z.shape[-2], z.shape[-1]
    nb = rows // HADAMARD_BLOCK
    t = z.reshape(*lead, nb, HADAMARD_BLOCK, cols) * (signs.to(z.device, z.dtype) * 0.25)[:, None]
    h = 1
    while h < HADAMARD_BLOCK:
        a, b = t.reshape(*lead, nb, HADAMARD_BLOCK // (2 * h), 2, h, cols).unbind(-3)
        t = torch.stack((a + b, a - b), dim=-3)
        h *= 2
    return t.reshape(z.shape)


# ---------------------------------------------------------------------------------------------------------------
# The three GEMMs, written as explicit sums of residual and rank-1 mean terms (batched over groups)
# ---------------------------------------------------------------------------------------------------------------

def _mt(w: torch.Tensor) -> torch.Tensor:
    return w.transpose(-1, -2)


def fprop(rx_q: torch.Tensor, mu_x_q: torch.Tensor | None, w_q: torch.Tensor) -> torch.Tensor:
    """Y = Q(R_X)·Q(W)ᵀ + 1·(Q(μ_X)·Q(W)ᵀ), FP32, [G, L, N]."""
    y = rx_q @ _mt(w_q)
    if mu_x_q is not None:
        y = y + mu_x_q[:, None, :] @ _mt(w_q)
    return y


def dgrad(rd_q: torch.Tensor, mu_d_q: torch.Tensor | None, w_q: torch.Tensor) -> torch.Tensor:
    """dX = Q(R_D)·Q(W) + 1·(Q(μ_D)·Q(W)), FP32, [G, L, K]."""
    dx = rd_q @ w_q
    if mu_d_q is not None:
        dx = dx + mu_d_q[:, None, :] @ w_q
    return dx


def wgrad(rd_q: torch.Tensor, mu_d_q: torch.Tensor | None, rx_q: torch.Tensor, mu_x_q: torch.Tensor | None,
          ones: torch.Tensor) -> torch.Tensor:
    """dW = Q_A(D)ᵀQ_A(X) expanded into the residual GEMM and three rank-1 terms, FP32, [G, N, K].

    `ones` [G, L] is the token-space vector that carries the means (the real-token mask, or its Hadamard transform).
    """
    dw = _mt(rd_q) @ rx_q
    if mu_x_q is not None:
        dw = dw + (_mt(rd_q) @ ones[..., None]) * mu_x_q[:, None, :]
    if mu_d_q is not None:
        dw = dw + mu_d_q[:, :, None] * (ones[:, None, :] @ rx_q)
    if mu_x_q is not None and mu_d_q is not None:
        dw = dw + (ones * ones).sum(1)[:, None, None] * (mu_d_q[:, :, None] * mu_x_q[:, None, :])
    return dw


def _saved(p: PackedTensor | None) -> tuple[list[torch.Tensor], tuple | None]:
    if p is None:
        return [], None
    tensors = [p.codes, p.scales] + ([p.tensor_scale] if p.tensor_scale is not None else [])
    return tensors, (p.shape, p.axis, p.format, p.block_2d, len(tensors))


def _restore(tensors: list[torch.Tensor], meta: tuple | None) -> tuple[PackedTensor | None, list[torch.Tensor]]:
    if meta is None:
        return None, tensors
    shape, axis, fmt, block_2d, n = meta
    ts = tensors[2] if n == 3 else None
    return PackedTensor(tensors[0], tensors[1], ts, shape, axis, fmt, block_2d), tensors[n:]


class GroupedAverisLinearFunction(torch.autograd.Function):
    """W4A4G4 Averis linear over G groups: x [G, L, K] · weight [G, N, K]ᵀ → [G, L, N] (reference, FP32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None, recipe: Recipe,
                seed: int) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the op's FP32 arithmetic is part of its numerics
            return GroupedAverisLinearFunction._forward(ctx, x, weight, mask, recipe, seed)

    @staticmethod
    def _forward(ctx, x, weight, mask, recipe, seed):
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        counts = mask.sum(1) if mask is not None else torch.full((x.shape[0],), x.shape[1], device=x.device)
        gen = make_generator(mix_seed(seed, 1), x.device) if (recipe.sr_activations or recipe.sr_weights) else None
        two_d = recipe.weight_block_2d
        rx, mu_x = center(x, recipe.center_activations, mask, counts)
        pw = _pack(weight.float(), recipe, -1, recipe.sr_weights, gen, two_d)
        w_q = dequantize(pw)
        mu_x_q = None if mu_x is None else _fq(mu_x, recipe, -1, recipe.sr_activations, gen)
        px = None
        if recipe.block_axis == "last":
            px = _pack(rx, recipe, -1, recipe.sr_activations, gen)
            rx_q = dequantize(px)
        else:
            rx_q = _fq(rx, recipe, -1, recipe.sr_activations, gen)
            if need_wgrad:
                rx_t = hadamard_tokens(rx, hadamard_signs(seed)) if recipe.hadamard else rx
                px = _pack(rx_t, recipe, 1, recipe.sr_activations, gen)
        y = fprop(rx_q, mu_x_q, w_q)
        if mask is not None:
            y = y * mask[..., None]
        keep_w = need_dgrad and (recipe.block_axis == "last" or two_d)  # dgrad reuses this very Q(W)
        saved_x, meta_x = _saved(px if need_wgrad else None)
        saved_w, meta_w = _saved(pw if keep_w else None)
        extra = [t for t in (mask, mu_x_q) if t is not None]
        ctx.save_for_backward(weight, counts, *saved_x, *saved_w, *extra)
        ctx.meta = (recipe, seed, meta_x, meta_w, mask is not None, mu_x_q is not None)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        with torch.autocast(dy.device.type, enabled=False):
            dx, dw = GroupedAverisLinearFunction._backward(ctx, dy)
        return dx, dw, None, None, None

    @staticmethod
    def _backward(ctx, dy):
        recipe, seed, meta_x, meta_w, has_mask, has_mu_x = ctx.meta
        weight, counts, *rest = ctx.saved_tensors
        px, rest = _restore(rest, meta_x)
        pw, rest = _restore(rest, meta_w)
        mask = rest.pop(0) if has_mask else None
        mu_x_q = rest.pop(0) if has_mu_x else None

        gen = make_generator(mix_seed(seed, 2), dy.device)
        sr = recipe.sr_gradients
        d = dy.float() * mask[..., None] if mask is not None else dy
        rd, mu_d = center(d, recipe.center_gradients, mask, counts)
        mu_d_q = None if mu_d is None else _fq(mu_d, recipe, -1, sr, gen)
        rd_last = None
        if ctx.needs_input_grad[0] or recipe.block_axis == "last":
            rd_last = _fq(rd, recipe, -1, sr, gen)

        dx = dw = None
        if ctx.needs_input_grad[0]:
            # Q(W) along out-features (the reduction axis of dX = D·W), or the forward's Q(W) when reused
            w_q = dequantize(pw) if pw is not None else _fq(weight.float(), recipe, 1, recipe.sr_weights, gen)
            dx = dgrad(rd_last, mu_d_q, w_q)
            if mask is not None:
                dx = dx * mask[..., None]
            dx = dx.to(dy.dtype)
        if ctx.needs_input_grad[1]:
            rx_q = dequantize(px)
            ones = mask.float() if mask is not None else torch.ones(dy.shape[:2], device=dy.device)
            if recipe.block_axis == "last":
                rd_q = rd_last
            else:
                if recipe.hadamard:
                    signs = hadamard_signs(seed)
                    rd = hadamard_tokens(rd, signs)
                    ones = hadamard_tokens(ones[..., None], signs)[..., 0]
                rd_q = _fq(rd, recipe, 1, sr, gen)
            dw = wgrad(rd_q, mu_d_q, rx_q, mu_x_q, ones).to(weight.dtype)
        return dx, dw


def averis_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: Recipe,
                  seed: int = 0) -> torch.Tensor:
    """W4A4G4 Averis linear of a dense layer: `x` (..., in_features) → (..., out_features)."""
    lead = x.shape[:-1]
    y = GroupedAverisLinearFunction.apply(x.reshape(1, -1, x.shape[-1]), weight[None], None, recipe, seed)
    y = y.reshape(*lead, weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


def grouped_averis_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, recipe: Recipe,
                          seed: int = 0) -> torch.Tensor:
    """W4A4G4 Averis linear of G groups (MoE experts): x [G, L, K], weight [G, N, K], mask [G, L] → [G, L, N]."""
    return GroupedAverisLinearFunction.apply(x, weight, mask.to(torch.float32), recipe, seed)


def packed_linear(x: torch.Tensor, packed_weight: PackedTensor, bias: torch.Tensor | None,
                  recipe: Recipe) -> torch.Tensor:
    """Inference forward on a packed weight: W4A4 with Averis (exactly the training forward with RTN) or W4A16."""
    with torch.autocast(x.device.type, enabled=False):
        w_q = dequantize(packed_weight)
        if recipe.activations == "none":
            return torch.nn.functional.linear(x, w_q.to(x.dtype), None if bias is None else bias.to(x.dtype))
        lead = x.shape[:-1]
        y = packed_grouped_linear(x.reshape(1, -1, x.shape[-1]), w_q[None], None, recipe)
        y = y.reshape(*lead, w_q.shape[0])
        return y if bias is None else y + bias.to(y.dtype)


def packed_grouped_linear(x: torch.Tensor, w_q: torch.Tensor, mask: torch.Tensor | None, recipe: Recipe
                          ) -> torch.Tensor:
    """W4A4 forward of G groups on dequantized packed weights [G, N, K] (RTN, same math as training)."""
    counts = mask.sum(1) if mask is not None else torch.full((x.shape[0],), x.shape[1], device=x.device)
    rx, mu_x = center(x, recipe.center_activations, mask, counts)
    rx_q = _fq(rx, recipe, -1, False, None)
    mu_x_q = None if mu_x is None else _fq(mu_x, recipe, -1, False, None)
    y = fprop(rx_q, mu_x_q, w_q)
    if mask is not None:
        y = y * mask[..., None]
    return y.to(x.dtype)
