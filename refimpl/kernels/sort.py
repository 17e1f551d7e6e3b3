"""ARGSORT and TOP_K: row-wise sorting of float32 values into int32 indices
(spec/graph-ops.md).

ggml's CPU backend sorts with ``std::sort`` (``std::partial_sort`` for TOP_K), which leaves
the order of equal values unspecified.  refimpl sorts stably: equal values keep their index
order, ascending or descending alike.  TOP_K gives the k largest in descending order (ggml
gives the same set, deliberately in no particular order).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..graph.build import Node
from ..graph.ops import Op
from ..graph.registry import kernel
from .cpu_tensors import view
from .parallel import sized_kernel


@sized_kernel(0, cache=True, nogil=True)
def argsort_rows(a, out, descending):
    """out[i3, i2, i1, :k] = the first k = out.shape[-1] indices of row a[i3, i2, i1] in
    stable sorted order (descending with ``descending``)."""
    n3, n2, n1, n0 = a.shape
    k = out.shape[3]
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        row = np.empty(n0, np.float32)
        for i0 in range(n0):
            row[i0] = -a[i3, i2, i1, i0] if descending else a[i3, i2, i1, i0]
        order = np.argsort(row, kind="mergesort")
        for j in range(k):
            out[i3, i2, i1, j] = order[j]


def reference(a: np.ndarray, descending: bool, k: int | None = None) -> np.ndarray:
    """Numpy oracle: stable argsort of each row of ``a``, first ``k`` indices (all when None)."""
    a = np.asarray(a, np.float32)
    idx = np.argsort(-a if descending else a, axis=-1, kind="stable").astype(np.int32)
    return idx if k is None else idx[..., :k]


def _bind(node: Node, descending: bool):
    av, out = view(node.src[0]), view(node)

    def run():
        # sorted into a scratch array: dst may share bytes with src0
        tmp = np.empty(out.shape, np.int32)
        argsort_rows(av, tmp, descending)
        out[...] = tmp
    return run


@kernel("cpu", Op.ARGSORT)
def bind_argsort(node: Node):
    """ARGSORT: the CPU runner of a validated node."""
    return _bind(node, node.param_i32(0) == 1)


@kernel("cpu", Op.TOP_K)
def bind_top_k(node: Node):
    """TOP_K: the CPU runner of a validated node."""
    return _bind(node, True)
