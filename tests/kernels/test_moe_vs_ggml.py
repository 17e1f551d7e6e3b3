"""The ops of MoE routing against ggml's own CPU backend (the peer build's libggml-cpu, in
process through tools.ggml_cpu), judged by the numerics contract (tools.contract): SUM_ROWS,
CLAMP, FILL, ARGSORT, TOP_K, ADD_ID and MUL_MAT_ID; plus each kernel against its numpy
``reference`` and the run-time refusal of out-of-range expert ids."""

from __future__ import annotations

import numpy as np
import pytest

from refimpl.graph import GraphInvalid, Op
from refimpl.kernels import binary, reduce, sort, unary
from refimpl.kernels import quants as Q
from refimpl.kernels.cpu_tensors import round_to
from refimpl.kernels.matmul import reference_id
from refimpl.protocol import GgmlType as T
from tools.contract import assert_op_within_contract
from tools.ggml_cpu import GgmlCpu, run_op
from tools.graphs import GraphBuilder

from .test_quants import random_rows

pytestmark = pytest.mark.peer


@pytest.fixture(scope="module")
def cpu(peer_bin) -> GgmlCpu:
    return GgmlCpu.load(peer_bin)


def ne_of(x: np.ndarray):
    return tuple(x.shape[::-1]) + (1,) * (4 - x.ndim)


# -- SUM_ROWS ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n0", [1, 5, 33, 1003])
@pytest.mark.parametrize("permuted", [False, True])
def test_sum_rows(cpu, n0, permuted):
    x = (np.random.default_rng(n0).standard_normal((3, 4, 5, n0)) * 10).astype(np.float32)
    g = GraphBuilder(16 << 20)
    a = g.input(T.F32, ne_of(x), x)
    if permuted:    # ggml_permute(a, 0, 2, 3, 1): ne (n0, 3, 5, 4)
        ne = (n0, 3, 5, 4)
        nb = (a.nb[0], a.nb[3], a.nb[1], a.nb[2])
        a = g.view(a, ne, nb, op=Op.PERMUTE)
        want = run_op(cpu, lambda ctx, t: ctx.call("ggml_sum_rows",
                                                   ctx.call("ggml_permute", t, 0, 2, 3, 1)),
                      [(T.F32, ne_of(x), x)])
    else:
        ne = ne_of(x)
        want = run_op(cpu, lambda ctx, t: ctx.call("ggml_sum_rows", t), [(T.F32, ne, x)])
    out = g.node(Op.SUM_ROWS, T.F32, (1, *ne[1:]), [a])
    g.run()
    got = g.read(out)
    assert_op_within_contract(got, want, "SUM_ROWS")
    logical = x.transpose(1, 2, 0, 3) if permuted else x
    np.testing.assert_allclose(got, reduce.reference(logical), rtol=1e-6, atol=1e-5)


# -- CLAMP, FILL ------------------------------------------------------------------------------

@pytest.mark.parametrize("type_", [T.F32, T.F16])
@pytest.mark.parametrize("lo,hi", [(-0.5, 0.5), (6.103515625e-5, np.inf), (-np.inf, 2.0)])
def test_clamp(cpu, type_, lo, hi):
    x = (np.random.default_rng(1).standard_normal((2, 7, 37)) * 2).astype(np.float32)
    x[0, 0, :4] = [np.nan, np.inf, -np.inf, 0.0]
    want = run_op(cpu, lambda ctx, t: ctx.call("ggml_clamp", t, float(lo), float(hi)),
                  [(type_, ne_of(x), x)])
    g = GraphBuilder(16 << 20)
    out = g.node(Op.CLAMP, type_, ne_of(x), [g.input(type_, ne_of(x), x)],
                 params=[float(lo), float(hi)])
    g.run()
    got = g.read(out)
    assert_op_within_contract(got, want, "CLAMP")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    xr = x.astype(np.float16).astype(np.float32) if type_ == T.F16 else x
    np.testing.assert_allclose(got, unary.reference_clamp(xr, np.float32(lo), np.float32(hi))
                               .reshape(got.shape), rtol=1e-3)


