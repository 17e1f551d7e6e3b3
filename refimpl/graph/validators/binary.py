"""What ggml accepts for the ops of :mod:`refimpl.kernels.binary` (validation, any device)."""

from __future__ import annotations

from ..build import Node
from ..checks import (
    FLOAT_TYPES,
    can_repeat,
    elementwise_strides,
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
    require(can_repeat(b, a), node, f"src1 {list(b.ne)} does not tile src0 {list(a.ne)}")
