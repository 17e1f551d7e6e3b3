"""What ggml accepts for the recurrent and linear-attention ops of
:mod:`refimpl.kernels.recurrent` (spec/ops/recurrent.md; validation, any device).

ggml's CPU backend computes all of them in F32 only (any other type aborts), and its kernels
walk their tensors with pointer arithmetic derived from the shapes: every shape a kernel
derives an offset from is tied here to the tensors it indexes, and the op parameters that
choose how much is written (K of SSM_SCAN and GATED_DELTA_NET) to the destination's size
(spec/hazards.md, H17).  SSM_SCAN's sequence ids are index data, checked by the kernel right
before it runs.
"""

from __future__ import annotations

from ..build import Node
from ..checks import (BF16, F16, F32, I32, block_rows, elementwise_strides, fail, is_contiguous,
                      no_src_beyond, require, src, type_in)
from ..ops import Op
from ..registry import validates
from .types import QUANT_WEIGHT_TYPES


def _f32(node: Node, *tensors: tuple[Node, str]) -> None:
    """Each tensor F32 with element-aligned strides."""
    for t, what in tensors:
        type_in(t, {F32}, node, what)
        elementwise_strides(t, node, what)


def _contiguous(node: Node, t: Node, what: str) -> None:
    if not is_contiguous(t):
        fail(node, f"{what} '{t.name}' must be contiguous")


def _dst(node: Node, ne: tuple) -> None:
    """dst: contiguous F32 of shape ``ne``."""
    _f32(node, (node, "dst"))
    if node.ne != ne:
        fail(node, f"dst shape must be {list(ne)}")
    _contiguous(node, node, "dst")


@validates(Op.SSM_CONV)
def check_ssm_conv(node: Node) -> None:
    """SSM_CONV (ggml_ssm_conv): the depthwise causal convolution of Mamba.  src0 (sx) is
    (d_conv - 1 + n_t, d_inner, n_s) with packed rows, src1 (c) the (d_conv, d_inner) weights,
    dst (d_inner, n_t, n_s): raise GraphInvalid unless ggml would accept the node."""
    sx, c = src(node, 0, "sx"), src(node, 1, "weights")
    no_src_beyond(node, 2)
    _f32(node, (sx, "src0"), (c, "src1"))
    require(sx.ne[3] == 1, node, "src0 must be 3-D")
    require(c.ne[2] == 1 and c.ne[3] == 1, node, "src1 must be a matrix")
    d_conv, d_inner = c.ne[0], c.ne[1]
    n_t = sx.ne[0] - d_conv + 1
    if not (n_t >= 0):
        fail(node, f"src0 rows of {sx.ne[0]} are shorter than d_conv - 1 = {d_conv - 1}")
    if sx.ne[1] != d_inner:
        fail(node, f"src0 ne[1] must equal src1's d_inner {d_inner}")
    require(sx.nb[0] == 4 and sx.nb[1] == 4 * sx.ne[0], node, "src0 rows must be packed")
    require(c.nb[0] == 4, node, "src1 rows must be packed")
    _f32(node, (node, "dst"))
    if node.ne != (d_inner, n_t, sx.ne[2], 1):
        fail(node, f"dst shape must be {[d_inner, n_t, sx.ne[2], 1]}")


