"""Scalar float helpers for numba kernels: rounding to half and bfloat16 precision.

Numba has no half-precision type on the CPU.  Where ggml's CPU backend rounds an
intermediate value to F16 (its GELU lookup tables, F16 operands of dot products) or BF16,
kernels call these to reproduce the same value in float32.  Both round to nearest, ties to
even, like the F16C instructions and ggml's BF16 conversion.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_F16_MAX = 65504.0


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
def round_bf16(x):
    """``x`` rounded to the nearest bfloat16 value (ties to even), returned as float32."""
    ax = abs(x)
    if not ax < math.inf or ax == 0.0:
        return np.float32(x)
    m, e = math.frexp(np.float64(x))
    if e < -125:                   # float32 subnormal range: a fixed step of 2**-133
        return np.float32(np.rint(np.float64(x) * 2.0 ** 133) / 2.0 ** 133)
    return np.float32(math.ldexp(np.rint(m * 256.0), e - 8))
