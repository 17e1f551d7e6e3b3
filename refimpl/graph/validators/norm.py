"""What ggml accepts for the ops of :mod:`refimpl.kernels.norm` (validation, any device)."""

from __future__ import annotations

import math

from ...protocol.ggml_types import GgmlType
from ..build import Node
from ..checks import elementwise_strides, no_src_beyond, require, same_shape, src, type_in
from ..ops import Op
from ..registry import validates


@validates(Op.RMS_NORM, Op.NORM)
def check_norm_ops(node: Node) -> None:
    """RMS_NORM and NORM: F32 in, F32 out, same shape; op_params[0] is eps (float, >= 0): raise
    GraphInvalid unless ggml would accept the node."""
    a = src(node, 0)
    no_src_beyond(node, 1)
    for t, what in ((node, "dst"), (a, "src0")):
        type_in(t, {GgmlType.F32}, node, what)
        elementwise_strides(t, node, what)
    same_shape(node, a, node, "dst and src0")
    eps = node.param_f32(0)
    require(eps >= 0.0 and math.isfinite(eps), node, f"eps must be finite and >= 0, got {eps}")
    require(a.ne[0] > 0, node, "rows must not be empty")
