"""IM2COL, IM2COL_3D, COL2IM_1D, CONV_2D, CONV_3D, CONV_2D_DW, CONV_TRANSPOSE_1D/2D,
POOL_1D/2D, IM2COL_BACK and POOL_2D_BACK against numpy oracles written from ggml-cpu's
definitions (refimpl.kernels.conv), and refusal of nodes ggml would not build
(spec/ops/conv.md)."""

from __future__ import annotations

import numpy as np
import pytest

from refimpl.graph import GraphInvalid, Op
from refimpl.graph.validators.conv import POOL_AVG, POOL_MAX, conv_out
from refimpl.kernels import conv as C
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder

RNG = np.random.default_rng(11)
TOL = dict(rtol=2e-5, atol=2e-5)


def _vals(shape):
    return RNG.uniform(-1, 1, shape).astype(np.float32)


def _f16(x):
    return x.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("dst", [T.F32, T.F16])
def test_im2col_2d(dst):
    g = GraphBuilder(1 << 22)
    n, ic, h, w, kh, kw = 2, 3, 7, 9, 3, 2
    s, p, d = (2, 1), (1, 2), (1, 2)
    x = _vals((n, ic, h, w))
    kern = g.input(T.F16, (kw, kh, ic, 4))
    img = g.input(T.F32, (w, h, ic, n), x)
    oh, ow = conv_out(h, kh, s[1], p[1], d[1]), conv_out(w, kw, s[0], p[0], d[0])
    out = g.node(Op.IM2COL, dst, (ic * kh * kw, ow, oh, n), [kern, img],
                 params=[s[0], s[1], p[0], p[1], d[0], d[1], 1])
    g.run()
    expect = C.reference_im2col(x[:, :, None], (1, kh, kw), s + (1,), p + (0,), d + (1,))[:, 0]
    if dst == T.F16:
        expect = _f16(expect.astype(np.float32))
    np.testing.assert_array_equal(g.read(out), expect)


def test_im2col_1d_of_f16_image():
    g = GraphBuilder(1 << 20)
    n, ic, w, kw = 2, 3, 11, 3
    x = _f16(_vals((n, ic, w)))
    kern = g.input(T.F32, (kw, ic, 5))
    img = g.input(T.F16, (w, ic, n), x)
    ow = conv_out(w, kw, 2, 1, 1)
    out = g.node(Op.IM2COL, T.F16, (ic * kw, ow, n), [kern, img], params=[2, 0, 1, 0, 1, 0, 0])
    g.run()
    expect = C.reference_im2col(x[:, :, None, None], (1, 1, kw), (2, 1, 1), (1, 0, 0), (1, 1, 1))
    np.testing.assert_array_equal(g.read(out)[0], expect[:, 0, 0])


def test_im2col_3d():
    g = GraphBuilder(1 << 22)
    n, ic, dd, h, w, k = 2, 2, 4, 5, 6, (2, 3, 2)
    s, p, d = (1, 2, 1), (1, 0, 1), (2, 1, 1)
    x = _vals((n * ic, dd, h, w))
    kern = g.input(T.F32, (k[2], k[1], k[0], 3 * ic))
    img = g.input(T.F32, (w, h, dd, n * ic), x)
    od = conv_out(dd, k[0], s[2], p[2], d[2])
    oh, ow = conv_out(h, k[1], s[1], p[1], d[1]), conv_out(w, k[2], s[0], p[0], d[0])
    out = g.node(Op.IM2COL_3D, T.F32, (ic * k[0] * k[1] * k[2], ow, oh, od * n), [kern, img],
                 params=[*s, *p, *d, ic])
    g.run()
    expect = C.reference_im2col(x.reshape(n, ic, dd, h, w), k, s, p, d)
    np.testing.assert_array_equal(g.read(out).reshape(expect.shape), expect)