@pytest.mark.parametrize("type_", [T.F32, T.F16])
@pytest.mark.parametrize("value", [0.0, -np.inf, 3.1416, 70000.0])
def test_fill(cpu, type_, value):
    x = np.random.default_rng(2).standard_normal((3, 5, 9)).astype(np.float32)
    want = run_op(cpu, lambda ctx, t: ctx.call("ggml_fill", t, float(value)),
                  [(type_, ne_of(x), x)])
    g = GraphBuilder(16 << 20)
    out = g.node(Op.FILL, type_, ne_of(x), [g.input(type_, ne_of(x), x)], params=[float(value)])
    g.run()
    got = g.read(out)
    np.testing.assert_array_equal(got, want)
    with np.errstate(over="ignore"):
        ref = unary.reference_fill(got.shape, value).astype(np.float16 if type_ == T.F16 else
                                                            np.float32)
    np.testing.assert_array_equal(got, ref.astype(np.float32))


# -- ARGSORT, TOP_K ---------------------------------------------------------------------------

def _unique_rows(rng, shape):
    """Rows of distinct values (as test-backend-ops makes them: a shuffled 0..n-1), scaled."""
    rows = np.stack([rng.permutation(shape[-1]) for _ in range(int(np.prod(shape[:-1])))])
    return (rows.reshape(shape) * 0.37 - 3).astype(np.float32)


@pytest.mark.parametrize("n0", [1, 2, 16, 60, 1025])
@pytest.mark.parametrize("order", [0, 1])
def test_argsort(cpu, n0, order):
    x = _unique_rows(np.random.default_rng(n0), (2, 3, 4, n0))
    want = run_op(cpu, lambda ctx, t: ctx.call("ggml_argsort", t, order), [(T.F32, ne_of(x), x)])
    g = GraphBuilder(16 << 20)
    out = g.node(Op.ARGSORT, T.I32, ne_of(x), [g.input(T.F32, ne_of(x), x)], params=[order])
    g.run()
    got = g.read(out)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, sort.reference(x, order == 1))


def test_argsort_ties_are_stable():
    """Equal values keep their index order (ggml's std::sort leaves it unspecified)."""
    x = np.array([[[[1.0, 3.0, 1.0, 3.0, 2.0, 1.0]]]], np.float32)
    for order, expect in ((0, [0, 2, 5, 4, 1, 3]), (1, [1, 3, 4, 0, 2, 5])):
        g = GraphBuilder(1 << 20)
        out = g.node(Op.ARGSORT, T.I32, (6, 1, 1, 1), [g.input(T.F32, (6, 1, 1, 1), x)],
                     params=[order])
        g.run()
        assert g.read(out).ravel().tolist() == expect
        assert sort.reference(x, order == 1).ravel().tolist() == expect


@pytest.mark.parametrize("n0,k", [(1, 1), (16, 4), (60, 8), (1025, 100), (32, 32)])
def test_top_k(cpu, n0, k):
    x = _unique_rows(np.random.default_rng(k), (2, 3, n0))
    want = run_op(cpu, lambda ctx, t: ctx.call("ggml_top_k", t, k), [(T.F32, ne_of(x), x)])
    g = GraphBuilder(16 << 20)
    out = g.node(Op.TOP_K, T.I32, (k, 3, 2, 1), [g.input(T.F32, ne_of(x), x)])
    g.run()
    got = g.read(out)
    # ggml's order within the k is unspecified: compare the sets
    np.testing.assert_array_equal(np.sort(got, axis=-1), np.sort(want, axis=-1))
    np.testing.assert_array_equal(got.reshape(2, 3, k), sort.reference(x, True, k))


# -- ADD_ID -----------------------------------------------------------------------------------

