"""ADD, SUB, MUL, DIV: elementwise with ggml's repeat-broadcast of src1 (spec/graph-ops.md).

``dst[i] = src0[i] (op) src1[i mod src1.ne]`` in float32, for F32, F16 and BF16 tensors
(mixed as ggml's CPU backend allows), rounding to the destination type at the end.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..graph.build import Node
from ..graph.checks import (FLOAT_TYPES, can_repeat, elementwise_strides, no_src_beyond,
                            require, same_shape, src, type_in)
from ..graph.ops import Op
from ..graph.registry import OpImpl, register
from .cpu_tensors import load_f32, store_f32, view

ADD, SUB, MUL, DIV = 0, 1, 2, 3
_CODES = {Op.ADD: ADD, Op.SUB: SUB, Op.MUL: MUL, Op.DIV: DIV}


@njit(parallel=True, cache=True, nogil=True)
def binary_f32(a, b, out, code):
    """out = a (code) tile(b), all float32 4-D arrays; out may be a itself."""
    n3, n2, n1, n0 = out.shape
    b3, b2, b1, b0 = b.shape
    rows = n3 * n2 * n1
    for r in prange(rows):
        i3 = r // (n2 * n1)
        i2 = (r // n1) % n2
        i1 = r % n1
        j3, j2, j1 = i3 % b3, i2 % b2, i1 % b1
        for i0 in range(n0):
            x = a[i3, i2, i1, i0]
            y = b[j3, j2, j1, i0 % b0]
            if code == 0:
                out[i3, i2, i1, i0] = x + y
            elif code == 1:
                out[i3, i2, i1, i0] = x - y
            elif code == 2:
                out[i3, i2, i1, i0] = x * y
            else:
                out[i3, i2, i1, i0] = x / y


def reference(op: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Numpy oracle: ``a`` op ``b`` tiled to ``a``'s shape (both float, shape (ne3..ne0))."""
    tiled = np.tile(b, tuple(x // y for x, y in zip(a.shape, b.shape)))
    return {Op.ADD: np.add, Op.SUB: np.subtract, Op.MUL: np.multiply,
            Op.DIV: np.divide}[Op(op)](a.astype(np.float32), tiled.astype(np.float32))


@register
class BinaryOps(OpImpl):
    """ADD, SUB, MUL, DIV."""

    ops = (Op.ADD, Op.SUB, Op.MUL, Op.DIV)

    def check(self, node: Node) -> None:
        a, b = src(node, 0), src(node, 1)
        no_src_beyond(node, 2)
        for t, what in ((node, "dst"), (a, "src0"), (b, "src1")):
            type_in(t, FLOAT_TYPES, node, what)
            elementwise_strides(t, node, what)
        same_shape(node, a, node, "dst and src0")
        require(node.type == a.type, node, "dst must have src0's type")
        require(can_repeat(b, a), node, f"src1 {list(b.ne)} does not tile src0 {list(a.ne)}")

    def bind(self, node: Node, device_kind: str):
        if device_kind != "cpu":
            return None
        a, b = node.src[0], node.src[1]
        code = _CODES[Op(node.op)]

        def run():
            av, bv = load_f32(a), load_f32(b)
            if node.type == 0 and not np.may_share_memory(view(node), bv):
                binary_f32(av, bv, view(node), code)
            else:
                out = np.empty(av.shape, np.float32)
                binary_f32(av, bv, out, code)
                store_f32(node, out)
        return run
