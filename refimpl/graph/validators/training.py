"""What ggml accepts for the training and backward ops of :mod:`refimpl.kernels.training`
(validation, any device; spec/ops/training.md).

ROPE_BACK shares ROPE's validator (:mod:`.rope`).  The optimiser steps are the one place
where a node writes memory outside its own bytes: OPT_STEP_ADAMW updates its moments (src2,
src3) in place, and both steps write the parameters through src0, which the node is a view of.
Their validators pin that down: the node lies exactly over src0, and every tensor written
occupies distinct bytes that no other operand shares.
"""

from __future__ import annotations

import math

from ..build import Node
from ..checks import (
    F16,
    F32,
    I32,
    block_rows,
    elementwise_strides,
    fail,
    is_contiguous,
    no_src_beyond,
    overlaps,
    require,
    same_shape,
    src,
    type_in,
)
from ..ops import Op
from ..registry import validates
from .types import QUANT_WEIGHT_TYPES

#: GGML_TENSOR_FLAG_PARAM: the tensor holds trainable parameters (ggml_set_param).
FLAG_PARAM = 4

#: src0 types of OUT_PROD: ggml's CPU backend dequantises block formats row by row.
OUT_PROD_SRC0 = frozenset({F32, F16}) | QUANT_WEIGHT_TYPES


def _plain(node: Node, *pairs) -> None:
    """Each (tensor, name) of ``pairs`` has element-aligned strides and offset."""
    for t, what in pairs:
        elementwise_strides(t, node, what)


def _all_f32(node: Node, *pairs) -> None:
    """Each (tensor, name) of ``pairs`` is F32 with element-aligned strides and offset."""
    for t, what in pairs:
        type_in(t, {F32}, node, what)
        elementwise_strides(t, node, what)


@validates(Op.SILU_BACK)
def check_silu_back(node: Node) -> None:
    """SILU_BACK (ggml_silu_back): ``dx = dy · σ(x) · (1 + x · (1 − σ(x)))`` with dy in src0
    and x in src1; F32 or F16, all three of one type and shape: raise GraphInvalid unless ggml
    would accept the node."""
    dy, x = src(node, 0, "gradient"), src(node, 1, "input")
    no_src_beyond(node, 2)
    type_in(dy, {F32, F16}, node, "src0")
    require(x.type == dy.type and node.type == dy.type, node, "src0, src1 and dst must share one type")
    same_shape(node, dy, node, "dst and src0")
    same_shape(x, dy, node, "src1 and src0")
    _plain(node, (node, "dst"), (dy, "src0"), (x, "src1"))


@validates(Op.RMS_NORM_BACK)
def check_rms_norm_back(node: Node) -> None:
    """RMS_NORM_BACK (ggml_rms_norm_back): the gradient of RMS_NORM with dz in src0 and the
    forward input x in src1; F32, same shapes; op_params[0] is eps: raise GraphInvalid unless
    ggml would accept the node."""
    dz, x = src(node, 0, "gradient"), src(node, 1, "input")
    no_src_beyond(node, 2)
    _all_f32(node, (node, "dst"), (dz, "src0"), (x, "src1"))
    same_shape(node, dz, node, "dst and src0")
    same_shape(x, dz, node, "src1 and src0")
    eps = node.param_f32(0)
    if not (eps >= 0.0 and math.isfinite(eps)):
        fail(node, f"eps must be finite and >= 0, got {eps}")
    require(dz.ne[0] > 0, node, "rows must not be empty")


