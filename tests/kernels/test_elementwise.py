"""The elementwise and reduction ops of spec/ops/elementwise.md against numpy oracles, and
their validators' refusals (ACC/SET views outside dst among them: spec/hazards.md, H17)."""

from __future__ import annotations

import numpy as np
import pytest

from refimpl.graph import GraphInvalid, Op, UnaryOp
from refimpl.kernels.elementwise import (diag_mask, reference_acc_set, reference_arange,
                                         reference_timestep_embedding, tri_mask)
from refimpl.kernels.norm import reference_group_norm, reference_l2_norm
from refimpl.kernels.reduce import reference_argmax
from refimpl.kernels.unary import reference_unary
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder

TOL = {T.F32: 2e-6, T.F16: 2e-3, T.BF16: 1.6e-2}
RNG = np.random.default_rng(7)


def _close(got, want, t=T.F32):
    from refimpl.kernels.cpu_tensors import round_to
    with np.errstate(all="ignore"):
        want = round_to(np.asarray(want, np.float64).astype(np.float32), t)
    np.testing.assert_allclose(got, want, rtol=TOL[t], atol=TOL[t])


def _math_ref(op, x, slope=0.0):
    with np.errstate(all="ignore"):
        return {Op.SQR: lambda v: v * v, Op.SQRT: np.sqrt, Op.LOG: np.log, Op.SIN: np.sin,
                Op.COS: np.cos,
                Op.LEAKY_RELU: lambda v: np.where(v > 0, v, 0) + slope * np.where(v < 0, v, 0),
                }[op](np.asarray(x, np.float64))


# -- one value from one -----------------------------------------------------------------------

MATH_CASES = [(op, ts) for op in (Op.SQR, Op.SQRT, Op.LOG, Op.SIN, Op.COS)
              for ts in ((T.F32, T.F32), (T.F16, T.F16), (T.BF16, T.BF16), (T.F16, T.F32))]
MATH_CASES += [(Op.LEAKY_RELU, (t, t)) for t in (T.F32, T.F16)]   # its only types


@pytest.mark.parametrize("op,ts", MATH_CASES)
def test_math_ops(op, ts):
    ta, td = ts
    ne = (13, 3, 2, 1)
    x = RNG.uniform(-3, 3, ne[::-1]).astype(np.float32)
    x[0, 0, 0, :4] = [0.0, -0.0, 4.0, -1.0]       # zeros and a negative for SQRT and LOG
    g = GraphBuilder(1 << 20)
    a = g.input(ta, ne, x)
    out = g.node(op, td, ne, [a], [0.125])
    g.run()
    got, want = g.read(out), _math_ref(op, g.read(a), 0.125)
    assert np.array_equal(np.isnan(got), np.isnan(want.astype(np.float32)))
    ok = ~np.isnan(want)
    _close(got[ok], want[ok], td)


def test_math_on_a_strided_view_and_log_sqrt_edges():
    """A transposed source (non-contiguous rows); LOG(0) = -inf, LOG(<0), SQRT(<0) = NaN,
    SQRT(-0) = -0."""
    g = GraphBuilder(1 << 20)
    base = g.input(T.F32, (4, 3), np.arange(12, dtype=np.float32).reshape(3, 4) - 1)
    t = g.view(base, (3, 4), (16, 4), op=Op.TRANSPOSE)
    out = g.node(Op.SQRT, T.F32, (3, 4), [t])
    lg = g.node(Op.LOG, T.F32, (3, 4), [t])
    g.run()
    x = (np.arange(12, dtype=np.float32).reshape(3, 4) - 1).T
    got = g.read(out).reshape(4, 3)
    assert np.isnan(got[0, 0]) and got[1, 0] == 0.0
    _close(got[x >= 0], np.sqrt(x[x >= 0]))
    lgv = g.read(lg).reshape(4, 3)
    assert lgv[1, 0] == -np.inf and np.isnan(lgv[0, 0])


@pytest.mark.parametrize("ts", [(T.F32, T.F32), (T.F16, T.F32), (T.F16, T.F16), (T.BF16, T.BF16),
                                (T.BF16, T.F32)])
