"""ADD/SUB/MUL/DIV kernels against the numpy oracle, including repeat-broadcast, mixed float
types, in-place results and non-contiguous sources."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.graph import GraphInvalid, Op
from refimpl.kernels.binary import reference
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder

TOL = {T.F32: 0, T.F16: 2e-3, T.BF16: 1e-2}


@st.composite
def shapes(draw):
    """(ne of src0, ne of src1) with src1 tiling src0."""
    small = [draw(st.integers(1, 5)) for _ in range(4)]
    reps = [draw(st.integers(1, 3)) for _ in range(4)]
    return tuple(s * r for s, r in zip(small, reps)), tuple(small)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(op=st.sampled_from([Op.ADD, Op.SUB, Op.MUL, Op.DIV]), shp=shapes(),
       t0=st.sampled_from([T.F32, T.F16, T.BF16]), t1=st.sampled_from([T.F32, T.F16, T.BF16]),
       seed=st.integers(0, 2**32 - 1))
def test_matches_oracle(op, shp, t0, t1, seed):
    rng = np.random.default_rng(seed)
    ne0, ne1 = shp
    x = rng.uniform(0.5, 2, ne0[::-1]).astype(np.float32)
    y = rng.uniform(0.5, 2, ne1[::-1]).astype(np.float32)
    g = GraphBuilder(1 << 20)
    a, b = g.input(t0, ne0, x), g.input(t1, ne1, y)
    out = g.node(op, t0, ne0, [a, b])
    g.run()
    expect = reference(op, g.read(a), g.read(b))
    np.testing.assert_allclose(g.read(out), expect, rtol=TOL[t0], atol=1e-6)


def test_in_place_and_permuted_source():
    rng = np.random.default_rng(0)
    g = GraphBuilder(1 << 20)
    base = rng.standard_normal((1, 1, 6, 4)).astype(np.float32)  # ne = (4, 6)
    a = g.input(T.F32, (4, 6), base)
    at = g.view(a, (6, 4), (16, 4), op=Op.TRANSPOSE)  # ne=(6,4), element strides swapped
    b = g.input(T.F32, (6, 1), np.arange(6, dtype=np.float32))
    out = g.node(Op.ADD, T.F32, (6, 4), [at, b])
    again = g.node(Op.MUL, T.F32, (6, 4), [out, out], inplace_of=out)
    g.run()
    expect = base[0, 0].T + np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(g.read(again)[0, 0], expect * expect)


@pytest.mark.parametrize("case", ["untileable", "dst type", "quantized", "odd stride"])
def test_invalid_nodes_are_refused(case):
    g = GraphBuilder(1 << 20)
    a = g.input(T.F32, (8, 2))
    if case == "untileable":
        b = g.input(T.F32, (3, 1))
        g.node(Op.ADD, T.F32, (8, 2), [a, b])
    elif case == "dst type":
        b = g.input(T.F32, (8, 1))
        g.node(Op.ADD, T.F16, (8, 2), [a, b])
    elif case == "quantized":
        b = g.input(T.Q8_0, (32, 1))
        g.node(Op.ADD, T.F32, (8, 2), [a, b])
    else:
        b = g.input(T.F32, (8, 1), nb=(4, 33, 33, 33))
        g.node(Op.ADD, T.F32, (8, 2), [a, b])
    with pytest.raises(GraphInvalid):
        g.compile()