@validates(Op.SSM_SCAN)
def check_ssm_scan(node: Node) -> None:
    """SSM_SCAN (ggml_ssm_scan): Mamba's selective scan.  Sources s (d_state, head_dim,
    n_head, n_slots), x (head_dim, n_head, n_t, n_s), dt (n_head, n_t, n_s), A (d_state or 1,
    n_head), B and C (d_state, n_group, n_t, n_s), ids (n_s) I32; op_params[0] = K, the
    number of state snapshots; dst is the 1-D concatenation of y and K·n_s states: raise
    GraphInvalid unless ggml would accept the node.  The ids themselves are checked against
    n_slots when the kernel runs."""
    s, x, dt, a = (src(node, 0, "s"), src(node, 1, "x"), src(node, 2, "dt"),
                   src(node, 3, "A"))
    b, c, ids = src(node, 4, "B"), src(node, 5, "C"), src(node, 6, "ids")
    no_src_beyond(node, 7)
    _f32(node, (s, "src0"), (x, "src1"), (dt, "src2"), (a, "src3"), (b, "src4"), (c, "src5"))
    type_in(ids, {I32}, node, "src6")
    elementwise_strides(ids, node, "src6")
    k = node.param_i32(0)
    if not (k >= 1):
        fail(node, f"K (op_params[0]) must be at least 1, not {k}")
    for t, what in ((s, "src0"), (dt, "src2"), (a, "src3")):
        _contiguous(node, t, what)
    for t, what in ((x, "src1"), (b, "src4"), (c, "src5")):
        if not (t.nb[0] == 4 and t.nb[1] == 4 * t.ne[0]):
            fail(node, f"{what} rows must be packed")
    require(b.ne == c.ne, node, "B and C must have the same shape")
    d_state, head_dim, n_head, n_t, n_s = s.ne[0], x.ne[0], x.ne[1], x.ne[2], x.ne[3]
    if dt.ne != (n_head, n_t, n_s, 1):
        fail(node, f"dt shape must be {[n_head, n_t, n_s, 1]}")
    require(s.ne[1] == head_dim and s.ne[2] == n_head, node,
            "s must be (d_state, head_dim, n_head, slots) of x's head_dim and n_head")
    n_group = b.ne[1]
    if not (b.ne[0] == d_state and b.ne[2] == n_t and b.ne[3] == n_s):
        fail(node, f"B and C must be (d_state, n_group, n_t, n_s) = {[d_state, n_group, n_t, n_s]}")
    if not (n_group >= 1 and n_head % n_group == 0):
        fail(node, f"n_head {n_head} must be a multiple of n_group {n_group}")
    if ids.ne != (n_s, 1, 1, 1):
        fail(node, f"ids must be a vector of {n_s} sequence ids")
    if not (a.ne[1] == n_head and a.ne[2] == 1 and a.ne[3] == 1):
        fail(node, f"A must be (d_state or 1, {n_head})")
    if a.ne[0] not in (1, d_state):
        fail(node, f"A ne[0] must be 1 or d_state {d_state}")
    require(a.ne[0] == 1 or k == 1, node, "per-state decay (Mamba-1 A) needs K == 1")
    _dst(node, (x.nelements + k * d_state * head_dim * n_head * n_s, 1, 1, 1))


def _linear_attention(node: Node, n_src: int, state_slot: int, names: str) -> None:
    """RWKV_WKV6, GATED_LINEAR_ATTN, RWKV_WKV7: per-token sources (S, H, n_tokens), all
    contiguous F32, and a state of S·S·H per sequence (n_seqs = state ne[1]); the sequences
    split the tokens evenly.  dst is (S·H, n_tokens + S·n_seqs)."""
    srcs = [src(node, i, names.split(",")[i]) for i in range(n_src)]
    no_src_beyond(node, n_src)
    for i, t in enumerate(srcs):
        _f32(node, (t, f"src{i}"))
        _contiguous(node, t, f"src{i}")
    first = srcs[0]
    size, heads, n_tokens = first.ne[0], first.ne[1], first.ne[2]
    state = srcs[state_slot]
    n_seqs = state.ne[1]
    for i, t in enumerate(srcs):
        if i == state_slot:
            continue
        if node.op == Op.RWKV_WKV6 and i == 3:     # time_faaaa: one (S, H) for every token
            if t.nelements != size * heads:
                fail(node, f"src3 must hold S·H = {size * heads} values")
            continue
        if not (t.ne[:3] == (size, heads, n_tokens) and t.ne[3] == 1):
            fail(node, f"src{i} must be (S, H, n_tokens) = {[size, heads, n_tokens]}")
    if state.nelements != size * size * heads * n_seqs:
        fail(node, f"state must hold S·S·H·n_seqs = {size * size * heads * n_seqs} values")
    if not (n_seqs >= 1 and n_tokens % n_seqs == 0):
        fail(node, f"{n_tokens} tokens do not split evenly into {n_seqs} sequences")
    _dst(node, (size * heads, n_tokens + size * n_seqs, 1, 1))


