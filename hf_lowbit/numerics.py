"""Reference FP4 numerics (NVFP4 and MXFP4) in plain PyTorch.

This module is the single source of truth for what a quantized value is. Every fast path (Triton kernels, fused
layers) is tested against it: bit for bit for round-to-nearest, in distribution for stochastic rounding.

Formats (see ALGORITHMS.md §1):

* **NVFP4**: blocks of 16 elements, FP8 E4M3 block scale, one FP32 tensor scale ``s_t = amax / (6 * 448)``.
  Block scale ``s_b = e4m3(amax_b / 6 / s_t)``; element code ``q = e2m1(x / (s_b * s_t))``; value ``(q * s_b) * s_t``.
* **MXFP4**: blocks of 32 elements, E8M0 (power of two) block scale ``2^e`` with ``e = floor(log2(amax_b)) - 2``
  (OCP rule, ``mx_scale="floor"``, the default: block maxima above 6 * 2^e saturate to ±6) or the smallest ``e`` with
  ``amax_b <= 6 * 2^e`` (``mx_scale="ceil"``: nothing saturates). No tensor scale.

Element codes are the E2M1 bit patterns: bit 3 is the sign, bits 0-2 index ``{0, .5, 1, 1.5, 2, 3, 4, 6}``. Two
codes share a byte, the element with the lower index in the low nibble (the layout compressed-tensors and vLLM use).

Non-finite input: a NaN or Inf anywhere in an NVFP4 tensor makes its tensor scale NaN, so every dequantized value
of that tensor is NaN (divergence stays loud instead of being clipped away). In MXFP4 the block holding it gets the
E8M0 NaN scale (255) and dequantizes to NaN; other blocks are unaffected. Zeros quantize to code 0 exactly; an
all-zero NVFP4 tensor has tensor scale 0. Negative inputs that round to zero keep their sign bit (code 8, -0.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "FP4Format",
    "FORMATS",
    "E2M1_VALUES",
    "PackedTensor",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack_codes",
    "unpack_codes",
    "round_to_e2m1",
    "e2m1_codes_to_values",
    "decode_block_scales",
]

E4M3_MAX = 448.0
E2M1_MAX = 6.0
NVFP4_TENSOR_SCALE_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688
E8M0_BIAS = 127
E8M0_NAN = 255

#: Magnitudes of the eight non-negative E2M1 codes.
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: Value of each of the 16 four-bit codes (index = code).
E2M1_VALUES = torch.tensor(list(E2M1_GRID) + [-v for v in E2M1_GRID], dtype=torch.float32)

Rounding = Literal["rtn", "sr"]
FormatName = Literal["nvfp4", "mxfp4"]


@dataclass(frozen=True)
class FP4Format:
    """Static description of one FP4 block format."""

    name: str
    block_size: int
    scale_kind: Literal["e4m3", "e8m0"]
    has_tensor_scale: bool


FORMATS: dict[str, FP4Format] = {
    "nvfp4": FP4Format("nvfp4", 16, "e4m3", True),
    "mxfp4": FP4Format("mxfp4", 32, "e8m0", False),
}


def get_format(name: str) -> FP4Format:
    """Look up a format by name, with an error that lists the allowed names."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"format={name!r} is not supported; allowed: {sorted(FORMATS)}") from None


