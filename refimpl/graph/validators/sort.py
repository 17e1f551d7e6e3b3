"""What ggml accepts for the ops of :mod:`refimpl.kernels.sort` (validation, any device)."""

from __future__ import annotations

from ..build import Node
from ..checks import (
    F32,
    I32,
    elementwise_strides,
    fail,
    no_src_beyond,
    require,
    src,
    type_in,
)
from ..ops import Op
from ..registry import validates

#: ``enum ggml_sort_order``.
SORT_ASC, SORT_DESC = 0, 1


def _f32_to_i32(node: Node) -> Node:
    a = src(node, 0)
    no_src_beyond(node, 1)
    type_in(a, {F32}, node, "src0")
    type_in(node, {I32}, node, "dst")
    elementwise_strides(a, node, "src0")
    elementwise_strides(node, node, "dst")
    require(a.ne[0] <= 0x7FFFFFFF, node, "rows longer than INT32_MAX")
    return a


@validates(Op.ARGSORT)
def check_argsort(node: Node) -> None:
    """ARGSORT (ggml_argsort): each row's indices in sorted order; op_params[0] is the order
    (0 ascending, 1 descending); F32 in, I32 out: raise GraphInvalid unless ggml would accept
    the node."""
    a = _f32_to_i32(node)
    if node.ne != a.ne:
        fail(node, f"dst shape {list(node.ne)} must be src0's {list(a.ne)}")
    order = node.param_i32(0)
    if order not in (SORT_ASC, SORT_DESC):
        fail(node, f"unknown sort order {order}")


@validates(Op.TOP_K)
def check_top_k(node: Node) -> None:
    """TOP_K (ggml_top_k): the indices of each row's k = dst.ne[0] largest values, in no
    particular order; F32 in, I32 out: raise GraphInvalid unless ggml would accept the node."""
    a = _f32_to_i32(node)
    if node.ne[1:] != a.ne[1:]:
        fail(node, f"dst shape {list(node.ne)} must be src0's "
                   f"{list(a.ne)} but in ne[0]")
    if not (node.ne[0] <= a.ne[0]):
        fail(node, f"k={node.ne[0]} exceeds the row length {a.ne[0]}")
