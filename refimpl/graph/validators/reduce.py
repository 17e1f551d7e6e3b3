"""What ggml accepts for the ops of :mod:`refimpl.kernels.reduce` (validation, any device)."""

from __future__ import annotations

from ..build import Node
from ..checks import F32, elementwise_strides, no_src_beyond, require, src, type_in
from ..ops import Op
from ..registry import validates


@validates(Op.SUM_ROWS)
def check_sum_rows(node: Node) -> None:
    """SUM_ROWS (ggml_sum_rows): ``dst[0, i1, i2, i3] = Σ src0[:, i1, i2, i3]``; F32 only (the
    CPU backend aborts on any other type): raise GraphInvalid unless ggml would accept the
    node."""
    a = src(node, 0)
    no_src_beyond(node, 1)
    for t, what in ((node, "dst"), (a, "src0")):
        type_in(t, {F32}, node, what)
        elementwise_strides(t, node, what)
    expect = (1, *a.ne[1:])
    require(node.ne == expect, node, f"dst shape must be {list(expect)}")
