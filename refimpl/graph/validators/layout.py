"""What ggml accepts for the ops of :mod:`refimpl.kernels.layout` (validation, any device):
REPEAT, REPEAT_BACK, CONCAT, PAD, PAD_REFLECT_1D, ROLL, UPSCALE, WIN_PART, WIN_UNPART,
GET_REL_POS and ADD_REL_POS (spec/ops/layout.md)."""

from __future__ import annotations

from ...protocol.ggml_types import GgmlType
from ..build import Node
from ..checks import (F16, F32, BF16, I32, block_rows, can_repeat, elementwise_strides, fail,
                      is_contiguous, no_src_beyond, require, src, type_in)
from ..ops import Op
from ..registry import validates

#: The plain element types (read element by element); every other type is a block format.
PLAIN = {F32, F16, BF16, I32, GgmlType.I8, GgmlType.I16, GgmlType.I64, GgmlType.F64}
#: REPEAT's types in ggml-cpu (its 4- and 2-byte copy loops).
REPEAT_TYPES = {F32, I32, F16, BF16, GgmlType.I16}

#: ``enum ggml_scale_mode`` and its flags (UPSCALE's op_params[0]).
SCALE_NEAREST, SCALE_BILINEAR, SCALE_BICUBIC = 0, 1, 2
SCALE_ALIGN_CORNERS, SCALE_ANTIALIAS = 1 << 8, 1 << 9


def _unary(node: Node, types) -> Node:
    """src0 (the only source) of a plain type in ``types``, dst of the same type; both read
    and written element by element."""
    a = src(node, 0)
    no_src_beyond(node, 1)
    type_in(a, types, node, "src0")
    require(node.type == a.type, node, "dst must have src0's type")
    elementwise_strides(a, node, "src0")
    elementwise_strides(node, node, "dst")
    return a


@validates(Op.REPEAT)
def check_repeat(node: Node) -> None:
    """REPEAT (ggml_repeat): dst tiles src0, whose every dimension divides dst's; F32, I32,
    F16, BF16, I16 with packed rows (ggml-cpu asserts nb[0]): raise GraphInvalid unless ggml
    would accept the node."""
    a = _unary(node, REPEAT_TYPES)
    if not can_repeat(a, node):
        fail(node, f"src0 {list(a.ne)} does not tile dst {list(node.ne)}")
    for t, what in ((a, "src0"), (node, "dst")):
        if t.nb[0] != t.traits.type_size:
            fail(node, f"{what} rows must be packed (nb[0])")


@validates(Op.REPEAT_BACK)
def check_repeat_back(node: Node) -> None:
    """REPEAT_BACK (ggml_repeat_back): dst is src0 summed over its tiles of dst's shape; F32
    with packed rows: raise GraphInvalid unless ggml would accept the node."""
    a = _unary(node, {F32})
    if not can_repeat(node, a):
        fail(node, f"dst {list(node.ne)} does not tile src0 {list(a.ne)}")
    for t, what in ((a, "src0"), (node, "dst")):
        if t.nb[0] != 4:
            fail(node, f"{what} rows must be packed (nb[0])")


@validates(Op.CONCAT)
def check_concat(node: Node) -> None:
    """CONCAT (ggml_concat): src0 then src1 along dimension op_params[0]; any type, both
    sources and dst of one type; block types need packed rows (and whole blocks when joined
    along dimension 0): raise GraphInvalid unless ggml would accept the node."""
    a, b = src(node, 0), src(node, 1)
    no_src_beyond(node, 2)
    dim = node.param_i32(0)
    if not (0 <= dim < 4):
        fail(node, f"dimension {dim} is not 0..3")
    require(a.type == b.type == node.type, node, "src0, src1 and dst must share one type")
    for d in range(4):
        want = a.ne[d] + b.ne[d] if d == dim else a.ne[d]
        if not (d == dim or a.ne[d] == b.ne[d]):
            fail(node, f"src0 {list(a.ne)} and src1 {list(b.ne)} differ outside dimension {dim}")
        if node.ne[d] != want:
            fail(node, f"dst ne[{d}] must be {want}")
    check = elementwise_strides if a.type in PLAIN else block_rows
    for t, what in ((a, "src0"), (b, "src1"), (node, "dst")):
        check(t, node, what)


