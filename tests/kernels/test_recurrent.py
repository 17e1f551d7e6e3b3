"""SSM_CONV, SSM_SCAN, RWKV_WKV6, GATED_LINEAR_ATTN, RWKV_WKV7, GATED_DELTA_NET and SOLVE_TRI
against numpy oracles, and the validators' refusals (spec/ops/recurrent.md)."""

from __future__ import annotations

import numpy as np
import pytest

from refimpl.graph import GraphInvalid, Op
from refimpl.kernels import recurrent as rc
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder

F32 = T.F32


def _rand(rng, ne, lo=-1.0, hi=1.0):
    return rng.uniform(lo, hi, ne[::-1]).astype(np.float32)


def test_ssm_conv():
    rng = np.random.default_rng(0)
    d_conv, d_inner, n_t, n_s = 4, 6, 5, 2
    sx, c = _rand(rng, (d_conv - 1 + n_t, d_inner, n_s)), _rand(rng, (d_conv, d_inner))
    g = GraphBuilder(1 << 20)
    out = g.node(Op.SSM_CONV, F32, (d_inner, n_t, n_s),
                 [g.input(F32, sx.shape[::-1], sx), g.input(F32, c.shape[::-1], c)])
    g.run()
    want = rc.reference_ssm_conv(sx, c)
    np.testing.assert_allclose(g.read(out)[0], want, rtol=1e-5, atol=1e-5)


def _ssm_scan_graph(rng, d_state, head_dim, n_head, n_group, n_t, n_s, k=1, ids=None,
                    slots=None):
    slots = slots or n_s
    nA = 1 if head_dim > 1 else d_state
    vals = dict(
        s=_rand(rng, (d_state, head_dim, n_head, slots)),
        x=_rand(rng, (head_dim, n_head, n_t, n_s)),
        dt=_rand(rng, (n_head, n_t, n_s)),
        a=_rand(rng, (nA, n_head), -1.0, -0.5),
        b=_rand(rng, (d_state, n_group, n_t, n_s)),
        c=_rand(rng, (d_state, n_group, n_t, n_s)),
    )
    ids = np.array(rng.permutation(n_s) if ids is None else ids, np.int32)
    g = GraphBuilder(1 << 20)
    srcs = [g.input(F32, v.shape[::-1], v) for v in vals.values()]
    srcs.append(g.input(T.I32, (n_s,), ids))
    n = vals["x"].size + k * d_state * head_dim * n_head * n_s
    out = g.node(Op.SSM_SCAN, F32, (n,), srcs, [k])
    return g, out, vals, ids