def test_add1(ts):
    ta, tb = ts
    x = RNG.standard_normal((2, 3, 5)).astype(np.float32)
    g = GraphBuilder(1 << 20)
    a = g.input(ta, (5, 3, 2), x)
    b = g.input(tb, (1,), np.array([1.75], np.float32))
    out = g.node(Op.ADD1, ta, (5, 3, 2), [a, b])
    g.run()
    _close(g.read(out), g.read(a).astype(np.float64) + 1.75, ta)


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_1])
def test_add1_on_a_block_format(t):
    """ggml-cpu's ADD1 on quantised rows: dequantise, add, quantise again (from_float); the
    quantiser is numpy's oracle here (refimpl.kernels.quantize.reference)."""
    from refimpl.kernels.quantize import reference as quantize_reference
    from refimpl.kernels.quants import dequantize_rows
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    raw = quantize_reference(int(t), x)
    g = GraphBuilder(1 << 20)
    a = g.input(t, (64, 3), raw)
    b = g.input(T.F32, (1,), np.array([0.375], np.float32))
    out = g.node(Op.ADD1, t, (64, 3), [a, b])
    g.run()
    want = quantize_reference(int(t), dequantize_rows(int(t), raw, 64).reshape(3, 64) + np.float32(0.375))
    assert np.array_equal(g._raw(out).reshape(want.shape), want)
    g4 = GraphBuilder(1 << 20)
    a4 = g4.input(t, (32, 1, 1, 2), quantize_reference(int(t), x[:2, :32]))
    g4.node(Op.ADD1, t, (32, 1, 1, 2), [a4, g4.input(T.F32, (1,))])
    with pytest.raises(GraphInvalid, match="ne\\[3\\] == 1"):      # ggml-cpu misplaces 4-D rows
        g4.compile()


def test_unary_widens_f16_into_f32():
    """ggml-cpu's generic unary kernel takes F16 into an F32 dst (not for GELU's own)."""
    x = RNG.uniform(-3, 3, (3, 8)).astype(np.float32)
    g = GraphBuilder(1 << 20)
    a = g.input(T.F16, (8, 3), x)
    out = g.node(Op.UNARY, T.F32, (8, 3), [a], [int(UnaryOp.TANH)])
    g.run()
    _close(g.read(out), reference_unary(UnaryOp.TANH, g.read(a), False))
    g2 = GraphBuilder(1 << 20)
    a = g2.input(T.F16, (8, 3), x)
    g2.node(Op.UNARY, T.F32, (8, 3), [a], [int(UnaryOp.GELU)])
    with pytest.raises(GraphInvalid, match="src0's type"):
        g2.compile()


# -- moving values --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", range(4))
def test_tri(kind):
    x = RNG.standard_normal((2, 5, 5)).astype(np.float32)
    g = GraphBuilder(1 << 20)
    a = g.input(T.F32, (5, 5, 2), x)
    out = g.node(Op.TRI, T.F32, (5, 5, 2), [a], [kind])
    g.run()
    r, c = np.indices((5, 5))
    keep = [c >= r, c > r, c <= r, c < r][kind]
    assert np.array_equal(tri_mask(5, 5, kind), keep)
    assert np.array_equal(g.read(out)[0], np.where(keep, x, 0))


def test_diag_and_masks():
    x = RNG.standard_normal((3, 1, 4)).astype(np.float32)
    m = RNG.standard_normal((2, 4, 6)).astype(np.float32)
    g = GraphBuilder(1 << 20)
    a = g.input(T.F32, (4, 1, 3), x)
    d = g.node(Op.DIAG, T.F32, (4, 4, 3), [a])
    b = g.input(T.F32, (6, 4, 2), m)
    inf = g.node(Op.DIAG_MASK_INF, T.F32, (6, 4, 2), [b], [1])
    zero = g.node(Op.DIAG_MASK_ZERO, T.F32, (6, 4, 2), [b], [1], inplace_of=b)
    g.run()
    want = np.zeros((1, 3, 4, 4), np.float32)
    for k in range(3):
        want[0, k] = np.diag(x[k, 0])
    assert np.array_equal(g.read(d), want)
    r, c = np.indices((4, 6))
    masked = c > 1 + r
    assert np.array_equal(diag_mask(4, 6, 1), masked)
    assert np.array_equal(g.read(inf)[0], np.where(masked, -np.inf, m))
    assert np.array_equal(g.read(zero)[0], np.where(masked, 0, m))


def test_arange_and_timestep_embedding():
    g = GraphBuilder(1 << 20)
    ar = g.node(Op.ARANGE, T.F32, (30,), [], [0.5, 8.0, 0.25])
    ts = g.input(T.F32, (3,), np.array([1.0, 20.0, 999.0], np.float32))
    emb = g.node(Op.TIMESTEP_EMBEDDING, T.F32, (9, 3), [ts], [9, 10000])
    g.run()
    _close(g.read(ar).ravel(), reference_arange(0.5, 0.25, 30))
    want = reference_timestep_embedding(np.array([1.0, 20.0, 999.0]), 9, 10000)
    np.testing.assert_allclose(g.read(emb)[0, 0], want, atol=2e-4)