def pad_params(node: Node) -> list[int]:
    """PAD's ``[lp0, rp0, lp1, rp1, lp2, rp2, lp3, rp3]`` (op_params 0..7)."""
    return [node.param_i32(i) for i in range(8)]


@validates(Op.PAD)
def check_pad(node: Node) -> None:
    """PAD (ggml_pad_ext): src0 with lp_d zeros before and rp_d after it in each dimension d
    (op_params 0..7), or with op_params[8] != 0 the source repeated around (circular); F32
    only: raise GraphInvalid unless ggml would accept the node."""
    a = _unary(node, {F32})
    p = pad_params(node)
    circular = node.param_i32(8) != 0
    for d in range(4):
        lp, rp = p[2 * d], p[2 * d + 1]
        if not (lp >= 0 and rp >= 0):
            fail(node, f"negative padding in dimension {d}")
        if node.ne[d] != a.ne[d] + lp + rp:
            fail(node, f"dst ne[{d}] must be {a.ne[d] + lp + rp}")
        # circular: ggml-cpu wraps one period back, more would read before the source
        if circular and not (a.ne[d] > 0 and lp <= a.ne[d]):
            fail(node, f"circular padding {lp} exceeds the source's {a.ne[d]} in dimension {d}")


@validates(Op.PAD_REFLECT_1D)
def check_pad_reflect_1d(node: Node) -> None:
    """PAD_REFLECT_1D (ggml_pad_reflect_1d): each row mirrored p0 = op_params[0] values to the
    left and p1 = op_params[1] to the right, without repeating the edge; both shorter than the
    row; F32, contiguous src0: raise GraphInvalid unless ggml would accept the node."""
    a = _unary(node, {F32})
    p0, p1 = node.param_i32(0), node.param_i32(1)
    if not (0 <= p0 < a.ne[0] and 0 <= p1 < a.ne[0]):
        fail(node, f"padding ({p0}, {p1}) must be non-negative and shorter than the row "
                   f"({a.ne[0]})")
    require(is_contiguous(a), node, "src0 must be contiguous")
    expect = (a.ne[0] + p0 + p1, *a.ne[1:])
    if node.ne != expect:
        fail(node, f"dst shape must be {list(expect)}")


@validates(Op.ROLL)
def check_roll(node: Node) -> None:
    """ROLL (ggml_roll): src0 rotated by op_params[d] places along each dimension d, every
    |shift| below the dimension; F32, packed rows: raise GraphInvalid unless ggml would
    accept the node."""
    a = _unary(node, {F32})
    require(node.ne == a.ne, node, "dst must have src0's shape")
    require(a.nb[0] == 4 and node.nb[0] == 4, node, "rows must be packed (nb[0])")
    for d in range(4):
        s = node.param_i32(d)
        if not (abs(s) < a.ne[d]):
            fail(node, f"shift {s} is not shorter than ne[{d}]={a.ne[d]}")


@validates(Op.UPSCALE)
def check_upscale(node: Node) -> None:
    """UPSCALE (ggml_interpolate): src0 resampled to dst's shape; op_params[0] is the mode
    (nearest, bilinear, bicubic) in its low byte with the flags align-corners (bit 8) and
    antialias (bit 9, bilinear only); F32: raise GraphInvalid unless ggml would accept the
    node."""
    a = _unary(node, {F32})
    flags = node.param_i32(0)
    mode = flags & 0xFF
    if mode not in (SCALE_NEAREST, SCALE_BILINEAR, SCALE_BICUBIC):
        fail(node, f"unknown scale mode {mode}")
    require(not flags & SCALE_ANTIALIAS or mode == SCALE_BILINEAR, node,
            "antialias is only defined for bilinear scaling")
    require(node.nelements == 0 or a.nelements > 0, node, "an empty source cannot be scaled up")


def window_counts(w: int, width: int, height: int) -> tuple[int, int]:
    """How many w×w windows cover a width×height image, padded at the right and bottom."""
    return (width + (w - width % w) % w) // w, (height + (w - height % w) % w) // w


