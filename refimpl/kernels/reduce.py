"""SUM_ROWS, SUM, MEAN, CUMSUM, ARGMAX, COUNT_EQUAL (spec/ops/moe.md, spec/ops/elementwise.md).

SUM_ROWS: the sum of each row.

ggml's CPU backend adds a row's float32 values in double precision and rounds the sum once
(``ggml_vec_sum_f32``); so does :func:`sum_rows_f32`, in order (:func:`.numeric.sum_f64`).  Rows may be strided
(permuted or sliced views).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..graph.build import Node
from ..graph.checks import overlaps
from ..graph.ops import Op
from ..graph.registry import kernel
from ..protocol.ggml_types import GgmlType
from .cpu_tensors import bf16_to_f32, f16_to_f32, store_f32, view
from .numeric import sum_f64
from .parallel import sized_kernel


@sized_kernel(0, cache=True, nogil=True)
def sum_rows_f32(a, out):
    """out[i3, i2, i1, 0] = Σ a[i3, i2, i1, :], accumulated in float64."""
    n3, n2, n1, n0 = a.shape
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        out[i3, i2, i1, 0] = np.float32(sum_f64(a[i3, i2, i1]))


def reference(a: np.ndarray) -> np.ndarray:
    """Numpy oracle: row sums of ``a`` (ne3, ne2, ne1, ne0) in float64, shape (.., 1)."""
    return np.asarray(a, np.float64).sum(axis=-1, keepdims=True)


@kernel("cpu", Op.SUM_ROWS)
def bind_sum_rows(node: Node):
    """SUM_ROWS: the CPU runner of a validated node."""
    av, out = view(node.src[0]), view(node)
    if not overlaps(node, node.src[0]):
        return lambda: sum_rows_f32(av, out)

    def run():   # dst shares bytes with src0: sum every row first
        tmp = np.empty(out.shape, np.float32)
        sum_rows_f32(av, tmp)
        out[...] = tmp
    return run


# -- SUM, MEAN, CUMSUM, ARGMAX, COUNT_EQUAL ---------------------------------------------------

@njit(cache=True, nogil=True)
def sum_all(a, wide):
    """Σ of a 4-D float32 array, row by row as ggml-cpu's SUM: with ``wide`` (F32 tensors)
    each row in float64 and the rows in float64; otherwise (F16, BF16 widened to float32)
    each row in float32 and the rows in float32."""
    n3, n2, n1, n0 = a.shape
    total64 = 0.0
    total32 = np.float32(0.0)
    for i3 in range(n3):
        for i2 in range(n2):
            for i1 in range(n1):
                if wide:
                    total64 += sum_f64(a[i3, i2, i1])
                else:
                    s = np.float32(0.0)
                    for i0 in range(n0):
                        s += a[i3, i2, i1, i0]
                    total32 += s
    return total64 if wide else np.float64(total32)


@njit(cache=True, nogil=True)
def argmax_f32(a, out):
    """out[i] = the index of the largest value of row i of a (2-D float32), as ggml-cpu's
    ``ggml_vec_argmax_f32`` finds it: the running maximum ``m = m > x ? m : x`` and the last
    index where it equals the element (so the last of equal maxima)."""
    for r in range(a.shape[0]):
        m = -np.float32(np.inf)
        idx = 0
        for i in range(a.shape[1]):
            x = a[r, i]
            m = m if m > x else x
            if m == x:
                idx = i
        out[r] = idx


def reference_argmax(a: np.ndarray) -> np.ndarray:
    """Numpy oracle of ARGMAX: the last index of each row's maximum (rows without NaN)."""
    a = np.asarray(a)
    return a.shape[-1] - 1 - np.argmax(a[..., ::-1], axis=-1)


def rows_read_packed(t: Node) -> np.ndarray:
    """``t`` as SUM, MEAN and ARGMAX read it: each row ``ne[0]`` packed elements from its
    first, whatever ``nb[0]`` says (ggml-cpu's kernels; the validator has checked that
    ``nb[0]`` is at least the element size, so every read lies inside t's bytes)."""
    v = view(t)
    if t.nb[0] == t.traits.type_size:
        return v
    return np.ndarray(v.shape, v.dtype, buffer=t.buffer.memory.array, offset=t.offset,
                      strides=(*v.strides[:3], t.traits.type_size))


def _as_f32(t: Node, v: np.ndarray) -> np.ndarray:
    if t.type == GgmlType.F16:
        return f16_to_f32(v)
    return bf16_to_f32(v) if t.type == GgmlType.BF16 else v


@kernel("cpu", Op.SUM)
def bind_sum(node: Node):
    """SUM: the CPU runner of a validated node (dst of src0's type)."""
    a = node.src[0]
    wide = a.type == GgmlType.F32
    rows = rows_read_packed(a)

    def run():
        total = np.full((1, 1, 1, 1), sum_all(_as_f32(a, rows), wide), np.float32)
        store_f32(node, total)
    return run


@kernel("cpu", Op.MEAN)
def bind_mean(node: Node):
    """MEAN: each row's float64 sum rounded to float32, divided by ne[0] in float32: the CPU
    runner of a validated node."""
    av, out = rows_read_packed(node.src[0]), view(node)
    n = np.float32(node.src[0].ne[0])

    def run():
        tmp = np.empty(out.shape, np.float32)
        sum_rows_f32(av, tmp)
        out[...] = tmp / n
    return run


@kernel("cpu", Op.CUMSUM)
def bind_cumsum(node: Node):
    """CUMSUM: running float32 sums along each row, in order: the CPU runner of a validated
    node."""
    av, out = view(node.src[0]), view(node)
    return lambda: out.__setitem__(Ellipsis, np.cumsum(av, axis=-1, dtype=np.float32))


@kernel("cpu", Op.ARGMAX)
def bind_argmax(node: Node):
    """ARGMAX: the CPU runner of a validated node."""
    av, out = rows_read_packed(node.src[0])[0, 0], view(node)[0, 0, 0]

    def run():
        tmp = np.empty(out.shape, np.int32)
        argmax_f32(av, tmp)
        out[...] = tmp
    return run


@kernel("cpu", Op.COUNT_EQUAL)
def bind_count_equal(node: Node):
    """COUNT_EQUAL: the CPU runner of a validated node (an I64 count)."""
    av, bv, out = view(node.src[0]), view(node.src[1]), view(node)
    return lambda: out.__setitem__(Ellipsis, np.count_nonzero(av == bv))
