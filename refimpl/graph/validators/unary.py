"""What ggml accepts for the ops of :mod:`refimpl.kernels.unary` (validation, any device)."""

from __future__ import annotations

from ..build import Node
from ..checks import (
    F16,
    F32,
    FLOAT_TYPES,
    is_contiguous,
    elementwise_strides,
    fail,
    no_src_beyond,
    require,
    same_shape,
    src,
    type_in,
)
from ..ops import GluOp, Op, UnaryOp
from ..registry import validates


def _float_operands(node: Node, *ts) -> None:
    for t, what in ((node, "dst"), *ts):
        type_in(t, FLOAT_TYPES, node, what)
        elementwise_strides(t, node, what)


@validates(Op.UNARY)
def check_unary_ops(node: Node) -> None:
    """UNARY: op_params[0] selects the function (``UnaryOp``): raise GraphInvalid unless ggml
    would accept the node."""
    a = src(node, 0)
    no_src_beyond(node, 1)
    _float_operands(node, (a, "src0"))
    same_shape(node, a, node, "dst and src0")
    code = node.param_i32(0)
    if not (0 <= code < len(UnaryOp)):
        fail(node, f"unknown unary op {code}")
    if code in OWN_KERNELS:
        require(node.type == a.type, node, "dst must have src0's type")
    else:   # ggml-cpu's one-value-from-one kernels also widen F16/BF16 into F32
        require(node.type == a.type or node.type == F32, node,
                "dst must have src0's type or be F32")


#: UNARY sub-ops ggml-cpu computes with kernels of their own, for one type throughout; the
#: others go through its generic kernel, which also takes F16 or BF16 into an F32 dst.
OWN_KERNELS = frozenset({UnaryOp.GELU, UnaryOp.GELU_QUICK, UnaryOp.SILU, UnaryOp.GELU_ERF})


@validates(Op.GLU)
def check_glu_ops(node: Node) -> None:
    """GLU: ``act(x) * g`` with x and g the two halves of src0 (op_params[1] swaps them) or
    src0 and src1: raise GraphInvalid unless ggml would accept the node."""
    a = src(node, 0)
    no_src_beyond(node, 2)
    b = node.src[1]
    _float_operands(node, (a, "src0"))
    require(node.type == a.type, node, "dst must have src0's type")
    code = node.param_i32(0)
    if not (0 <= code < len(GluOp)):
        fail(node, f"unknown GLU op {code}")
    if b is not None:
        src(node, 1)
        _float_operands(node, (b, "src1"))
        require(b.type == a.type, node, "src0 and src1 must share a type")
        same_shape(a, b, node, "src0 and src1")
        same_shape(node, a, node, "dst and src0")
    else:
        if node.ne != (a.ne[0] // 2, *a.ne[1:]):
            fail(node, f"dst {list(node.ne)} must be src0 {list(a.ne)} with ne[0] halved")


@validates(Op.SCALE)
def check_scale_op(node: Node) -> None:
    """SCALE: ``dst = src0 * s + b`` with s, b in op_params[0], [1] (floats): raise GraphInvalid
    unless ggml would accept the node."""
    a = src(node, 0)
    no_src_beyond(node, 1)
    _float_operands(node, (a, "src0"))
    same_shape(node, a, node, "dst and src0")
    require(node.type == a.type, node, "dst must have src0's type")


@validates(Op.CLAMP)
def check_clamp(node: Node) -> None:
    """CLAMP (ggml_clamp): ``dst = max(min(src0, hi), lo)`` with lo, hi in op_params[0], [1]
    (floats); F32 or F16 (ggml's CPU backend aborts on others): raise GraphInvalid unless ggml
    would accept the node."""
    a = src(node, 0)
    no_src_beyond(node, 1)
    for t, what in ((node, "dst"), (a, "src0")):
        type_in(t, {F32, F16}, node, what)
        elementwise_strides(t, node, what)
    same_shape(node, a, node, "dst and src0")
    require(node.type == a.type, node, "dst must have src0's type")


@validates(Op.FILL)
def check_fill(node: Node) -> None:
    """FILL (ggml_fill): every element of dst set to op_params[0] (a float); F32 or F16, src0
    contiguous and of dst's type and shape (its values are not read): raise GraphInvalid
    unless ggml would accept the node."""
    a = src(node, 0)
    no_src_beyond(node, 1)
    for t, what in ((node, "dst"), (a, "src0")):
        type_in(t, {F32, F16}, node, what)
        elementwise_strides(t, node, what)
    require(is_contiguous(a), node, "src0 must be contiguous")
    same_shape(node, a, node, "dst and src0")
    require(node.type == a.type, node, "dst must have src0's type")