@dataclass
class PackedTensor:
    """A tensor quantized to FP4: packed element codes plus the scales needed to decode them.

    ``codes`` holds the tensor with its block axis moved last and padded to a whole number of blocks, two codes per
    byte. ``scales`` holds one uint8 per block (E4M3 bit pattern for NVFP4, biased E8M0 exponent for MXFP4); its
    shape is ``codes.shape[:-1] + (n_blocks,)`` for 1-D blocks and ``(rows/B, cols/B)`` for 2-D (B×B) blocks.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None
    shape: tuple[int, ...]
    axis: int
    format: str
    block_2d: bool = False

    @property
    def fmt(self) -> FP4Format:
        return get_format(self.format)

    def nbytes(self) -> int:
        """Bytes of storage (codes + block scales + tensor scale)."""
        n = self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()
        if self.tensor_scale is not None:
            n += self.tensor_scale.numel() * self.tensor_scale.element_size()
        return n

    def clone(self) -> "PackedTensor":
        ts = None if self.tensor_scale is None else self.tensor_scale.detach().clone()
        return PackedTensor(self.codes.detach().clone(), self.scales.detach().clone(), ts, self.shape, self.axis,
                            self.format, self.block_2d)

    def to(self, device: torch.device | str) -> "PackedTensor":
        ts = None if self.tensor_scale is None else self.tensor_scale.to(device)
        return PackedTensor(self.codes.to(device), self.scales.to(device), ts, self.shape, self.axis, self.format,
                            self.block_2d)


# ----------------------------------------------------------------------------------------------------------------
# Element rounding
# ----------------------------------------------------------------------------------------------------------------

_RTN_BOUNDARY_CACHE: dict[torch.device, torch.Tensor] = {}


def _rtn_boundaries(device: torch.device) -> torch.Tensor:
    b = _RTN_BOUNDARY_CACHE.get(device)
    if b is None:
        mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
        lower_code_odd = torch.tensor([False, True, False, True, False, True, False])
        b = torch.where(lower_code_odd, torch.nextafter(mids, torch.zeros(())), mids).to(device)
        _RTN_BOUNDARY_CACHE[device] = b
    return b


_GRID_CACHE: dict[torch.device, torch.Tensor] = {}


def _e2m1_grid(device: torch.device) -> torch.Tensor:
    """The non-negative E2M1 values on `device`, built once per device: a fresh `torch.tensor(..., device=cuda)`
    per call is a blocking host-to-device copy, which waits for all queued GPU work."""
    g = _GRID_CACHE.get(device)
    if g is None:
        g = torch.tensor(E2M1_GRID, dtype=torch.float32).to(device)
        _GRID_CACHE[device] = g
    return g


def round_to_e2m1(a: torch.Tensor, rounding: Rounding = "rtn", generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """Round already-scaled FP32 values to 4-bit E2M1 codes (uint8, one code per element).

    RTN rounds to the nearest grid value with ties to the even code; SR picks one of the two neighbouring grid
    values with probability proportional to proximity (``E[value] = a``). Magnitudes above 6 saturate to ±6, NaN
    maps to code 0 (callers make NaN visible through the scale). ``noise`` (uniform [0, 1)) overrides the generator.
    """
    a = a.float()
    mag = a.abs()
    if rounding == "rtn":
        # Count the code boundaries strictly below |a|. At an exact tie the even code wins: boundaries whose lower
        # code is even stay as they are (a tie stays below), the others are moved one ulp down (a tie goes up).
        idx = torch.bucketize(torch.nan_to_num(mag, nan=0.0).contiguous(), _rtn_boundaries(a.device))
    elif rounding == "sr":
        grid = _e2m1_grid(a.device)
        clipped = torch.nan_to_num(mag.clamp(max=E2M1_MAX), nan=0.0).contiguous()
        lo = (torch.bucketize(clipped, grid, right=True) - 1).clamp(0, 6)
        lo_val = grid[lo]
        hi_val = grid[lo + 1]
        p_up = (clipped - lo_val) / (hi_val - lo_val)
        if noise is None:
            noise = torch.rand(a.shape, generator=generator, device=a.device, dtype=torch.float32)
        idx = (lo + (noise < p_up).to(lo.dtype)).to(torch.uint8)
    else:
        raise ValueError(f"rounding={rounding!r} is not supported; allowed: ['rtn', 'sr']")
    sign = (a < 0).to(torch.uint8) << 3
    return (idx.to(torch.uint8) | sign)


def e2m1_codes_to_values(codes: torch.Tensor) -> torch.Tensor:
    """Decode unpacked 4-bit codes to FP32 values."""
    return E2M1_VALUES.to(codes.device)[codes.long()]


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack pairs of 4-bit codes along the last axis (even length) into bytes, first element in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_codes needs an even last dimension, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: bytes to pairs of 4-bit codes along the last axis."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


# ----------------------------------------------------------------------------------------------------------------
# Scales
# ----------------------------------------------------------------------------------------------------------------

def divide_exactly(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """``t / divisor`` correctly rounded on every device. PyTorch's CUDA kernel turns a division by a Python (CPU)
    scalar into a multiplication by its reciprocal (up to 1 ulp off); a divisor tensor on t's device is divided."""
    return t / torch.full((), divisor, dtype=t.dtype, device=t.device)


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """FP32 tensor scale ``amax / 2688``; NaN if the tensor holds a NaN or Inf."""
    amax = x.abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    return torch.where(torch.isfinite(amax), divide_exactly(amax, NVFP4_TENSOR_SCALE_DIVISOR),
                       torch.full_like(amax, float("nan")))


