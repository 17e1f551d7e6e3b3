"""Scalar float helpers for numba kernels that reproduce ggml's CPU arithmetic bit for bit.

* Rounding to half and bfloat16 precision.  Numba has no half-precision type on the CPU.
  Where ggml's CPU backend rounds an intermediate value to F16 (its GELU lookup tables, F16
  operands of dot products) or BF16, kernels call these to reproduce the same value in
  float32.  Both round to nearest, ties to even, like the F16C instructions and ggml's BF16
  conversion.
* A true fused multiply-add (:func:`fma32`) and float/bit reinterpretation, for the places
  where ggml's kernels (or its compiler) fuse a product into an addition.
* ggml's 8-lane AVX2 ``exp`` (:func:`vexp_f32`) and SiLU, and its horizontal sum of an 8-lane
  register (:func:`hsum8_f32`).
* The C library's ``powf`` (:func:`powf`), where ggml calls it for a constant (ROPE's
  frequency step, ALiBi's slopes).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

_F16_MAX = 65504.0


@njit(cache=True, nogil=True)
def _powf(a, b):
    return math.pow(a, b)


def powf(a, b) -> np.float32:
    """``a ** b`` in float32 as the C library's ``powf`` computes it (numba compiles
    ``math.pow`` of two float32 values to a call of it), as ggml's CPU backend does.  Not
    ``np.power``: numpy's float32 power depends on the CPU it runs on (on an AVX-512 host it
    differed from ``powf`` in the last bit for one exponent in six, which moved every ROPE
    angle of a 64-wide head)."""
    return np.float32(_powf(np.float32(a), np.float32(b)))


@njit(cache=True, inline="always")
def round_f16(x):
    """``x`` rounded to the nearest IEEE half value (ties to even), returned as float32."""
    ax = abs(x)
    if not ax < math.inf:          # inf or nan stay as they are
        return np.float32(x)
    if ax >= 65520.0:              # rounds past the largest half: overflow to infinity
        return np.float32(math.copysign(math.inf, x))
    if ax < 6.103515625e-05:       # below 2**-14: half subnormals, a fixed step of 2**-24
        return np.float32(np.rint(np.float64(x) * 16777216.0) / 16777216.0)
    m, e = math.frexp(np.float64(x))   # x = m * 2**e, 0.5 <= |m| < 1
    return np.float32(math.ldexp(np.rint(m * 2048.0), e - 11))


@njit(cache=True, inline="always")
def f16_bits(x):
    """The IEEE half nearest the float32 ``x`` (ties to even; overflow to infinity, NaN to a
    quiet NaN) as its bit pattern, in any CPU's arithmetic (:func:`round_f16`, then the
    half's fields read off the rounded value)."""
    r = round_f16(x)
    u = f32_bits(r)
    sign = np.int32((u >> np.uint32(16)) & np.uint32(0x8000))
    a = u & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):                       # inf, or NaN (quiet)
        return sign | 0x7C00 | (0x200 if a > np.uint32(0x7F800000) else 0)
    if a < np.uint32(0x38800000):                        # half subnormal: a multiple of 2^-24
        return sign | np.int32(abs(np.float64(r)) * 16777216.0)
    exp = np.int32(a >> np.uint32(23)) - 112             # rebias 127 -> 15
    return sign | (exp << 10) | np.int32((a >> np.uint32(13)) & np.uint32(0x3FF))


@njit(cache=True, inline="always")
def round_bf16(x):
    """``x`` rounded to the nearest bfloat16 value (ties to even), returned as float32."""
    ax = abs(x)
    if not ax < math.inf or ax == 0.0:
        return np.float32(x)
    m, e = math.frexp(np.float64(x))
    if e < -125:                   # float32 subnormal range: a fixed step of 2**-133
        return np.float32(np.rint(np.float64(x) * 2.0 ** 133) / 2.0 ** 133)
    return np.float32(math.ldexp(np.rint(m * 256.0), e - 8))


# -- exact float32 building blocks --------------------------------------------------------------
#
# ggml's x86 kernels use fused multiply-adds (one rounding) and reinterpret float bits as
# integers.  Numba has neither as a function, so both are emitted straight as LLVM operations:
# ``llvm.fma.f32`` becomes a single vfmadd instruction on an FMA machine (and a correctly
# rounded library call elsewhere), and a bitcast costs nothing.

@intrinsic
def fma32(typingctx, a, b, c):
    """``a*b + c`` in float32 with a single rounding (IEEE fusedMultiplyAdd)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return sig, codegen


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bit pattern of the float32 ``x`` as a uint32."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))
    return sig, codegen


@intrinsic
def f32_from_bits(typingctx, u):
    """The float32 whose IEEE bit pattern is the uint32 ``u``."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return sig, codegen


# -- ggml's vector exp ---------------------------------------------------------------------------
#
# On an AVX2+FMA machine ggml evaluates exp, eight lanes at a time, with a short polynomial
# instead of libm (softmax, SiLU, SwiGLU, the tiled flash attention).  Every lane is independent,
# so one lane is reproduced here; leftovers that do not fill eight lanes go through libm's expf,
# which is what ``math.exp`` on a float32 calls in numba.
#
# The method: write x = n*ln2 + b with n an integer (found by adding 1.5*2^23, which pushes the
# rounded n into the low mantissa bits), |b| <= ln2/2; approximate e^b - 1 by a degree-5
# polynomial in b; scale by 2^n built directly in the exponent bits.  When |n| > 126, 2^n is
# not a normal float: the scale is split into two factors so that overflow gives infinity and
# underflow rounds gradually, and beyond |n| > 192 the result is a square that is surely 0 or inf.

