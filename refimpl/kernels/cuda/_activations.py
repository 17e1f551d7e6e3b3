"""MUL_MAT's activation conversion on the GPU (spec/ops/matmul.md, activation formats).

ggml's CPU backend converts src1 before its dot products, and so do refimpl's CPU device
(refimpl/kernels/matmul.py) and, to give the same products, its CUDA device: for weights in a
block format, float activations are quantised to the weights' activation format (Q8_0, Q8_1
or Q8_K) and the product sees the values those stand for; for F16 and BF16 weights, F32
activations are rounded to the weights' type.  These kernels do that on the device, reading
src1 where it lies (any strides, F32, F16 or BF16) and writing a contiguous copy:

* :func:`q8_values_kernel`: one thread per block of 32 (Q8_0, Q8_1) or 256 (Q8_K) values,
  with the arithmetic of :func:`refimpl.kernels.quants.quantize_activations` step for step
  (float32 throughout, rounding to nearest even with libdevice's ``rintf``), writing
  ``q · d`` as float32;
* :func:`round_kernel`: F16 by the native conversion, BF16 bits rounded to nearest even.

Both agree bit for bit with the host functions (tests/cuda/test_kernels.py).
"""

from __future__ import annotations

import numpy as np
from numba import cuda
from numba.cuda import libdevice

from ..quants import Q8_K
from ._common import SIM, device, ld, st, unravel

if SIM:
    def _rint(v):
        """Round to the nearest integer, ties to even (float32)."""
        return np.float32(np.rint(v))
else:
    @cuda.jit(device=True)
    def _rint(v):
        # libdevice's rintf: one instruction, and no addition the compiler could fuse with
        # the multiplication that produced ``v`` (a fused multiply-add would round once, not
        # twice, and could move a value that sits on a rounding boundary)
        return libdevice.rintf(v)


@device
def _rint_clamped(v, nan_to):
    """rint(v) as float32, clamped to [-128, 127]; ``nan_to`` for NaN."""
    if v != v:
        return nan_to
    if v > np.float32(127.0):
        return np.float32(127.0)
    if v < np.float32(-128.0):
        return np.float32(-128.0)
    return _rint(v)


@cuda.jit
def q8_values_kernel(code, K, T, B2, B3, x, xo, xs0, xs1, xs2, xs3, xbf, bft, out):
    half = cuda.local.array(1, np.float16)
    bs = 256 if code == Q8_K else 32
    nb = K // bs
    n = nb * T * B2 * B3
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        b = i % nb
        row = i // nb
        t, i2, i3, _ = unravel(row, T, B2, B3)
        xb = xo + t * xs1 + i2 * xs2 + i3 * xs3 + b * bs * xs0
        ob = row * K + b * bs
        if code == Q8_K:
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for j in range(bs):
                v = ld(x, xb + j * xs0, xbf, bft)
                if abs(v) > amax:
                    amax = abs(v)
                    vmax = v
            if amax == 0:
                for j in range(bs):
                    out[ob + j] = np.float32(0.0)
                continue
            iscale = np.float32(-127.0) / vmax
            d = np.float32(1.0) / iscale
            for j in range(bs):
                q = _rint_clamped(iscale * ld(x, xb + j * xs0, xbf, bft), np.float32(0.0))
                out[ob + j] = q * d
        else:
            amax = np.float32(0.0)
            for j in range(bs):
                v = abs(ld(x, xb + j * xs0, xbf, bft))
                if v > amax:
                    amax = v
            inv = np.float32(0.0)
            if amax != 0:
                inv = np.float32(127.0) / amax
            half[0] = amax / np.float32(127.0)      # the scale is stored as F16
            d = np.float32(half[0])
            for j in range(bs):
                q = _rint_clamped(ld(x, xb + j * xs0, xbf, bft) * inv, np.float32(-128.0))
                out[ob + j] = q * d


@cuda.jit
def round_kernel(K, T, B2, B3, x, xo, xs0, xs1, xs2, xs3, xbf, bft, out, out_bf):
    n = K * T * B2 * B3
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        k, t, i2, i3 = unravel(i, K, T, B2)
        st(out, i, ld(x, xo + k * xs0 + t * xs1 + i2 * xs2 + i3 * xs3, xbf, bft), out_bf)
