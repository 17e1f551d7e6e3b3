"""MUL_MAT against a float64 oracle on gguf-dequantised weights and oracle-quantised
activations: every weight type, src0 broadcast over dims 2 and 3, permuted and padded views,
F16/BF16/quantised src1, each of ggml's kernels (the choice, and agreement between them);
and refusal of invalid nodes.  ggml itself, under the numerics contract, is in test_matmul_vs_ggml."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.graph import GraphInvalid, Op
from refimpl.kernels import matmul
from refimpl.kernels import quants as Q
from refimpl.kernels.matmul import reference
from refimpl.protocol import GgmlType as T
from refimpl.protocol.tensor import contiguous_strides
from tools.graphs import GraphBuilder

from .test_quants import GGUF_TYPE, pack_activations, random_rows

FLOAT = [T.F32, T.F16, T.BF16]
QUANT = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (8 significant bits, ties to even) by frexp, independent of the
    kernels' bit arithmetic."""
    m, e = np.frexp(x.astype(np.float64))
    return np.ldexp(np.rint(m * 256.0) / 256.0, e).astype(np.float32)


def f16_round(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float32)


def permuted_input(g: GraphBuilder, type_, x: np.ndarray, order):
    """A tensor whose logical values are ``x`` (numpy (ne3, ne2, ne1, ne0)) but whose memory
    is laid out with ggml dims ``order`` (innermost first): a PERMUTE view of a contiguous
    tensor, as ggml_permute builds it."""
    ne = (x.shape[3], x.shape[2], x.shape[1], x.shape[0])
    if list(order) == [0, 1, 2, 3]:
        return g.input(type_, ne, x)
    base_ne = tuple(ne[o] for o in order)
    base_nb = contiguous_strides(type_, base_ne)
    nb = [0] * 4
    for j, o in enumerate(order):
        nb[o] = base_nb[j]
    base_vals = x.transpose([3 - order[3], 3 - order[2], 3 - order[1], 3 - order[0]])
    base = g.input(type_, base_ne, np.ascontiguousarray(base_vals))
    return g.view(base, ne, tuple(nb), op=Op.PERMUTE)


