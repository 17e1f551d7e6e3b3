"""Recurrent and linear-attention ops: SSM_CONV, SSM_SCAN (Mamba), RWKV_WKV6,
GATED_LINEAR_ATTN, RWKV_WKV7, GATED_DELTA_NET and SOLVE_TRI, with DeepSeek's
LIGHTNING_INDEXER and the DSV4 hyper-connection ops (spec/ops/recurrent.md).

Each walks tokens in order, carrying a small state per (sequence, head); the state ops write
their outputs followed by the final states into one F32 destination, as ggml lays it out.
Everything is computed in float32 as ggml's CPU backend does (its SIMD paths sum in another
order, within test-backend-ops' bound); the dot products of GATED_DELTA_NET are accumulated
in float64 (``ggml_vec_dot_f32``'s scalar path uses ggml_float).

The destination is computed into a private copy of its current bytes and stored at the end:
sources may share bytes with it, and the snapshot slots an op does not write (SSM_SCAN and
GATED_DELTA_NET with fewer tokens than K) keep what the client put there.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..graph.build import Node
from ..graph.ops import Op
from ..graph.registry import kernel
from .cpu_tensors import f16_to_f32, rows_u8, view
from .get_rows import checked_indices
from .parallel import sized_kernel
from .quants import F32, dequantize_rows

_OPTS = dict(cache=True, nogil=True)


def _flat_dst(node: Node) -> np.ndarray:
    """A float32 copy of the (contiguous) destination, flat in ggml's element order."""
    return np.array(view(node), np.float32).reshape(-1)


def _store(node: Node, flat: np.ndarray) -> None:
    view(node)[...] = flat.reshape(view(node).shape)


def _values(t: Node, shape: tuple) -> np.ndarray:
    """A contiguous float32 source seen as ``shape`` (a view when possible)."""
    return np.ascontiguousarray(view(t)).reshape(shape)


# ----------------------------------------------------------------------------------------------
# SSM_CONV
# ----------------------------------------------------------------------------------------------

@sized_kernel(2, **_OPTS)
def ssm_conv_f32(sx, c, out):
    """out[s, t, r] = Σ_i sx[s, r, t + i] · c[r, i]: sx (n_s, d_inner, d_conv-1+n_t), c
    (d_inner, d_conv), out (n_s, n_t, d_inner); float32 sums in order."""
    n_s, n_t, n_r = out.shape
    n_c = c.shape[1]
    for j in prange(n_s * n_r):
        s, r = j // n_r, j % n_r
        for t in range(n_t):
            acc = np.float32(0.0)
            for i in range(n_c):
                acc += sx[s, r, t + i] * c[r, i]
            out[s, t, r] = acc


