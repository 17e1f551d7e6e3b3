"""GET_ROWS against the numpy oracle on gguf-dequantised rows (bit for bit), with batches,
viewed sources and index tensors, the run-time index check, and refusal of invalid nodes."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.graph import GraphInvalid, Op
from refimpl.kernels import quants as Q
from refimpl.kernels.get_rows import reference
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder

from .test_quants import GGUF_TYPE, random_rows

PLAIN = [T.F32, T.F16, T.BF16, T.I32]
QUANT = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def source(g: GraphBuilder, rng, type_, ne0, nrows, a2, a3, pad_cols, pad_rows):
    """src0 (ne0, nrows, a2, a3), a view at an offset into a padded tensor when asked.
    Returns (tensor, the values as dst will hold them (a3, a2, nrows, ne0))."""
    bs = Q.BLOCK[int(type_)][0] if type_ in QUANT else 1
    cols, rows = ne0 + pad_cols * bs, nrows + pad_rows
    if type_ in QUANT:
        raw = random_rows(rng, int(type_), a3 * a2 * rows, cols)
        vals = gguf_dequantize(raw, GGUF_TYPE[int(type_)]).astype(np.float32)
    else:
        size = 2 if type_ in (T.F16, T.BF16) else 4
        raw = rng.integers(0, 256, (a3 * a2 * rows, cols * size), dtype=np.uint8)
        if type_ == T.F32:
            vals = raw.view(np.float32)
        elif type_ == T.I32:
            vals = raw.view(np.int32)
        elif type_ == T.F16:
            # ggml widens with F16C, which quiets signalling NaNs (payload kept)
            bits = raw.view(np.float16).astype(np.float32).view(np.uint32)
            nan = np.isnan(raw.view(np.float16))
            bits[nan] |= 0x00400000
            vals = bits.view(np.float32)
        else:
            vals = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    base = g.input(type_, (cols, rows, a2, a3), raw)
    vals = vals.reshape(a3, a2, rows, cols)
    if not (pad_cols or pad_rows):
        return base, vals
    off_cols, off_rows = pad_cols * bs, pad_rows
    offset = off_cols // bs * base.nb[0] + off_rows * base.nb[1]
    view = g.view(base, (ne0, nrows, a2, a3), base.nb, offset=offset)
    return view, vals[:, :, off_rows:, off_cols:]


def indices(g: GraphBuilder, idx: np.ndarray, strided: bool):
    """src1 (n, a2, a3) holding ``idx`` (a3, a2, n); optionally every other element of a
    larger tensor (a view with nb[0] = 8)."""
    a3, a2, n = idx.shape
    if not strided:
        return g.input(T.I32, (n, a2, a3), idx)
    wide = np.zeros((a3, a2, 2 * n), np.int32)
    wide[:, :, ::2] = idx
    base = g.input(T.I32, (2 * n, a2, a3), wide)
    return g.view(base, (n, a2, a3), (8, base.nb[1], base.nb[2], base.nb[3]))


@settings(max_examples=50, deadline=None, derandomize=True)
@given(type_=st.sampled_from(PLAIN + QUANT), nrows=st.integers(1, 7), n=st.integers(1, 9),
       a2=st.integers(1, 3), a3=st.integers(1, 2), width=st.integers(1, 3),
       pad_cols=st.integers(0, 1), pad_rows=st.integers(0, 2), strided=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_matches_oracle(type_, nrows, n, a2, a3, width, pad_cols, pad_rows, strided, seed):
    rng = np.random.default_rng(seed)
    ne0 = width * (Q.BLOCK[int(type_)][0] if type_ in QUANT else 5)
    g = GraphBuilder(4 << 20)
    src, vals = source(g, rng, type_, ne0, nrows, a2, a3, pad_cols, pad_rows)
    idx = rng.integers(0, nrows, (a3, a2, n)).astype(np.int32)
    ids = indices(g, idx, strided)
    dtype = T.I32 if type_ == T.I32 else T.F32
    out = g.node(Op.GET_ROWS, dtype, (ne0, n, a2, a3), [src, ids])
    g.run()
    got = g.read(out)
    want = reference(vals, idx)
    if dtype == T.F32:  # compare bits: NaN payloads and signed zeros are copied too
        got, want = got.view(np.uint32), np.ascontiguousarray(want).view(np.uint32)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad", [-1, 5, 2**31 - 1, -2**31])
def test_out_of_range_index_stops_the_graph(bad):
    g = GraphBuilder(1 << 20)
    src = g.input(T.F32, (4, 5), np.arange(20, dtype=np.float32))
    ids = g.input(T.I32, (3,), np.array([0, bad, 1], np.int32))
    out = g.node(Op.GET_ROWS, T.F32, (4, 3), [src, ids])
    g.write(out, np.full(12, 9.0, np.float32))
    g.compile()
    with pytest.raises(GraphInvalid, match="outside"):
        g.run()
    np.testing.assert_array_equal(g.read(out), 9.0)  # nothing was written


def test_indices_are_checked_on_every_run():
    """A stored plan run again (GRAPH_RECOMPUTE) checks the indices it finds then."""
    g = GraphBuilder(1 << 20)
    src = g.input(T.I32, (2, 3), np.arange(6, dtype=np.int32))
    ids = g.input(T.I32, (2,), np.array([0, 2], np.int32))
    out = g.node(Op.GET_ROWS, T.I32, (2, 2), [src, ids])
    g.run()
    np.testing.assert_array_equal(g.read(out)[0, 0], [[0, 1], [4, 5]])
    g.write(ids, np.array([0, 3], np.int32))
    with pytest.raises(GraphInvalid):
        g.plan.run()


def test_large_row_index():
    g = GraphBuilder(16 << 20)
    rows = np.arange(70000 * 8, dtype=np.float32).reshape(70000, 8)
    src = g.input(T.F32, (8, 70000), rows)
    idx = np.array([69999, 0, 12345], np.int32)
    ids = g.input(T.I32, (3,), idx)
    out = g.node(Op.GET_ROWS, T.F32, (8, 3), [src, ids])
    g.run()
    np.testing.assert_array_equal(g.read(out)[0, 0], rows[idx])


@pytest.mark.parametrize("case", ["dst f16", "dst f32 from i32", "idx i64", "idx f32",
                                  "batch mismatch", "idx ne3", "dst shape", "src q8_k",
                                  "src q8_1", "src unpacked", "src2", "missing idx"])
def test_invalid_nodes_are_refused(case):
    g = GraphBuilder(1 << 20)
    src_t, ids_t, dtype = T.F32, T.I32, T.F32
    src_ne, ids_ne, ne = (32, 5, 2), (3, 2), (32, 3, 2)
    extra = []
    if case == "dst f16":
        dtype = T.F16
    elif case == "dst f32 from i32":
        src_t = T.I32
    elif case == "idx i64":
        ids_t = T.I64
    elif case == "idx f32":
        ids_t = T.F32
    elif case == "batch mismatch":
        ids_ne = (3, 3)
        ne = (32, 3, 3)
    elif case == "idx ne3":
        ids_ne, ne = (3, 2, 1, 2), (32, 3, 2, 1)
    elif case == "dst shape":
        ne = (32, 4, 2)
    elif case == "src q8_k":
        src_t, src_ne, ne = T.Q8_K, (256, 5, 2), (256, 3, 2)
    elif case == "src q8_1":
        src_t = T.Q8_1
    elif case == "src2":
        extra = [g.input(T.F32, (1,))]
    src = g.input(src_t, src_ne)
    if case == "src unpacked":
        src = g.view(src, (16, 5, 2), (8, 128, 640))
        ne = (16, 3, 2)
    ids = g.input(ids_t, ids_ne) if case != "missing idx" else None
    g.node(Op.GET_ROWS, dtype, ne, [src, ids] + extra)
    with pytest.raises(GraphInvalid):
        g.compile()


@pytest.mark.peer
@pytest.mark.parametrize("type_", PLAIN + QUANT, ids=lambda t: t.name)
def test_matches_ggml(peer_bin, type_):
    """Bit for bit against ggml's own CPU backend (the peer's libggml-cpu, in process)."""
    from tools.ggml_cpu import GgmlCpu

    rng = np.random.default_rng(int(type_))
    bs = Q.BLOCK[int(type_)][0] if type_ in QUANT else 1
    ne0, nrows = 2 * bs if type_ in QUANT else 37, 9
    if type_ in QUANT:
        raw = random_rows(rng, int(type_), 2 * nrows, ne0)
    else:
        size = 2 if type_ in (T.F16, T.BF16) else 4
        raw = rng.integers(0, 256, (2 * nrows, ne0 * size), dtype=np.uint8)
    idx = rng.integers(0, nrows, (2, 5)).astype(np.int32)
    g = GraphBuilder(1 << 20)
    src = g.input(type_, (ne0, nrows, 2), raw)
    ids = g.input(T.I32, (5, 2), idx)
    out = g.node(Op.GET_ROWS, T.I32 if type_ == T.I32 else T.F32, (ne0, 5, 2), [src, ids])
    g.run()
    with GgmlCpu.load(peer_bin).context() as ctx:
        theirs = ctx.compute(ctx.call("ggml_get_rows", ctx.tensor(type_, (ne0, nrows, 2), raw),
                                      ctx.tensor(T.I32, (5, 2), idx)), 1)
    np.testing.assert_array_equal(g.read(out).view(np.uint32), theirs.view(np.uint32))
