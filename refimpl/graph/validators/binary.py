"""What ggml accepts for the ops of :mod:`refimpl.kernels.binary` (validation, any device)."""

from __future__ import annotations

from ..build import Node
from ..checks import (
    F32,
    FLOAT_TYPES,
    I32,
    can_repeat,
    elementwise_strides,
    fail,
    no_src_beyond,
    require,
    same_shape,
    src,
    type_in,
)
from ..ops import Op
from ..registry import validates


@validates(Op.ADD, Op.SUB, Op.MUL, Op.DIV)
def check_binary_ops(node: Node) -> None:
    """ADD, SUB, MUL, DIV: raise GraphInvalid unless ggml would accept the node."""
    a, b = src(node, 0), src(node, 1)
    no_src_beyond(node, 2)
    for t, what in ((node, "dst"), (a, "src0"), (b, "src1")):
        type_in(t, FLOAT_TYPES, node, what)
        elementwise_strides(t, node, what)
    same_shape(node, a, node, "dst and src0")
    require(node.type == a.type, node, "dst must have src0's type")
    if not can_repeat(b, a):
        fail(node, f"src1 {list(b.ne)} does not tile src0 {list(a.ne)}")


@validates(Op.ADD_ID)
def check_add_id(node: Node) -> None:
    """ADD_ID (ggml_add_id): ``dst[:, i1, i2, i3] = src0[:, i1, i2, i3] + src1[:, ids[i1, i2]]``
    (a per-expert bias), all F32 but ids I32; the ids' range is checked when the graph runs:
    raise GraphInvalid unless ggml would accept the node."""
    a, b, ids = src(node, 0), src(node, 1), src(node, 2, "ids")
    no_src_beyond(node, 3)
    for t, what in ((node, "dst"), (a, "src0"), (b, "src1")):
        type_in(t, {F32}, node, what)
        elementwise_strides(t, node, what)
    type_in(ids, {I32}, node, "ids")
    elementwise_strides(ids, node, "ids")
    same_shape(node, a, node, "dst and src0")
    if a.ne[0] != b.ne[0]:
        fail(node, f"src0 and src1 rows differ in length ({a.ne[0]} and "
                   f"{b.ne[0]})")
    if not (ids.ne[0] == a.ne[1] and ids.ne[1] == a.ne[2]):
        fail(node, f"ids {list(ids.ne[:2])} must be src0's ne[1], ne[2] {list(a.ne[1:3])}")
    require(node.nelements == 0 or (ids.nelements > 0 and b.ne[2] > 0 and b.ne[3] > 0), node,
            "ids or src1 is empty")