def reference_ssm_conv(sx: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Numpy oracle: sx (n_s, d_inner, d_conv-1+n_t), c (d_inner, d_conv) -> (n_s, n_t,
    d_inner)."""
    n_c = c.shape[1]
    n_t = sx.shape[2] - n_c + 1
    windows = np.stack([sx[:, :, t:t + n_c] for t in range(n_t)], axis=1)
    return np.einsum("stri,ri->str", windows.astype(np.float64), c)


@kernel("cpu", Op.SSM_CONV)
def bind_ssm_conv(node: Node):
    """SSM_CONV F32: the CPU runner of a validated node."""
    sx, c = view(node.src[0])[0], view(node.src[1])[0, 0]
    dst = view(node)[0]

    def run():
        out = np.empty(dst.shape, np.float32)
        if out.size:
            ssm_conv_f32(sx, c, out)
        dst[...] = out
    return run


# ----------------------------------------------------------------------------------------------
# SSM_SCAN
# ----------------------------------------------------------------------------------------------

@njit(inline="always")
def _softplus(x):
    """ggml_compute_softplus_f32: log(1 + e^x), or x above 20."""
    return x if x > np.float32(20.0) else np.float32(math.log(np.float32(1.0) + np.float32(math.exp(x))))


@sized_kernel(1, error_model="numpy", **_OPTS)
def ssm_scan_f32(s, x, dt, a, b, c, ids, y, states):
    """Selective scan.  s (slots, n_head, head_dim, d_state) initial states, x (n_s, n_t,
    n_head, head_dim), dt (n_s, n_t, n_head), a (n_head, 1 or d_state), b and c (n_s, n_t,
    n_group, d_state), ids (n_s) checked slots of s; y (n_s, n_t, n_head, head_dim) and
    states (K, n_s, n_head, head_dim, d_state) are written (slot 0 the final state, slot
    k the state k tokens before the end)."""
    n_s, n_t, n_head, head_dim = x.shape
    n_group, d_state = b.shape[2], b.shape[3]
    n_k = states.shape[0]
    per_group = n_head // n_group
    scalar_a = a.shape[1] == 1
    for j in prange(n_s * n_head):
        q, h = j // n_head, j % n_head
        g = h // per_group
        st = states[0, q, h]
        st[...] = s[ids[q], h]
        for t in range(n_t):
            d = _softplus(dt[q, t, h])
            decay = np.float32(math.exp(d * a[h, 0]))
            for r in range(head_dim):
                x_dt = x[q, t, h, r] * d
                acc = np.float32(0.0)
                for i in range(d_state):
                    if not scalar_a:
                        decay = np.float32(math.exp(d * a[h, i]))
                    v = st[r, i] * decay + b[q, t, g, i] * x_dt
                    acc += v * c[q, t, g, i]
                    st[r, i] = v
                y[q, t, h, r] = acc
            slot = n_t - 1 - t
            if n_k > 1 and 0 < slot < n_k:
                states[slot, q, h] = st


def _softplus_ref(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def reference_ssm_scan(s, x, dt, a, b, c, ids, k=1):
    """Numpy oracle in float64: shapes as :func:`ssm_scan_f32`; returns (y, states)."""
    n_s, n_t, n_head, head_dim = x.shape
    n_group, d_state = b.shape[2], b.shape[3]
    y = np.zeros(x.shape)
    states = np.zeros((k, n_s, n_head, head_dim, d_state))
    for q in range(n_s):
        st = s[ids[q]].astype(np.float64)
        for t in range(n_t):
            d = _softplus_ref(dt[q, t].astype(np.float64))               # (n_head,)
            decay = np.exp(d[:, None] * a)                             # (n_head, 1 | d_state)
            bg = np.repeat(b[q, t], n_head // n_group, axis=0)           # (n_head, d_state)
            cg = np.repeat(c[q, t], n_head // n_group, axis=0)
            st = st * decay[:, None, :] + bg[:, None, :] * (x[q, t] * d[:, None])[:, :, None]
            y[q, t] = (st * cg[:, None, :]).sum(-1)
            slot = n_t - 1 - t
            if slot < k:
                states[slot, q] = st
    return y, states


@kernel("cpu", Op.SSM_SCAN)
def bind_ssm_scan(node: Node):
    """SSM_SCAN F32: the CPU runner of a validated node."""
    s_n, x_n, dt_n, a_n, b_n, c_n, ids_n = node.src[:7]
    s = view(s_n)                       # (slots, n_head, head_dim, d_state)
    x = view(x_n)                       # (n_s, n_t, n_head, head_dim), strided outer dims
    dt = view(dt_n)[0]                  # (n_s, n_t, n_head)
    a = view(a_n)[0, 0]                 # (n_head, 1 | d_state)
    b, c = view(b_n), view(c_n)         # (n_s, n_t, n_group, d_state)
    k = node.param_i32(0)
    n_y = x_n.nelements
    state_shape = (k, *x.shape[:1], *s.shape[1:])

    def run():
        # llama.cpp #25765 reads a state wherever an id points
        ids = checked_indices(node, ids_n, s_n.ne[3], "sequence id",
                              "the {} state slots of src0").reshape(-1)
        flat = _flat_dst(node)
        y = flat[:n_y].reshape(x.shape)
        states = flat[n_y:].reshape(state_shape)
        if y.size or states.size:
            ssm_scan_f32(s, x, dt, a, b, c, ids, y, states)
        _store(node, flat)
    return run


# ----------------------------------------------------------------------------------------------
# RWKV_WKV6, GATED_LINEAR_ATTN, RWKV_WKV7
# ----------------------------------------------------------------------------------------------
# Shapes inside the kernels: per-token sources (n_tokens, H, S); states (n_seqs, H, S, S);
# out (n_tokens, H, S).  The tokens of sequence q are q·T/n_seqs ... (q+1)·T/n_seqs - 1.

@sized_kernel(0, **_OPTS)
def wkv6_f32(k, v, r, tf, td, s0, out, states):
    """RWKV v6: per head, S[i][j] ← S[i][j]·td[i] + k[i]·v[j] after out[j] = Σ_i r[i] ·
    (k[i]·v[j]·tf[i] + S[i][j])."""
    n_tok, heads, size = k.shape
    n_seqs = states.shape[0]
    per_seq = n_tok // n_seqs
    for job in prange(n_seqs * heads):
        q, h = job // heads, job % heads
        st = states[q, h]
        st[...] = s0[q, h]
        for t in range(q * per_seq, (q + 1) * per_seq):
            o = out[t, h]
            o[:] = 0
            for i in range(size):
                kk, rr, u, w = k[t, h, i], r[t, h, i], tf[h, i], td[t, h, i]
                for j in range(size):
                    kv = v[t, h, j] * kk
                    prev = st[i, j]
                    o[j] += (kv * u + prev) * rr
                    st[i, j] = prev * w + kv


@sized_kernel(0, **_OPTS)
def gla_f32(k, v, q_, g, scale, s0, out, states):
    """Gated linear attention: S[i][j] ← S[i][j]·g[i] + k[i]·v[j], then out[j] += S[i][j] ·
    q[i]·scale, over i in order."""
    n_tok, heads, size = k.shape
    n_seqs = states.shape[0]
    per_seq = n_tok // n_seqs
    for job in prange(n_seqs * heads):
        q, h = job // heads, job % heads
        st = states[q, h]
        st[...] = s0[q, h]
        for t in range(q * per_seq, (q + 1) * per_seq):
            o = out[t, h]
            o[:] = 0
            for i in range(size):
                kk, qq, gg = k[t, h, i], q_[t, h, i] * scale, g[t, h, i]
                for j in range(size):
                    v_new = st[i, j] * gg + v[t, h, j] * kk
                    o[j] += v_new * qq
                    st[i, j] = v_new


@sized_kernel(0, **_OPTS)
def wkv7_f32(r, w, k, v, a, b, s0, out, states):
    """RWKV v7: per value row i, sa = Σ_j a[j]·S[i][j]; S[i][j] ← S[i][j]·w[j] + v[i]·k[j] +
    sa·b[j]; out[i] = Σ_j S[i][j]·r[j]."""
    n_tok, heads, size = k.shape
    n_seqs = states.shape[0]
    per_seq = n_tok // n_seqs
    for job in prange(n_seqs * heads):
        q, h = job // heads, job % heads
        st = states[q, h]
        st[...] = s0[q, h]
        for t in range(q * per_seq, (q + 1) * per_seq):
            for i in range(size):
                vi = v[t, h, i]
                sa = np.float32(0.0)
                for j in range(size):
                    sa += a[t, h, j] * st[i, j]
                acc = np.float32(0.0)
                for j in range(size):
                    x = st[i, j] * w[t, h, j] + vi * k[t, h, j] + sa * b[t, h, j]
                    st[i, j] = x
                    acc += x * r[t, h, j]
                out[t, h, i] = acc


def reference_linear_attention(op, srcs, state, n_seqs, scale=1.0):
    """Numpy oracle (float64) of RWKV_WKV6 (srcs k, v, r, tf, td), GATED_LINEAR_ATTN (k, v,
    q, g) and RWKV_WKV7 (r, w, k, v, a, b): per-token sources (n_tokens, H, S), state
    (n_seqs, H, S, S); returns (out (n_tokens, H, S), states)."""
    srcs = [np.asarray(x, np.float64) for x in srcs]
    n_tok, heads, size = srcs[0].shape if op != Op.RWKV_WKV6 else srcs[1].shape
    per_seq = n_tok // n_seqs
    out = np.zeros((n_tok, heads, size))
    states = np.array(state, np.float64).reshape(n_seqs, heads, size, size)
    for q in range(n_seqs):
        st = states[q]
        for t in range(q * per_seq, (q + 1) * per_seq):
            if op == Op.RWKV_WKV6:
                k, v, r, tf, td = srcs
                kv = k[t][:, :, None] * v[t][:, None, :]
                out[t] = np.einsum("hi,hij->hj", r[t], kv * tf.reshape(heads, size)[:, :, None] + st)
                st = st * td[t][:, :, None] + kv
            elif op == Op.GATED_LINEAR_ATTN:
                k, v, q_, g = srcs
                st = st * g[t][:, :, None] + k[t][:, :, None] * v[t][:, None, :]
                out[t] = np.einsum("hi,hij->hj", q_[t] * scale, st)
            else:
                r, w, k, v, a, b = srcs
                sa = np.einsum("hij,hj->hi", st, a[t])
                st = st * w[t][:, None, :] + v[t][:, :, None] * k[t][:, None, :] + sa[:, :, None] * b[t][:, None, :]
                out[t] = np.einsum("hij,hj->hi", st, r[t])
        states[q] = st
    return out, states


_LINEAR = {Op.RWKV_WKV6: (wkv6_f32, 5), Op.GATED_LINEAR_ATTN: (gla_f32, 4),
           Op.RWKV_WKV7: (wkv7_f32, 6)}


@kernel("cpu", Op.RWKV_WKV6, Op.GATED_LINEAR_ATTN, Op.RWKV_WKV7)
def bind_linear_attention(node: Node):
    """RWKV_WKV6, GATED_LINEAR_ATTN and RWKV_WKV7 F32: the CPU runner of a validated node."""
    fn, n_tok_srcs = _LINEAR[node.op]
    ref = node.src[1]                               # v (WKV6, GLA) or w (WKV7): (S, H, T)
    size, heads, n_tok = ref.ne[0], ref.ne[1], ref.ne[2]
    state_n = node.src[n_tok_srcs]
    n_seqs = state_n.ne[1]
    tok_shape = (n_tok, heads, size)
    args = []
    for i in range(n_tok_srcs):
        shape = (heads, size) if node.op == Op.RWKV_WKV6 and i == 3 else tok_shape
        args.append(_values(node.src[i], shape))
    if node.op == Op.GATED_LINEAR_ATTN:
        args.append(np.float32(node.param_f32(0)))
    s0 = _values(state_n, (n_seqs, heads, size, size))
    n_out = n_tok * heads * size

    def run():
        flat = _flat_dst(node)
        out = flat[:n_out].reshape(tok_shape)
        states = flat[n_out:].reshape(n_seqs, heads, size, size)
        if n_tok and heads and size:
            fn(*args, s0, out, states)
        _store(node, flat)
    return run


# ----------------------------------------------------------------------------------------------
# GATED_DELTA_NET
# ----------------------------------------------------------------------------------------------

@sized_kernel(0, **_OPTS)
def gated_delta_net_f32(q, k, v, g, beta, s0, out, states):
    """Gated delta rule, per (sequence, head) with the state kept as M[j][i] = S[i][j]:
    M ← M·exp(g) (per key i when g has S_v gates), δ[j] = (v[j] - M[j]·k)·β, M[j] += δ[j]·k,
    out[j] = M[j]·q / √S_v.  q, k (Sq, n_t, Hq, S_v) broadcast over heads (modulo Hq) and
    sequences (blocks of n_s/Sq); v (n_s, n_t, H, S_v); g (n_s, n_t, H, 1|S_v); beta (n_s,
    n_t, H, 1); s0 (n_s, H, S_v, S_v); out (n_s, n_t, H, S_v); states (K, n_s, H, S_v, S_v):
    slot k is the state k tokens before the end, written while k < K."""
    n_s, n_t, heads, size = v.shape
    hq, hk = q.shape[2], k.shape[2]
    rq, rk = n_s // q.shape[0], n_s // k.shape[0]
    n_k = states.shape[0]
    scale = np.float32(1.0) / np.float32(math.sqrt(np.float32(size)))
    kda = g.shape[3] == size
    for job in prange(n_s * heads):
        s, h = job // heads, job % heads
        m = np.empty((size, size), np.float32)
        m[...] = s0[s, h]
        gates = np.empty(size, np.float32)
        delta = np.empty(size, np.float32)
        if n_t == 0 and n_k == 1:
            states[0, s, h] = m
        for t in range(n_t):
            qv, kv, vv = q[s // rq, t, h % hq], k[s // rk, t, h % hk], v[s, t, h]
            if kda:
                for i in range(size):
                    gates[i] = np.float32(math.exp(g[s, t, h, i]))
                for j in range(size):
                    for i in range(size):
                        m[j, i] *= gates[i]
            else:
                e = np.float32(math.exp(g[s, t, h, 0]))
                for j in range(size):
                    for i in range(size):
                        m[j, i] *= e
            bt = beta[s, t, h, 0]
            for j in range(size):
                acc = 0.0
                for i in range(size):
                    acc += m[j, i] * kv[i]
                delta[j] = (vv[j] - np.float32(acc)) * bt
            for j in range(size):
                for i in range(size):
                    m[j, i] += kv[i] * delta[j]
            for j in range(size):
                acc = 0.0
                for i in range(size):
                    acc += m[j, i] * qv[i]
                out[s, t, h, j] = np.float32(acc) * scale
            slot = n_t - 1 - t
            if slot < n_k:
                states[slot, s, h] = m


def reference_gated_delta_net(q, k, v, g, beta, s0, n_k=1):
    """Numpy oracle (float64), shapes as :func:`gated_delta_net_f32`; returns (out, states)
    with slots the kernel does not write left zero."""
    n_s, n_t, heads, size = v.shape
    out = np.zeros(v.shape)
    states = np.zeros((n_k, n_s, heads, size, size))
    for s in range(n_s):
        for h in range(heads):
            m = s0[s, h].astype(np.float64)
            if n_t == 0 and n_k == 1:
                states[0, s, h] = m
            for t in range(n_t):
                qv = q[s // (n_s // q.shape[0]), t, h % q.shape[2]]
                kv = k[s // (n_s // k.shape[0]), t, h % k.shape[2]]
                m = m * np.exp(g[s, t, h].astype(np.float64))[None, :]
                delta = (v[s, t, h] - m @ kv) * beta[s, t, h, 0]
                m = m + delta[:, None] * kv[None, :]
                out[s, t, h] = m @ qv / math.sqrt(size)
                if n_t - 1 - t < n_k:
                    states[n_t - 1 - t, s, h] = m
    return out, states


@kernel("cpu", Op.GATED_DELTA_NET)
def bind_gated_delta_net(node: Node):
    """GATED_DELTA_NET F32: the CPU runner of a validated node."""
    q, k, v, g, beta, s0 = (view(t) for t in node.src[:6])   # (ne3, ne2, ne1, ne0) each
    size, heads, n_t, n_s = node.src[2].ne
    n_k = node.param_i32(0)
    n_out = size * heads * n_t * n_s

    def run():
        flat = _flat_dst(node)
        out = flat[:n_out].reshape(n_s, n_t, heads, size)
        states = flat[n_out:].reshape(n_k, n_s, heads, size, size)
        if heads and size and n_s:
            gated_delta_net_f32(q, k, v, g, beta, s0, out, states)
        _store(node, flat)
    return run


# ----------------------------------------------------------------------------------------------
# SOLVE_TRI
# ----------------------------------------------------------------------------------------------

@sized_kernel(1, error_model="numpy", **_OPTS)
def solve_tri_f32(a, b, x):
    """Forward substitution, column by column: a (B3, B2, n, n) lower triangular, b and x
    (B3, B2, n, k); x[r, c] = (b[r, c] - Σ_{t<r} a[r, t]·x[t, c]) / a[r, r] in float32
    (a zero diagonal gives inf or NaN, as in ggml)."""
    n3, n2, n, kc = b.shape
    for job in prange(n3 * n2 * kc):
        i3, i2, col = job // (n2 * kc), (job // kc) % n2, job % kc
        aa, bb, xx = a[i3, i2], b[i3, i2], x[i3, i2]
        for r in range(n):
            acc = np.float32(0.0)
            for t in range(r):
                acc += aa[r, t] * xx[t, col]
            xx[r, col] = (bb[r, col] - acc) / aa[r, r]


def reference_solve_tri(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Numpy oracle: ``solve(tril(a), b)`` per batch, float64."""
    a64 = np.tril(np.asarray(a, np.float64))
    return np.linalg.solve(a64, np.asarray(b, np.float64))


@kernel("cpu", Op.SOLVE_TRI)
def bind_solve_tri(node: Node):
    """SOLVE_TRI F32: the CPU runner of a validated node."""
    a, b, dst = view(node.src[0]), view(node.src[1]), view(node)

    def run():
        x = np.empty(dst.shape, np.float32)
        if x.size:
            solve_tri_f32(a, b, x)
        dst[...] = x
    return run


# ----------------------------------------------------------------------------------------------
# LIGHTNING_INDEXER
# ----------------------------------------------------------------------------------------------

@sized_kernel(0, **_OPTS)
def lightning_scores_f32(qk, w, mask, out):
    """out[t, j] = Σ_h max(qk[t, h, j], 0)·w[t, h] + mask[t, j] (float32, heads in order):
    qk (n_tok, n_head, n_kv) the dot products of one stream, w (n_tok, n_head), mask and out
    (n_tok, n_kv)."""
    n_tok, n_head, n_kv = qk.shape
    for t in prange(n_tok):
        row = out[t]
        row[:] = 0
        for h in range(n_head):
            wh = w[t, h]
            for j in range(n_kv):
                x = qk[t, h, j]
                row[j] += (x if x > 0 else np.float32(0.0)) * wh
        for j in range(n_kv):
            row[j] += mask[t, j]


def lightning_indexer(q, k, w, mask) -> np.ndarray:
    """LIGHTNING_INDEXER: q (n_stream, n_tok, n_head, d), k (n_stream, n_kv, d) float32, w
    (n_stream, n_tok, n_head), mask (n_mask, n_tok, n_kv) -> (n_stream, n_tok, n_kv).  The
    q·k dot products are one float32 matrix product per stream (ggml: ``ggml_vec_dot_f32``
    per pair)."""
    n_stream, n_tok, n_head, d = q.shape
    out = np.empty((n_stream, n_tok, k.shape[1]), np.float32)
    for s in range(n_stream):
        qk = (q[s].reshape(n_tok * n_head, d) @ k[s].T).reshape(n_tok, n_head, -1)
        lightning_scores_f32(qk, w[s], mask[s % mask.shape[0]], out[s])
    return out


def reference_lightning_indexer(q, k, w, mask):
    """Numpy oracle (float64), shapes as :func:`lightning_indexer`."""
    qk = np.einsum("sthd,sjd->sthj", q.astype(np.float64), k.astype(np.float64))
    score = np.einsum("sthj,sth->stj", np.maximum(qk, 0), w)
    n_mask = mask.shape[0]
    return score + mask[np.arange(q.shape[0]) % n_mask]


@kernel("cpu", Op.LIGHTNING_INDEXER)
def bind_lightning_indexer(node: Node):
    """LIGHTNING_INDEXER with keys of any type of INDEXER_K_TYPES: the CPU runner of a
    validated node."""
    q_n, k_n, w_n, m_n = node.src[:4]
    q = view(q_n)                               # (n_stream, n_tok, n_head, d)
    w = view(w_n)[:, 0]                         # (n_stream, n_tok, n_head)
    dst = view(node)[:, 0]                      # (n_stream, n_tok, n_kv)

    def keys():
        if k_n.type == F32:
            return view(k_n)[:, :, 0]
        return dequantize_rows(k_n.type, rows_u8(k_n), k_n.ne[0])[:, :, 0]

    def run():
        if dst.size:
            mask = f16_to_f32(view(m_n))[:, 0]  # (n_mask, n_tok, n_kv)
            dst[...] = lightning_indexer(np.ascontiguousarray(q), np.ascontiguousarray(keys()),
                                         w, mask)
    return run


# ----------------------------------------------------------------------------------------------
# DSV4_HC_COMB, DSV4_HC_PRE, DSV4_HC_POST (DeepSeek V4 hyper-connections)
# ----------------------------------------------------------------------------------------------

@njit(inline="always")
def _normalise(c, eps, over_rows):
    """Divide each column (idst fixed) or, with ``over_rows``, each row (isrc fixed) of the
    4x4 c[isrc, idst] by eps plus its sum (float32)."""
    for a in range(4):
        total = eps
        for b in range(4):
            total += c[a, b] if over_rows else c[b, a]
        inv = np.float32(1.0) / total
        for b in range(4):
            if over_rows:
                c[a, b] *= inv
            else:
                c[b, a] *= inv


@sized_kernel(0, error_model="numpy", **_OPTS)
def hc_comb_f32(mixes, scale, base, eps, n_iter, out):
    """Per token: c[isrc, :] = softmax(mixes[8 + 4·isrc + :]·scale + base[...]) + eps, then
    Sinkhorn: columns normalised, then n_iter-1 times rows and columns.  mixes (n_tok, 24),
    base (24,), out (n_tok, 4 (isrc), 4 (idst))."""
    n_tok = mixes.shape[0]
    for t in prange(n_tok):
        c = np.empty((4, 4), np.float32)
        for a in range(4):
            top = np.float32(-np.inf)
            for b in range(4):
                v = mixes[t, 8 + 4 * a + b] * scale + base[8 + 4 * a + b]
                c[a, b] = v
                top = max(top, v)
            total = np.float32(0.0)
            for b in range(4):
                e = np.float32(math.exp(c[a, b] - top))
                c[a, b] = e
                total += e
            inv = np.float32(1.0) / total
            for b in range(4):
                c[a, b] = c[a, b] * inv + eps
        _normalise(c, eps, False)
        for _ in range(1, n_iter):
            _normalise(c, eps, True)
            _normalise(c, eps, False)
        out[t] = c


def reference_hc_comb(mixes, scale, base, eps, n_iter):
    """Numpy oracle (float64), shapes as :func:`hc_comb_f32`."""
    v = (mixes[:, 8:24] * scale + base[8:24]).reshape(-1, 4, 4).astype(np.float64)
    e = np.exp(v - v.max(-1, keepdims=True))
    c = e / e.sum(-1, keepdims=True) + eps
    c = c / (eps + c.sum(1, keepdims=True))
    for _ in range(1, n_iter):
        c = c / (eps + c.sum(2, keepdims=True))
        c = c / (eps + c.sum(1, keepdims=True))
    return c


@sized_kernel(3, error_model="numpy", **_OPTS)
def hc_pre_f32(x, w, scale, out, gated):
    """out[t, i] = scale · Σ_h x[t, h, i]·weight: x (n_tok, hc, n_embd); w (n_tok, hc) or,
    ``gated``, gates (n_tok, hc, n_embd) through a sigmoid; out (n_tok, n_embd)."""
    n_tok, hc, n_embd = x.shape
    for job in prange(n_tok * n_embd):
        t, i = job // n_embd, job % n_embd
        acc = np.float32(0.0)
        for h in range(hc):
            if gated:
                wv = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-w[t, h, i])))
            else:
                wv = w[t, h, 0]
            acc += x[t, h, i] * wv
        out[t, i] = scale * acc


