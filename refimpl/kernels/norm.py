"""RMS_NORM and NORM over rows (spec/ops/norm.md).

Bit-exact with ggml's CPU backend.  RMS_NORM sums the float32 squares in float64, in order;
NORM sums the row in float64 for its mean, and the squared deviations eight at a time in
float32 (ggml's AVX2 horizontal sum) and the groups in float64.  The mean of squares or the
variance and the scale ``1/sqrt(. + eps)`` are rounded to float32, and each element is
multiplied by that scale in float32.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ..graph.build import Node
from ..graph.ops import Op
from ..graph.registry import kernel
from .cpu_tensors import view
from .numeric import hsum8_f32, sum_f64
from .parallel import sized_kernel


@sized_kernel(0, cache=True, nogil=True)
def rms_norm_f32(x, out, eps):
    """out[row] = x[row] / sqrt(mean(x[row]**2) + eps) for every row of 4-D float32 arrays."""
    n3, n2, n1, n0 = x.shape
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        s = 0.0
        for i0 in range(n0):
            v = x[i3, i2, i1, i0]
            s += np.float64(v * v)
        mean = np.float32(s / n0)
        scale = np.float32(1.0) / np.float32(math.sqrt(np.float32(mean + eps)))
        for i0 in range(n0):
            out[i3, i2, i1, i0] = x[i3, i2, i1, i0] * scale


@sized_kernel(0, cache=True, nogil=True)
def norm_f32(x, out, eps):
    """out[row] = (x[row] - mean) / sqrt(var + eps) for every row of 4-D float32 arrays.

    As ggml's AVX2 kernel: the mean is the float64 sum rounded to float32, then divided by n in
    float32; the squared deviations are summed eight at a time in float32
    (:func:`.numeric.hsum8_f32`), the groups and the leftovers in float64.
    """
    n3, n2, n1, n0 = x.shape
    n8 = n0 - n0 % 8
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        xr = x[i3, i2, i1]
        mean = np.float32(sum_f64(xr)) / np.float32(n0)
        d = np.empty(n0, np.float32)
        for i0 in range(n0):
            d[i0] = xr[i0] - mean
        v = 0.0
        for c in range(0, n8, 8):
            v += np.float64(hsum8_f32(d[c] * d[c], d[c + 1] * d[c + 1], d[c + 2] * d[c + 2],
                                      d[c + 3] * d[c + 3], d[c + 4] * d[c + 4],
                                      d[c + 5] * d[c + 5], d[c + 6] * d[c + 6],
                                      d[c + 7] * d[c + 7]))
        for i0 in range(n8, n0):
            v += np.float64(d[i0] * d[i0])
        var = np.float32(v / n0)
        scale = np.float32(1.0) / np.float32(math.sqrt(np.float32(var + eps)))
        orow = out[i3, i2, i1]
        for i0 in range(n0):
            orow[i0] = d[i0] * scale


def reference_rms_norm(x: np.ndarray, eps: float) -> np.ndarray:
    """Numpy oracle (float64)."""
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def reference_norm(x: np.ndarray, eps: float) -> np.ndarray:
    """Numpy oracle (float64)."""
    x = np.asarray(x, np.float64)
    d = x - x.mean(axis=-1, keepdims=True)
    return d / np.sqrt(np.mean(d * d, axis=-1, keepdims=True) + eps)


@kernel("cpu", Op.RMS_NORM, Op.NORM)
def bind_norm_ops(node: Node):
    """RMS_NORM and NORM: F32 in, F32 out, same shape; op_params[0] is eps (float, >= 0): the
    CPU runner of a validated node."""
    a = node.src[0]
    eps = np.float32(node.param_f32(0))
    kernel = rms_norm_f32 if node.op == Op.RMS_NORM else norm_f32
    return lambda: kernel(view(a), view(node), eps)
