"""What ggml accepts for the ops of :mod:`refimpl.kernels.flash_attn` (validation, any device)."""

from __future__ import annotations

from ..build import Node
from ..checks import (
    BF16,
    F16,
    F32,
    block_rows,
    elementwise_strides,
    fail,
    is_contiguous,
    no_src_beyond,
    require,
    src,
    type_in,
)
from ..ops import Op
from ..registry import validates
from .types import ATTENTION_BLOCK_TYPES

PREC_DEFAULT, PREC_F32 = 0, 10
#: K and V types: floats, the block formats of a quantised KV cache, Q1_0 and Q2_0.
_KV_TYPES = {F32, F16, BF16} | ATTENTION_BLOCK_TYPES


def _divides(d: int, n: int) -> bool:
    return d > 0 and n % d == 0


@validates(Op.FLASH_ATTN_EXT)
def check_flash_attn_ext(node: Node) -> None:
    """FLASH_ATTN_EXT (ggml_flash_attn_ext) with F32, F16, BF16 or quantised (Q8_0, Q4_0,
    Q4_1, Q5_0, Q5_1, IQ4_NL) K and V: raise GraphInvalid unless ggml would accept the node."""
    q, k, v = src(node, 0, "q"), src(node, 1, "k"), src(node, 2, "v")
    no_src_beyond(node, 5)
    type_in(node, {F32}, node, "dst")
    type_in(q, {F32}, node, "q")
    type_in(k, _KV_TYPES, node, "k")
    type_in(v, _KV_TYPES, node, "v")
    for t, what in ((node, "dst"), (q, "q"), (k, "k"), (v, "v")):
        block_rows(t, node, what)        # packed rows; plain types: element-aligned strides
        if t.ne[0] % t.traits.block_size != 0:
            fail(node, f"{what} rows of {t.ne[0]} values are not whole {t.traits.name} blocks")
    require(is_contiguous(node), node, "dst must be contiguous")
    dk, dv, nkv = k.ne[0], v.ne[0], k.ne[1]
    if q.ne[0] != dk:
        fail(node, f"q head size {q.ne[0]} differs from k head size {dk}")
    if v.ne[1] != nkv:
        fail(node, f"v has {v.ne[1]} rows, k has {nkv}")
    if not (q.ne[3] == k.ne[3] == v.ne[3]):
        fail(node, f"q, k and v differ in ne[3] ({q.ne[3]}, {k.ne[3]}, {v.ne[3]})")
    if not _divides(k.ne[2], q.ne[2]):
        fail(node, f"k heads {k.ne[2]} do not divide q heads {q.ne[2]}")
    if not _divides(v.ne[2], q.ne[2]):
        fail(node, f"v heads {v.ne[2]} do not divide q heads {q.ne[2]}")
    expect = (dv, q.ne[2], q.ne[1], q.ne[3])
    if node.ne != expect:
        fail(node, f"dst shape {list(node.ne)}, expected {list(expect)}")
    mask = node.src[3] if len(node.src) > 3 else None
    if mask is not None:
        mask = src(node, 3, "mask")
        type_in(mask, {F16}, node, "mask")
        elementwise_strides(mask, node, "mask")
        require(is_contiguous(mask), node, "mask must be contiguous")
        if not (mask.ne[0] >= nkv):
            fail(node, f"mask ne[0]={mask.ne[0]} is shorter than n_kv={nkv}")
        if not (mask.ne[1] >= q.ne[1]):
            fail(node, f"mask has {mask.ne[1]} rows, q has {q.ne[1]}")
        for d in (2, 3):
            if not _divides(mask.ne[d], q.ne[d]):
                fail(node, f"mask ne[{d}]={mask.ne[d]} does not divide q ne[{d}]={q.ne[d]}")
    if node.param_f32(1) > 0.0 and mask is None:
        fail(node, "ALiBi (max_bias > 0) needs a mask")
    sinks = node.src[4] if len(node.src) > 4 else None
    if sinks is not None:
        sinks = src(node, 4, "sinks")
        type_in(sinks, {F32}, node, "sinks")
        elementwise_strides(sinks, node, "sinks")
        if sinks.ne[0] != q.ne[2]:
            fail(node, f"sinks ne[0]={sinks.ne[0]} differs from the "
                       f"number of heads {q.ne[2]}")
    prec = node.param_i32(3)
    if prec not in (PREC_DEFAULT, PREC_F32):
        fail(node, f"precision {prec} is not 0 (default) or 10 (f32)")
    if not (node.param_i32(4) >= 0):
        fail(node, f"n_kv_max={node.param_i32(4)} is negative")