@sized_kernel(4, **_OPTS)
def hc_post_f32(x, res, post, comb, out, identity):
    """out[t, d, i] = x[t, i]·post[t, d] + Σ_s res[t, s, i]·comb[t, s, d] (or + res[t, d, i]
    when ``identity``): x (n_tok, n_embd), res and out (n_tok, hc, n_embd), post (n_tok,
    hc), comb (n_tok, hc (src), hc (dst))."""
    n_tok, hc, n_embd = out.shape
    for job in prange(n_tok * hc):
        t, d = job // hc, job % hc
        for i in range(n_embd):
            acc = x[t, i] * post[t, d]
            if identity:
                acc += res[t, d, i]
            else:
                for s in range(hc):
                    acc += res[t, s, i] * comb[t, s, d]
            out[t, d, i] = acc


@kernel("cpu", Op.DSV4_HC_COMB)
def bind_hc_comb(node: Node):
    """DSV4_HC_COMB F32: the CPU runner of a validated node."""
    mixes = view(node.src[0])[0, 0]                  # (n_tok, 24)
    scale = view(node.src[1]).reshape(-1)
    base = view(node.src[2]).reshape(-1)
    eps, n_iter = np.float32(node.param_f32(0)), node.param_i32(1)
    dst = view(node)[0]                              # (n_tok, 4, 4)

    def run():
        out = np.empty(dst.shape, np.float32)
        if out.size:
            hc_comb_f32(mixes, scale[2], base, eps, n_iter, out)
        dst[...] = out
    return run


