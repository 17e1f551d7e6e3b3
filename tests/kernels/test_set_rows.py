"""SET_ROWS against the numpy oracle (F32/F16 rows into F32/F16/BF16 destinations, I32/I64
indices repeating over dimensions 2 and 3, strided views), the run-time index check that
closes llama.cpp #26912, and refusal of invalid nodes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.graph import GraphInvalid, Op
from refimpl.kernels.cpu_tensors import round_to
from refimpl.kernels.set_rows import reference
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder


@st.composite
def cases(draw):
    ne0, ne1 = draw(st.integers(1, 33)), draw(st.integers(1, 12))
    i11, i12 = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    ne2, ne3 = i11 * draw(st.integers(1, 2)), i12 * draw(st.integers(1, 2))
    r = draw(st.integers(1, ne1))
    return dict(ne=(ne0, ne1, ne2, ne3), r=r, i11=i11, i12=i12,
                dst=draw(st.sampled_from([T.F32, T.F16, T.BF16])),
                src=draw(st.sampled_from([T.F32, T.F16])),
                idx=draw(st.sampled_from([T.I32, T.I64])),
                view=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=50, deadline=None, derandomize=True)
@given(c=cases())
def test_matches_oracle(c):
    rng = np.random.default_rng(c["seed"])
    ne0, ne1, ne2, ne3 = c["ne"]
    r = c["r"]
    g = GraphBuilder(1 << 20)
    dst = g.input(c["dst"], c["ne"], rng.uniform(-1, 1, c["ne"][::-1]))
    before = g.read(dst)
    # distinct indices per (i12, i11) plane, as a KV-cache update uses them
    ids = np.stack([rng.permutation(ne1)[:r] for _ in range(c["i11"] * c["i12"])])
    ids = ids.reshape(1, c["i12"], c["i11"], r)
    if c["view"]:
        # rows: a view of every other row of a larger tensor; indices: a strided view too
        big = g.input(c["src"], (ne0, 2 * r, ne2, ne3), rng.uniform(-1, 1, (ne3, ne2, 2 * r, ne0)))
        esz = 4 if c["src"] == T.F32 else 2
        rows = g.view(big, (ne0, r, ne2, ne3), (esz, 2 * ne0 * esz, big.nb[2], big.nb[3]))
        rows_vals = g.read(big)[:, :, ::2, :]
        isz = 4 if c["idx"] == T.I32 else 8
        full = np.zeros((1, c["i12"], c["i11"], 2 * r), np.int64)
        full[..., ::2] = ids
        ibig = g.input(c["idx"], (2 * r, c["i11"], c["i12"]), full)
        idx = g.view(ibig, (r, c["i11"], c["i12"], 1), (2 * isz, ibig.nb[1], ibig.nb[2], ibig.nb[3]))
    else:
        rows = g.input(c["src"], (ne0, r, ne2, ne3), rng.uniform(-1, 1, (ne3, ne2, r, ne0)))
        rows_vals = g.read(rows)
        idx = g.input(c["idx"], (r, c["i11"], c["i12"]), ids)
    # the SET_ROWS node shares the bytes of its destination (src2), as ggml_set_rows builds it
    out = g.node(Op.SET_ROWS, c["dst"], c["ne"], [rows, idx, dst], inplace_of=dst)
    g.run()
    expect = reference(before, round_to(rows_vals.astype(np.float32), c["dst"]), ids)
    np.testing.assert_array_equal(g.read(out), expect)


def _graph(idx_values, idx_type=T.I64, dst_type=T.F16):
    g = GraphBuilder(1 << 20)
    cache = g.input(dst_type, (32, 16), np.zeros((1, 1, 16, 32)))
    rows = g.input(T.F32, (32, 2), np.ones((1, 1, 2, 32)))
    idx = g.input(idx_type, (2,), np.asarray(idx_values))
    out = g.node(Op.SET_ROWS, dst_type, (32, 16), [rows, idx, cache], inplace_of=cache)
    return g, cache, out


def test_llama_kv_cache_update():
    g, cache, out = _graph([3, 15])
    g.run()
    r = g.read(out)[0, 0]
    assert np.all(r[[3, 15]] == 1.0) and np.all(np.delete(r, [3, 15], axis=0) == 0.0)


@pytest.mark.parametrize("idx_type", [T.I32, T.I64])
@pytest.mark.parametrize("bad", [16, -1, 2**31 - 1, -(2**31)])
def test_out_of_range_index_stops_the_graph(idx_type, bad):
    g, cache, out = _graph([3, bad], idx_type)
    g.compile()  # shapes are fine: only the data is wrong
    with pytest.raises(GraphInvalid, match="outside"):
        g.run()
    assert np.all(g.read(cache) == 0.0), "nothing may be written when an index is bad"


def test_huge_i64_index_is_refused():
    g, cache, out = _graph([0, 2**40])
    with pytest.raises(GraphInvalid):
        g.run()


@pytest.mark.parametrize("case", ["k-quant dst", "bf16 rows", "f32 idx", "row length",
                                  "index count", "idx broadcast", "idx ne3", "strided rows",
                                  "src2 elsewhere", "dims 2-3"])
def test_invalid_nodes_are_refused(case):
    g = GraphBuilder(1 << 20)
    dst_type = T.Q4_K if case == "k-quant dst" else T.F32   # (block dst: the KV-cache types)
    ne = (256 if case == "k-quant dst" else 32, 8, 2, 1)
    cache = g.input(dst_type, ne)
    rows = g.input(T.BF16 if case == "bf16 rows" else T.F32,
                   (31 if case == "row length" else ne[0], 3, 1 if case == "dims 2-3" else 2, 1),
                   nb=(8, 256, 768, 1536) if case == "strided rows" else None)
    idx_ne = {"index count": (2, 1, 1, 1), "idx broadcast": (3, 3, 1, 1),
              "idx ne3": (3, 1, 1, 2)}.get(case, (3, 2, 1, 1))
    idx = g.input(T.F32 if case == "f32 idx" else T.I64, idx_ne)
    target = g.input(T.F32, ne) if case == "src2 elsewhere" else cache
    g.node(Op.SET_ROWS, dst_type, ne, [rows, idx, target], inplace_of=cache)
    with pytest.raises(GraphInvalid):
        g.compile()


def test_llama_cpp_issue_26912_is_refused():
    """src0 with more planes than the destination: ggml_nbytes ignores nb[2] of a destination
    with ne[2] = 1, so llama.cpp's server wrote at dst + nb[2], past the buffer."""
    g = GraphBuilder(1 << 20)
    cache = g.input(T.F32, (32, 8, 1, 1), nb=(4, 128, 1 << 19, 1 << 19))
    rows = g.input(T.F32, (32, 3, 2, 1))
    idx = g.input(T.I64, (3, 2, 1), np.zeros((1, 1, 2, 3)))
    g.node(Op.SET_ROWS, T.F32, (32, 8, 1, 1), [rows, idx, cache], nb=cache.nb, inplace_of=cache)
    with pytest.raises(GraphInvalid, match="dimensions 2 and 3"):
        g.compile()
