"""RMS_NORM and NORM over rows (spec/ops/norm.md); L2_NORM and GROUP_NORM (spec/ops/elementwise.md).

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
from ..graph.checks import overlaps
from ..graph.ops import Op
from ..graph.registry import kernel
from .cpu_tensors import view
from .numeric import hsum8_f32, sum_f64
from .parallel import sized_kernel


@sized_kernel(0, cache=True, nogil=True)
def rms_norm_f32(x, out, eps, l2):
    """out[row] = x[row] / sqrt(mean(x[row]**2) + eps) for every row of 4-D float32 arrays;
    with ``l2`` (L2_NORM) out[row] = x[row] / max(‖x[row]‖, eps) instead.  Both sum the
    float32 squares in float64 and multiply each element by a float32 scale: RMS_NORM's from
    the mean rounded to float32, L2_NORM's from ``sqrtf`` of the sum rounded to float32."""
    n3, n2, n1, n0 = x.shape
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        s = 0.0
        for i0 in range(n0):
            v = x[i3, i2, i1, i0]
            s += np.float64(v * v)
        if l2:
            norm = np.float32(math.sqrt(np.float32(s)))
            scale = np.float32(1.0) / (norm if norm >= eps else eps)
        else:
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
    if node.op == Op.RMS_NORM:
        return lambda: rms_norm_f32(view(a), view(node), eps, False)
    return lambda: norm_f32(view(a), view(node), eps)


def reference_l2_norm(x: np.ndarray, eps: float) -> np.ndarray:
    """Numpy oracle (float64)."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.sqrt(np.sum(x * x, axis=-1, keepdims=True)), eps)


@sized_kernel(0, cache=True, nogil=True)
def group_norm_f32(x, out, groups, eps):
    """GROUP_NORM over 4-D float32 arrays (ne3, channels, ne1, ne0): the channels split into
    ``groups`` runs of ceil(channels / groups); each run of each i3 normalised by its mean
    and variance as ggml-cpu computes them: row sums in float64 added in float64, the mean
    and variance rounded to float32, deviations and their float32 squares, then times
    ``1 / sqrtf(variance + eps)`` in float32."""
    n3, nc, n1, n0 = x.shape
    per = (nc + groups - 1) // groups
    used = (nc + per - 1) // per if per > 0 else 0     # groups past the channels are empty
    for w in prange(used * n3):
        g, i3 = w // n3, w % n3
        start = g * per
        end = min(start + per, nc)
        count = n0 * n1 * (end - start)
        s = 0.0
        for c in range(start, end):
            for i1 in range(n1):
                s += sum_f64(x[i3, c, i1])
        mean = np.float32(s / count)
        s2 = 0.0
        for c in range(start, end):
            for i1 in range(n1):
                r = 0.0
                for i0 in range(n0):
                    v = x[i3, c, i1, i0] - mean
                    out[i3, c, i1, i0] = v
                    r += np.float64(v * v)
                s2 += r
        var = np.float32(s2 / count)
        scale = np.float32(1.0) / np.float32(math.sqrt(var + eps))
        for c in range(start, end):
            for i1 in range(n1):
                for i0 in range(n0):
                    out[i3, c, i1, i0] *= scale


def reference_group_norm(x: np.ndarray, groups: int, eps: float) -> np.ndarray:
    """Numpy oracle (float64), x of shape (ne3, channels, ne1, ne0)."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    per = -(-x.shape[1] // groups)
    for s in range(0, x.shape[1], per):
        part = x[:, s:s + per]
        d = part - part.mean(axis=(1, 2, 3), keepdims=True)
        out[:, s:s + per] = d / np.sqrt(np.mean(d * d, axis=(1, 2, 3), keepdims=True) + eps)
    return out


@kernel("cpu", Op.L2_NORM, Op.GROUP_NORM)
def bind_l2_group_norm(node: Node):
    """L2_NORM (eps in op_params[0]) and GROUP_NORM (groups, eps in op_params[0], [1]): the
    CPU runner of a validated node (through a scratch copy where dst shares bytes with
    src0 elsewhere than in place)."""
    a = node.src[0]
    av, out = view(a), view(node)
    if node.op == Op.L2_NORM:
        eps = np.float32(node.param_f32(0))
        compute = lambda o: rms_norm_f32(av, o, eps, True)   # noqa: E731
    else:
        groups, eps = node.param_i32(0), np.float32(node.param_f32(1))
        compute = lambda o: group_norm_f32(av, o, groups, eps)   # noqa: E731
    if not overlaps(node, a) or (a.offset == node.offset and a.nb == node.nb):
        return lambda: compute(out)

    def run():
        tmp = np.empty(out.shape, np.float32)
        compute(tmp)
        out[...] = tmp
    return run