@kernel("cpu", Op.DSV4_HC_PRE)
def bind_hc_pre(node: Node):
    """DSV4_HC_PRE F32 (plain or gated): the CPU runner of a validated node."""
    x = view(node.src[0])[0]                         # (n_tok, hc, n_embd)
    gated = node.param_i32(1) != 0
    w = view(node.src[1])[0] if gated else view(node.src[1])[0, 0][:, :, None]
    scale = np.float32(node.param_f32(0))
    dst = view(node)[0, 0]                           # (n_tok, n_embd)

    def run():
        out = np.empty(dst.shape, np.float32)
        if out.size:
            hc_pre_f32(x, w, scale, out, gated)
        dst[...] = out
    return run


@kernel("cpu", Op.DSV4_HC_POST)
def bind_hc_post(node: Node):
    """DSV4_HC_POST F32 (with or without comb): the CPU runner of a validated node."""
    x = view(node.src[0])[0, 0]                      # (n_tok, n_embd)
    res = view(node.src[1])[0]                       # (n_tok, hc, n_embd)
    post = view(node.src[2])[0, 0]                   # (n_tok, hc)
    identity = len(node.src) < 4 or node.src[3] is None
    comb = res[:, :, :1] if identity else view(node.src[3])[0]   # (n_tok, hc, hc); unused if identity
    dst = view(node)[0]

    def run():
        out = np.empty(dst.shape, np.float32)
        if out.size:
            hc_post_f32(x, res, post, comb, out, identity)
        dst[...] = out
    return run
