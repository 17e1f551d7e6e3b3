"""SUM_ROWS: the sum of each row (spec/graph-ops.md).

ggml's CPU backend adds a row's float32 values in double precision and rounds the sum once
(``ggml_vec_sum_f32``); so does :func:`sum_rows_f32`, in order (:func:`.numeric.sum_f64`).  Rows may be strided
(permuted or sliced views).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..graph.build import Node
from ..graph.checks import overlaps
from ..graph.ops import Op
from ..graph.registry import kernel
from .cpu_tensors import view
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
