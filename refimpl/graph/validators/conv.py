"""What ggml accepts for the ops of :mod:`refimpl.kernels.conv` (validation, any device):
IM2COL, IM2COL_3D, COL2IM_1D, CONV_TRANSPOSE_1D, CONV_2D, CONV_3D, CONV_2D_DW,
CONV_TRANSPOSE_2D, POOL_1D, POOL_2D, IM2COL_BACK and POOL_2D_BACK (spec/ops/conv.md).

Every kernel of these ops checks each source coordinate it computes against the source's
shape before reading, so the stride, padding and dilation parameters cannot move a read out
of range; what is checked here is that the shapes agree with them as ggml's constructors
make them (so the work stays proportional to the tensors), and the types and layouts the
CPU backend computes.
"""

from __future__ import annotations

import numpy as np

from ..build import Node
from ..checks import (F16, F32, BF16, elementwise_strides, fail, is_contiguous, no_src_beyond,
                      require, src, type_in)
from ..ops import Op
from ..registry import validates

#: ``enum ggml_op_pool``.
POOL_MAX, POOL_AVG = 0, 1


def c_div(a: int, b: int) -> int:
    """C's integer division (truncating toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def conv_out(n: int, k: int, s: int, p: int, d: int) -> int:
    """ggml_calc_conv_output_size: positions of a k-tap window (dilation d) over n inputs
    padded by p on both sides, stride s."""
    return c_div(n + 2 * p - d * (k - 1) - 1, s) + 1


def params(node: Node, n: int) -> list[int]:
    """op_params[0:n] as signed integers."""
    return [node.param_i32(i) for i in range(n)]


def _positive(node: Node, values, what: str) -> None:
    if not all(v > 0 for v in values):
        fail(node, f"{what} {list(values)} must be positive")


def _shape(node: Node, expect) -> None:
    expect = tuple(int(x) for x in expect)
    if node.ne != expect:
        fail(node, f"dst shape must be {list(expect)}")


def _f32_image(node: Node, t: Node, what: str, types=frozenset({F32})) -> None:
    type_in(t, types, node, what)
    elementwise_strides(t, node, what)


@validates(Op.IM2COL)
def check_im2col(node: Node) -> None:
    """IM2COL (ggml_im2col): the patches of image src1 that kernel src0 (only its shape is
    read) covers, one row of IC·KH·KW values per output position; op_params s0, s1, p0, p1,
    d0, d1, is_2D; dst F32 from an F32 image or F16 from F32/F16, contiguous: raise
    GraphInvalid unless ggml would accept the node."""
    a, b = src(node, 0), src(node, 1)
    no_src_beyond(node, 2)
    s0, s1, p0, p1, d0, d1, is_2d = params(node, 7)
    if is_2d not in (0, 1):
        fail(node, f"is_2D must be 0 or 1, not {is_2d}")
    type_in(node, {F32, F16}, node, "dst")
    _f32_image(node, b, "src1", {F32} if node.type == F32 else {F32, F16})
    require(is_contiguous(node), node, "dst must be contiguous")
    if is_2d:
        _positive(node, (s0, s1), "strides")
        require(a.ne[2] == b.ne[2], node, "kernel and image channels differ")
        oh, ow = conv_out(b.ne[1], a.ne[1], s1, p1, d1), conv_out(b.ne[0], a.ne[0], s0, p0, d0)
        require(oh > 0 and ow > 0, node, "image smaller than the kernel")
        _shape(node, (a.ne[2] * a.ne[1] * a.ne[0], ow, oh, b.ne[3]))
    else:
        _positive(node, (s0,), "stride")
        require(b.ne[1] == a.ne[1] and b.ne[3] == 1, node,
                "1-D: kernel and image channels differ, or the image is 4-D")
        ow = conv_out(b.ne[0], a.ne[0], s0, p0, d0)
        require(ow > 0, node, "image smaller than the kernel")
        _shape(node, (a.ne[1] * a.ne[0], ow, b.ne[2], 1))


@validates(Op.IM2COL_3D)
def check_im2col_3d(node: Node) -> None:
    """IM2COL_3D (ggml_im2col_3d): src1 = (IW, IH, ID, ≥ N·IC) images, kernel src0 = (KW, KH,
    KD, OC·IC) (only its shape is read), dst (IC·KD·KH·KW, OW, OH, OD·N); op_params s0, s1,
    s2, p0, p1, p2, d0, d1, d2, IC; F32 image, dst F32 or F16, contiguous: raise GraphInvalid
    unless ggml would accept the node."""
    a, b = src(node, 0), src(node, 1)
    no_src_beyond(node, 2)
    s0, s1, s2, p0, p1, p2, d0, d1, d2, ic = params(node, 10)
    type_in(node, {F32, F16}, node, "dst")
    _f32_image(node, b, "src1")
    require(is_contiguous(node), node, "dst must be contiguous")
    _positive(node, (s0, s1, s2, ic), "strides and IC")   # N = src1 ne[3] / IC, rounded down
    od = conv_out(b.ne[2], a.ne[2], s2, p2, d2)
    oh = conv_out(b.ne[1], a.ne[1], s1, p1, d1)
    ow = conv_out(b.ne[0], a.ne[0], s0, p0, d0)
    require(od > 0 and oh > 0 and ow > 0, node, "image smaller than the kernel")
    _shape(node, (a.ne[0] * a.ne[1] * a.ne[2] * ic, ow, oh, od * (b.ne[3] // ic)))


@validates(Op.COL2IM_1D)
def check_col2im_1d(node: Node) -> None:
    """COL2IM_1D (ggml_col2im_1d): columns src0 = (K·OC, T_in) overlap-added into dst =
    (T_out, OC), T_out = (T_in - 1)·s0 + K - 2·p0; op_params s0, OC, p0; F32, F16 or BF16 in
    and out (one type), contiguous: raise GraphInvalid unless ggml would accept the node."""
    a = src(node, 0)
    no_src_beyond(node, 1)
    s0, oc, p0 = params(node, 3)
    type_in(a, {F32, F16, BF16}, node, "src0")
    require(node.type == a.type, node, "dst must have src0's type")
    require(a.ne[2:] == (1, 1), node, "src0 must be a matrix")
    require(is_contiguous(a) and is_contiguous(node), node, "src0 and dst must be contiguous")
    require(s0 > 0 and oc > 0 and p0 >= 0, node, "s0 and OC must be positive, p0 not negative")
    k = a.ne[0] // oc
    if not (k * oc == a.ne[0] and k > 0):
        fail(node, f"src0 ne[0]={a.ne[0]} is not K·OC for OC={oc}")
    t_out = (a.ne[1] - 1) * s0 + k - 2 * p0
    require(t_out > 0, node, "no output samples")
    _shape(node, (t_out, oc, 1, 1))


def packed(t: Node) -> bool:
    """ggml_is_contiguous: elements packed in order, the strides of dimensions of one element
    (``ne[0]`` included) aside."""
    expected = t.traits.type_size
    for n, nb in zip(t.ne, t.nb):
        if n != 1 and nb != expected:
            return False
        expected *= n
    return True


def _kernel_f32_f16(node: Node, k: Node) -> None:
    type_in(k, {F32, F16}, node, "src0 (kernel)")
    elementwise_strides(k, node, "src0 (kernel)")
    require(packed(k), node, "the kernel must be contiguous")


@validates(Op.CONV_TRANSPOSE_1D)
def check_conv_transpose_1d(node: Node) -> None:
    """CONV_TRANSPOSE_1D (ggml_conv_transpose_1d): kernel src0 = (K, OC, IC), input src1 =
    (L, IC), dst ((L - 1)·s0 + K, OC); op_params s0, p0 = 0, d0 = 1; F32 or F16 kernel, F32
    input and dst: raise GraphInvalid unless ggml would accept the node."""
    a, b = src(node, 0), src(node, 1)
    no_src_beyond(node, 2)
    s0, p0, d0 = params(node, 3)
    _kernel_f32_f16(node, a)
    _f32_image(node, b, "src1")
    type_in(node, {F32}, node, "dst")
    require(is_contiguous(node), node, "dst must be contiguous")
    require(b.ne[2:] == (1, 1) and a.ne[3] == 1 and a.ne[2] == b.ne[1], node,
            "src1 must be a matrix of src0's input channels")
    require(p0 == 0 and d0 == 1, node, "only p0 = 0 and d0 = 1")
    _positive(node, (s0,), "stride")
    _shape(node, ((b.ne[0] - 1) * s0 + a.ne[0], a.ne[1], 1, 1))


@validates(Op.CONV_TRANSPOSE_2D)
def check_conv_transpose_2d(node: Node) -> None:
    """CONV_TRANSPOSE_2D (ggml_conv_transpose_2d_p0): kernel src0 = (KW, KH, OC, IC), input
    src1 = (W, H, IC, N), dst ((W - 1)·s + KW, (H - 1)·s + KH, OC, N); op_params[0] = s; F32
    or F16 kernel, F32 input and dst: raise GraphInvalid unless ggml would accept the node."""
    a, b = src(node, 0), src(node, 1)
    no_src_beyond(node, 2)
    s = node.param_i32(0)
    _kernel_f32_f16(node, a)
    _f32_image(node, b, "src1")
    type_in(node, {F32}, node, "dst")
    require(is_contiguous(node), node, "dst must be contiguous")
    require(a.ne[3] == b.ne[2], node, "kernel and input channels differ")
    _positive(node, (s,), "stride")
    _shape(node, ((b.ne[0] - 1) * s + a.ne[0], (b.ne[1] - 1) * s + a.ne[1], a.ne[2], b.ne[3]))


@validates(Op.CONV_2D)
def check_conv_2d(node: Node) -> None:
    """CONV_2D (ggml_conv_2d_direct): kernel src0 = (KW, KH, IC, OC), image src1 = (W, H, IC,
    N), dst (OW, OH, OC, N); op_params s0, s1, p0, p1, d0, d1; F32 or F16 kernel (contiguous),
    F32 image and dst: raise GraphInvalid unless ggml would accept the node."""
    a, b = src(node, 0), src(node, 1)
    no_src_beyond(node, 2)
    s0, s1, p0, p1, d0, d1 = params(node, 6)
    _kernel_f32_f16(node, a)
    _f32_image(node, b, "src1")
    _f32_image(node, node, "dst")
    require(a.ne[2] == b.ne[2], node, "kernel and image channels differ")
    _positive(node, (s0, s1), "strides")
    _shape(node, (conv_out(b.ne[0], a.ne[0], s0, p0, d0), conv_out(b.ne[1], a.ne[1], s1, p1, d1),
                  a.ne[3], b.ne[3]))


@validates(Op.CONV_3D)
def check_conv_3d(node: Node) -> None:
    """CONV_3D (ggml_conv_3d_direct): kernel src0 = (KW, KH, KD, OC·IC), images src1 = (W,
    H, D, N·IC), dst (OW, OH, OD, N·OC); op_params s0..2, p0..2, d0..2, IC, N, OC; F32 or F16
    kernel (contiguous), F32 images and dst: raise GraphInvalid unless ggml would accept the
    node."""
    a, b = src(node, 0), src(node, 1)
    no_src_beyond(node, 2)
    s0, s1, s2, p0, p1, p2, d0, d1, d2, ic, n, oc = params(node, 12)
    _kernel_f32_f16(node, a)
    _f32_image(node, b, "src1")
    _f32_image(node, node, "dst")
    _positive(node, (s0, s1, s2, ic, n, oc), "strides, IC, N and OC")
    require(a.ne[3] == ic * oc and b.ne[3] == ic * n, node,
            "kernel ne[3] must be IC·OC and image ne[3] IC·N")
    _shape(node, (conv_out(b.ne[0], a.ne[0], s0, p0, d0), conv_out(b.ne[1], a.ne[1], s1, p1, d1),
                  conv_out(b.ne[2], a.ne[2], s2, p2, d2), oc * n))


@validates(Op.CONV_2D_DW)
def check_conv_2d_dw(node: Node) -> None:
    """CONV_2D_DW (ggml_conv_2d_dw_direct): depthwise, kernel src0 = (KW, KH, 1, C), image
    src1 = (W, H, C, N) in any layout (WHCN or channels first), dst (OW, OH, C, N); op_params
    s0, s1, p0, p1, d0, d1; F32 or F16 kernel, F32 image and dst: raise GraphInvalid unless
    ggml would accept the node."""
    a, b = src(node, 0), src(node, 1)
    no_src_beyond(node, 2)
    s0, s1, p0, p1, d0, d1 = params(node, 6)
    type_in(a, {F32, F16}, node, "src0 (kernel)")
    elementwise_strides(a, node, "src0")
    _f32_image(node, b, "src1")
    _f32_image(node, node, "dst")
    require(a.ne[2] == 1 and a.ne[3] == b.ne[2], node, "the kernel must be (KW, KH, 1, C)")
    _positive(node, (s0, s1), "strides")
    _shape(node, (conv_out(b.ne[0], a.ne[0], s0, p0, d0), conv_out(b.ne[1], a.ne[1], s1, p1, d1),
                  b.ne[2], b.ne[3]))


def pool_out(n: int, k: int, s: int, p: int) -> int:
    """ggml_calc_pool_output_size in float32 arithmetic, as ggml computes it."""
    f32 = np.float32
    return int(f32(f32(f32(n) + f32(2) * f32(p) - f32(k)) / f32(s)) + f32(1))


def _pool(node: Node) -> Node:
    a = src(node, 0)
    no_src_beyond(node, 1)
    type_in(a, {F32, F16}, node, "src0")
    type_in(node, {F32}, node, "dst")
    require(is_contiguous(a) and is_contiguous(node), node, "src0 and dst must be contiguous")
    if node.param_i32(0) not in (POOL_MAX, POOL_AVG):
        fail(node, f"unknown pooling {node.param_i32(0)}")
    return a


@validates(Op.POOL_1D)
def check_pool_1d(node: Node) -> None:
    """POOL_1D (ggml_pool_1d): max or average (over the taps inside the row) of k0 taps,
    stride s0, padding p0 along dimension 0; op_params op, k0, s0, p0; F32 or F16 in, F32
    out, contiguous: raise GraphInvalid unless ggml would accept the node."""
    a = _pool(node)
    _, k0, s0, p0 = params(node, 4)
    _positive(node, (k0, s0), "kernel and stride")
    ow = pool_out(a.ne[0], k0, s0, p0)
    require(ow > 0, node, "no output positions")
    _shape(node, (ow, *a.ne[1:]))


@validates(Op.POOL_2D)
def check_pool_2d(node: Node) -> None:
    """POOL_2D (ggml_pool_2d): max or average (over k0·k1, padding counted) of k0×k1
    windows, strides s0, s1, paddings p0, p1 (stored as integers) in dimensions 0 and 1;
    op_params op, k0, k1, s0, s1, p0, p1; F32 or F16 in, F32 out, contiguous: raise
    GraphInvalid unless ggml would accept the node."""
    a = _pool(node)
    _, k0, k1, s0, s1, p0, p1 = params(node, 7)
    _positive(node, (k0, k1, s0, s1), "kernels and strides")
    ow, oh = pool_out(a.ne[0], k0, s0, p0), pool_out(a.ne[1], k1, s1, p1)
    require(ow > 0 and oh > 0, node, "no output positions")
    _shape(node, (ow, oh, *a.ne[2:]))


@validates(Op.IM2COL_BACK)
def check_im2col_back(node: Node) -> None:
    """IM2COL_BACK (ggml_im2col_back): the image-shaped dst (W, H, IC, N), or (W, IC, N) in
    1-D, gets the sum of the patch values src0 = (IC·KH·KW, OW, OH, N) (IM2COL's layout) that
    read each position, for the kernel shape of src1; op_params as IM2COL's; F32 gradients,
    F32 or F16 kernel, F32 dst, contiguous: raise GraphInvalid unless ggml would accept the
    node."""
    g, k = src(node, 0), src(node, 1)
    no_src_beyond(node, 2)
    s0, s1, p0, p1, d0, d1, is_2d = params(node, 7)
    if is_2d not in (0, 1):
        fail(node, f"is_2D must be 0 or 1, not {is_2d}")
    type_in(g, {F32}, node, "src0")
    type_in(k, {F32, F16}, node, "src1 (kernel)")
    type_in(node, {F32}, node, "dst")
    require(is_contiguous(g) and is_contiguous(node), node, "src0 and dst must be contiguous")
    if is_2d:
        _positive(node, (s0, s1), "strides")
        iw, ih, ic, n = node.ne
        kw, kh = k.ne[0], k.ne[1]
        expect = (ic * kh * kw, conv_out(iw, kw, s0, p0, d0), conv_out(ih, kh, s1, p1, d1), n)
    else:
        _positive(node, (s0,), "stride")
        iw, ic, n, one = node.ne
        require(one == 1, node, "1-D: dst must be (W, IC, N)")
        kw = k.ne[0]
        expect = (ic * kw, conv_out(iw, kw, s0, p0, d0), n, 1)
    require(expect[1] > 0 and expect[2] > 0, node, "image smaller than the kernel")
    if g.ne != tuple(expect):
        fail(node, f"src0 shape must be {list(expect)}")


@validates(Op.POOL_2D_BACK)
def check_pool_2d_back(node: Node) -> None:
    """POOL_2D_BACK (ggml_pool_2d_back): the gradient src0 of a POOL_2D output passed back to
    its input's shape (dst, of the forward input src1's shape): to each window's first
    maximum of src1 (max), or spread over the window's taps inside (average, divided by
    k0·k1); op_params as POOL_2D's; F32 gradient, dst and src1 F32 (or both F16 for max),
    contiguous: raise GraphInvalid unless ggml would accept the node (F16 averages are
    refused: ggml-cpu adds their bit patterns as integers)."""
    g, af = src(node, 0), src(node, 1)
    no_src_beyond(node, 2)
    op, k0, k1, s0, s1, p0, p1 = params(node, 7)
    if op not in (POOL_MAX, POOL_AVG):
        fail(node, f"unknown pooling {op}")
    type_in(g, {F32}, node, "src0")
    type_in(node, {F32, F16} if op == POOL_MAX else {F32}, node, "dst")
    require(af.type == node.type, node, "src1 must have dst's type")
    for t, what in ((g, "src0"), (af, "src1"), (node, "dst")):
        if not is_contiguous(t):
            fail(node, f"{what} must be contiguous")
    require(node.ne == af.ne, node, "dst must have src1's shape")
    require(g.ne[2:] == node.ne[2:], node, "src0 and dst must share ne[2] and ne[3]")
    _positive(node, (k0, k1, s0, s1), "kernels and strides")
