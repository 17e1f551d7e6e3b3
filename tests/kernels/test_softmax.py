"""SOFT_MAX against the numpy oracle: scale, F32/F16 masks repeating over the head dimensions,
ALiBi, sinks, in-place results; and refusal of nodes ggml would not build."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.graph import GraphInvalid, Op
from refimpl.kernels.softmax import alibi_slopes, reference
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder


@st.composite
def cases(draw):
    ne = (draw(st.integers(1, 40)), draw(st.integers(1, 6)), draw(st.integers(1, 5)),
          draw(st.integers(1, 3)))
    mask = draw(st.sampled_from([None, T.F32, T.F16]))
    mne = None
    if mask is not None:
        d2 = draw(st.sampled_from([d for d in range(1, ne[2] + 1) if ne[2] % d == 0]))
        d3 = draw(st.sampled_from([d for d in range(1, ne[3] + 1) if ne[3] % d == 0]))
        mne = (ne[0], ne[1] + draw(st.integers(0, 3)), d2, d3)
    max_bias = draw(st.sampled_from([0.0, 8.0])) if mask is not None else 0.0
    return dict(ne=ne, mask=mask, mne=mne, max_bias=max_bias,
                scale=draw(st.sampled_from([1.0, 0.125, 3.5])),
                sinks=draw(st.booleans()), inplace=draw(st.booleans()),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(c=cases())
def test_matches_oracle(c):
    rng = np.random.default_rng(c["seed"])
    ne = c["ne"]
    g = GraphBuilder(1 << 20)
    x = g.input(T.F32, ne, rng.uniform(-4, 4, ne[::-1]))
    srcs = [x, None, None]
    mvals = svals = None
    if c["mask"] is not None:
        mv = rng.uniform(-2, 2, c["mne"][::-1]).astype(np.float32)
        mv[rng.random(mv.shape) < 0.2] = -np.inf
        mv[..., 0] = 0.0  # keep at least one finite logit per row
        srcs[1] = g.input(c["mask"], c["mne"], mv)
    if c["sinks"]:
        srcs[2] = g.input(T.F32, (ne[2],), rng.uniform(-3, 3, ne[2]))
    while srcs and srcs[-1] is None:
        srcs.pop()
    out = g.node(Op.SOFT_MAX, T.F32, ne, srcs, params=[c["scale"], c["max_bias"]],
                 inplace_of=x if c["inplace"] else None)
    xin = g.read(x)
    if c["mask"] is not None:
        mvals = g.read(srcs[1])
    if c["sinks"]:
        svals = g.read(srcs[2])[0, 0, 0]
    g.run()
    expect = reference(xin, mvals, c["scale"], c["max_bias"], svals)
    np.testing.assert_allclose(g.read(out), expect, rtol=2e-6, atol=1e-7)


def test_alibi_slopes_follow_ggml():
    # 12 heads: 8 powers of m0 = 2^-1, then odd powers of m1 = 2^-0.5
    s = alibi_slopes(12, 8.0)
    expect = [2.0 ** -(h + 1) for h in range(8)] + [2.0 ** (-0.5 * (2 * k + 1)) for k in range(4)]
    np.testing.assert_allclose(s, expect, rtol=1e-6)
    assert np.all(alibi_slopes(5, 0.0) == 1.0)


def test_llama_shape():
    """The node llama.cpp 0.3.36 sends: kq [256,2,4,1] with an F32 causal mask [256,2,1,1]."""
    rng = np.random.default_rng(1)
    g = GraphBuilder(1 << 20)
    kq = g.input(T.F32, (256, 2, 4, 1), rng.standard_normal((1, 4, 2, 256)))
    m = np.zeros((1, 1, 2, 256), np.float32)
    m[0, 0, 0, 1:] = -np.inf
    m[0, 0, 1, 2:] = -np.inf
    mask = g.input(T.F32, (256, 2, 1, 1), m)
    out = g.node(Op.SOFT_MAX, T.F32, (256, 2, 4, 1), [kq, mask], params=[0.25, 0.0])
    g.run()
    r = g.read(out)
    assert np.all(r[..., 0, 0] == 1.0) and np.all(r[..., 0, 1:] == 0.0)
    np.testing.assert_allclose(r.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("case", ["f16 src", "strided src", "mask ne0", "mask rows", "mask heads",
                                  "mask type", "alibi without mask", "sinks length", "sinks type",
                                  "shape", "extra src"])
def test_invalid_nodes_are_refused(case):
    g = GraphBuilder(1 << 20)
    ne = (8, 4, 6, 1)
    x = g.input(T.F16 if case == "f16 src" else T.F32, ne)
    srcs = [x]
    params = [1.0, 0.0]
    if case == "strided src":
        srcs = [g.input(T.F32, ne, nb=(4, 64, 256, 1536))]
    elif case in ("mask ne0", "mask rows", "mask heads", "mask type"):
        mne = {"mask ne0": (7, 4, 1, 1), "mask rows": (8, 3, 1, 1), "mask heads": (8, 4, 4, 1),
               "mask type": (8, 4, 1, 1)}[case]
        srcs.append(g.input(T.BF16 if case == "mask type" else T.F32, mne))
    elif case == "alibi without mask":
        params = [1.0, 8.0]
    elif case in ("sinks length", "sinks type"):
        srcs += [None, g.input(T.F16 if case == "sinks type" else T.F32,
                               (5,) if case == "sinks length" else (6,))]
    elif case == "extra src":
        srcs += [None, None, g.input(T.F32, (6,))]
    g.node(Op.SOFT_MAX, T.F32, (8, 4, 3, 1) if case == "shape" else ne, srcs, params=params)
    with pytest.raises(GraphInvalid):
        g.compile()
