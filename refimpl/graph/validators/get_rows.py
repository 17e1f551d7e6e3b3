"""What ggml accepts for the ops of :mod:`refimpl.kernels.get_rows` (validation, any device)."""

from __future__ import annotations

from ..build import Node
from ..checks import (
    BF16,
    F16,
    F32,
    I32,
    block_rows,
    elementwise_strides,
    fail,
    no_src_beyond,
    require,
    src,
    type_in,
)
from ..ops import Op
from ..registry import validates
from .types import QUANT_WEIGHT_TYPES

SRC_TYPES = frozenset({F32, F16, BF16, I32}) | QUANT_WEIGHT_TYPES


@validates(Op.GET_ROWS)
def check_get_rows(node: Node) -> None:
    """GET_ROWS from F32, F16, BF16, I32 and Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K,
    Q5_K, Q6_K, IQ4_NL, IQ4_XS, MXFP4, NVFP4, TQ1_0, TQ2_0, Q1_0, Q2_0, IQ1_S, IQ1_M, IQ2_XXS,
    IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S rows: raise
    GraphInvalid unless ggml would accept the node."""
    a, b = src(node, 0, "rows"), src(node, 1, "indices")
    no_src_beyond(node, 2)
    type_in(a, SRC_TYPES, node, "src0")
    type_in(b, {I32}, node, "src1")
    want = I32 if a.type == I32 else F32
    if node.type != want:
        fail(node, f"dst must be {'i32' if want == I32 else 'f32'}")
    require(b.ne[3] == 1, node, "src1 must have ne[3] == 1")
    if not (a.ne[2] == b.ne[1] and a.ne[3] == b.ne[2]):
        fail(node, f"src1 batches {list(b.ne[1:3])} must equal src0's {list(a.ne[2:])}")
    expect = (a.ne[0], b.ne[0], b.ne[1], b.ne[2])
    if node.ne != expect:
        fail(node, f"dst shape must be {list(expect)}")
    block_rows(a, node, "src0")
    elementwise_strides(b, node, "src1")
    elementwise_strides(node, node, "dst")