# -- reductions --------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [T.F32, T.F16, T.BF16])
def test_sum(t):
    x = RNG.uniform(-1, 1, (2, 3, 4, 7)).astype(np.float32)
    g = GraphBuilder(1 << 20)
    a = g.input(t, (7, 4, 3, 2), x)
    out = g.node(Op.SUM, t, (1,), [a])
    g.run()
    want = g.read(a).astype(np.float64).sum()
    tol = {T.F32: 1e-5, T.F16: 2e-2, T.BF16: 0.2}[t]
    assert abs(float(g.read(out).ravel()[0]) - want) <= tol


def test_sum_mean_read_rows_packed_as_ggml_does():
    """ggml-cpu's SUM and MEAN read each row as ne[0] consecutive elements from its first,
    whatever nb[0] says (test-backend-ops' SUM over a transposed tensor depends on it); a
    stride below the element size would read past the tensor and is refused."""
    x = RNG.uniform(-1, 1, (5, 7)).astype(np.float32)
    g = GraphBuilder(1 << 20)
    base = g.input(T.F32, (7, 5), x)
    t = g.view(base, (5, 7), (28, 4), op=Op.TRANSPOSE)        # ne0 = 5 along nb0 = 28
    s = g.node(Op.SUM, T.F32, (1,), [t])
    mean = g.node(Op.MEAN, T.F32, (1, 7), [t])
    g.run()
    flat = x.astype(np.float64).ravel()
    rows = np.array([flat[r:r + 5].sum() for r in range(7)])   # row r starts at element r
    assert abs(float(g.read(s).ravel()[0]) - rows.sum()) < 1e-5
    _close(g.read(mean).ravel(), rows / 5)
    g2 = GraphBuilder(1 << 20)
    one = g2.input(T.F32, (1, 3), np.ones((3, 1)))
    bcast = g2.view(one, (4, 3), (0, 4))
    g2.node(Op.SUM, T.F32, (1,), [bcast])
    with pytest.raises(GraphInvalid, match="below the element size"):
        g2.compile()


def test_mean_cumsum_argmax_count_equal():
    x = RNG.standard_normal((2, 3, 9)).astype(np.float32)
    x[0, 0, [2, 6]] = 5.0                           # tied maxima: ggml takes the last
    g = GraphBuilder(1 << 20)
    a = g.input(T.F32, (9, 3, 2), x)
    mean = g.node(Op.MEAN, T.F32, (1, 3, 2), [a])
    cs = g.node(Op.CUMSUM, T.F32, (9, 3, 2), [a])
    m = g.input(T.F32, (9, 6), x.reshape(6, 9))
    am = g.node(Op.ARGMAX, T.I32, (6,), [m])
    p = g.input(T.I32, (5, 2), np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]], np.int32))
    q = g.input(T.I32, (5, 2), np.array([[1, 0, 3, 0, 5], [0, 4, 0, 0, 1]], np.int32))
    ce = g.node(Op.COUNT_EQUAL, T.I64, (1,), [p, q])
    g.run()
    _close(g.read(mean)[0], x.astype(np.float64).mean(axis=-1, keepdims=True))
    _close(g.read(cs)[0], np.cumsum(x.astype(np.float64), axis=-1))
    got = g.read(am).ravel()
    assert got[0] == 6
    assert np.array_equal(got, reference_argmax(x.reshape(6, 9)))
    assert int(np.frombuffer(g._raw(ce).tobytes(), np.int64)[0]) == 5


def test_l2_norm_and_group_norm():
    x = RNG.standard_normal((2, 5, 3, 8)).astype(np.float32)
    g = GraphBuilder(1 << 20)
    a = g.input(T.F32, (8, 3, 5, 2), x)
    l2 = g.node(Op.L2_NORM, T.F32, (8, 3, 5, 2), [a], [1e-6])
    gn = g.node(Op.GROUP_NORM, T.F32, (8, 3, 5, 2), [a], [2, 1e-5])
    tiny = g.input(T.F32, (4,), np.zeros(4, np.float32))
    l2z = g.node(Op.L2_NORM, T.F32, (4,), [tiny], [0.5])
    g.run()
    _close(g.read(l2), reference_l2_norm(x, 1e-6))
    np.testing.assert_allclose(g.read(gn), reference_group_norm(x, 2, 1e-5), rtol=1e-4, atol=1e-5)
    assert np.array_equal(g.read(l2z).ravel(), np.zeros(4))


# -- ACC and SET --------------------------------------------------------------------------------

@pytest.mark.parametrize("op,t,inplace", [(Op.ACC, T.F32, 0), (Op.ACC, T.F32, 1),
                                          (Op.SET, T.F32, 0), (Op.SET, T.I32, 1)])
