"""What ggml accepts for the ops of :mod:`refimpl.kernels.matmul` (validation, any device)."""

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
from .types import QUANT_WEIGHT_TYPES, VEC_DOT_TYPE

WEIGHT_TYPES = frozenset({F32, F16, BF16}) | QUANT_WEIGHT_TYPES


@validates(Op.MUL_MAT)
def check_mat_mul(node: Node) -> None:
    """MUL_MAT with F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K,
    Q6_K, IQ4_NL, IQ4_XS, MXFP4, NVFP4, TQ1_0, TQ2_0, Q1_0, Q2_0, IQ1_S, IQ1_M, IQ2_XXS,
    IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S weights: raise
    GraphInvalid unless ggml would accept the node."""
    a, b = src(node, 0, "weights"), src(node, 1, "activations")
    no_src_beyond(node, 2)
    type_in(a, WEIGHT_TYPES, node, "src0")
    type_in(b, {F32, F16, BF16, VEC_DOT_TYPE[a.type]}, node, "src1")
    require(node.type == F32, node, "dst must be f32")
    if a.ne[0] != b.ne[0]:
        fail(node, f"src0 and src1 rows differ in length "
                   f"({a.ne[0]} and {b.ne[0]})")
    require(a.ne[2] > 0 and a.ne[3] > 0, node, "src0 has an empty batch dimension")
    if not (b.ne[2] % a.ne[2] == 0 and b.ne[3] % a.ne[3] == 0):
        fail(node, f"src0 batches {list(a.ne[2:])} do not divide src1 batches {list(b.ne[2:])}")
    expect = (a.ne[1], b.ne[1], b.ne[2], b.ne[3])
    if node.ne != expect:
        fail(node, f"dst shape must be {list(expect)}")
    block_rows(a, node, "src0")
    require(a.nb[0] <= a.nb[1], node, "src0 is transposed (nb[0] > nb[1])")
    block_rows(b, node, "src1")
    elementwise_strides(node, node, "dst")
    if not (node.nelements == 0 or node.nb[0] == 4 <= node.nb[1] <= node.nb[2] <= node.nb[3]):
        fail(node, f"dst must not be transposed or permuted (nb={list(node.nb)})")


@validates(Op.MUL_MAT_ID)
def check_mat_mul_id(node: Node) -> None:
    """MUL_MAT_ID (ggml_mul_mat_id): ``dst[:, j, t] = as[ids[j, t]] · b[:, j % b.ne[1], t]``
    with the experts' weights ``as`` (K, N, n_expert) of any MUL_MAT weight type, F32
    activations ``b`` (K, 1 or n_used, n_tokens) and I32 expert ids (n_used, n_tokens); the
    ids' range is checked when the graph runs: raise GraphInvalid unless ggml would accept the
    node."""
    a, b, ids = src(node, 0, "experts"), src(node, 1, "activations"), src(node, 2, "ids")
    no_src_beyond(node, 3)
    type_in(a, WEIGHT_TYPES, node, "src0")
    type_in(b, {F32}, node, "src1")
    type_in(ids, {I32}, node, "ids")
    require(node.type == F32, node, "dst must be f32")
    require(a.ne[3] == 1 and b.ne[3] == 1, node, "src0 and src1 must be 3-D")
    require(ids.ne[2] == 1 and ids.ne[3] == 1, node, "ids must be 2-D")
    if ids.ne[1] != b.ne[2]:
        fail(node, f"ids has {ids.ne[1]} token columns, src1 {b.ne[2]}")
    if a.ne[0] != b.ne[0]:
        fail(node, f"src0 and src1 rows differ in length ({a.ne[0]} and "
                   f"{b.ne[0]})")
    if not (b.ne[1] > 0 and ids.ne[0] % b.ne[1] == 0):
        fail(node, f"src1 ne[1]={b.ne[1]} does not divide the ids per token {ids.ne[0]}")
    expect = (a.ne[1], ids.ne[0], b.ne[2], 1)
    if node.ne != expect:
        fail(node, f"dst shape must be {list(expect)}")
    block_rows(a, node, "src0")
    require(a.nb[0] <= a.nb[1], node, "src0 is transposed (nb[0] > nb[1])")
    block_rows(b, node, "src1")
    elementwise_strides(ids, node, "ids")
    elementwise_strides(node, node, "dst")
    if not (node.nelements == 0 or node.nb[0] == 4 <= node.nb[1] <= node.nb[2] <= node.nb[3]):
        fail(node, f"dst must not be transposed or permuted (nb={list(node.nb)})")
