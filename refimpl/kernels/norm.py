"""RMS_NORM and NORM over rows (spec/ops/norm.md).

Like ggml's CPU backend: squares (RMS_NORM) or deviations (NORM) are summed in double
precision, the mean and the scale ``1/sqrt(mean + eps)`` are rounded to float32, and each
element is multiplied by that scale in float32.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..graph.build import Node
from ..graph.checks import elementwise_strides, no_src_beyond, require, same_shape, src, type_in
from ..graph.ops import Op
from ..graph.registry import OpImpl, register
from ..protocol.ggml_types import GgmlType
from .cpu_tensors import view


@njit(parallel=True, cache=True, nogil=True)
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


@njit(parallel=True, cache=True, nogil=True)
def norm_f32(x, out, eps):
    """out[row] = (x[row] - mean) / sqrt(var + eps) for every row of 4-D float32 arrays."""
    n3, n2, n1, n0 = x.shape
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        s = 0.0
        for i0 in range(n0):
            s += np.float64(x[i3, i2, i1, i0])
        mean = np.float32(s / n0)
        v = 0.0
        for i0 in range(n0):
            d = x[i3, i2, i1, i0] - mean
            v += np.float64(d * d)
        var = np.float32(v / n0)
        scale = np.float32(1.0) / np.float32(math.sqrt(np.float32(var + eps)))
        for i0 in range(n0):
            out[i3, i2, i1, i0] = (x[i3, i2, i1, i0] - mean) * scale


def reference_rms_norm(x: np.ndarray, eps: float) -> np.ndarray:
    """Numpy oracle (float64)."""
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def reference_norm(x: np.ndarray, eps: float) -> np.ndarray:
    """Numpy oracle (float64)."""
    x = np.asarray(x, np.float64)
    d = x - x.mean(axis=-1, keepdims=True)
    return d / np.sqrt(np.mean(d * d, axis=-1, keepdims=True) + eps)


@register
class NormOps(OpImpl):
    """RMS_NORM and NORM: F32 in, F32 out, same shape; op_params[0] is eps (float, >= 0)."""

    ops = (Op.RMS_NORM, Op.NORM)

    def check(self, node: Node) -> None:
        a = src(node, 0)
        no_src_beyond(node, 1)
        for t, what in ((node, "dst"), (a, "src0")):
            type_in(t, {GgmlType.F32}, node, what)
            elementwise_strides(t, node, what)
        same_shape(node, a, node, "dst and src0")
        eps = node.param_f32(0)
        require(eps >= 0.0 and math.isfinite(eps), node, f"eps must be finite and >= 0, got {eps}")
        require(a.ne[0] > 0, node, "rows must not be empty")

    def bind(self, node: Node, device_kind: str):
        if device_kind != "cpu":
            return None
        a = node.src[0]
        eps = np.float32(node.param_f32(0))
        kernel = rms_norm_f32 if node.op == Op.RMS_NORM else norm_f32
        return lambda: kernel(view(a), view(node), eps)
