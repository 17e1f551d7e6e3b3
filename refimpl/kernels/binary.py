"""ADD, SUB, MUL, DIV: elementwise with ggml's repeat-broadcast of src1; ADD_ID, a bias row per
expert (spec/graph-ops.md).

``dst[i] = src0[i] (op) src1[i mod src1.ne]`` in float32, for F32, F16 and BF16 tensors
(mixed as ggml's CPU backend allows), rounding to the destination type at the end.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..graph.build import Node
from ..graph.checks import overlaps
from ..graph.ops import Op
from ..graph.registry import kernel
from .cpu_tensors import load_f32, store_f32, view
from .parallel import sized_kernel
from .set_rows import check_indices

ADD, SUB, MUL, DIV = 0, 1, 2, 3
_CODES = {Op.ADD: ADD, Op.SUB: SUB, Op.MUL: MUL, Op.DIV: DIV}


@sized_kernel(2, cache=True, nogil=True)
def binary_f32(a, b, out, code):
    """out = a (code) tile(b), all float32 4-D arrays; out may be a itself.  Row by row; the
    op and whether src1's rows are as long as src0's are decided outside the inner loops, so
    that each is one loop the compiler vectorises."""
    n3, n2, n1, n0 = out.shape
    b3, b2, b1, b0 = b.shape
    rows = n3 * n2 * n1
    for r in prange(rows):
        i3 = r // (n2 * n1)
        i2 = (r // n1) % n2
        i1 = r % n1
        x, y, o = a[i3, i2, i1], b[i3 % b3, i2 % b2, i1 % b1], out[i3, i2, i1]
        if b0 != n0:                                   # src1's row repeats along the row
            for i0 in range(n0):
                o[i0] = _apply(code, x[i0], y[i0 % b0])
        elif code == 0:
            for i0 in range(n0):
                o[i0] = x[i0] + y[i0]
        elif code == 1:
            for i0 in range(n0):
                o[i0] = x[i0] - y[i0]
        elif code == 2:
            for i0 in range(n0):
                o[i0] = x[i0] * y[i0]
        else:
            for i0 in range(n0):
                o[i0] = x[i0] / y[i0]


@njit(cache=True, nogil=True, inline="always")
def _apply(code, x, y):
    """``x (code) y`` for one pair of values."""
    if code == 0:
        return x + y
    if code == 1:
        return x - y
    if code == 2:
        return x * y
    return x / y


def reference(op: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Numpy oracle: ``a`` op ``b`` tiled to ``a``'s shape (both float, shape (ne3..ne0))."""
    tiled = np.tile(b, tuple(x // y for x, y in zip(a.shape, b.shape)))
    return {Op.ADD: np.add, Op.SUB: np.subtract, Op.MUL: np.multiply,
            Op.DIV: np.divide}[Op(op)](a.astype(np.float32), tiled.astype(np.float32))


@kernel("cpu", Op.ADD, Op.SUB, Op.MUL, Op.DIV)
def bind_binary_ops(node: Node):
    """ADD, SUB, MUL, DIV: the CPU runner of a validated node."""
    a, b = node.src[0], node.src[1]
    code = _CODES[Op(node.op)]
    if node.type == 0 and b.type == 0 and not np.may_share_memory(view(node), view(b)):
        av, bv, out = view(a), view(b), view(node)    # made once: views of fixed bytes
        return lambda: binary_f32(av, bv, out, code)

    def run():
        av = load_f32(a)
        out = np.empty(av.shape, np.float32)
        binary_f32(av, load_f32(b), out, code)
        store_f32(node, out)
    return run


@sized_kernel(2, cache=True, nogil=True)
def add_id_f32(a, b, out, ids):
    """out[i3, i2, i1] = a[i3, i2, i1] + b[ids[i2, i1]] (rows; ids already range-checked)."""
    n3, n2, n1, n0 = out.shape
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        x, y, o = a[i3, i2, i1], b[ids[i2, i1]], out[i3, i2, i1]
        for i0 in range(n0):
            o[i0] = x[i0] + y[i0]


def reference_add_id(a: np.ndarray, b: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Numpy oracle of ADD_ID: ``a`` (ne3, ne2, ne1, ne0) plus rows of ``b`` (n, ne0) picked
    by ``ids`` (ne2, ne1)."""
    return np.asarray(a, np.float64) + np.asarray(b, np.float64)[ids]


@kernel("cpu", Op.ADD_ID)
def bind_add_id(node: Node):
    """ADD_ID: the CPU runner of a validated node; an id outside src1's rows is refused before
    anything is written (ggml's CPU backend asserts, ending its server)."""
    a, b, ids = node.src[0], node.src[1], node.src[2]
    if node.nelements == 0:
        return lambda: None
    av, out = view(a), view(node)
    bv = view(b)[0, 0]
    iv = view(ids)[:, :, :a.ne[2], :a.ne[1]][:1, :1]     # the (i1, i2) entries ggml reads

    def run():
        check_indices(node, iv, b.ne[1], "expert id", 2)
        # a copy of src1's rows when dst shares its bytes (an in-place add reads as it writes)
        rows = bv.copy() if overlaps(node, b) else bv
        add_id_f32(av, rows, out, iv[0, 0])
    return run