@pytest.mark.parametrize("ktype", [T.F32, T.F16])
def test_conv_2d(ktype):
    g = GraphBuilder(1 << 22)
    n, ic, oc, h, w, kh, kw = 2, 3, 4, 8, 7, 3, 3
    x, wk = _vals((n, ic, h, w)), _vals((oc, ic, kh, kw))
    if ktype == T.F16:
        wk = _f16(wk)
    kern = g.input(ktype, (kw, kh, ic, oc), wk)
    img = g.input(T.F32, (w, h, ic, n), x)
    s, p, d = (1, 2), (1, 0), (2, 1)
    oh, ow = conv_out(h, kh, s[1], p[1], d[1]), conv_out(w, kw, s[0], p[0], d[0])
    out = g.node(Op.CONV_2D, T.F32, (ow, oh, oc, n), [kern, img], params=[*s, *p, *d])
    g.run()
    xs = _f16(x) if ktype == T.F16 else x   # ggml-cpu rounds the patches to the kernel type
    expect = C.reference_conv(xs[:, :, None], wk[:, :, None], s + (1,), p + (0,), d + (1,))
    np.testing.assert_allclose(g.read(out), expect[:, :, 0], **TOL)


def test_conv_3d():
    g = GraphBuilder(1 << 22)
    n, ic, oc, dd, h, w, k = 2, 2, 3, 4, 5, 6, (2, 2, 3)
    x, wk = _vals((n * ic, dd, h, w)), _vals((oc * ic, *k))
    kern = g.input(T.F32, (k[2], k[1], k[0], oc * ic), wk)
    img = g.input(T.F32, (w, h, dd, n * ic), x)
    s, p, d = (2, 1, 1), (1, 0, 1), (1, 1, 2)
    od = conv_out(dd, k[0], s[2], p[2], d[2])
    oh, ow = conv_out(h, k[1], s[1], p[1], d[1]), conv_out(w, k[2], s[0], p[0], d[0])
    out = g.node(Op.CONV_3D, T.F32, (ow, oh, od, n * oc), [kern, img],
                 params=[*s, *p, *d, ic, n, oc])
    g.run()
    expect = C.reference_conv(x.reshape(n, ic, dd, h, w), wk.reshape(oc, ic, *k), s, p, d)
    np.testing.assert_allclose(g.read(out), expect.reshape(n * oc, od, oh, ow), **TOL)


@pytest.mark.parametrize("cwhn", [False, True])
def test_conv_2d_dw(cwhn):
    g = GraphBuilder(1 << 22)
    n, c, h, w = 2, 5, 9, 8
    x, wk = _vals((n, c, h, w)), _f16(_vals((c, 1, 3, 3)))
    kern = g.input(T.F16, (3, 3, 1, c), wk)
    if cwhn:   # channels innermost in memory, seen through a permuted view as (W, H, C, N)
        base = g.input(T.F32, (c, w, h, n), x.transpose(0, 2, 3, 1))
        img = g.view(base, (w, h, c, n), (4 * c, 4 * c * w, 4, 4 * c * w * h), op=Op.PERMUTE)
    else:
        img = g.input(T.F32, (w, h, c, n), x)
    oh, ow = conv_out(h, 3, 2, 1, 1), conv_out(w, 3, 1, 1, 2)
    out = g.node(Op.CONV_2D_DW, T.F32, (ow, oh, c, n), [kern, img], params=[1, 2, 1, 1, 2, 1])
    g.run()
    expect = np.stack([C.reference_conv(x[:, i:i + 1, None], wk[i:i + 1, :, None], (1, 2, 1),
                                        (1, 1, 0), (2, 1, 1))[:, 0, 0] for i in range(c)], 1)
    np.testing.assert_allclose(g.read(out), expect, **TOL)