@validates(Op.OUT_PROD)
def check_out_prod(node: Node) -> None:
    """OUT_PROD (ggml_out_prod): ``dst[:, i1, i2, i3] = Σ_j src0[:, j, i2/r2, i3/r3] ·
    src1[i1, j, i2, i3]``; src0 F32, F16 or a block format refimpl dequantises (block formats
    and F16 without broadcasting), src1 and dst F32, dst contiguous: raise GraphInvalid unless
    ggml would accept the node."""
    a, b = src(node, 0, "src0"), src(node, 1, "src1")
    no_src_beyond(node, 2)
    type_in(a, OUT_PROD_SRC0, node, "src0")
    _all_f32(node, (node, "dst"), (b, "src1"))
    if a.ne[1] != b.ne[1]:
        fail(node, f"src0 ne[1]={a.ne[1]} differs from src1 ne[1]={b.ne[1]}")
    for d in (2, 3):
        if not (a.ne[d] > 0 and b.ne[d] % a.ne[d] == 0):
            fail(node, f"src0 ne[{d}]={a.ne[d]} does not divide src1 ne[{d}]={b.ne[d]}")
        if a.type != F32 and a.ne[d] != b.ne[d]:
            fail(node, f"a {a.traits.name} src0 does not broadcast "
                       f"(ne[{d}] {a.ne[d]} != {b.ne[d]})")
    require(a.nb[0] <= a.nb[1], node, "src0 must not be transposed")
    block_rows(a, node, "src0")
    expect = (a.ne[0], b.ne[0], b.ne[2], b.ne[3])
    if node.ne != expect:
        fail(node, f"dst shape must be {list(expect)}")
    require(is_contiguous(node), node, "dst must be contiguous (ggml clears it as one block)")


@validates(Op.GET_ROWS_BACK)
def check_get_rows_back(node: Node) -> None:
    """GET_ROWS_BACK (ggml_get_rows_back): ``dst[:, src1[i]] += src0[:, i]`` over a cleared
    F32 matrix; src0 an F32 or F16 matrix, src1 an I32 vector of at most src0's rows, dst
    contiguous with src0's row length: raise GraphInvalid unless ggml would accept the node."""
    a, b = src(node, 0, "gradient"), src(node, 1, "indices")
    no_src_beyond(node, 2)
    type_in(a, {F32, F16}, node, "src0")
    type_in(b, {I32}, node, "src1")
    _plain(node, (a, "src0"), (b, "src1"))
    _all_f32(node, (node, "dst"))
    require(a.ne[2] == a.ne[3] == 1, node, "src0 must be a matrix")
    require(b.ne[1] == b.ne[2] == b.ne[3] == 1, node, "src1 must be a vector")
    require(node.ne[2] == node.ne[3] == 1, node, "dst must be a matrix")
    if node.ne[0] != a.ne[0]:
        fail(node, f"dst ne[0]={node.ne[0]} differs from src0's {a.ne[0]}")
    if not (b.ne[0] <= a.ne[1]):
        fail(node, f"src1 names {b.ne[0]} rows, src0 has {a.ne[1]}")
    require(is_contiguous(node), node, "dst must be contiguous (ggml clears it as one block)")


@validates(Op.SOFT_MAX_BACK)
def check_soft_max_back(node: Node) -> None:
    """SOFT_MAX_BACK (ggml_soft_max_ext_back): ``dx = scale · y · (dy − y·dy)`` per row with
    dy in src0 and y in src1; F32, contiguous, same shapes; op_params: scale, max_bias (must
    be 0): raise GraphInvalid unless ggml would accept the node."""
    dy, y = src(node, 0, "gradient"), src(node, 1, "softmax output")
    no_src_beyond(node, 2)
    _all_f32(node, (node, "dst"), (dy, "src0"), (y, "src1"))
    for t, what in ((node, "dst"), (dy, "src0"), (y, "src1")):
        if not is_contiguous(t):
            fail(node, f"{what} must be contiguous")
    same_shape(node, dy, node, "dst and src0")
    same_shape(y, dy, node, "src1 and src0")
    max_bias = node.param_f32(1)
    if max_bias != 0.0:
        fail(node, f"max_bias must be 0 (ALiBi has no backward), got {max_bias}")


@validates(Op.CROSS_ENTROPY_LOSS)
def check_cross_entropy_loss(node: Node) -> None:
    """CROSS_ENTROPY_LOSS (ggml_cross_entropy_loss): ``−(1/rows) Σ src1 · log_softmax(src0)``
    into a one-element F32 dst; src0 (logits) and src1 (labels) F32 of one shape with packed
    rows: raise GraphInvalid unless ggml would accept the node."""
    a, b = src(node, 0, "logits"), src(node, 1, "labels")
    no_src_beyond(node, 2)
    _all_f32(node, (node, "dst"), (a, "src0"), (b, "src1"))
    same_shape(a, b, node, "src0 and src1")
    require(node.ne == (1, 1, 1, 1), node, "dst must be a scalar")
    require(a.ne[0] > 0, node, "rows must not be empty")


