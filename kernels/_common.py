"""Helpers shared by the FP4 kernels: E4M3 / E8M0 scale rounding, E2M1 rounding and decoding, GEMM tile helpers (all
Triton device functions), and `interpreting()` for the host side.

Every helper reproduces `hf_lowbit.numerics` bit for bit, with integer/bit arithmetic only where the reference
relies on IEEE rounding (so the CPU interpreter and the GPU agree without depending on hardware cast modes).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. `triton.cdiv` is a constexpr function in Triton 3.6: ~3 µs per host call,
    dozens per FP4 linear step (measured with cProfile on an H200 host, benchmarks/NOTES.md)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1), on the host (see `cdiv`)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


#: Triton decides interpreter vs. compiled kernels when the kernels are defined (at import), so the host side reads
#: TRITON_INTERPRET once as well.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


#: True in compiled kernels, False under the interpreter: hardware conversions (`cvt.rn.satfinite.e4m3x2.f32`) and
#: libdevice calls exist only there (the interpreter's casts truncate and it has no libdevice), so device functions
#: branch on it at compile time.
COMPILED = tl.constexpr(not _INTERPRET)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU interpreter: small tiles, no hardware-specific paths)."""
    return _INTERPRET


_DUMMIES: dict = {}


def dummy_tensors(device) -> tuple:
    """One-element uint8, BF16 and FP32 tensors per device, for the pointer arguments of absent operands (cached:
    no allocation per launch)."""
    d = _DUMMIES.get(device)
    if d is None:
        d = _DUMMIES[device] = tuple(torch.empty(1, device=device, dtype=t)
                                     for t in (torch.uint8, torch.bfloat16, torch.float32))
    return d


_SETTINGS: dict[str, str | None] = {}


def env_setting(name: str, default: str | None = None) -> str | None:
    """`os.environ.get(name, default)`, read once per process: the kernels' tuning switches (``HF_LOWBIT_*``) are
    consulted on every launch, and an environment lookup costs ~3 µs (dozens per FP4 linear step, measured with
    scripts/profile_wrapper_host.py). `reload_env_settings()` re-reads them (benchmarks and tests that change one)."""
    try:
        value = _SETTINGS[name]
    except KeyError:
        value = _SETTINGS[name] = os.environ.get(name)
    return default if value is None else value


def env_choice(name: str, allowed: tuple[str, ...]) -> str:
    """A switch restricted to `allowed` (the first is the default): any other value is refused by name."""
    value = env_setting(name, allowed[0])
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {list(allowed)}")
    return value


def env_ints(name: str, lows: tuple[int, ...]) -> tuple[int, ...] | None:
    """A tuning override of ``len(lows)`` comma-separated integers (e.g. ``HF_LOWBIT_QCFG="64,64,4"``), each at least
    its entry of `lows`; None when unset. Any other value is refused by name before a launch."""
    value = env_setting(name)
    if value is None:
        return None
    try:
        ints = tuple(int(v) for v in value.split(","))
    except ValueError:
        ints = ()
    if len(ints) != len(lows) or any(v < low for v, low in zip(ints, lows)):
        raise ValueError(f"{name}={value!r} is not valid; allowed: {len(lows)} comma-separated integers, each at "
                         f"least {list(lows)}")
    return ints


def reload_env_settings() -> None:
    """Forget the cached ``HF_LOWBIT_*`` switches so that the next launch reads the environment again."""
    _SETTINGS.clear()