_EXP_SHIFT = np.float32(float.fromhex("0x1.8p23"))       # 1.5 * 2^23
_EXP_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))  # 1/ln 2, rounded to float
_EXP_LN2_HI = np.float32(float.fromhex("0x1.62e4p-1"))   # ln 2 = LN2_HI + LN2_LO
_EXP_LN2_LO = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_EXP_C1 = np.float32(float.fromhex("0x1.ffffecp-1"))     # polynomial coefficients, b^1 .. b^5
_EXP_C2 = np.float32(float.fromhex("0x1.fffdb6p-2"))
_EXP_C3 = np.float32(float.fromhex("0x1.555e66p-3"))
_EXP_C4 = np.float32(float.fromhex("0x1.573e2ep-5"))
_EXP_C5 = np.float32(float.fromhex("0x1.0e4020p-7"))


@njit(cache=True, nogil=True)
def vexp_f32(x):
    """One lane of ggml's AVX2 ``exp`` approximation (float32 in, float32 out, bit-exact)."""
    z = fma32(x, _EXP_LOG2E, _EXP_SHIFT)
    n = z - _EXP_SHIFT                               # round(x / ln 2), as a float
    b = fma32(-n, _EXP_LN2_HI, x)                    # x - n*ln2 in two exact-ish steps
    b = fma32(-n, _EXP_LN2_LO, b)
    e = np.uint32(f32_bits(z) << np.uint32(23))      # n in the exponent field (mod 2^9)
    u = b * b
    hi = fma32(fma32(_EXP_C5, b, _EXP_C4), u, fma32(_EXP_C3, b, _EXP_C2))
    p = fma32(hi, u, _EXP_C1 * b)                    # e^b - 1
    an = abs(n)
    if not an > np.float32(126.0):                   # 2^n is a normal float (NaN lands here too)
        k = f32_from_bits(np.uint32(e + np.uint32(0x3F800000)))
        return fma32(p, k, k)
    neg = np.uint32(0x82000000) if n <= np.float32(0.0) else np.uint32(0)
    s1 = f32_from_bits(np.uint32(neg + np.uint32(0x7F000000)))   # 2^127 or 2^-125
    if an > np.float32(192.0):
        return s1 * s1                               # certainly inf or 0
    s2 = f32_from_bits(np.uint32(e - neg))
    return fma32(s2, p, s2) * s1


@njit(cache=True, nogil=True)
def vsilu_f32(x):
    """One lane of ggml's AVX2 SiLU: ``x / (1 + vexp(-x))``."""
    return x / (np.float32(1.0) + vexp_f32(np.float32(0.0) - x))


@njit(cache=True, nogil=True)
def silu_f32(x):
    """ggml's scalar SiLU (the leftovers after the 8-lane chunks): ``x / (1 + expf(-x))``."""
    return x / (np.float32(1.0) + np.float32(math.exp(-x)))


@njit(cache=True, nogil=True, inline="always")
def sum_f64(row):
    """The sum of a float32 row in float64, in order (ggml's ``ggml_vec_sum_f32``, which
    SUM_ROWS and NORM's mean use)."""
    s = 0.0
    for i in range(row.shape[0]):
        s += np.float64(row[i])
    return s


@njit(cache=True, nogil=True)
def hsum8_f32(v0, v1, v2, v3, v4, v5, v6, v7):
    """ggml's horizontal float32 sum of one 8-lane register: the upper half is added to the lower
    half, then lanes 2,3 to lanes 0,1, then lane 1 to lane 0."""
    a0 = v0 + v4
    a1 = v1 + v5
    a2 = v2 + v6
    a3 = v3 + v7
    return (a0 + a2) + (a1 + a3)


@njit(cache=True, nogil=True, inline="always")
def vexp8_sub_f32(buf, c, m):
    """One 8-lane step of ggml's AVX2 ``exp(x - max)`` loop (soft_max, flash attention):
    ``buf[c:c+8]`` becomes ``vexp(buf - m)`` in place; returns the lanes' :func:`hsum8_f32`."""
    e0 = vexp_f32(buf[c] - m)
    e1 = vexp_f32(buf[c + 1] - m)
    e2 = vexp_f32(buf[c + 2] - m)
    e3 = vexp_f32(buf[c + 3] - m)
    e4 = vexp_f32(buf[c + 4] - m)
    e5 = vexp_f32(buf[c + 5] - m)
    e6 = vexp_f32(buf[c + 6] - m)
    e7 = vexp_f32(buf[c + 7] - m)
    buf[c], buf[c + 1], buf[c + 2], buf[c + 3] = e0, e1, e2, e3
    buf[c + 4], buf[c + 5], buf[c + 6], buf[c + 7] = e4, e5, e6, e7
    return hsum8_f32(e0, e1, e2, e3, e4, e5, e6, e7)