@validates(Op.RWKV_WKV6)
def check_rwkv_wkv6(node: Node) -> None:
    """RWKV_WKV6 (ggml_rwkv_wkv6): sources k, v, r, time_faaaa (S, H), time_decay, state:
    raise GraphInvalid unless ggml would accept the node."""
    _linear_attention(node, 6, 5, "k,v,r,time_faaaa,time_decay,state")


@validates(Op.GATED_LINEAR_ATTN)
def check_gated_linear_attn(node: Node) -> None:
    """GATED_LINEAR_ATTN (ggml_gated_linear_attn): sources k, v, q, g, state; op_params[0] is
    the float scale: raise GraphInvalid unless ggml would accept the node."""
    _linear_attention(node, 5, 4, "k,v,q,g,state")


@validates(Op.RWKV_WKV7)
def check_rwkv_wkv7(node: Node) -> None:
    """RWKV_WKV7 (ggml_rwkv_wkv7): sources r, w, k, v, a, b, state: raise GraphInvalid unless
    ggml would accept the node."""
    _linear_attention(node, 7, 6, "r,w,k,v,a,b,state")


@validates(Op.SOLVE_TRI)
def check_solve_tri(node: Node) -> None:
    """SOLVE_TRI (ggml_solve_tri, the only variant ggml has: left, lower, non-unit): A X = B
    for a contiguous square lower-triangular A (n, n, b2, b3) and contiguous B (k, n, b2, b3);
    dst X has B's shape: raise GraphInvalid unless ggml would accept the node."""
    a, b = src(node, 0, "A"), src(node, 1, "B")
    no_src_beyond(node, 2)
    _f32(node, (a, "src0"), (b, "src1"), (node, "dst"))
    _contiguous(node, a, "src0")
    _contiguous(node, b, "src1")
    require(a.ne[0] == a.ne[1], node, "A must be square")
    require(a.ne[1] == b.ne[1], node, "B must have as many rows as A")
    require(a.ne[2:] == b.ne[2:], node, "A and B must have the same batch dimensions")
    if node.ne != b.ne:
        fail(node, f"dst shape must be {list(b.ne)}")


@validates(Op.GATED_DELTA_NET)
def check_gated_delta_net(node: Node) -> None:
    """GATED_DELTA_NET (ggml_gated_delta_net): sources q, k (S_v, Hq, n_t, Sq) with packed
    rows, v (S_v, H, n_t, n_s) likewise, g (1 or S_v, H, n_t, n_s), beta (1, H, n_t, n_s)
    and the initial state (S_v, S_v, H, n_s), all F32; op_params[0] = K, the state snapshots
    kept.  dst is (S_v·H, n_t·n_s + K·S_v·n_s).  Raise GraphInvalid unless ggml would accept
    the node (K must match dst: llama.cpp #25704 writes K snapshots wherever dst ends)."""
    q, k, v = src(node, 0, "q"), src(node, 1, "k"), src(node, 2, "v")
    g, beta, state = src(node, 3, "g"), src(node, 4, "beta"), src(node, 5, "state")
    no_src_beyond(node, 6)
    _f32(node, (q, "src0"), (k, "src1"), (v, "src2"), (g, "src3"), (beta, "src4"),
         (state, "src5"))
    s_v, heads, n_t, n_s = v.ne
    for t, what in ((q, "src0"), (k, "src1"), (v, "src2")):
        if not (t.nb[0] == 4 or t.ne[0] == 1):
            fail(node, f"{what} rows must be packed")
    for t, what in ((q, "src0"), (k, "src1")):
        if not (t.ne[0] == s_v and t.ne[2] == n_t):
            fail(node, f"{what} must be (S_v, heads, n_t, seqs) with S_v={s_v}, n_t={n_t}")
        if not (t.ne[1] >= 1 or heads == 0):
            fail(node, f"{what} has no heads")
        if not (t.ne[3] >= 1 and n_s % t.ne[3] == 0):
            fail(node, f"{what} sequences ({t.ne[3]}) must divide v's {n_s}")
    for t, what in ((g, "src3"), (beta, "src4"), (state, "src5")):
        _contiguous(node, t, what)
    if not (g.ne[0] in (1, s_v) and g.ne[1:] == (heads, n_t, n_s)):
        fail(node, f"g must be (1 or S_v, {heads}, {n_t}, {n_s})")
    if beta.ne != (1, heads, n_t, n_s):
        fail(node, f"beta must be (1, {heads}, {n_t}, {n_s})")
    if state.ne != (s_v, s_v, heads, n_s):
        fail(node, f"state must be (S_v, S_v, H, n_seqs) = {[s_v, s_v, heads, n_s]}")
    kk = node.param_i32(0)
    if not (kk >= 1):
        fail(node, f"K (op_params[0]) must be at least 1, not {kk}")
    _dst(node, (s_v * heads, n_t * n_s + kk * s_v * n_s, 1, 1))