@triton.jit
def max_nan(a, b):
    """Combine function of a NaN-propagating max reduction."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def abs_max(x, axis):
    """max |x| along `axis` with NaN read as +inf (a block holding NaN gets a non-finite scale, as in the reference):
    a NaN-propagating max (one instruction per element, the abs a free operand modifier) and one select per
    result instead of a compare and a select per element."""
    if COMPILED:
        m = tl.reduce(tl.abs(x), axis, max_nan)
        return tl.where(m != m, float("inf"), m)
    return tl.max(tl.where(x != x, float("inf"), tl.abs(x)), axis)  # the same values; the interpreter runs a
    # custom combine function element by element in Python


@triton.jit
def e4m3_rne(s):
    """Round a non-negative FP32 value (already clamped to <= 448, or NaN) to E4M3, ties to even.

    Returns (value as FP32, E4M3 bit pattern as int32). NaN gives (NaN, 0x7F) like torch's cast.
    """
    if COMPILED:  # RNE with saturation, NaN → 0x7F: the same result in ~3 instructions instead of ~20
        f8 = s.to(tl.float8e4nv)
        return f8.to(tl.float32), f8.to(tl.uint8, bitcast=True).to(tl.int32)
    isnan = s != s
    s0 = tl.where(isnan, 0.0, s)
    bits = s0.to(tl.int32, bitcast=True)
    # normal range: keep 3 mantissa bits, round to nearest even on the dropped 20 bits
    rn = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
    vn = rn.to(tl.float32, bitcast=True)
    # subnormal range (< 2^-6): multiples of 2^-9, ties to even
    t = s0 * 512.0
    n = t.to(tl.int32)
    fr = t - n.to(tl.float32)
    up = (fr > 0.5) | ((fr == 0.5) & ((n & 1) == 1))
    n = n + up.to(tl.int32)
    vs = n.to(tl.float32) * 0.001953125
    sub = s0 < 0.015625
    v = tl.where(sub, vs, vn)
    vb = v.to(tl.int32, bitcast=True)
    byte_n = (((vb >> 23) - 120) << 3) | ((vb >> 20) & 7)
    byte = tl.where(sub, n, byte_n)
    v = tl.where(isnan, s, v)
    byte = tl.where(isnan, 0x7F, byte)
    return v, byte


@triton.jit
def e4m3_decode(byte):
    """E4M3 bit pattern (int32 0..255) → FP32 value."""
    sign = (byte >> 7) & 1
    e = (byte >> 3) & 15
    m = byte & 7
    normal = ((e + 120) << 23) | (m << 20)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))
    v = tl.where((byte & 0x7F) == 0x7F, float("nan"), v)
    return tl.where(sign == 1, -v, v)


@triton.jit
def e8m0_from_amax(amax, MX_CEIL: tl.constexpr):
    """Biased E8M0 exponent (int32) of a block maximum (>= 0, or +inf / NaN for non-finite blocks).

    Same rule as `numerics._mxfp4_block_exponents`: floor(log2(amax)) - 2 (+1 for "ceil" when amax > 6 * 2^e),
    clamped to [-127, 127]; zero → 0; non-finite → 255.
    """
    bits = amax.to(tl.int32, bitcast=True)
    ex = (bits >> 23) & 0xFF
    b = ex - 2
    if MX_CEIL:
        b = b + ((bits & 0x7FFFFF) > 0x400000).to(tl.int32)
    b = tl.minimum(tl.maximum(b, 0), 254)
    b = tl.where((ex == 255) | (amax != amax), 255, b)
    return b


@triton.jit
def e8m0_scale(b):
    """2^(b-127) as FP32 (b = 0 → 2^-127; b = 255 → NaN)."""
    v = tl.where(b == 0, 0x00400000, b << 23).to(tl.float32, bitcast=True)
    return tl.where(b == 255, float("nan"), v)


@triton.jit
def e8m0_inv_scale(b):
    """The exact reciprocal 2^(127-b) as FP32 (1.0 for the NaN scale 255, as the reference divides by 1)."""
    v = tl.where(b == 254, 0x00400000, (254 - b) << 23).to(tl.float32, bitcast=True)
    return tl.where(b == 255, 1.0, v)


@triton.jit
def round_e2m1(a, SR: tl.constexpr, rnd):
    """Scaled FP32 → 4-bit E2M1 code (int32 0..15): RTN ties-to-even-code, or SR with uniform noise `rnd`."""
    if SR:  # the code of the value e2m1_rounded picks (its sign bit set for a < 0, −0 included)
        idx = _e2m1_index(tl.abs(e2m1_rounded(a, SR, rnd)))
    else:
        mag = tl.abs(a)
        idx = ((mag > 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32) + (mag > 1.25).to(tl.int32)
               + (mag >= 1.75).to(tl.int32) + (mag > 2.5).to(tl.int32) + (mag >= 3.5).to(tl.int32)
               + (mag > 5.0).to(tl.int32))
    return idx | ((a < 0).to(tl.int32) << 3)


@triton.jit
def e2m1_rounded(a, SR: tl.constexpr, rnd):
    """The signed E2M1 value (FP32) that `round_e2m1(a, SR, rnd)` encodes, without forming the code:
    `e2m1_value(round_e2m1(a, SR, rnd))` bit for bit for RTN (Triton negates as 0 − x, so both give +0.0 where the
    code is 8: value-equal to the reference's −0.0), in about a third of the instructions.

    |a| is clamped to 6 (NaN → 0); b = 2^⌊log2 |a|⌋ (1 below 1) sets the grid step b/2. RTN adds and subtracts
    c = 2^22·b, whose ulp is that step, so the FP32 addition rounds to the grid with ties to even, which are the
    reference's ties (0.25 → 0, 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4). SR adds uniform noise
    times the step and takes the grid point at or below: the upper neighbour with probability (|a| − lower)/step."""
    mag = tl.abs(a)
    m = tl.minimum(mag, 6.0)
    m = tl.where(mag != mag, 0.0, m)
    b = tl.maximum((m.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True), 1.0)
    if SR:
        z = m + rnd * (b * 0.5)
        v = tl.where(z >= 1.0, (z.to(tl.int32, bitcast=True) & -4194304).to(tl.float32, bitcast=True),
                     tl.where(z >= 0.5, 0.5, 0.0))  # one mantissa bit at or above 1, multiples of 1/2 below
    else:
        c = b * 4194304.0
        v = (m + c) - c
    return tl.where(a < 0, -v, v)


@triton.jit
def _e2m1_index(v):
    """Magnitude index 0..7 of an E2M1 grid value v >= 0 (0, 0.5, 1, 1.5, 2, 3, 4, 6)."""
    return tl.where(v >= 1.0, (v.to(tl.int32, bitcast=True) >> 22) - 252, (v * 2.0).to(tl.int32))


@triton.jit
def e2m1_value(code):
    """4-bit E2M1 code (int32) → FP32 value."""
    i = code & 7
    e = i >> 1
    big = (((e + 126) << 23) | ((i & 1) << 22)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, (i & 1).to(tl.float32) * 0.5, big)
    return tl.where((code & 8) != 0, -v, v)


@triton.jit
def bf16_rne(v):
    """FP32 → the nearest BF16 value (ties to even), still as FP32 (so any later cast to BF16 is exact).

    The CPU interpreter's FP32→BF16 cast truncates; this keeps both paths identical to torch's `.to(bfloat16)`.
    """
    b = v.to(tl.int32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, r)


@triton.jit
def round_to(v, ptr):
    """FP32 `v` rounded to nearest even in the element type of `ptr` (BF16 through `bf16_rne`: the interpreter's own
    cast truncates), returned in that type."""
    if ptr.dtype.element_ty == tl.bfloat16:
        v = bf16_rne(v)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def tile_offsets(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column offsets of this program's [BM, BN] output tile, tiles visited in GROUP_M-row bands (L2 reuse
    of the B operand across neighbouring programs), from the linear program id on grid axis 0."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)


@triton.jit
def add_outer(acc, u_ptr, v_ptr, offs_m, offs_n, mm, nm):
    """acc + u[m] v[n] on one [BM, BN] tile (the rank-1 Averis mean terms of a GEMM epilogue); masked rows and
    columns read zeros."""
    return acc + tl.load(u_ptr + offs_m, mask=mm, other=0.0)[:, None] * tl.load(v_ptr + offs_n, mask=nm,
                                                                                other=0.0)[None, :]