@pytest.mark.parametrize("ktype", [T.F32, T.F16])
def test_conv_transpose_1d(ktype):
    g = GraphBuilder(1 << 20)
    ic, oc, k, length, s = 3, 2, 4, 5, 3
    x, wk = _vals((ic, length)), _f16(_vals((ic, oc, k)))
    kern = g.input(ktype, (k, oc, ic), wk)
    img = g.input(T.F32, (length, ic), x)
    out = g.node(Op.CONV_TRANSPOSE_1D, T.F32, ((length - 1) * s + k, oc), [kern, img],
                 params=[s, 0, 1])
    g.run()
    xs = _f16(x) if ktype == T.F16 else x
    expect = C.reference_conv_transpose(xs[None, :, None], wk[:, :, None], s)[0, :, 0]
    np.testing.assert_allclose(g.read(out)[0, 0], expect, **TOL)


@pytest.mark.parametrize("ktype", [T.F32, T.F16])
def test_conv_transpose_2d(ktype):
    g = GraphBuilder(1 << 22)
    n, ic, oc, h, w, kh, kw, s = 2, 3, 2, 4, 5, 3, 2, 2
    x, wk = _vals((n, ic, h, w)), _f16(_vals((ic, oc, kh, kw)))
    kern = g.input(ktype, (kw, kh, oc, ic), wk)
    img = g.input(T.F32, (w, h, ic, n), x)
    out = g.node(Op.CONV_TRANSPOSE_2D, T.F32, ((w - 1) * s + kw, (h - 1) * s + kh, oc, n),
                 [kern, img], params=[s])
    g.run()
    xs = _f16(x) if ktype == T.F16 else x
    np.testing.assert_allclose(g.read(out), C.reference_conv_transpose(xs, wk, s), **TOL)


@pytest.mark.parametrize("op", [POOL_MAX, POOL_AVG])
@pytest.mark.parametrize("type_", [T.F32, T.F16])
def test_pool_1d(op, type_):
    g = GraphBuilder(1 << 20)
    x = _f16(_vals((2, 3, 4, 10)))
    a = g.input(type_, (10, 4, 3, 2), x)
    k, s, p = 3, 2, 2
    ow = (10 + 2 * p - k) // s + 1
    out = g.node(Op.POOL_1D, T.F32, (ow, 4, 3, 2), [a], params=[op, k, s, p])
    g.run()
    expect = C.reference_pool(x[..., None, :].reshape(2, 12, 1, 10), op == POOL_AVG, (k, 1),
                              (s, 1), (p, 0), (1, ow), True).reshape(2, 3, 4, ow)
    np.testing.assert_allclose(g.read(out), expect, **TOL)


@pytest.mark.parametrize("op", [POOL_MAX, POOL_AVG])
def test_pool_2d(op):
    g = GraphBuilder(1 << 20)
    x = _vals((2, 3, 9, 10))
    a = g.input(T.F32, (10, 9, 3, 2), x)
    k, s, p = (3, 2), (2, 1), (1, 1)
    ow, oh = (10 + 2 - 3) // 2 + 1, (9 + 2 - 2) // 1 + 1
    out = g.node(Op.POOL_2D, T.F32, (ow, oh, 3, 2), [a], params=[op, *k, *s, *p])
    g.run()
    np.testing.assert_allclose(g.read(out), C.reference_pool(x, op == POOL_AVG, k, s, p, (oh, ow),
                                                             False), **TOL)


@pytest.mark.parametrize("type_", [T.F32, T.F16, T.BF16])
def test_col2im_1d(type_):
    g = GraphBuilder(1 << 20)
    k, oc, t_in, s, p = 5, 3, 7, 2, 1
    col = _f16(_vals((t_in, k * oc)))
    a = g.input(type_, (k * oc, t_in), col)
    t_out = (t_in - 1) * s + k - 2 * p
    out = g.node(Op.COL2IM_1D, type_, (t_out, oc), [a], params=[s, oc, p])
    g.run()
    tol = {T.F32: 1e-5, T.F16: 2e-3, T.BF16: 1e-2}[type_]
    np.testing.assert_allclose(g.read(out)[0, 0], C.reference_col2im_1d(col, oc, s, p), rtol=tol,
                               atol=tol)