@pytest.mark.parametrize("head_dim,n_group,k", [(1, 1, 1), (4, 2, 1), (4, 1, 3)])
def test_ssm_scan(head_dim, n_group, k):
    rng = np.random.default_rng(head_dim + k)
    d_state, n_head, n_t, n_s = 8, 4, 5, 2
    g, out, v, ids = _ssm_scan_graph(rng, d_state, head_dim, n_head, n_group, n_t, n_s, k)
    g.run()
    y, states = rc.reference_ssm_scan(
        v["s"], v["x"], v["dt"], v["a"], v["b"], v["c"], ids, k)
    got = g.read(out).reshape(-1)
    np.testing.assert_allclose(got[:y.size], y.reshape(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[y.size:], states.reshape(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 2, 1 << 30])
def test_ssm_scan_refuses_ids_out_of_range(bad):
    g, _, _, _ = _ssm_scan_graph(np.random.default_rng(1), 4, 1, 2, 1, 2, 2, ids=[0, bad])
    g.compile()
    with pytest.raises(GraphInvalid, match="sequence id"):
        g.run()


def _linear_graph(op, rng, size, heads, n_tok, n_seqs):
    n_srcs = {Op.RWKV_WKV6: 5, Op.GATED_LINEAR_ATTN: 4, Op.RWKV_WKV7: 6}[op]
    vals = []
    for i in range(n_srcs):
        ne = (size, heads) if op == Op.RWKV_WKV6 and i == 3 else (size, heads, n_tok)
        lo, hi = (0.5, 1.0) if (op, i) in ((Op.RWKV_WKV6, 4), (Op.GATED_LINEAR_ATTN, 3),
                                          (Op.RWKV_WKV7, 1)) else (-1.0, 1.0)
        x = _rand(rng, ne, lo, hi)
        if op == Op.RWKV_WKV7 and i in (4, 5):   # a, b unit rows keep the state bounded
            x /= np.linalg.norm(x, axis=-1, keepdims=True)
        vals.append(x)
    state = _rand(rng, (size * size * heads, n_seqs))
    g = GraphBuilder(1 << 20)
    srcs = [g.input(F32, v.shape[::-1], v) for v in vals + [state]]
    params = [0.125] if op == Op.GATED_LINEAR_ATTN else None
    out = g.node(op, F32, (size * heads, n_tok + size * n_seqs), srcs, params)
    return g, out, vals, state


@pytest.mark.parametrize("op", [Op.RWKV_WKV6, Op.GATED_LINEAR_ATTN, Op.RWKV_WKV7])
def test_linear_attention(op):
    rng = np.random.default_rng(int(op))
    size, heads, n_tok, n_seqs = 8, 2, 6, 2
    g, out, vals, state = _linear_graph(op, rng, size, heads, n_tok, n_seqs)
    g.run()
    tok = [v if v.ndim == 2 else v.reshape(n_tok, heads, size) for v in vals]
    want, states = rc.reference_linear_attention(op, tok, state, n_seqs, 0.125)
    got = g.read(out).reshape(-1)
    n = n_tok * heads * size
    np.testing.assert_allclose(got[:n], want.reshape(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[n:], states.reshape(-1), rtol=1e-4, atol=1e-5)


def test_linear_attention_refuses_uneven_sequences():
    g, _, _, _ = _linear_graph(Op.RWKV_WKV6, np.random.default_rng(0), 4, 1, 3, 2)
    with pytest.raises(GraphInvalid, match="split evenly"):
        g.compile()


def _gdn_graph(rng, size, heads, n_t, n_s, kda, k=1, v_repeat=1, dst_k=None):
    q = _rand(rng, (size, heads, n_t, n_s))
    kk = _rand(rng, (size, heads, n_t, n_s))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    hv = heads * v_repeat
    v = _rand(rng, (size, hv, n_t, n_s))
    gate = _rand(rng, (size if kda else 1, hv, n_t, n_s), -1.0, 0.0)
    beta = _rand(rng, (1, hv, n_t, n_s), 0.0, 1.0)
    s0 = _rand(rng, (size, size, hv, n_s))
    g = GraphBuilder(1 << 20)
    srcs = [g.input(F32, x.shape[::-1], x) for x in (q, kk, v, gate, beta, s0)]
    dst_k = dst_k or k
    out = g.node(Op.GATED_DELTA_NET, F32, (size * hv, n_t * n_s + dst_k * size * n_s), srcs, [k])
    return g, out, (q, kk, v, gate, beta, s0)


@pytest.mark.parametrize("kda,k,v_repeat", [(False, 1, 1), (True, 1, 2), (False, 3, 1)])
def test_gated_delta_net(kda, k, v_repeat):
    rng = np.random.default_rng(k + v_repeat)
    size, heads, n_t, n_s = 8, 2, 4, 2
    g, out, (q, kk, v, gate, beta, s0) = _gdn_graph(rng, size, heads, n_t, n_s, kda, k, v_repeat)
    g.run()
    want, states = rc.reference_gated_delta_net(q, kk, v, np.broadcast_to(gate, v.shape),
                                                beta, s0, k)
    got = g.read(out).reshape(-1)
    np.testing.assert_allclose(got[:want.size], want.reshape(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[want.size:], states.reshape(-1), rtol=1e-4, atol=1e-5)


def test_gated_delta_net_refuses_k_beyond_dst():
    # llama.cpp #25704: K of op_params larger than the destination was sized for
    g, _, _ = _gdn_graph(np.random.default_rng(0), 4, 1, 2, 1, False, k=64, dst_k=1)
    with pytest.raises(GraphInvalid, match="dst shape"):
        g.compile()


def test_solve_tri():
    rng = np.random.default_rng(3)
    n, kc = 7, 3
    a = np.tril(_rand(rng, (n, n, 2), 0.1, 1.0))
    a += np.eye(n, dtype=np.float32)
    b = _rand(rng, (kc, n, 2))
    g = GraphBuilder(1 << 20)
    out = g.node(Op.SOLVE_TRI, F32, (kc, n, 2), [g.input(F32, a.shape[::-1], a),
                                                 g.input(F32, b.shape[::-1], b)])
    g.run()
    np.testing.assert_allclose(g.read(out)[0], rc.reference_solve_tri(a, b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["conv f16", "conv short", "scan group", "scan K mamba1",
                                  "tri square", "gdn q size"])
def test_refusals(case):
    g = GraphBuilder(1 << 20)
    if case == "conv f16":
        g.node(Op.SSM_CONV, F32, (4, 2, 1), [g.input(T.F16, (5, 4, 1)), g.input(F32, (4, 4))])
    elif case == "conv short":
        g.node(Op.SSM_CONV, F32, (4, 0, 1), [g.input(F32, (2, 4, 1)), g.input(F32, (4, 4))])
    elif case == "scan group":
        g, *_ = _ssm_scan_graph(np.random.default_rng(0), 4, 2, 3, 2, 2, 1)  # 3 % 2 heads
    elif case == "scan K mamba1":
        g, *_ = _ssm_scan_graph(np.random.default_rng(0), 4, 1, 2, 1, 3, 1, k=2)
    elif case == "tri square":
        g.node(Op.SOLVE_TRI, F32, (2, 3), [g.input(F32, (4, 3)), g.input(F32, (2, 3))])
    else:
        g, out, _ = _gdn_graph(np.random.default_rng(0), 4, 1, 2, 1, False)
        q = g.tensors[0]
        from dataclasses import replace
        g.tensors[0] = replace(q, ne=(2, *q.ne[1:]))
    with pytest.raises(GraphInvalid):
        g.compile()


@pytest.mark.parametrize("type_k", [T.F32, T.F16, T.BF16])
def test_lightning_indexer(type_k):
    rng = np.random.default_rng(int(type_k))
    d, n_head, n_tok, n_stream, n_kv, n_mask = 32, 3, 2, 2, 5, 1
    q = _rand(rng, (d, n_head, n_tok, n_stream))
    k = _rand(rng, (d, 1, n_kv, n_stream))
    w = _rand(rng, (n_head, n_tok, 1, n_stream))
    mask = rng.choice([0.0, -np.inf], (n_mask, 1, n_tok, n_kv)).astype(np.float16)
    g = GraphBuilder(1 << 20)
    kt = g.input(type_k, (d, 1, n_kv, n_stream), k)
    out = g.node(Op.LIGHTNING_INDEXER, F32, (n_kv, n_tok, 1, n_stream),
                 [g.input(F32, q.shape[::-1], q), kt, g.input(F32, w.shape[::-1], w),
                  g.input(T.F16, mask.shape[::-1], mask)])
    g.run()
    keys = g.read(kt)[:, :, 0]          # as stored (rounded to type_k)
    want = rc.reference_lightning_indexer(q, keys, w[:, 0], mask[:, 0].astype(np.float32))
    np.testing.assert_allclose(g.read(out)[:, 0], want, rtol=1e-4, atol=1e-4)


def test_dsv4_hc_ops():
    rng = np.random.default_rng(5)
    n_tok, n_embd, hc = 3, 5, 4
    mixes, scale, base = _rand(rng, (24, n_tok)), _rand(rng, (3,)), _rand(rng, (24,))
    x3, gate = _rand(rng, (n_embd, hc, n_tok)), _rand(rng, (n_embd, hc, n_tok))
    weights = _rand(rng, (hc, n_tok))
    x2, post, res = _rand(rng, (n_embd, n_tok)), _rand(rng, (hc, n_tok)), _rand(rng, (n_embd, hc, n_tok))
    g = GraphBuilder(1 << 20)
    inp = {name: g.input(F32, v.shape[::-1], v) for name, v in
           dict(mixes=mixes, scale=scale, base=base, x3=x3, gate=gate, weights=weights,
                x2=x2, post=post, res=res).items()}
    comb = g.node(Op.DSV4_HC_COMB, F32, (hc, hc, n_tok), [inp["mixes"], inp["scale"], inp["base"]],
                  [1e-6, 5])
    pre = g.node(Op.DSV4_HC_PRE, F32, (n_embd, n_tok), [inp["x3"], inp["weights"]], [1.0, 0])
    pre_g = g.node(Op.DSV4_HC_PRE, F32, (n_embd, n_tok), [inp["x3"], inp["gate"]], [0.25, 1])
    post_c = g.node(Op.DSV4_HC_POST, F32, (n_embd, hc, n_tok), [inp["x2"], inp["res"], inp["post"], comb])
    post_i = g.node(Op.DSV4_HC_POST, F32, (n_embd, hc, n_tok), [inp["x2"], inp["res"], inp["post"]])
    g.run()
    c = rc.reference_hc_comb(mixes, scale[2], base, np.float32(1e-6), 5)
    np.testing.assert_allclose(g.read(comb)[0], c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.read(pre)[0, 0], np.einsum("thi,th->ti", x3, weights),
                               rtol=1e-5, atol=1e-6)
    sig = 1 / (1 + np.exp(-gate.astype(np.float64)))
    np.testing.assert_allclose(g.read(pre_g)[0, 0], 0.25 * np.einsum("thi,thi->ti", x3, sig),
                               rtol=1e-5, atol=1e-6)
    base_post = x2[:, None, :] * post[:, :, None]
    np.testing.assert_allclose(g.read(post_c)[0], base_post + np.einsum("tsi,tsd->tdi", res, g.read(comb)[0]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.read(post_i)[0], base_post + res, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_iter", [0, 1 << 20])
def test_dsv4_hc_comb_refuses_iterations(n_iter):
    g = GraphBuilder(1 << 20)
    g.node(Op.DSV4_HC_COMB, F32, (4, 4, 1), [g.input(F32, (24, 1)), g.input(F32, (3,)),
                                             g.input(F32, (24,))], [1e-6, n_iter])
    with pytest.raises(GraphInvalid, match="n_iter"):
        g.compile()


def _bufferless_view(consumer: bool) -> GraphBuilder:
    """A VIEW node of an input neither has a buffer here (ggml's scheduler sends Mamba's
    state-copy ids so), optionally read by an ADD."""
    g = GraphBuilder(1 << 16)
    ids = g._add(type_=T.I32, ne=(4,), buffer=0, data=0, at=0, name="s_copy")
    view = g._add(type_=T.I32, ne=(1,), op=Op.VIEW, srcs=[ids], view_src=ids, view_offs=4,
                  buffer=0, data=0, at=0, node=True, name="s_copy (view)")
    x = g.input(F32, (4, 2))
    g.node(Op.ADD, F32, (4, 2), [x, view] if consumer else [x, x])
    return g


def test_a_view_of_bytes_not_held_here_computes_nothing():
    _bufferless_view(consumer=False).run()
    with pytest.raises(GraphInvalid, match="has no buffer on this server"):
        _bufferless_view(consumer=True).compile()