def weight_input(g: GraphBuilder, rng, type_, k, n, a2, a3, pad_cols, pad_rows):
    """src0 (k, n, a2, a3), optionally a view into a larger tensor (extra blocks per row,
    extra rows per batch).  Returns (tensor, values (a3, a2, n, k) the product sees, mins or
    None, raw rows or None)."""
    bs = Q.BLOCK[int(type_)][0] if type_ in QUANT else 1
    kp = k + pad_cols * bs
    np_ = n + pad_rows
    if type_ in QUANT:
        raw = random_rows(rng, int(type_), a3 * a2 * np_, kp)
        base = g.input(type_, (kp, np_, a2, a3), raw)
        vals = gguf_dequantize(raw, GGUF_TYPE[int(type_)]).astype(np.float64)
        vals = vals.reshape(a3, a2, np_, kp)[:, :, :n, :k]
        mins = None
        if type_ in (T.Q4_1, T.Q5_1):
            size = Q.BLOCK[int(type_)][1]
            blocks = raw.reshape(a3, a2, np_, kp // 32, size)[:, :, :n, :k // 32]
            mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    else:
        w = rng.standard_normal((a3, a2, np_, kp)).astype(np.float32)
        base = g.input(type_, (kp, np_, a2, a3), w)
        vals = g.read(base).astype(np.float64)[:, :, :n, :k]
        mins = None
    if pad_cols or pad_rows:
        t = g.view(base, (k, n, a2, a3), base.nb)
    else:
        t = base
    return t, vals, mins


def expected(wtype, wvals, mins, x, btype):
    """Oracle result (float64 (b3, b2, t, n)) and an error scale of the same shape."""
    b3, b2, nt, k = x.shape
    if wtype in FLOAT:
        xv = x.astype(np.float64)
        if wtype == T.F16 and btype != T.F16:
            xv = f16_round(x).astype(np.float64)
        if wtype == T.BF16 and btype != T.BF16:
            xv = bf16_round(x).astype(np.float64)
        return reference(wvals, xv), reference(np.abs(wvals), np.abs(xv))
    vec = Q.VEC_DOT_TYPE[int(wtype)]
    bs = 32 if vec != Q.Q8_K else 256
    qs, d, extra = Q.reference_quantize(x.reshape(-1, k), vec)
    xq = (qs.reshape(-1, k // bs, bs) * d[:, :, None].astype(np.float64)).reshape(b3, b2, nt, k)
    out = reference(wvals, xq)
    scale = reference(np.abs(wvals), np.abs(xq))
    if mins is not None:  # ggml pairs the weight minimum with s = f16(d * sum(q))
        s = extra.astype(np.float64)
        exact = d.astype(np.float64) * qs.reshape(-1, k // 32, 32).sum(axis=2)
        corr = (s - exact).reshape(b3, b2, nt, k // 32)
        out = out + reference(mins, corr)
        scale = scale + reference(np.abs(mins), np.abs(s).reshape(b3, b2, nt, k // 32))
    return out, scale


@st.composite
def cases(draw):
    wtype = draw(st.sampled_from(FLOAT + QUANT))
    bs = Q.BLOCK[int(wtype)][0] if wtype in QUANT else 1
    if wtype in QUANT:
        k = bs * draw(st.integers(1, 3 if bs == 256 else 6))
    else:
        k = draw(st.integers(1, 70))
    vec = Q.VEC_DOT_TYPE.get(int(wtype))
    btypes = [T.F32, T.F16, T.BF16] + ([T(vec)] if wtype in QUANT else [])
    return dict(
        wtype=wtype, k=k, n=draw(st.integers(1, 9)), nt=draw(st.integers(1, 20)),
        a2=draw(st.integers(1, 2)), a3=draw(st.integers(1, 2)),
        r2=draw(st.integers(1, 3)), r3=draw(st.integers(1, 2)),
        btype=draw(st.sampled_from(btypes)),
        order=draw(st.sampled_from([(0, 1, 2, 3), (0, 2, 1, 3), (0, 1, 3, 2), (0, 3, 2, 1)])),
        pad_cols=draw(st.integers(0, 1)), pad_rows=draw(st.integers(0, 1)),
        seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=50, deadline=None, derandomize=True)
@given(c=cases())
def test_matches_oracle(c):
    rng = np.random.default_rng(c["seed"])
    k, n, nt = c["k"], c["n"], c["nt"]
    a2, a3 = c["a2"], c["a3"]
    b2, b3 = a2 * c["r2"], a3 * c["r3"]
    wtype, btype = c["wtype"], c["btype"]
    g = GraphBuilder(8 << 20)
    w, wvals, mins = weight_input(g, rng, wtype, k, n, a2, a3, c["pad_cols"], c["pad_rows"])
    x = rng.standard_normal((b3, b2, nt, k)).astype(np.float32)
    if btype in (T.F16, T.BF16):
        x = f16_round(x) if btype == T.F16 else bf16_round(x)
    if btype in (T.Q8_0, T.Q8_1, T.Q8_K):
        qs, d, extra = Q.reference_quantize(x.reshape(-1, k), int(btype))
        b = g.input(btype, (k, nt, b2, b3), pack_activations(qs, d, extra, int(btype)))
    else:
        b = permuted_input(g, btype, x, c["order"])
    out = g.node(Op.MUL_MAT, T.F32, (n, nt, b2, b3), [w, b])
    g.run()
    want, scale = expected(wtype, wvals, mins, x, btype)
    got = g.read(out).astype(np.float64)
    assert np.all(np.abs(got - want) <= 2e-6 * scale + 1e-30), np.abs(got - want).max()


def test_attention_shapes():
    """K-cache style F16 src0 view (head_dim, n_kv, n_head_kv) against a permuted F32 q with
    grouped heads (n_head = 2 x n_head_kv), then the transposed-V style product."""
    rng = np.random.default_rng(7)
    hd, n_kv, hkv, nq = 16, 12, 2, 3
    g = GraphBuilder(4 << 20)
    cache = rng.standard_normal((1, hkv, 20, hd)).astype(np.float32)   # room for 20 cells
    kc = g.input(T.F16, (hd, 20, hkv), cache)
    kview = g.view(kc, (hd, n_kv, hkv), kc.nb)
    q = rng.standard_normal((1, nq, 2 * hkv, hd)).astype(np.float32)   # (hd, n_head, nq)
    qt = g.input(T.F32, (hd, 2 * hkv, nq), q)
    qp = g.view(qt, (hd, nq, 2 * hkv), (4, qt.nb[2], qt.nb[1], qt.nb[3]), op=Op.PERMUTE)
    kq = g.node(Op.MUL_MAT, T.F32, (n_kv, nq, 2 * hkv), [kview, qp])
    g.run()
    kv = cache[0, :, :n_kv].astype(np.float16).astype(np.float64)          # (hkv, n_kv, hd)
    qv = q[0].transpose(1, 0, 2).astype(np.float16).astype(np.float64)      # (n_head, nq, hd)
    want = np.einsum("hkd,hqd->hqk", np.repeat(kv, 2, axis=0), qv)
    np.testing.assert_allclose(g.read(kq)[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wtype", QUANT, ids=lambda t: t.name)
def test_kernels_agree(wtype, monkeypatch):
    """Both kernels a quantised weight type can take (BLAS on decoded values, and the integer
    dot products on packed or unpacked rows) give the same result to float32 rounding."""
    rng = np.random.default_rng(11)
    k, n, nt = 512, 40, 24
    data = random_rows(rng, int(wtype), n, k)
    x = rng.standard_normal((nt, k)).astype(np.float32)
    integer = matmul.PACKED if int(wtype) in matmul.fast.PACKED_TYPES else matmul.UNPACKED
    results = []
    for kernel in (matmul.BLAS, integer):
        monkeypatch.setattr(matmul, "choose_kernel", lambda *args, kern=kernel: kern)
        g = GraphBuilder(4 << 20)
        w = g.input(wtype, (k, n), data)
        b = g.input(T.F32, (k, nt), x)
        out = g.node(Op.MUL_MAT, T.F32, (n, nt), [w, b])
        g.run()
        results.append(g.read(out))
    tol = 1e-5 * np.abs(results[0]).max()
    np.testing.assert_allclose(results[1], results[0], rtol=0, atol=tol, err_msg=wtype.name)


@pytest.mark.parametrize("wtype", [T.F32, T.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("nt", [1, 3])
def test_float_kernels_agree(wtype, nt, monkeypatch):
    """F32 and F16 weights with few activation rows: the packed kernel (sixteen float32 lanes
    a row, the last K % 16 one at a time) and BLAS agree to float32 rounding, with broadcast
    batches and a K that leaves values over."""
    if wtype == T.F16 and not matmul.HAS_F16C:
        pytest.fail("this host has no F16C: the F16 packed kernel cannot run here")
    rng = np.random.default_rng(5)
    k, n, a2, b2 = 70, 9, 2, 4
    wv = rng.standard_normal((a2, n, k)).astype(np.float32)
    x = rng.standard_normal((b2, nt, k)).astype(np.float32)
    results = []
    for kernel in (matmul.BLAS, matmul.PACKED):
        monkeypatch.setattr(matmul, "choose_kernel", lambda *args, kern=kernel: kern)
        g = GraphBuilder(4 << 20)
        w = g.input(wtype, (k, n, a2), wv)
        b = g.input(T.F32, (k, nt, b2), x)
        out = g.node(Op.MUL_MAT, T.F32, (n, nt, b2), [w, b])
        g.run()
        results.append(g.read(out))
    wr = wv.astype(np.float16) if wtype == T.F16 else wv
    xr = x.astype(np.float16) if wtype == T.F16 else x
    want = np.einsum("gnk,gtk->gtn", np.repeat(wr.astype(np.float64), 2, axis=0),
                     xr.astype(np.float64))
    tol = 1e-5 * np.abs(want).max()
    for got in results:
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=0, atol=tol)
    assert not np.array_equal(results[0], np.zeros_like(results[0]))


@pytest.mark.parametrize("args, kernel", [
    ((T.F32, 1), matmul.PACKED),
    ((T.F32, matmul.BLAS_MIN_ROWS - 1), matmul.PACKED),
    ((T.F32, matmul.BLAS_MIN_ROWS), matmul.BLAS),
    ((T.F16, 1), matmul.PACKED if matmul.HAS_F16C else matmul.BLAS),
    ((T.F16, matmul.BLAS_MIN_ROWS), matmul.BLAS),
    ((T.BF16, 7), matmul.BLAS),
    ((T.Q4_0, 1), matmul.PACKED),
    ((T.Q8_0, matmul.BLAS_MIN_ROWS - 1), matmul.PACKED),
    ((T.Q8_0, matmul.BLAS_MIN_ROWS), matmul.PACKED),
    ((T.Q4_1, 2), matmul.PACKED),
    ((T.Q4_K, 1), matmul.PACKED),
    ((T.Q6_K, 3), matmul.PACKED),
    ((T.Q6_K, 300), matmul.PACKED),
    ((T.Q5_0, 1), matmul.PACKED),
    ((T.Q5_1, 2), matmul.PACKED),
    ((T.Q2_K, 1), matmul.UNPACKED),
    ((T.Q3_K, 3), matmul.UNPACKED),
    ((T.Q5_K, 1), matmul.PACKED),
    ((T.Q5_K, 64), matmul.PACKED),
    ((T.Q2_K, matmul.BLAS_MIN_ROWS), matmul.BLAS),
])
def test_choose_kernel(args, kernel):
    wtype, rows = args
    assert matmul.choose_kernel(int(wtype), rows) == kernel


@pytest.mark.parametrize("wtype", [T.F32, T.Q4_0])
def test_empty_activations_run(wtype):
    g = GraphBuilder(1 << 20)
    w = g.input(wtype, (32, 3))
    b = g.input(T.F32, (32, 0))
    g.node(Op.MUL_MAT, T.F32, (3, 0), [w, b])
    g.run()


UNSUPPORTED = [t for t in T if t not in (*FLOAT, *QUANT) and t.value not in
               (T.I8, T.I16, T.I32, T.I64, T.F64) and t not in Q.MORE_WEIGHT_TYPES]


@pytest.mark.parametrize("wtype", UNSUPPORTED, ids=lambda t: t.name)
def test_other_weight_types_are_refused(wtype):
    from refimpl.protocol.ggml_types import type_traits
    g = GraphBuilder(1 << 20)
    k = type_traits(wtype).block_size * 2
    w = g.input(wtype, (k, 4))
    b = g.input(T.F32, (k, 2))
    g.node(Op.MUL_MAT, T.F32, (4, 2), [w, b])
    with pytest.raises(GraphInvalid):
        g.compile()


@pytest.mark.parametrize("case", ["dst f16", "k mismatch", "batch", "transposed src0",
                                  "src1 q8_0 for f32", "src1 q8_1 for q4_0", "src1 i32",
                                  "dst shape", "dst permuted", "src1 unpacked", "src2",
                                  "missing src1", "empty src0 batch", "odd dst stride"])
def test_invalid_nodes_are_refused(case):
    g = GraphBuilder(1 << 20)
    wt = T.Q4_0 if case in ("src1 q8_1 for q4_0",) else T.F32
    w = g.input(wt, (32, 4, 2))
    b = g.input(T.F32, (32, 3, 4))
    ne = (4, 3, 4)
    srcs = [w, b]
    dtype = T.F32
    nb = None
    if case == "dst f16":
        dtype = T.F16
    elif case == "k mismatch":
        srcs[1] = g.input(T.F32, (33, 3, 4))
    elif case == "batch":
        srcs[1] = g.input(T.F32, (32, 3, 3))
        ne = (4, 3, 3)
    elif case == "transposed src0":
        srcs[0] = g.view(w, (32, 4, 2), (16, 4, 512), op=Op.TRANSPOSE)
    elif case == "src1 q8_0 for f32":
        srcs[1] = g.input(T.Q8_0, (32, 3, 4))
    elif case == "src1 q8_1 for q4_0":
        srcs[1] = g.input(T.Q8_1, (32, 3, 4))
    elif case == "src1 i32":
        srcs[1] = g.input(T.I32, (32, 3, 4))
    elif case == "dst shape":
        ne = (4, 3, 2)
    elif case == "dst permuted":
        nb = (4, 48, 16, 192)
    elif case == "src1 unpacked":
        srcs[1] = g.view(b, (16, 3, 4), (8, 128, 384))
    elif case == "src2":
        srcs.append(g.input(T.F32, (4,)))
    elif case == "missing src1":
        srcs[1] = None
    elif case == "empty src0 batch":
        srcs[0] = g.input(T.F32, (32, 4, 0))
        ne = (4, 3, 4)
    elif case == "odd dst stride":
        nb = (4, 18, 54, 216)
    g.node(Op.MUL_MAT, dtype, ne, srcs, nb=nb)
    with pytest.raises(GraphInvalid):
        g.compile()