def _ids(rng, n_expert, n_used, n_tokens):
    return np.stack([rng.permutation(n_expert)[:n_used] for _ in range(n_tokens)]).astype(np.int32)


@pytest.mark.parametrize("n_embd,n_expert,n_used,n_tokens", [(32, 4, 1, 1), (129, 8, 4, 32),
                                                              (64, 8, 2, 129)])
def test_add_id(cpu, n_embd, n_expert, n_used, n_tokens):
    rng = np.random.default_rng(n_tokens)
    a = rng.standard_normal((n_tokens, n_used, n_embd)).astype(np.float32)
    b = rng.standard_normal((n_expert, n_embd)).astype(np.float32)
    ids = _ids(rng, n_expert, n_used, n_tokens)
    want = run_op(cpu, lambda ctx, x, y, i: ctx.call("ggml_add_id", x, y, i),
                  [(T.F32, ne_of(a), a), (T.F32, ne_of(b), b), (T.I32, ne_of(ids), ids)])
    g = GraphBuilder(16 << 20)
    out = g.node(Op.ADD_ID, T.F32, ne_of(a), [g.input(T.F32, ne_of(a), a),
                                              g.input(T.F32, ne_of(b), b),
                                              g.input(T.I32, ne_of(ids), ids)])
    g.run()
    got = g.read(out)
    assert_op_within_contract(got, want, "ADD_ID")
    np.testing.assert_allclose(got.reshape(a.shape), binary.reference_add_id(a, b, ids),
                               rtol=1e-6)


@pytest.mark.parametrize("bad", [-1, 4, 1 << 30])
def test_add_id_refuses_out_of_range_ids(bad):
    """ggml's CPU backend asserts on such an id (its server dies); refimpl refuses the graph
    before writing anything (spec/hazards.md)."""
    a = np.ones((3, 2, 8), np.float32)
    ids = np.array([[0, 1], [2, 3], [1, bad]], np.int32)
    g = GraphBuilder(1 << 20)
    out = g.node(Op.ADD_ID, T.F32, ne_of(a), [g.input(T.F32, ne_of(a), a),
                                              g.input(T.F32, (8, 4), np.zeros((4, 8))),
                                              g.input(T.I32, ne_of(ids), ids)])
    g.write(out, np.full(a.shape, 7.0, np.float32))
    with pytest.raises(GraphInvalid, match=f"expert id {bad} .*outside \\[0, 4\\)"):
        g.run()
    assert (g.read(out) == 7.0).all()


# -- MUL_MAT_ID -------------------------------------------------------------------------------

MM_TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K,
            T.Q4_K, T.Q5_K, T.Q6_K]


def _experts(rng, type_, n_expert, n, k):
    """Expert weights: (values for our graph and ggml's, values the product sees (E, N, K))."""
    if type_ in (T.F32, T.F16, T.BF16):
        w = rng.standard_normal((n_expert, n, k)).astype(np.float32)
        seen = w if type_ == T.F32 else round_to(w, type_)
        return w, seen
    raw = random_rows(rng, type_, n_expert * n, k)
    return raw, Q.dequantize_rows(type_, raw, k).reshape(n_expert, n, k)


@pytest.mark.parametrize("type_", MM_TYPES)
@pytest.mark.parametrize("n_tokens,b1", [(1, 1), (3, 4), (17, 1)])
def test_mul_mat_id(cpu, type_, n_tokens, b1):
    n_expert, n_used, n, k = 8, 4, 48, 256
    rng = np.random.default_rng(int(type_) * 100 + n_tokens)
    w, seen = _experts(rng, type_, n_expert, n, k)
    x = rng.standard_normal((n_tokens, b1, k)).astype(np.float32)
    ids = _ids(rng, n_expert, n_used, n_tokens)
    w_ne = (k, n, n_expert, 1)
    want = run_op(cpu, lambda ctx, ww, xx, ii: ctx.call("ggml_mul_mat_id", ww, xx, ii),
                  [(type_, w_ne, w), (T.F32, ne_of(x), x), (T.I32, ne_of(ids), ids)], 2)
    g = GraphBuilder(32 << 20)
    out = g.node(Op.MUL_MAT_ID, T.F32, (n, n_used, n_tokens, 1),
                 [g.input(type_, w_ne, w), g.input(T.F32, ne_of(x), x),
                  g.input(T.I32, ne_of(ids), ids)])
    g.run()
    got = g.read(out)
    assert_op_within_contract(got, want, "MUL_MAT_ID")
    if type_ in (T.F32, T.F16, T.BF16):
        ref = reference_id(seen, round_to(x, type_), ids)
        assert_op_within_contract(got.reshape(ref.shape), ref, "MUL_MAT_ID")


