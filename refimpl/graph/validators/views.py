"""NONE, VIEW, RESHAPE, PERMUTE, TRANSPOSE: ops that describe existing bytes anew.

They compute nothing (no device has a kernel for them); validation checks that a view really
is a view: it lies in the same buffer as the tensor it views, at ``view_src``'s address plus
``view_offs`` (spec/graph-ops.md).
"""

from __future__ import annotations

from ..build import Node
from ..checks import fail
from ..ops import Op
from ..registry import validates


@validates(Op.NONE, Op.VIEW, Op.RESHAPE, Op.PERMUTE, Op.TRANSPOSE)
def check_view_ops(node: Node) -> None:
    """The five no-work ops: raise GraphInvalid unless ggml would accept the node."""
    if node.op == Op.NONE:
        return
    base = node.view_src
    if base is None:
        fail(node, "a view op without view_src")
    if node.src[0] is None:
        fail(node, "a view op without src[0]")
    if node.buffer is None and base.buffer is None:
        # a view of bytes this server does not hold (ggml's scheduler leaves views of another
        # backend's tensors unallocated): it describes nothing, and no computing node may read
        # it (bind_node refuses sources without a buffer)
        return
    if base.buffer is not node.buffer or node.offset != base.offset + node.view_offs:
        fail(node, f"does not lie at view_src '{base.name}' + {node.view_offs} in the same buffer")
    if node.type != node.src[0].type:
        fail(node, "a view must keep the type of its source")
    if node.op in (Op.RESHAPE, Op.PERMUTE, Op.TRANSPOSE) and node.nelements != node.src[0].nelements:
        fail(node, "a reshape/permute/transpose must keep the number of elements")
