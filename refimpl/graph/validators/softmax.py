"""What ggml accepts for the ops of :mod:`refimpl.kernels.softmax` (validation, any device)."""

from __future__ import annotations

from ..build import Node
from ..checks import (
    F16,
    F32,
    elementwise_strides,
    fail,
    is_contiguous,
    no_src_beyond,
    require,
    same_shape,
    src,
    type_in,
)
from ..ops import Op
from ..registry import validates


@validates(Op.SOFT_MAX)
def check_soft_max(node: Node) -> None:
    """SOFT_MAX (ggml_soft_max_ext, with optional sinks): raise GraphInvalid unless ggml would
    accept the node."""
    a = src(node, 0, "logits")
    no_src_beyond(node, 3)
    for t, what in ((node, "dst"), (a, "src0")):
        type_in(t, {F32}, node, what)
        elementwise_strides(t, node, what)
        if not is_contiguous(t):
            fail(node, f"{what} must be contiguous")
    same_shape(node, a, node, "dst and src0")
    mask = node.src[1] if len(node.src) > 1 else None
    if mask is not None:
        mask = src(node, 1, "mask")
        type_in(mask, {F32, F16}, node, "mask")
        elementwise_strides(mask, node, "mask")
        require(is_contiguous(mask), node, "mask must be contiguous")
        if mask.ne[0] != a.ne[0]:
            fail(node, f"mask ne[0]={mask.ne[0]} differs from src0 "
                       f"ne[0]={a.ne[0]}")
        if not (mask.ne[1] >= a.ne[1]):
            fail(node, f"mask has {mask.ne[1]} rows, src0 needs {a.ne[1]}")
        for d in (2, 3):
            if not (mask.ne[d] > 0 and a.ne[d] % mask.ne[d] == 0):
                fail(node, f"mask ne[{d}]={mask.ne[d]} does not divide src0 ne[{d}]={a.ne[d]}")
    max_bias = node.param_f32(1)
    if max_bias > 0.0 and mask is None:
        fail(node, "ALiBi (max_bias > 0) needs a mask")
    sinks = node.src[2] if len(node.src) > 2 else None
    if sinks is not None:
        sinks = src(node, 2, "sinks")
        type_in(sinks, {F32}, node, "sinks")
        elementwise_strides(sinks, node, "sinks")
        if sinks.ne[0] != a.ne[2]:
            fail(node, f"sinks ne[0]={sinks.ne[0]} differs from the "
                       f"number of heads {a.ne[2]}")