@pytest.mark.parametrize("bad", [-1, 8, -(1 << 31)])
def test_mul_mat_id_refuses_out_of_range_ids(bad):
    """An expert id outside [0, n_expert) makes ggml's CPU backend write outside its scratch
    memory (its check is an assert, compiled out); refimpl refuses the graph before writing
    anything (spec/hazards.md)."""
    k, n = 32, 4
    ids = np.array([[0, 1], [2, bad]], np.int32)
    g = GraphBuilder(1 << 20)
    out = g.node(Op.MUL_MAT_ID, T.F32, (n, 2, 2, 1),
                 [g.input(T.F32, (k, n, 8, 1), np.ones((8, n, k))),
                  g.input(T.F32, (k, 1, 2, 1), np.ones((2, 1, k))),
                  g.input(T.I32, ne_of(ids), ids)])
    g.write(out, np.full((2, 2, n), 7.0, np.float32))
    with pytest.raises(GraphInvalid, match=f"expert id {bad} .*outside \\[0, 8\\)"):
        g.run()
    assert (g.read(out) == 7.0).all()


# -- the routers of build_moe_ffn, whole ------------------------------------------------------

class Both:
    """One graph built twice: as refimpl nodes and in a ggml context."""

    def __init__(self, ctx):
        self.g, self.ctx = GraphBuilder(32 << 20), ctx

    def input(self, type_, values):
        v = np.asarray(values)
        ne = ne_of(v)
        return self.g.input(type_, ne, v), self.ctx.tensor(type_, ne, v)

    def node(self, op, type_, ne, srcs, params, fn, *extra):
        ne = tuple(ne) + (1,) * (4 - len(ne))
        ours = self.g.node(op, type_, ne, [s[0] for s in srcs], params)
        return ours, self.ctx.call(fn, *[s[1] for s in srcs], *extra)

    def view(self, t, ne, nb, offset=0, op=Op.VIEW):
        ne, nb = tuple(ne) + (1,) * (4 - len(ne)), list(nb)
        while len(nb) < 4:
            nb.append(nb[-1] * ne[len(nb) - 1])
        return self.g.view(t[0], ne, tuple(nb), offset=offset, op=op), \
            self.ctx.view(t[1], ne, nb, offset)