@pytest.mark.parametrize("is_2d", [0, 1])
def test_im2col_back(is_2d):
    g = GraphBuilder(1 << 22)
    n, ic, h, w, kh, kw = 2, 3, (6 if is_2d else 1), 9, (2 if is_2d else 1), 3
    s, p, d = (2, 1 if is_2d else 1), (1, 1 if is_2d else 0), (1, 2 if is_2d else 1)
    oh, ow = conv_out(h, kh, s[1], p[1], d[1]), conv_out(w, kw, s[0], p[0], d[0])
    grad = _vals((n, oh, ow, ic * kh * kw))
    gin = g.input(T.F32, (ic * kh * kw, ow, oh, n) if is_2d else (ic * kw, ow, n), grad)
    kern = g.input(T.F16, (kw, kh, ic, 1) if is_2d else (kw, ic, 1))
    ne = (w, h, ic, n) if is_2d else (w, ic, n)
    out = g.node(Op.IM2COL_BACK, T.F32, ne, [gin, kern],
                 params=[s[0], s[1] if is_2d else 0, p[0], p[1] if is_2d else 0, d[0],
                         d[1] if is_2d else 0, is_2d])
    g.run()
    expect = C.reference_im2col_back(grad, (n, ic, h, w), (kh, kw), s, p, d)
    np.testing.assert_allclose(g.read(out).reshape(expect.shape), expect, **TOL)


@pytest.mark.parametrize("op,type_", [(POOL_MAX, T.F32), (POOL_AVG, T.F32), (POOL_MAX, T.F16)])
def test_pool_2d_back(op, type_):
    g = GraphBuilder(1 << 20)
    fwd = _f16(_vals((2, 3, 7, 8)))
    k, s, p = (3, 2), (2, 2), (1, 0)
    ow, oh = (8 + 2 - 3) // 2 + 1, (7 + 0 - 2) // 2 + 1
    grad = _vals((2, 3, oh, ow))
    gin, af = g.input(T.F32, (ow, oh, 3, 2), grad), g.input(type_, (8, 7, 3, 2), fwd)
    out = g.node(Op.POOL_2D_BACK, type_, (8, 7, 3, 2), [gin, af], params=[op, *k, *s, *p])
    g.run()
    expect = C.reference_pool_2d_back(grad, fwd, op == POOL_AVG, k, s, p)
    tol = 2e-3 if type_ == T.F16 else 2e-5
    np.testing.assert_allclose(g.read(out), expect, rtol=tol, atol=tol)


_REFUSALS = {
    "im2col dst bf16": (Op.IM2COL, T.BF16, [(3, 3, 2, 4), (8, 8, 2, 1)], (18, 6, 6, 1),
                        [1, 1, 0, 0, 1, 1, 1]),
    "im2col wrong shape": (Op.IM2COL, T.F32, [(3, 3, 2, 4), (8, 8, 2, 1)], (18, 6, 5, 1),
                           [1, 1, 0, 0, 1, 1, 1]),
    "im2col zero stride": (Op.IM2COL, T.F32, [(3, 3, 2, 4), (8, 8, 2, 1)], (18, 6, 6, 1),
                           [0, 1, 0, 0, 1, 1, 1]),
    "conv_2d channels": (Op.CONV_2D, T.F32, [(3, 3, 3, 4), (8, 8, 2, 1)], (6, 6, 4, 1),
                         [1, 1, 0, 0, 1, 1]),
    "conv_2d q8 kernel": (Op.CONV_2D, T.F32, [(32, 1, 2, 4), (40, 8, 2, 1)], (9, 8, 4, 1),
                          [1, 1, 0, 0, 1, 1]),
    "conv_3d counts": (Op.CONV_3D, T.F32, [(2, 2, 2, 6), (4, 4, 4, 4)], (3, 3, 3, 6),
                       [1, 1, 1, 0, 0, 0, 1, 1, 1, 2, 2, 4]),
    "conv_2d_dw kernel": (Op.CONV_2D_DW, T.F32, [(3, 3, 2, 4), (8, 8, 4, 1)], (6, 6, 4, 1),
                          [1, 1, 0, 0, 1, 1]),
    "conv_transpose_1d padding": (Op.CONV_TRANSPOSE_1D, T.F32, [(3, 2, 4), (5, 4)], (7, 2),
                                  [1, 1, 1]),
    "conv_transpose_2d shape": (Op.CONV_TRANSPOSE_2D, T.F32, [(3, 3, 2, 4), (5, 5, 4, 1)],
                                (12, 11, 2, 1), [2]),
    "pool_1d op": (Op.POOL_1D, T.F32, [(10, 2)], (8, 2), [2, 3, 1, 0]),
    "pool_2d shape": (Op.POOL_2D, T.F32, [(10, 10, 2)], (8, 7, 2), [0, 3, 3, 1, 1, 0, 0]),
    "col2im oc": (Op.COL2IM_1D, T.F32, [(10, 4)], (11, 3), [2, 3, 0]),
    "im2col_back shape": (Op.IM2COL_BACK, T.F32, [(6, 6, 2), (3, 2, 1)], (9, 2, 2), [1, 0, 0, 0,
                                                                                    1, 0, 0]),
    "pool_2d_back f16 avg": (Op.POOL_2D_BACK, T.F16, [(4, 4, 2), (8, 8, 2)], (8, 8, 2),
                             [1, 2, 2, 2, 2, 0, 0]),
}