@validates(Op.CROSS_ENTROPY_LOSS_BACK)
def check_cross_entropy_loss_back(node: Node) -> None:
    """CROSS_ENTROPY_LOSS_BACK (ggml_cross_entropy_loss_back): ``(softmax(src1) − src2) ·
    src0/rows`` with src0 the loss gradient (scalar), src1 logits, src2 labels; F32,
    contiguous, same shapes: raise GraphInvalid unless ggml would accept the node."""
    g, a, b = src(node, 0, "loss gradient"), src(node, 1, "logits"), src(node, 2, "labels")
    no_src_beyond(node, 3)
    _all_f32(node, (node, "dst"), (g, "src0"), (a, "src1"), (b, "src2"))
    require(g.ne == (1, 1, 1, 1), node, "src0 must be a scalar")
    same_shape(a, b, node, "src1 and src2")
    same_shape(node, a, node, "dst and src1")
    for t, what in ((node, "dst"), (a, "src1"), (b, "src2")):
        if not is_contiguous(t):
            fail(node, f"{what} must be contiguous")
    require(a.ne[0] > 0, node, "rows must not be empty")


def _distinct_bytes(t: Node, node: Node, what: str) -> None:
    """A tensor an op writes: its elements occupy distinct bytes (the Results rule of
    spec/graph-ops.md, applied to a source written in place)."""
    payload = t.ne[0] * t.traits.type_size * t.ne[1] * t.ne[2] * t.ne[3]
    if not (payload <= t.nbytes):
        fail(node, f"{what} '{t.name}' is written in place, but its strides "
                   f"{list(t.nb)} fold elements onto the same bytes")


def _check_opt_step(node: Node, n_state: int, n_params: int) -> None:
    """The rules OPT_STEP_ADAMW (``n_state`` = 2 moments) and OPT_STEP_SGD (none) share."""
    w, grad = src(node, 0, "parameters"), src(node, 1, "gradient")
    state = [src(node, 2 + i, ("first", "second")[i] + " moment") for i in range(n_state)]
    hp = src(node, 2 + n_state, "hyper-parameters")
    no_src_beyond(node, 3 + n_state)
    written = [(w, "src0")] + [(s, f"src{2 + i}") for i, s in enumerate(state)]
    _all_f32(node, (node, "dst"), (grad, "src1"), (hp, f"src{2 + n_state}"), *written)
    require(w.flags & FLAG_PARAM, node, "src0 is not marked as trainable parameters "
                                        "(GGML_TENSOR_FLAG_PARAM)")
    for t, what in [(grad, "src1")] + written[1:]:
        same_shape(t, w, node, f"{what} and src0")
    # the node is ggml_view_tensor(src0): the step writes the parameters where src0 lies
    require(node.buffer is not None and w.buffer is not None
            and node.buffer.memory is w.buffer.memory and node.offset == w.offset
            and node.ne == w.ne and node.nb == w.nb, node,
            "dst must be a view of src0 with its address, shape and strides")
    for t, what in written:
        _distinct_bytes(t, node, what)
    operands = written + [(grad, "src1"), (hp, f"src{2 + n_state}")]
    for i, (t, what) in enumerate(written):
        for u, other in operands[i + 1:]:
            if overlaps(t, u):
                fail(node, f"{what} is written in place and must not share bytes with {other}")
    if hp.nelements != n_params:
        fail(node, f"src{2 + n_state} must hold {n_params} values, "
                   f"not {hp.nelements}")
    if not is_contiguous(hp):
        fail(node, f"src{2 + n_state} must be contiguous")


@validates(Op.OPT_STEP_ADAMW)
def check_opt_step_adamw(node: Node) -> None:
    """OPT_STEP_ADAMW (ggml_opt_step_adamw): one AdamW step written in place into the
    parameters (src0, which dst views) and the moments (src2, src3) from the gradient (src1)
    and seven F32 hyper-parameters (src4); all F32 of one shape: raise GraphInvalid unless
    ggml would accept the node."""
    _check_opt_step(node, 2, 7)


@validates(Op.OPT_STEP_SGD)
def check_opt_step_sgd(node: Node) -> None:
    """OPT_STEP_SGD (ggml_opt_step_sgd): one SGD step with weight decay written in place into
    the parameters (src0, which dst views) from the gradient (src1) and two F32
    hyper-parameters (src2); all F32 of one shape: raise GraphInvalid unless ggml would accept
    the node."""
    _check_opt_step(node, 0, 2)