def test_acc_set(op, t, inplace):
    dt = np.float32 if t == T.F32 else np.int32
    av = (RNG.standard_normal((2, 4, 6)) * 10).astype(dt)
    bv = (RNG.standard_normal((2, 2, 3)) * 10).astype(dt)
    g = GraphBuilder(1 << 20)
    a = g.input(t, (6, 4, 2), av)
    b = g.input(t, (3, 2, 2), bv)
    esize = 4
    nb, offset = (6 * esize, 24 * esize, 24 * esize), (6 + 2) * esize   # row 1, column 2
    params = [*nb, offset, inplace]
    out = g.node(op, t, (6, 4, 2), [a, b], params, inplace_of=a if inplace else None)
    g.run()
    want = reference_acc_set(op, av[None], bv[None, ...], nb, offset)
    got = g.read(out)
    if t == T.F32:
        _close(got, want)
    else:
        assert np.array_equal(got, want)


@pytest.mark.parametrize("case", ["negative offset", "negative stride", "past dst", "unaligned",
                                  "overlapping rows", "f16", "not contiguous"])
def test_acc_set_views_outside_dst_are_refused(case):
    """llama.cpp #25764 (H17): ACC/SET take their view from op_params; the validator keeps
    every element of it inside dst (and src0) before anything runs."""
    g = GraphBuilder(1 << 20)
    t = T.F16 if case == "f16" else T.F32
    a = g.input(t, (8, 4))
    b = g.input(t, (4, 2))
    nb1, offset = 32, 0
    nb = None
    if case == "negative offset":
        offset = -64
    elif case == "negative stride":
        nb1, offset = -32, 96
    elif case == "past dst":
        offset = 3 * 32 + 8                      # the second row would end past dst
    elif case == "unaligned":
        offset = 2
    elif case == "overlapping rows":
        nb1 = 8
    elif case == "not contiguous":
        nb = (4, 64)
        a = g.input(t, (8, 4), nb=nb)
    for op in (Op.ACC, Op.SET):
        g.nodes.clear()
        g.node(op, t, (8, 4), [a, b], [nb1, nb1 * 2, nb1 * 2, offset, 0], nb=nb)
        with pytest.raises(GraphInvalid):
            g.compile()


@pytest.mark.parametrize("case", ["leaky bf16", "add1 not scalar", "tri not square", "diag rows",
                                  "mask n_past", "arange count", "timestep shape", "sum type",
                                  "mean shape", "cumsum strided", "argmax 3d", "count types",
                                  "l2 eps", "groups", "sqr f32 to f16"])
def test_refusals(case):
    g = GraphBuilder(1 << 20)
    a = g.input(T.F32, (8, 8, 2))
    build = {
        "leaky bf16": lambda: g.node(Op.LEAKY_RELU, T.BF16, (4,), [g.input(T.BF16, (4,))], [0.1]),
        "add1 not scalar": lambda: g.node(Op.ADD1, T.F32, (8, 8, 2), [a, g.input(T.F32, (2,))]),
        "tri not square": lambda: g.node(Op.TRI, T.F32, (8, 4), [g.input(T.F32, (8, 4))], [0]),
        "diag rows": lambda: g.node(Op.DIAG, T.F32, (8, 8, 2), [a]),
        "mask n_past": lambda: g.node(Op.DIAG_MASK_INF, T.F32, (8, 8, 2), [a], [-1]),
        "arange count": lambda: g.node(Op.ARANGE, T.F32, (5,), [], [0.0, 4.0, 1.0]),
        "timestep shape": lambda: g.node(Op.TIMESTEP_EMBEDDING, T.F32, (8, 3),
                                         [g.input(T.F32, (4,))], [8, 10000]),
        "sum type": lambda: g.node(Op.SUM, T.F16, (1,), [a]),
        "mean shape": lambda: g.node(Op.MEAN, T.F32, (8, 1, 2), [a]),
        "cumsum strided": lambda: g.node(Op.CUMSUM, T.F32, (8, 8, 2),
                                         [g.view(a, (8, 8, 2), (32, 4, 256), op=Op.PERMUTE)]),
        "argmax 3d": lambda: g.node(Op.ARGMAX, T.I32, (8,), [a]),
        "count types": lambda: g.node(Op.COUNT_EQUAL, T.I64, (1,), [a, a]),
        "l2 eps": lambda: g.node(Op.L2_NORM, T.F32, (8, 8, 2), [a], [-1.0]),
        "groups": lambda: g.node(Op.GROUP_NORM, T.F32, (8, 8, 2), [a], [0, 1e-5]),
        "sqr f32 to f16": lambda: g.node(Op.SQR, T.F16, (8, 8, 2), [a]),
    }
    build[case]()
    with pytest.raises(GraphInvalid):
        g.compile()