@validates(Op.WIN_PART)
def check_win_part(node: Node) -> None:
    """WIN_PART (ggml_win_part): a (C, W, H) image cut into w×w windows, zero-padded at the
    right and bottom: dst (C, w, w, npx·npy), op_params npx, npy, w; F32, contiguous (the CPU
    kernel indexes both tensors as packed): raise GraphInvalid unless ggml would accept the
    node."""
    a = _unary(node, {F32})
    npx, npy, w = (node.param_i32(i) for i in range(3))
    require(a.ne[3] == 1, node, "src0 must be 3-D")
    if not (w > 0):
        fail(node, f"window size {w} must be positive")
    if (npx, npy) != window_counts(w, a.ne[1], a.ne[2]):
        fail(node, f"window counts ({npx}, {npy}) do not match the image and w={w}")
    expect = (a.ne[0], w, w, npx * npy)
    if node.ne != expect:
        fail(node, f"dst shape must be {list(expect)}")
    require(is_contiguous(a) and is_contiguous(node), node, "src0 and dst must be contiguous")


@validates(Op.WIN_UNPART)
def check_win_unpart(node: Node) -> None:
    """WIN_UNPART (ggml_win_unpart): the (C, W, H) image dst put back together from the w×w
    windows src0 (C, w, w, npx·npy), padding dropped; op_params[0] = w; F32, contiguous:
    raise GraphInvalid unless ggml would accept the node."""
    a = _unary(node, {F32})
    w = node.param_i32(0)
    if not (w > 0):
        fail(node, f"window size {w} must be positive")
    require(node.ne[3] == 1, node, "dst must be 3-D")
    npx, npy = window_counts(w, node.ne[1], node.ne[2])
    expect = (node.ne[0], w, w, npx * npy)
    if a.ne != expect:
        fail(node, f"src0 shape must be {list(expect)} for this dst")
    require(is_contiguous(a) and is_contiguous(node), node, "src0 and dst must be contiguous")


@validates(Op.GET_REL_POS)
def check_get_rel_pos(node: Node) -> None:
    """GET_REL_POS (ggml_get_rel_pos): dst[q, k, :] = src0[q - k + (n - 1), :] for the n
    query and key positions (dst (C, n, n)) from a table src0 of 2n - 1 rows (C, 2n - 1); F16,
    contiguous: raise GraphInvalid unless ggml would accept the node (BF16 tables are
    refused: ggml-cpu copies their bits into the F16 result)."""
    a = _unary(node, {F16})
    n = node.ne[1]
    require(node.ne[2] == n and node.ne[3] == 1, node, "dst must be (C, n, n)")
    expect = (node.ne[0], 2 * n - 1, 1, 1)
    if a.ne != expect:
        fail(node, f"src0 must be {list(expect)}")
    require(is_contiguous(a) and is_contiguous(node), node, "src0 and dst must be contiguous")


@validates(Op.ADD_REL_POS)
def check_add_rel_pos(node: Node) -> None:
    """ADD_REL_POS (ggml_add_rel_pos): attention scores src0 (n·n, Q, B) plus relative
    position terms: dst[b, q, i, j] = src0[b, q, i, j] + src2[b, q, i] + src1[b, q, j] for
    src1 = src2 = (n, Q1, Q2, B) with Q = Q1·Q2; op_params[0] = 1 when dst is src0 itself;
    F32, contiguous, 3-D scores: raise GraphInvalid unless ggml would accept the node."""
    a, pw, ph = src(node, 0), src(node, 1), src(node, 2)
    no_src_beyond(node, 3)
    for t, what in ((node, "dst"), (a, "src0"), (pw, "src1"), (ph, "src2")):
        type_in(t, {F32}, node, what)
        if not is_contiguous(t):
            fail(node, f"{what} must be contiguous")
    require(pw.ne == ph.ne, node, "src1 and src2 must have one shape")
    require(a.ne[3] == 1 and pw.ne[3] == a.ne[2], node, "src0 must be 3-D, with src1's ne[3] blocks")
    require(pw.ne[0] * pw.ne[0] == a.ne[0] and pw.ne[1] * pw.ne[2] == a.ne[1], node,
            "src0 must be (n·n, Q1·Q2) for src1 (n, Q1, Q2)")
    require(node.ne == a.ne, node, "dst must have src0's shape")
