"""What ggml accepts for the ops of :mod:`refimpl.kernels.norm` (validation, any device)."""

from __future__ import annotations

import math

from ...protocol.ggml_types import GgmlType
from ..build import Node
from ..checks import fail, only_source, require, same_shape
from ..ops import Op
from ..registry import validates


@validates(Op.RMS_NORM, Op.NORM)
def check_norm_ops(node: Node) -> None:
    """RMS_NORM and NORM: F32 in, F32 out, same shape; op_params[0] is eps (float, >= 0): raise
    GraphInvalid unless ggml would accept the node."""
    a = only_source(node, {GgmlType.F32})
    same_shape(node, a, node, "dst and src0")
    eps = node.param_f32(0)
    if not (eps >= 0.0 and math.isfinite(eps)):
        fail(node, f"eps must be finite and >= 0, got {eps}")
    require(a.ne[0] > 0, node, "rows must not be empty")


@validates(Op.L2_NORM)
def check_l2_norm(node: Node) -> None:
    """L2_NORM (ggml_l2_norm): each row divided by max(its Euclidean norm, eps), eps in
    op_params[0] (float, >= 0: ggml-cpu asserts it); F32, one shape, any element-aligned
    strides: raise GraphInvalid unless ggml would accept the node."""
    a = only_source(node, {GgmlType.F32})
    same_shape(node, a, node, "dst and src0")
    eps = node.param_f32(0)
    if not (eps >= 0.0):
        fail(node, f"eps must be >= 0, got {eps}")


@validates(Op.GROUP_NORM)
def check_group_norm(node: Node) -> None:
    """GROUP_NORM (ggml_group_norm): the channels (ne[2]) split into op_params[0] groups
    (>= 1), each normalised over its ne[0]·ne[1]·channels elements, eps in op_params[1]
    (float); F32, one shape, rows packed (ggml-cpu asserts it for src0 and writes dst so):
    raise GraphInvalid unless ggml would accept the node."""
    a = only_source(node, {GgmlType.F32})
    for t, what in ((node, "dst"), (a, "src0")):
        if t.nb[0] != 4:
            fail(node, f"{what} rows must be packed")
    same_shape(node, a, node, "dst and src0")
    groups = node.param_i32(0)
    if not (groups >= 1):
        fail(node, f"the number of groups must be >= 1, got {groups}")
