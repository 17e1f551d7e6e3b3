"""UNARY, GLU and SCALE kernels against their numpy oracles, including ggml's F16 GELU table."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.graph import GluOp, GraphInvalid, Op, UnaryOp
from refimpl.kernels.unary import reference_glu, reference_scale, reference_unary
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder

FLOATS = [T.F32, T.F16, T.BF16]
TOL = {T.F32: 2e-6, T.F16: 2e-3, T.BF16: 1.6e-2}
dims = st.lists(st.integers(1, 7), min_size=4, max_size=4).map(tuple)


def close(got, want, t, table=False):
    """Within the type's precision; ops through the F16 table may land one half-ulp apart
    (the oracle evaluates in float64, ggml in float32, before rounding to half)."""
    from refimpl.kernels.cpu_tensors import round_to
    with np.errstate(over="ignore", invalid="ignore"):
        want = round_to(np.asarray(want).astype(np.float32), t)
    tol = max(TOL[t], 1e-3) if table else TOL[t]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


TABLE_UNARY = {UnaryOp.GELU, UnaryOp.GELU_QUICK}
TABLE_GLU = {GluOp.GEGLU, GluOp.GEGLU_QUICK}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(code=st.sampled_from(list(UnaryOp)), t=st.sampled_from(FLOATS), ne=dims,
       seed=st.integers(0, 2**31))
def test_unary(code, t, ne, seed):
    x = np.random.default_rng(seed).uniform(-12, 12, ne[::-1]).astype(np.float32)
    params = [0.8, 0.3, 0.5, -1e-6] if code == UnaryOp.XIELU else []
    g = GraphBuilder(1 << 20)
    a = g.input(t, ne, x)
    out = g.node(Op.UNARY, t, ne, [a], [int(code), *params])
    g.run()
    want = reference_unary(code, g.read(a), t != T.BF16, params or (0, 0, 0, 0))
    close(g.read(out), want, t, code in TABLE_UNARY)


def test_gelu_follows_the_half_precision_table():
    """ggml's CPU GELU rounds input and output to F16; an exact GELU would differ by ~1e-3."""
    x = np.linspace(-9.9, 9.9, 4001, dtype=np.float32)
    g = GraphBuilder(1 << 20)
    a = g.input(T.F32, (4001,), x)
    out = g.node(Op.UNARY, T.F32, (4001,), [a], [int(UnaryOp.GELU)])
    g.run()
    got = g.read(out).ravel()
    assert np.array_equal(got, got.astype(np.float16).astype(np.float32))  # table values
    exact = reference_unary(UnaryOp.GELU, x, False)
    tabled = reference_unary(UnaryOp.GELU, x, True)
    np.testing.assert_allclose(got, tabled, rtol=1e-3, atol=1e-4)
    assert np.abs(got - exact).max() > 1e-3  # the rounding is real, and reproduced


@settings(max_examples=50, deadline=None, derandomize=True)
@given(code=st.sampled_from(list(GluOp)), t=st.sampled_from(FLOATS), ne=dims,
       split=st.booleans(), swapped=st.booleans(), seed=st.integers(0, 2**31))
def test_glu(code, t, ne, split, swapped, seed):
    rng = np.random.default_rng(seed)
    g = GraphBuilder(1 << 20)
    params = [int(code), int(swapped), 1.702, 7.0]
    if split:
        full = (ne[0] * 2, *ne[1:])
        a = g.input(t, full, rng.uniform(-8, 8, full[::-1]))
        out = g.node(Op.GLU, t, ne, [a], params)
        g.run()
        av = g.read(a)
        lo, hi = av[..., :ne[0]], av[..., ne[0]:]
        x, gate = (hi, lo) if swapped else (lo, hi)
    else:
        a = g.input(t, ne, rng.uniform(-8, 8, ne[::-1]))
        b = g.input(t, ne, rng.uniform(-8, 8, ne[::-1]))
        out = g.node(Op.GLU, t, ne, [a, b], params)
        g.run()
        x, gate = g.read(a), g.read(b)
    want = reference_glu(code, x, gate, t != T.BF16, 1.702, 7.0)
    close(g.read(out), want, t, code in TABLE_GLU)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(ne=dims, s=st.floats(-4, 4, width=32), b=st.floats(-4, 4, width=32), seed=st.integers(0, 99))
def test_scale(ne, s, b, seed):
    x = np.random.default_rng(seed).standard_normal(ne[::-1]).astype(np.float32)
    g = GraphBuilder(1 << 20)
    a = g.input(T.F32, ne, x)
    out = g.node(Op.SCALE, T.F32, ne, [a], [float(s), float(b)])
    g.run()
    close(g.read(out), reference_scale(x, s, b), T.F32)


@pytest.mark.parametrize("case", ["bad unary code", "bad glu code", "glu halves", "type change",
                                  "quantized", "glu src types"])
def test_refusals(case):
    g = GraphBuilder(1 << 20)
    a = g.input(T.F32, (8, 2))
    if case == "bad unary code":
        g.node(Op.UNARY, T.F32, (8, 2), [a], [99])
    elif case == "bad glu code":
        g.node(Op.GLU, T.F32, (4, 2), [a], [7, 0])
    elif case == "glu halves":
        g.node(Op.GLU, T.F32, (8, 2), [a], [2, 0])
    elif case == "type change":
        g.node(Op.UNARY, T.F16, (8, 2), [a], [int(UnaryOp.SILU)])
    elif case == "quantized":
        q = g.input(T.Q8_0, (32, 2))
        g.node(Op.UNARY, T.Q8_0, (32, 2), [q], [int(UnaryOp.SILU)])
    else:
        b = g.input(T.F16, (8, 2))
        g.node(Op.GLU, T.F32, (8, 2), [a, b], [2, 0])
    with pytest.raises(GraphInvalid):
        g.compile()