#: Key types LIGHTNING_INDEXER reads (ggml converts any type with a to_float; refimpl those
#: it can dequantise).
INDEXER_K_TYPES = frozenset({F32, F16, BF16}) | QUANT_WEIGHT_TYPES


@validates(Op.LIGHTNING_INDEXER)
def check_lightning_indexer(node: Node) -> None:
    """LIGHTNING_INDEXER (ggml_lightning_indexer, DeepSeek's sparse-attention indexer): q
    (d, n_head, n_tok, n_stream) F32, k (d, 1, n_kv, n_stream) of INDEXER_K_TYPES, weights
    (n_head, n_tok, 1, n_stream) F32, mask (n_kv, n_tok, 1, n_mask) F16 with n_mask dividing
    n_stream; dst (n_kv, n_tok, 1, n_stream) F32, every row packed: raise GraphInvalid unless
    ggml would accept the node."""
    q, k, w, m = src(node, 0, "q"), src(node, 1, "k"), src(node, 2, "weights"), src(node, 3, "mask")
    no_src_beyond(node, 4)
    _f32(node, (q, "src0"), (w, "src2"), (node, "dst"))
    type_in(k, INDEXER_K_TYPES, node, "src1")
    block_rows(k, node, "src1")
    type_in(m, {F16}, node, "src3")
    elementwise_strides(m, node, "src3")
    for t, what in ((q, "src0"), (w, "src2"), (m, "src3"), (node, "dst")):
        if t.nb[0] != t.traits.type_size:
            fail(node, f"{what} rows must be packed")
    d, n_head, n_tok, n_stream = q.ne
    if not (k.ne[0] == d and k.ne[1] == 1 and k.ne[3] == n_stream):
        fail(node, f"k must be ({d}, 1, n_kv, {n_stream})")
    n_kv = k.ne[2]
    if w.ne != (n_head, n_tok, 1, n_stream):
        fail(node, f"weights must be {[n_head, n_tok, 1, n_stream]}")
    if m.ne[:3] != (n_kv, n_tok, 1):
        fail(node, f"mask must be ({n_kv}, {n_tok}, 1, n_mask)")
    if not (m.ne[3] >= 1 and n_stream % m.ne[3] == 0):
        fail(node, f"mask ne[3] {m.ne[3]} must divide the {n_stream} streams")
    if node.ne != (n_kv, n_tok, 1, n_stream):
        fail(node, f"dst shape must be {[n_kv, n_tok, 1, n_stream]}")


#: DeepSeek V4's hyper-connections have 4 streams (ggml asserts it).
HC = 4
#: Sinkhorn iterations DSV4_HC_COMB runs at most: ggml takes any positive count, each costs
#: work for every token, and a count from the wire must not buy unbounded work (spec/ops/
#: recurrent.md).  DeepSeek V4 uses 20.
MAX_HC_ITERATIONS = 1 << 10


