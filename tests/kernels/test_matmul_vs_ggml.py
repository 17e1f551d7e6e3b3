"""MUL_MAT against ggml's own CPU backend (the peer build's libggml-cpu, run in process through
tools.ggml_cpu), judged by the numerics contract of spec/numerics.md (NMSE within
test-backend-ops' bound for MUL_MAT, tools.contract): every weight type, activation
counts on both sides of each of ggml's kernel switches (1, 2, 8 rows), broadcast batches,
permuted and pre-quantised activations, padded weight views, and the attention products of a
KV cache.  The oracle is built for the host (-march=native), so nothing compares bits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl.graph import Op
from refimpl.kernels import quants as Q
from refimpl.protocol import GgmlType as T
from refimpl.protocol.tensor import contiguous_strides
from tools.contract import assert_op_within_contract
from tools.ggml_cpu import GgmlCpu
from tools.graphs import GraphBuilder

from .test_quants import pack_activations, random_rows

pytestmark = pytest.mark.peer

FLOAT = [T.F32, T.F16, T.BF16]
QUANT = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
ROWS = [1, 2, 7, 8, 9, 31, 32, 33, 64, 256]
ORDERS = [(0, 1, 2, 3), (0, 2, 1, 3), (0, 1, 3, 2), (0, 3, 2, 1)]


@pytest.fixture(scope="module")
def cpu(peer_bin) -> GgmlCpu:
    return GgmlCpu.load(peer_bin)


class Pair:
    """The same tensors built twice: in a refimpl graph and in a ggml context."""

    def __init__(self, ctx, arena: int):
        self.g = GraphBuilder(arena)
        self.ctx = ctx

    def input(self, type_, ne, values):
        return self.g.input(type_, ne, values), self.ctx.tensor(type_, ne, values)

    def view(self, base, ne, nb, offset=0, op=Op.VIEW):
        ours, theirs = base
        return (self.g.view(ours, ne, nb, offset=offset, op=op),
                self.ctx.view(theirs, ne, nb, offset))

    def permuted(self, type_, x: np.ndarray, order):
        """A tensor with logical values ``x`` ((ne3, ne2, ne1, ne0), float) stored with ggml
        dims ``order`` innermost first (as ggml_permute of a contiguous tensor makes it)."""
        ne = (x.shape[3], x.shape[2], x.shape[1], x.shape[0])
        if tuple(order) == (0, 1, 2, 3):
            return self.input(type_, ne, x)
        base_ne = tuple(ne[o] for o in order)
        base_nb = contiguous_strides(type_, base_ne)
        nb = [0] * 4
        for j, o in enumerate(order):
            nb[o] = base_nb[j]
        vals = np.ascontiguousarray(x.transpose([3 - order[3], 3 - order[2], 3 - order[1],
                                                 3 - order[0]]))
        return self.view(self.input(type_, base_ne, vals), ne, nb, op=Op.PERMUTE)

    def mul_mat(self, w, x, n, shape, n_threads):
        """Both products; returns (refimpl's, ggml's) as float32 arrays."""
        out = self.g.node(Op.MUL_MAT, T.F32, shape, [w[0], x[0]])
        self.g.compile()
        self.g.run()
        theirs = self.ctx.compute(self.ctx.call("ggml_mul_mat", w[1], x[1]), n_threads)
        return self.g.read(out), theirs


@st.composite
def cases(draw):
    wtype = draw(st.sampled_from(FLOAT + QUANT))
    if wtype in QUANT:
        bs = Q.BLOCK[int(wtype)][0]
        k = bs * draw(st.integers(1, 4 if bs == 256 else 10))
    else:
        k = draw(st.one_of(st.integers(1, 100), st.sampled_from([8, 32, 64, 96, 128, 264])))
    nt = draw(st.sampled_from(ROWS))
    small = nt <= 33
    vec = Q.VEC_DOT_TYPE[int(wtype)]
    btypes = [T.F32, T.F32] + ([T(vec)] if wtype != T.F32 else [T.F16, T.BF16])
    btype = draw(st.sampled_from(btypes))
    return dict(
        wtype=wtype, k=k, n=draw(st.integers(1, 24)), nt=nt, btype=btype,
        a2=draw(st.integers(1, 2 if small else 1)), a3=draw(st.integers(1, 2 if small else 1)),
        r2=draw(st.integers(1, 3 if small else 1)), r3=draw(st.integers(1, 2 if small else 1)),
        order=draw(st.sampled_from(ORDERS)) if btype in (T.F32, T.F16) else ORDERS[0],
        pad_cols=draw(st.integers(0, 1)), pad_rows=draw(st.integers(0, 2)),
        scale=10.0 ** draw(st.integers(-3, 3)), threads=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**32 - 1)))


def weights(p: Pair, rng, wtype, k, n, a2, a3, pad_cols, pad_rows):
    """src0 (k, n, a2, a3), a view into a larger tensor when padded."""
    bs = Q.BLOCK[int(wtype)][0] if wtype in QUANT else 1
    kp, np_ = k + pad_cols * bs, n + pad_rows
    if wtype in QUANT:
        data = random_rows(rng, int(wtype), a3 * a2 * np_, kp)
    else:
        data = rng.standard_normal((a3, a2, np_, kp)).astype(np.float32)
    base = p.input(wtype, (kp, np_, a2, a3), data)
    if not (pad_cols or pad_rows):
        return base
    offset = pad_cols * base[0].nb[0] + pad_rows * base[0].nb[1]
    return p.view(base, (k, n, a2, a3), base[0].nb, offset)


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases())
def test_within_contract(cpu, c):
    rng = np.random.default_rng(c["seed"])
    k, n, nt = c["k"], c["n"], c["nt"]
    a2, a3 = c["a2"], c["a3"]
    b2, b3 = a2 * c["r2"], a3 * c["r3"]
    wtype, btype = c["wtype"], c["btype"]
    x = (rng.standard_normal((b3, b2, nt, k)) * c["scale"]).astype(np.float32)
    with cpu.context() as ctx:
        p = Pair(ctx, 16 << 20)
        w = weights(p, rng, wtype, k, n, a2, a3, c["pad_cols"], c["pad_rows"])
        if btype in (T.Q8_0, T.Q8_1, T.Q8_K):
            qs, d, extra = Q.reference_quantize(x.reshape(-1, k), int(btype))
            packed = pack_activations(qs, d, extra, int(btype))
            b = p.input(btype, (k, nt, b2, b3), packed)
        else:
            b = p.permuted(btype, x, c["order"])
        ours, theirs = p.mul_mat(w, b, n, (n, nt, b2, b3), c["threads"])
    assert_op_within_contract(ours, theirs, "MUL_MAT")


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(head_dim=st.sampled_from([32, 40, 64, 80, 128]), n_kv=st.integers(1, 300),
       room=st.integers(0, 40), n_tokens=st.sampled_from(ROWS), n_head_kv=st.integers(1, 3),
       group=st.sampled_from([1, 2, 4]), k_type=st.sampled_from([T.F16, T.F16, T.F32, T.Q8_0]),
       v_type=st.sampled_from([T.F16, T.F16, T.F32]), threads=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_attention_products(cpu, head_dim, n_kv, room, n_tokens, n_head_kv, group, k_type,
                            v_type, threads, seed):
    """``kq = K·q`` with K a view of a KV cache (head_dim, n_kv, n_head_kv) and q permuted
    (head_dim, n_tokens, n_head), grouped heads sharing a K head; then ``kqv = V·kq`` with V
    a view of a transposed V cache (n_kv, head_dim, n_head_kv), as llama.cpp builds them
    without flash attention."""
    if n_tokens * group * n_head_kv * n_kv > 200_000:
        n_tokens = 9
    if k_type == T.Q8_0 and head_dim % 32:
        k_type = T.F16
    rng = np.random.default_rng(seed)
    n_head = group * n_head_kv
    kv_size = n_kv + room
    gqa = head_dim * n_head_kv
    with cpu.context() as ctx:
        p = Pair(ctx, 32 << 20)
        if k_type == T.Q8_0:
            kdata = random_rows(rng, int(T.Q8_0), kv_size, gqa)
        else:
            kdata = rng.standard_normal((1, 1, kv_size, gqa)).astype(np.float32)
        kcache = p.input(k_type, (gqa, kv_size), kdata)
        knb = kcache[0].nb
        row = Q.BLOCK[int(T.Q8_0)][1] * head_dim // 32 if k_type == T.Q8_0 else knb[0] * head_dim
        kview = p.view(kcache, (head_dim, n_kv, n_head_kv, 1),
                       (knb[0], knb[1], row, row * n_head_kv))
        q = rng.standard_normal((1, n_tokens, n_head, head_dim)).astype(np.float32)
        qp = p.permuted(T.F32, q.transpose(0, 2, 1, 3), (0, 2, 1, 3))
        kq = p.mul_mat(kview, qp, n_kv, (n_kv, n_tokens, n_head), threads)

        vdata = rng.standard_normal((1, 1, gqa, kv_size)).astype(np.float32)
        vcache = p.input(v_type, (kv_size, gqa), vdata)
        vnb = vcache[0].nb
        vview = p.view(vcache, (n_kv, head_dim, n_head_kv, 1),
                       (vnb[0], vnb[1], vnb[1] * head_dim, vnb[1] * gqa))
        probs = rng.uniform(0, 1, (1, n_head, n_tokens, n_kv)).astype(np.float32)
        soft = p.input(T.F32, (n_kv, n_tokens, n_head), probs)
        kqv = p.mul_mat(vview, soft, head_dim, (head_dim, n_tokens, n_head), threads)
    for ours, theirs in (kq, kqv):
        assert_op_within_contract(ours, theirs, "MUL_MAT")


@pytest.mark.parametrize("wtype", [T.Q8_0, T.Q4_0, T.Q5_0], ids=lambda t: t.name)
@pytest.mark.parametrize("nt", [1, 4])
def test_activation_minus_128(cpu, wtype, nt):
    """Pre-quantised Q8_0 activations holding -128 (which ggml's own quantisation makes only
    of NaN): x86's sign trick multiplies them as -128·|w|, in both kernels."""
    rng = np.random.default_rng(1)
    k, n = 128, 8
    qs = rng.integers(-128, 128, (nt, k)).astype(np.int8)
    qs[:, ::3] = -128
    d = Q.reference_round_f16(rng.uniform(0.001, 0.01, (nt, k // 32)).astype(np.float32))
    with cpu.context() as ctx:
        p = Pair(ctx, 1 << 20)
        w = p.input(wtype, (k, n), random_rows(rng, int(wtype), n, k))
        b = p.input(T.Q8_0, (k, nt), pack_activations(qs, d, None, Q.Q8_0))
        ours, theirs = p.mul_mat(w, b, n, (n, nt), 1)
    # a third of the activations are -128: read as +128 or -127 they would move every
    # product far outside the bound
    assert_op_within_contract(ours, theirs, "MUL_MAT")