def _nvfp4_block_scales(block_amax: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales (as float8_e4m3fn) for the given block maxima; 0 where the tensor scale is 0."""
    safe_ts = torch.where(tensor_scale == 0, torch.ones_like(tensor_scale), tensor_scale)
    s = divide_exactly(block_amax.float(), E2M1_MAX) / safe_ts
    s = torch.where(tensor_scale == 0, torch.zeros_like(s), s)
    s = torch.where(torch.isfinite(block_amax), s, torch.full_like(s, float("nan")))  # e.g. a forced tensor scale
    return s.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)  # clamp keeps NaN; NaN converts to the E4M3 NaN


def _mxfp4_block_exponents(block_amax: torch.Tensor, mx_scale: str) -> torch.Tensor:
    """Biased E8M0 exponents (uint8) for the given block maxima; 255 (NaN) for non-finite blocks."""
    amax = block_amax.float()
    _, exp = torch.frexp(amax)  # amax = m * 2^exp with m in [0.5, 1)  =>  floor(log2(amax)) = exp - 1
    e = (exp - 3).to(torch.int32)
    if mx_scale == "ceil":
        e = e + (amax > E2M1_MAX * torch.exp2(e.float())).to(torch.int32)
    elif mx_scale != "floor":
        raise ValueError(f"mx_scale={mx_scale!r} is not supported; allowed: ['floor', 'ceil']")
    e = torch.where(amax == 0, torch.full_like(e, -E8M0_BIAS), e).clamp(-E8M0_BIAS, E8M0_BIAS)
    biased = (e + E8M0_BIAS).to(torch.uint8)
    return torch.where(torch.isfinite(amax), biased, torch.full_like(biased, E8M0_NAN))


def e8m0_to_float(biased: torch.Tensor) -> torch.Tensor:
    """Decode biased E8M0 exponents to FP32 powers of two (NaN for 255)."""
    b = biased.to(torch.int32)
    normal = (b.clamp(min=1) << 23).view(torch.float32)  # 2^(b-127) for b >= 1
    value = torch.where(b == 0, torch.full_like(normal, 2.0 ** -127), normal)
    return torch.where(b == E8M0_NAN, torch.full_like(value, float("nan")), value)


def decode_block_scales(scales: torch.Tensor, format: str) -> torch.Tensor:
    """Stored uint8 block scales → FP32 (E4M3 value for NVFP4, power of two for MXFP4)."""
    if get_format(format).scale_kind == "e4m3":
        return scales.view(torch.float8_e4m3fn).float()
    return e8m0_to_float(scales)


# ----------------------------------------------------------------------------------------------------------------
# Block layout helpers
# ----------------------------------------------------------------------------------------------------------------

def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _move_axis_last_padded(x: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """Move ``axis`` last and zero-pad it to a multiple of ``block`` (zeros never change a block maximum)."""
    x = x.movedim(axis, -1)
    pad = _ceil_to(x.shape[-1], block) - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x


def _tiles_2d(x: torch.Tensor, block: int) -> torch.Tensor:
    """(..., R, C) → zero-padded (..., R/B, C/B, B, B) tiles."""
    r, c = x.shape[-2:]
    xp = torch.nn.functional.pad(x, (0, _ceil_to(c, block) - c, 0, _ceil_to(r, block) - r))
    rb, cb = xp.shape[-2] // block, xp.shape[-1] // block
    t = xp.reshape(*xp.shape[:-2], rb, block, cb, block)
    return t.transpose(-3, -2)


def _untile_2d(t: torch.Tensor) -> torch.Tensor:
    rb, cb, b, _ = t.shape[-4:]
    return t.transpose(-3, -2).reshape(*t.shape[:-4], rb * b, cb * b)


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


# ----------------------------------------------------------------------------------------------------------------
# Core: blocks → (codes, per-element scale factors)
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class _Quantized:
    codes: torch.Tensor           # unpacked uint8 codes, blocked layout (..., nb, B) or (rb, cb, B, B)
    block_scale: torch.Tensor     # FP32 decoded block scale, broadcastable against codes
    stored_scales: torch.Tensor   # uint8 storage of the block scales
    tensor_scale: torch.Tensor | None


def _tensor_scale_for(source: torch.Tensor, tensor_scale: torch.Tensor | None, slices: bool,
                      ndim: int) -> torch.Tensor:
    """The NVFP4 tensor scale(s): one per tensor, or one per slice along dim 0, shaped to broadcast over blocks."""
    if not slices:
        return nvfp4_tensor_scale(source) if tensor_scale is None else tensor_scale.float().reshape(())
    if tensor_scale is None:
        amax = source.abs().float().amax(dim=tuple(range(1, source.dim()))) if source.numel() else \
            torch.zeros(source.shape[0], device=source.device)
        tensor_scale = torch.where(torch.isfinite(amax), divide_exactly(amax, NVFP4_TENSOR_SCALE_DIVISOR),
                                   torch.full_like(amax, float("nan")))
    ts = tensor_scale.float().reshape(-1).expand(source.shape[0]) if tensor_scale.numel() == 1 else \
        tensor_scale.float().reshape(-1)
    if ts.numel() != source.shape[0]:
        raise ValueError(f"tensor_scale has {ts.numel()} values; slices=True needs one per slice "
                         f"({source.shape[0]})")
    return ts.reshape(-1, *([1] * (ndim - 1)))


def _quantize_blocked(blocks: torch.Tensor, fmt: FP4Format, reduce_dims: tuple[int, ...], rounding: Rounding,
                      generator: torch.Generator | None, mx_scale: str, tensor_scale: torch.Tensor | None,
                      source: torch.Tensor, slices: bool = False) -> _Quantized:
    """Quantize a tensor already arranged in blocks; ``reduce_dims`` are the within-block dims."""
    blocks = blocks.float()
    amax = blocks.abs().amax(dim=reduce_dims, keepdim=True)
    if fmt.scale_kind == "e4m3":
        ts = _tensor_scale_for(source, tensor_scale, slices, blocks.dim())
        sb = _nvfp4_block_scales(amax, ts)
        sb_f = sb.float()
        # A block whose scale is 0 (all zeros, or E4M3 underflow) quantizes to code 0; a quotient that overflows FP32
        # (only possible with a forced, too small tensor scale) is a magnitude above 6 and saturates in rounding.
        denom = sb_f * ts
        scaled = torch.where(denom == 0, 0.0, blocks / denom)
        stored = sb.view(torch.uint8)
        # NaN tensor scale: propagate NaN to every scale so every value decodes to NaN.
        sb_f = torch.where(torch.isnan(ts), torch.full_like(sb_f, float("nan")), sb_f)
        codes = round_to_e2m1(scaled, rounding, generator)
        return _Quantized(codes, sb_f, stored, ts)
    biased = _mxfp4_block_exponents(amax, mx_scale)
    scale = e8m0_to_float(biased)
    scaled = blocks / torch.where(torch.isnan(scale), 1.0, scale)
    codes = round_to_e2m1(scaled, rounding, generator)
    return _Quantized(codes, scale, biased, None)


def _check_inputs(x: torch.Tensor, rounding: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}"
                        f"{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}")
    if rounding not in ("rtn", "sr"):
        raise ValueError(f"rounding={rounding!r} is not supported; allowed: ['rtn', 'sr']")


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def _blocked(x: torch.Tensor, fmt: FP4Format, axis: int, rounding: Rounding, generator: torch.Generator | None,
             block_2d: bool, mx_scale: str, tensor_scale: torch.Tensor | None, slices: bool
             ) -> tuple[_Quantized, int, tuple[int, ...]]:
    """Arrange `x` in blocks and quantize; returns (result, normalized axis, shape of the blocked layout)."""
    b = fmt.block_size
    if slices and x.dim() < 2:
        raise ValueError(f"slices=True needs a tensor with a slice dimension and data, got shape {tuple(x.shape)}")
    if block_2d:
        if x.dim() != (3 if slices else 2):
            raise ValueError(f"block_2d=True needs a {'3-D (slices)' if slices else '2-D'} tensor, "
                             f"got shape {tuple(x.shape)}")
        tiles = _tiles_2d(x, b)
        q = _quantize_blocked(tiles, fmt, (-2, -1), rounding, generator, mx_scale, tensor_scale, x, slices)
        return q, x.dim() - 1, tuple(tiles.shape)
    ax = _normalize_axis(axis, x.dim())
    if slices and ax == 0:
        raise ValueError("axis=0 is the slice dimension when slices=True; the block axis must be another one")
    xm = _move_axis_last_padded(x, ax, b)
    blocks = xm.reshape(*xm.shape[:-1], xm.shape[-1] // b, b)
    q = _quantize_blocked(blocks, fmt, (-1,), rounding, generator, mx_scale, tensor_scale, x, slices)
    return q, ax, tuple(xm.shape)


def quantize(x: torch.Tensor, format: str = "nvfp4", axis: int = -1, rounding: Rounding = "rtn",
             generator: torch.Generator | None = None, block_2d: bool = False, mx_scale: str = "floor",
             tensor_scale: torch.Tensor | None = None, slices: bool = False) -> PackedTensor:
    """Quantize ``x`` to packed FP4 with blocks along ``axis`` (or B×B tiles of the last two dims if ``block_2d``).

    ``tensor_scale`` forces the NVFP4 FP32 tensor scale (e.g. one shared scale for fused q/k/v); by default it is
    ``amax(|x|) / 2688``. With ``slices=True`` dim 0 indexes independent tensors (e.g. the experts of a grouped
    GEMM), each with its own tensor scale. The block axis is zero-padded internally to a whole number of blocks.
    """
    _check_inputs(x, rounding)
    fmt = get_format(format)
    if x.dim() == 0:
        if slices:
            raise ValueError("slices=True needs a tensor with a slice dimension and data, got shape ()")
        x = x.reshape(1)
        shape: tuple[int, ...] = ()
    else:
        shape = tuple(x.shape)
    q, ax, layout = _blocked(x, fmt, axis, rounding, generator, block_2d, mx_scale, tensor_scale, slices)
    ts = None if q.tensor_scale is None else (q.tensor_scale.reshape(-1) if slices else q.tensor_scale)
    if block_2d:
        codes = _untile_2d(q.codes)
        scales = q.stored_scales.reshape(q.stored_scales.shape[:-2])
        return PackedTensor(pack_codes(codes), scales.contiguous(), ts, shape, ax, fmt.name, True)
    codes = q.codes.reshape(layout)
    return PackedTensor(pack_codes(codes), q.stored_scales.squeeze(-1).contiguous(), ts, shape, ax, fmt.name,
                        False)


def _apply_tensor_scale(out: torch.Tensor, ts: torch.Tensor | None) -> torch.Tensor:
    if ts is None:
        return out
    ts = ts.float()
    return out * (ts.reshape(-1, *([1] * (out.dim() - 1))) if ts.dim() else ts)


def dequantize(p: PackedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode a :class:`PackedTensor` to a dense tensor of its original shape: ``(code * s_b) * s_t``."""
    b = p.fmt.block_size
    vals = e2m1_codes_to_values(unpack_codes(p.codes))
    sb = decode_block_scales(p.scales, p.format)
    if p.block_2d:
        out = _apply_tensor_scale(_untile_2d(_tiles_2d(vals, b) * sb[..., None, None]), p.tensor_scale)
        r, c = p.shape[-2:]
        return out[..., :r, :c].to(dtype)
    out = (vals.reshape(*vals.shape[:-1], -1, b) * sb[..., None]).reshape(vals.shape)
    out = _apply_tensor_scale(out, p.tensor_scale)
    if len(p.shape) == 0:
        return out[..., 0].reshape(()).to(dtype)
    n = p.shape[p.axis]
    return out[..., :n].movedim(-1, p.axis).reshape(p.shape).to(dtype)


def fake_quantize(x: torch.Tensor, format: str = "nvfp4", axis: int = -1, rounding: Rounding = "rtn",
                  generator: torch.Generator | None = None, block_2d: bool = False, mx_scale: str = "floor",
                  tensor_scale: torch.Tensor | None = None, slices: bool = False) -> torch.Tensor:
    """Quantize then dequantize ``x`` (same arguments as :func:`quantize`); returns a tensor of ``x``'s dtype.

    Equal, value for value, to ``dequantize(quantize(x, ...), x.dtype)`` but skips the packing.
    """
    _check_inputs(x, rounding)
    fmt = get_format(format)
    if x.dim() == 0:
        if slices:
            raise ValueError("slices=True needs a tensor with a slice dimension and data, got shape ()")
        return fake_quantize(x.reshape(1), format, 0, rounding, generator, False, mx_scale, tensor_scale
                             ).reshape(())
    q, ax, layout = _blocked(x, fmt, axis, rounding, generator, block_2d, mx_scale, tensor_scale, slices)
    vals = e2m1_codes_to_values(q.codes) * q.block_scale
    if q.tensor_scale is not None:
        vals = vals * q.tensor_scale
    if block_2d:
        r, c = x.shape[-2:]
        return _untile_2d(vals)[..., :r, :c].to(x.dtype)
    vals = vals.reshape(layout)[..., : x.shape[ax]].movedim(-1, ax)
    return vals.to(x.dtype)