@pytest.mark.parametrize("case", list(_REFUSALS))
def test_invalid_nodes_are_refused(case):
    op, type_, srcs, ne, params = _REFUSALS[case]
    g = GraphBuilder(1 << 20)
    types = {"conv_2d q8 kernel": [T.Q8_0, T.F32], "pool_2d_back f16 avg": [T.F32, T.F16]}
    ins = [g.input(types.get(case, [T.F32, T.F32])[i], s) for i, s in enumerate(srcs)]
    g.node(op, type_, ne, ins, params=params)
    with pytest.raises(GraphInvalid):
        g.compile()


def test_conv_2d_takes_a_kernel_ggml_sees_as_contiguous():
    """A 1×1 kernel seen through a channels-first view: its ne[0] = 1 stride is not 4, and
    ggml_is_contiguous (so ggml-cpu) accepts it all the same."""
    g = GraphBuilder(1 << 20)
    ic, oc = 3, 4
    wk = _vals((oc, ic))
    base = g.input(T.F32, (ic, 1, 1, oc), wk.reshape(oc, 1, 1, ic))
    kern = g.view(base, (1, 1, ic, oc), (4 * ic, 4 * ic, 4, 4 * ic), op=Op.PERMUTE)
    x = _vals((2, ic, 5, 6))
    img = g.input(T.F32, (6, 5, ic, 2), x)
    out = g.node(Op.CONV_2D, T.F32, (6, 5, oc, 2), [kern, img], params=[1, 1, 0, 0, 1, 1])
    g.run()
    np.testing.assert_allclose(g.read(out), np.einsum("oi,nihw->nohw", wk, x), **TOL)


def test_im2col_3d_batch_rounds_down():
    """N = src1 ne[3] / IC rounded down, as ggml_im2col_3d computes it: one image of IC = 2
    from three volumes (the third unused)."""
    g = GraphBuilder(1 << 20)
    x = _vals((3, 2, 3, 4))
    kern = g.input(T.F32, (2, 2, 1, 2))
    img = g.input(T.F32, (4, 3, 2, 3), x)
    out = g.node(Op.IM2COL_3D, T.F32, (2 * 4, 3, 2, 2), [kern, img],
                 params=[1, 1, 1, 0, 0, 0, 1, 1, 1, 2])
    g.run()
    expect = C.reference_im2col(x[:2][None], (1, 2, 2), (1, 1, 1), (0, 0, 0), (1, 1, 1))
    np.testing.assert_array_equal(g.read(out).reshape(expect.shape), expect)