@validates(Op.DSV4_HC_COMB)
def check_dsv4_hc_comb(node: Node) -> None:
    """DSV4_HC_COMB (ggml_dsv4_hc_comb): mixes ((2+4)·4, n_tok), scale (≥3), base ((2+4)·4)
    F32; op_params eps (float) and n_iter in [1, MAX_HC_ITERATIONS]; dst (4, 4, n_tok) F32:
    raise GraphInvalid unless ggml would accept the node."""
    mixes, scale, base = src(node, 0, "mixes"), src(node, 1, "scale"), src(node, 2, "base")
    no_src_beyond(node, 3)
    _f32(node, (mixes, "src0"), (scale, "src1"), (base, "src2"), (node, "dst"))
    mix = (2 + HC) * HC
    if not (mixes.ne[0] == mix and mixes.ne[2:] == (1, 1)):
        fail(node, f"mixes must be ({mix}, n_tokens)")
    require(scale.ne[0] >= 3 and scale.ne[1:] == (1, 1, 1), node, "scale must be a vector of ≥ 3")
    if base.ne != (mix, 1, 1, 1):
        fail(node, f"base must be a vector of {mix}")
    n_iter = node.param_i32(1)
    if not (1 <= n_iter <= MAX_HC_ITERATIONS):
        fail(node, f"n_iter (op_params[1]) {n_iter} is outside [1, {MAX_HC_ITERATIONS}]")
    if node.ne != (HC, HC, mixes.ne[1], 1):
        fail(node, f"dst shape must be {[HC, HC, mixes.ne[1], 1]}")


@validates(Op.DSV4_HC_PRE)
def check_dsv4_hc_pre(node: Node) -> None:
    """DSV4_HC_PRE (ggml_dsv4_hc_pre, _gated): x (n_embd, hc, n_tok) F32 and weights (hc,
    n_tok), or gates (n_embd, hc, n_tok) when op_params[1] is non-zero; op_params[0] the
    float scale; dst (n_embd, n_tok) F32: raise GraphInvalid unless ggml would accept the
    node."""
    x, w = src(node, 0, "x"), src(node, 1, "weights")
    no_src_beyond(node, 2)
    _f32(node, (x, "src0"), (w, "src1"), (node, "dst"))
    n_embd, hc, n_tok = x.ne[:3]
    require(hc > 0 and x.ne[3] == 1, node, "x must be (n_embd, hc > 0, n_tokens)")
    want = (n_embd, hc, n_tok, 1) if node.param_i32(1) else (hc, n_tok, 1, 1)
    if w.ne != want:
        fail(node, f"src1 must be {list(want)}")
    if node.ne != (n_embd, n_tok, 1, 1):
        fail(node, f"dst shape must be {[n_embd, n_tok, 1, 1]}")


@validates(Op.DSV4_HC_POST)
def check_dsv4_hc_post(node: Node) -> None:
    """DSV4_HC_POST (ggml_dsv4_hc_post): x (n_embd, n_tok), residual (n_embd, hc, n_tok), post
    (hc, n_tok) and optional comb (hc, hc, n_tok), all F32; dst (n_embd, hc, n_tok) F32: raise
    GraphInvalid unless ggml would accept the node."""
    x, res, post = src(node, 0, "x"), src(node, 1, "residual"), src(node, 2, "post")
    comb = src(node, 3, "comb") if len(node.src) > 3 and node.src[3] is not None else None
    no_src_beyond(node, 4)
    _f32(node, (x, "src0"), (res, "src1"), (post, "src2"), (node, "dst"))
    n_embd, n_tok = x.ne[0], x.ne[1]
    hc = res.ne[1]
    require(x.ne[2:] == (1, 1), node, "x must be (n_embd, n_tokens)")
    if not (hc > 0 and res.ne == (n_embd, hc, n_tok, 1)):
        fail(node, f"residual must be ({n_embd}, hc > 0, {n_tok})")
    if post.ne != (hc, n_tok, 1, 1):
        fail(node, f"post must be {[hc, n_tok, 1, 1]}")
    if comb is not None:
        _f32(node, (comb, "src3"))
        if comb.ne != (hc, hc, n_tok, 1):
            fail(node, f"comb must be {[hc, hc, n_tok, 1]}")
    if node.ne != (n_embd, hc, n_tok, 1):
        fail(node, f"dst shape must be {[n_embd, hc, n_tok, 1]}")
