"""The arithmetic every quantization kernel shares: |v| with NaN as +inf, the scales from
an amax (quant_ref.scales_from_amax), and the cast to e4m3.

Under TRITON_INTERPRET=1 (CPU tests) the float8 cast goes through a workaround for the
interpreter's rounding defect (see `to_fp8`); on a GPU the native cast is used.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ep_fp8.ops.kernel_choice import interpreting

# TRITON_INTERPRET read once at import, the way Triton reads it ("true" turns the interpreter
# on as "1" does): the workaround in to_fp8 must be on whenever the interpreter runs.
_INTERPRET = tl.constexpr(interpreting())
_FP8_MAX = tl.constexpr(448.0)
_AMAX_FLOOR = tl.constexpr(2.0**-100)
# One program holds a whole row up to this many elements (amax, scale and cast from
# registers); longer rows take a second pass.
MAX_ROW_BLOCK = 8192


@triton.jit
def abs_nan_as_inf(v):
    """|v| with NaN as +inf, in v's dtype (exact; the interpreter, which has no bfloat16
    constants, works in float32)."""
    if _INTERPRET:
        v = v.to(tl.float32)
    return tl.where(v != v, float("inf"), tl.abs(v))


@triton.jit
def scales_from_amax(amax, EXACT: tl.constexpr):
    """(scale, descale) from a float32 amax; the arithmetic of quant_ref.scales_from_amax."""
    finite = amax < float("inf")  # False for +inf and for NaN
    a = tl.where(finite, tl.maximum(amax, _AMAX_FLOOR), 1.0)
    if EXACT:
        zero = tl.zeros_like(a)
        scale = tl.math.div_rn(zero + 448.0, a)
        descale = tl.math.div_rn(zero + 1.0, scale)
    else:
        bits = a.to(tl.int32, bitcast=True)
        e = (bits >> 23) - 127
        k = 8 - e - ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
        scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
        descale = ((127 - k) << 23).to(tl.float32, bitcast=True)
    scale = tl.where(finite, scale, float("nan"))
    descale = tl.where(finite, descale, float("nan"))
    return scale, descale


@triton.jit
def to_fp8(v_scaled):
    """clamp(v * scale, +-448) cast to e4m3, round to nearest even, NaN kept."""
    q = tl.clamp(v_scaled, -_FP8_MAX, _FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    if _INTERPRET:
        # The interpreter's float->fp8 cast rounds some values wrongly. Round in float32
        # first so that the cast is exact: normal e4m3 keeps 3 mantissa bits (round half
        # to even in bit space); below 2^-6 e4m3 is subnormal with a fixed step of 2^-9,
        # and adding then subtracting 2^14 rounds to that step in float32.
        b = q.to(tl.uint32, bitcast=True)
        normal = ((b + 0x7FFFF + ((b >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        mag = (tl.abs(q) + 16384.0) - 16384.0
        sub = (mag.to(tl.uint32, bitcast=True) | (b & 0x80000000)).to(tl.float32, bitcast=True)
        r = tl.where(tl.abs(q) < 0.015625, sub, normal)
        q8 = r.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        q8 = tl.where(q != q, 0x7F, q8)  # the interpreter also loses NaN there
        return q8.to(tl.float8e4nv, bitcast=True)
    else:
        return q.to(tl.float8e4nv)
