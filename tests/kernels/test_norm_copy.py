"""RMS_NORM, NORM, CPY, CONT, DUP against numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.graph import GraphInvalid, Op
from refimpl.kernels import copy as cp
from refimpl.kernels.norm import reference_norm, reference_rms_norm
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder

dims = st.lists(st.integers(1, 6), min_size=4, max_size=4).map(tuple)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(op=st.sampled_from([Op.RMS_NORM, Op.NORM]), ne=dims, eps=st.sampled_from([0.0, 1e-6, 1e-5]),
       seed=st.integers(0, 2**31))
def test_norms(op, ne, eps, seed):
    ne = (ne[0] * 5, *ne[1:])
    x = np.random.default_rng(seed).standard_normal(ne[::-1]).astype(np.float32) * 3 + 1
    g = GraphBuilder(1 << 20)
    a = g.input(T.F32, ne, x)
    out = g.node(op, T.F32, ne, [a], [float(eps)])
    g.run()
    ref = reference_rms_norm(x, eps) if op == Op.RMS_NORM else reference_norm(x, eps)
    np.testing.assert_allclose(g.read(out), ref, rtol=2e-5, atol=2e-5)


def test_norm_refuses_negative_eps():
    g = GraphBuilder(1 << 20)
    a = g.input(T.F32, (8,))
    g.node(Op.RMS_NORM, T.F32, (8,), [a], [-1.0])
    with pytest.raises(GraphInvalid):
        g.compile()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(t0=st.sampled_from([T.F32, T.F16, T.BF16]), t1=st.sampled_from([T.F32, T.F16, T.BF16]),
       ne=dims, permute=st.booleans(), seed=st.integers(0, 2**31))
def test_cpy_converts_in_flat_order(t0, t1, ne, permute, seed):
    rng = np.random.default_rng(seed)
    g = GraphBuilder(1 << 20)
    a = g.input(t0, ne, rng.standard_normal(ne[::-1]))
    srcv = a
    if permute:  # swap dims 0 and 1, as ggml_permute(a, 1, 0, 2, 3) does
        nb = a.nb
        srcv = g.view(a, (ne[1], ne[0], ne[2], ne[3]), (nb[1], nb[0], nb[2], nb[3]), op=Op.PERMUTE)
    dst_ne = (srcv.ne[0] * srcv.ne[1], srcv.ne[2], srcv.ne[3], 1)  # a different shape
    b = g.input(t1, dst_ne)
    out = g.node(Op.CPY, t1, dst_ne, [srcv, b], inplace_of=b)
    g.run()
    values = g.read(a)
    if permute:
        values = values.transpose(0, 1, 3, 2)
    want = cp.reference(values, g.read(out).shape)
    tol = 0 if t1 == T.F32 and t0 == T.F32 else 1e-2
    np.testing.assert_allclose(g.read(out), want, rtol=tol, atol=tol)


def test_block_copy_and_cont():
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, 4 * 34, dtype=np.uint8)  # 4 rows of one Q8_0 block
    g = GraphBuilder(1 << 20)
    a = g.input(T.Q8_0, (32, 4), raw)
    out = g.node(Op.DUP, T.Q8_0, (32, 4), [a])
    i = g.input(T.I32, (3, 2), np.arange(6))
    f = g.node(Op.CPY, T.F32, (6,), [i, g.input(T.F32, (6,))])
    g.run()
    assert g.read(out).tobytes() == raw.tobytes()
    assert g.read(f).ravel().tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("case", ["count", "to quant", "cont type"])
def test_copy_refusals(case):
    g = GraphBuilder(1 << 20)
    a = g.input(T.F32, (32, 2))
    if case == "count":
        g.node(Op.CONT, T.F32, (32, 3), [a])
    elif case == "to quant":
        b = g.input(T.Q4_K, (256, 1))
        g.node(Op.CPY, T.Q4_K, (256, 1), [g.input(T.F32, (256, 1)), b])
    else:
        g.node(Op.CONT, T.F16, (32, 2), [a])
    with pytest.raises(GraphInvalid):
        g.compile()


def _self_source(g: GraphBuilder, t, slot: int):
    """``t`` with src[slot] pointing at itself, replaced in the builder's graph."""
    from dataclasses import replace
    src = list(t.src)
    src[slot] = t.id
    new = replace(t, src=tuple(src))
    g.tensors[g.tensors.index(t)] = new
    return new


def test_cast_names_itself_as_destination():
    # ggml_cast(): a CPY whose src[1] is the node itself (llama.cpp 0.3.20 casts the attention
    # mask to F16 so; spec/graph.md, Checks).  It computes like any CPY into a fresh tensor.
    x = np.random.default_rng(3).standard_normal((2, 3, 8)).astype(np.float32)
    g = GraphBuilder(1 << 20)
    a = g.input(T.F32, (8, 3, 2), x)
    out = _self_source(g, g.node(Op.CPY, T.F16, (8, 3, 2), [a, a]), 1)
    g.run()
    np.testing.assert_array_equal(g.read(out).reshape(x.shape), x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("op, slot", [(Op.CPY, 0), (Op.ADD, 1), (Op.CONT, 0)])
def test_other_self_references_are_cycles(op, slot):
    g = GraphBuilder(1 << 20)
    a = g.input(T.F32, (8,))
    _self_source(g, g.node(op, T.F32, (8,), [a, a] if op != Op.CONT else [a]), slot)
    with pytest.raises(GraphInvalid, match="itself"):
        g.compile()