def _moe_ffn(b: Both, rng, arch, n_embd=64, n_ff=32, n_expert=8, n_used=2, n_tokens=5):
    """build_moe_ffn of llama.cpp 0.3.36 for ``arch``: qwen3moe (softmax gating, weights
    normalised by SUM_ROWS, CLAMP and DIV, SWIGLU) or gpt-oss (biased router, softmax over the
    chosen logits, per-expert biases by ADD_ID, SWIGLU_OAI).  Returns its output."""
    E, F, NE, U, T_ = n_embd, n_ff, n_expert, n_used, n_tokens
    F32 = T.F32
    w = lambda *shape: b.input(F32, rng.standard_normal(shape).astype(np.float32) / 4)
    cur = w(T_, E)
    logits = b.node(Op.MUL_MAT, F32, (NE, T_), [w(NE, E), cur], None, "ggml_mul_mat")
    if arch == "gpt-oss":
        logits = b.node(Op.ADD, F32, (NE, T_), [logits, w(NE)], None, "ggml_add")
        probs = logits
    else:
        probs = b.node(Op.SOFT_MAX, F32, (NE, T_), [logits], [1.0, 0.0], "ggml_soft_max")
    order = b.node(Op.ARGSORT, T.I32, (NE, T_), [probs], [1], "ggml_argsort", 1)
    selected = b.view(order, (U, T_), (4, 4 * NE))                       # argsort_top_k
    probs3 = b.view(probs, (1, NE, T_), (4, 4, 4 * NE), op=Op.RESHAPE)
    weights = b.node(Op.GET_ROWS, F32, (1, U, T_), [probs3, selected], None, "ggml_get_rows")
    w2 = b.view(weights, (U, T_), (4, 4 * U), op=Op.RESHAPE)
    if arch == "gpt-oss":
        w2 = b.node(Op.SOFT_MAX, F32, (U, T_), [w2], [1.0, 0.0], "ggml_soft_max")
    else:
        total = b.node(Op.SUM_ROWS, F32, (1, T_), [w2], None, "ggml_sum_rows")
        total = b.node(Op.CLAMP, F32, (1, T_), [total], [6.103515625e-5, float("inf")],
                       "ggml_clamp", 6.103515625e-5, float("inf"))
        w2 = b.node(Op.DIV, F32, (U, T_), [w2, total], None, "ggml_div")
    weights = b.view(w2, (1, U, T_), (4, 4, 4 * U), op=Op.RESHAPE)
    cur3 = b.view(cur, (E, 1, T_), (4, 4 * E, 4 * E), op=Op.RESHAPE)
    up = b.node(Op.MUL_MAT_ID, F32, (F, U, T_), [w(NE, F, E), cur3, selected], None,
                "ggml_mul_mat_id")
    gate = b.node(Op.MUL_MAT_ID, F32, (F, U, T_), [w(NE, F, E), cur3, selected], None,
                  "ggml_mul_mat_id")
    if arch == "gpt-oss":
        up = b.node(Op.ADD_ID, F32, (F, U, T_), [up, w(NE, F), selected], None, "ggml_add_id")
        gate = b.node(Op.ADD_ID, F32, (F, U, T_), [gate, w(NE, F), selected], None,
                      "ggml_add_id")
        act = b.node(Op.GLU, F32, (F, U, T_), [gate, up], [3, 0, 1.702, 7.0],
                     "ggml_swiglu_oai", 1.702, 7.0)
    else:
        act = b.node(Op.GLU, F32, (F, U, T_), [gate, up], [2, 0], "ggml_swiglu_split")
    experts = b.node(Op.MUL_MAT_ID, F32, (E, U, T_), [w(NE, E, F), act, selected], None,
                     "ggml_mul_mat_id")
    if arch == "gpt-oss":
        experts = b.node(Op.ADD_ID, F32, (E, U, T_), [experts, w(NE, E), selected], None,
                         "ggml_add_id")
    experts = b.node(Op.MUL, F32, (E, U, T_), [experts, weights], None, "ggml_mul")
    out = None
    for j in range(U):
        v = b.view(experts, (E, T_), (4, 4 * E * U), offset=4 * E * j)
        out = v if out is None else b.node(Op.ADD, F32, (E, T_), [out, v], None, "ggml_add")
    return out


@pytest.mark.parametrize("arch", ["qwen3moe", "gpt-oss"])
@pytest.mark.parametrize("n_tokens", [1, 7])
def test_moe_ffn_as_llama_builds_it(cpu, arch, n_tokens):
    with cpu.context() as ctx:
        b = Both(ctx)
        out = _moe_ffn(b, np.random.default_rng(n_tokens), arch, n_tokens=n_tokens)
        want = ctx.compute(out[1], 2)
    b.g.run()
    assert_op_within_contract(b.g.read(out[0]), want, "MUL_MAT_ID")
