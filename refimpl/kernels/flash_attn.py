"""FLASH_ATTN_EXT: fused attention with an online softmax (spec/ops/flash_attn.md).

For every query row ``q[:, iq1, h, i3]`` the kernel computes
``softmax(scale · K·q (soft-capped) + slope(h) · mask) · V`` over the ``n_kv`` keys of the K/V
head that ``h`` maps to (grouped-query broadcast), optionally with a per-head sink logit in the
denominator, and writes it to ``dst[:, h, iq1, i3]`` (ggml's permuted output layout).

Numerics follow the path ggml's CPU backend takes for the same node:

* with F32 or F16 K and V of one type and at least 64 query rows, ggml uses its tiled path,
  which works in float32 throughout (Q as given, K and V widened exactly);
* otherwise it uses its one-row path: Q is rounded to K's type before the dot product
  (F16 or BF16), and with an F16 V the weighted sum of V rows is accumulated in half
  precision, rounding after every scale and every multiply-add.

K, V, Q, the mask and the sinks are copied into packed float32 arrays before the kernel runs,
so a destination that overlaps an input cannot change what the kernel reads.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from ..graph.build import Node
from ..graph.checks import (BF16, F16, F32, elementwise_strides, fail, is_contiguous,
                            no_src_beyond, require, src, type_in)
from ..graph.ops import Op
from ..graph.registry import OpImpl, register
from .cpu_tensors import bf16_to_f32, round_to, view
from .softmax import alibi_slopes

PREC_DEFAULT, PREC_F32 = 0, 10
_KV_TYPES = {F32, F16, BF16}
#: ggml's CPU backend switches to its tiled (all-float32) kernel from this many query rows.
TILED_MIN_ROWS = 64


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _dot(a, b, n):
    s = np.float32(0.0)
    for i in range(n):
        s += a[i] * b[i]
    return s


@njit(cache=True, nogil=True)
def round_f16_inplace(a, u, tmp, tmpu):
    """Round the float32 row ``a`` to the nearest half-precision value, ties to even, exactly as
    a float32 -> float16 -> float32 round trip (overflow gives infinity, NaN stays NaN).

    ``u`` is ``a`` viewed as uint32; ``tmp``/``tmpu`` are a scratch row and its uint32 view.
    Branch-free (selects written as bit masks) so that both loops vectorise.
    """
    half = np.float32(0.5)
    for i in range(a.shape[0]):
        # half's subnormal range: magnitudes rounded to a multiple of 2^-24
        tmp[i] = (abs(a[i]) + half) - half
    u32 = np.uint32   # every intermediate cast back to 32 bits, so the loop uses 8 lanes
    for i in range(u.shape[0]):
        x = u[i]
        sign = u32(x & u32(0x80000000))
        ax = u32(x & u32(0x7FFFFFFF))
        # half's normal range: keep 11 significant bits, ties to even; overflow to infinity
        r = u32(u32(u32(x + u32(0x0FFF)) + u32(u32(x >> u32(13)) & u32(1))) & u32(0xFFFFE000))
        big = u32(u32(0) - u32(u32(r & u32(0x7FFFFFFF)) >= u32(0x47800000)))
        r = u32(u32(r & u32(~big)) | u32(u32(sign | u32(0x7F800000)) & big))
        small = u32(u32(0) - u32(ax < u32(0x38800000)))
        r = u32(u32(r & u32(~small)) | u32(u32(tmpu[i] | sign) & small))
        special = u32(u32(0) - u32(ax >= u32(0x7F800000)))   # inf and NaN pass through
        u[i] = u32(u32(r & u32(~special)) | u32(x & special))


@njit(cache=True, nogil=True)
def round_f16_finite(a):
    """The same rounding for finite values, in float arithmetic only (about twice as fast).

    Veltkamp's split ``p - (p - y)`` with ``p = 8193·y`` keeps 11 significant bits, ties to
    even; magnitudes below 2^-14 are instead rounded to a multiple of 2^-24 by adding and
    removing 0.5; results beyond 65504 become infinite.  The choices are blended with 0/1
    factors (exact here) instead of branches, so that the loop vectorises.  An infinite input
    becomes NaN: callers redo the work with :func:`round_f16_inplace` when that happens.
    Must not be compiled with contraction (an FMA would break the split).
    """
    f = np.float32
    split = f(8193.0)
    half = f(0.5)
    tiny = f(6.103515625e-05)          # 2^-14, the smallest normal half
    top = f(65504.0)                   # the largest finite half
    huge = f(5.192296858534828e33)     # 2^112: top·huge is finite, 65536·huge is not
    for i in range(a.shape[0]):
        y = a[i]
        p = y * split
        hi = p - (p - y)
        ay = abs(y)
        sub = (ay + half) - half
        r = hi + f(ay < tiny) * (sub - hi)
        r = r + f(abs(r) > top) * (r * huge)
        a[i] = f(math.copysign(r, y))


@njit(cache=True, nogil=True, fastmath={"contract"})
def _scale(a, x):
    for d in range(a.shape[0]):
        a[d] = a[d] * x


@njit(cache=True, nogil=True, fastmath={"contract"})
def _mad(a, v, x):
    for d in range(a.shape[0]):
        a[d] = a[d] + v[d] * x


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def _attend_block(q, k, v, mask, sinks, slopes, out, scale, softcap, use_mask, use_sinks,
                  v_f16, exact, iq3, ik2, ik3, iv2, iv3, h0, r0, nr):
    """Rows ``r0 .. r0+nr`` (head-major, then query) of the head group starting at ``h0``.

    Returns False, writing nothing, when ``v_f16`` and not ``exact`` and the half-precision
    accumulator met a non-finite value; the caller then runs the block again with ``exact``.
    """
    nq1, dk = q.shape[2], q.shape[3]
    nkv = k.shape[2]
    dv = v.shape[3]
    m3, m2 = mask.shape[0], mask.shape[1]
    neg_inf = np.float32(-np.inf)
    one = np.float32(1.0)
    heads = np.empty(nr, np.int64)
    qrows = np.empty(nr, np.int64)
    slope = np.empty(nr, np.float32)
    qblk = np.empty((nr, dk), np.float32)
    for r in range(nr):
        heads[r] = h0 + (r0 + r) // nq1
        qrows[r] = (r0 + r) % nq1
        slope[r] = slopes[heads[r]]
        qblk[r, :] = q[iq3, heads[r], qrows[r], :]
    acc = np.zeros((nr, dv), np.float32)
    accu = acc.view(np.uint32)
    tmp = np.empty(dv, np.float32)
    tmpu = tmp.view(np.uint32)
    mx = np.full(nr, neg_inf, np.float32)
    total = np.zeros(nr, np.float32)
    for ic in range(nkv):
        krow = k[ik3, ik2, ic]
        vrow = v[iv3, iv2, ic]
        for r in range(nr):
            mv = np.float32(0.0)
            if use_mask:
                mv = slope[r] * mask[iq3 % m3, heads[r] % m2, qrows[r], ic]
                if mv == neg_inf:
                    continue
            s = _dot(qblk[r], krow, dk) * scale
            if softcap != np.float32(0.0):
                s = softcap * np.float32(math.tanh(s))
            s = s + mv
            m_old = mx[r]
            ms = one
            vs = one
            a = acc[r]
            if s > m_old:
                mx[r] = s
                ms = np.float32(math.exp(m_old - s))
                _scale(a, ms)
                if v_f16:
                    if exact:
                        round_f16_inplace(a, accu[r], tmp, tmpu)
                    else:
                        round_f16_finite(a)
            else:
                vs = np.float32(math.exp(s - m_old))
            _mad(a, vrow, vs)
            if v_f16:
                if exact:
                    round_f16_inplace(a, accu[r], tmp, tmpu)
                else:
                    round_f16_finite(a)
            total[r] = total[r] * ms + vs
    if v_f16 and not exact:
        for r in range(nr):
            for d in range(dv):
                if not math.isfinite(acc[r, d]):
                    return False
    for r in range(nr):
        a = acc[r]
        if use_sinks:
            sk = sinks[heads[r]]
            ms = one
            vs = one
            if sk > mx[r]:
                ms = np.float32(math.exp(mx[r] - sk))
                _scale(a, ms)
            else:
                vs = np.float32(math.exp(sk - mx[r]))
            total[r] = total[r] * ms + vs
        inv = np.float32(0.0) if total[r] == np.float32(0.0) else one / total[r]
        o = out[iq3, qrows[r], heads[r]]
        for d in range(dv):
            o[d] = a[d] * inv
    return True


@njit(parallel=True, cache=True, nogil=True)
def flash_attn_f32(q, k, v, mask, sinks, slopes, out, scale, softcap, use_mask, use_sinks,
                   v_f16, group, qb):
    """Attention over packed float32 arrays.

    q (nq3, nq2, nq1, DK), k (nk3, nk2, nkv, DK), v (nv3, nv2, nkv, DV), mask (m3, m2, m1, m0)
    with m1 >= nq1 and m0 >= nkv, sinks and slopes (nq2,), out (nq3, nq1, nq2, DV).
    ``group`` query heads that share one K head and one V head are processed together, ``qb``
    rows (head, query) at a time, so that each K and V row is reused from cache.
    ``scale`` is already divided by ``softcap`` when soft-capping is on.  With ``v_f16`` the
    accumulator is rounded to half precision after every update (ggml's F16 V path).
    """
    nq3, nq2, nq1 = q.shape[0], q.shape[1], q.shape[2]
    nk3, nk2 = k.shape[0], k.shape[1]
    nv3, nv2 = v.shape[0], v.shape[1]
    rk2, rk3 = nq2 // nk2, nq3 // nk3
    rv2, rv3 = nq2 // nv2, nq3 // nv3
    n_groups = nq2 // group
    rows_per_group = group * nq1
    nblk = (rows_per_group + qb - 1) // qb
    for item in prange(nq3 * n_groups * nblk):
        iq3 = item // (n_groups * nblk)
        rem = item % (n_groups * nblk)
        h0 = (rem // nblk) * group
        r0 = (rem % nblk) * qb
        nr = min(qb, rows_per_group - r0)
        ik2, ik3 = h0 // rk2, iq3 // rk3
        iv2, iv3 = h0 // rv2, iq3 // rv3
        done = _attend_block(q, k, v, mask, sinks, slopes, out, scale, softcap, use_mask,
                             use_sinks, v_f16, False, iq3, ik2, ik3, iv2, iv3, h0, r0, nr)
        if not done:
            _attend_block(q, k, v, mask, sinks, slopes, out, scale, softcap, use_mask,
                          use_sinks, v_f16, True, iq3, ik2, ik3, iv2, iv3, h0, r0, nr)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None,
              scale: float = 1.0, max_bias: float = 0.0, softcap: float = 0.0,
              sinks: np.ndarray | None = None) -> np.ndarray:
    """Numpy oracle in float64 (plain attention, no online softmax).

    Scores are ``scale·q·k``, soft-capped as ``softcap·tanh(score/softcap)`` when ``softcap``
    is non-zero, plus ``slope(h)·mask``.
    q (nq3, nq2, nq1, DK), k (nq3, nk2, nkv, DK), v (nq3, nv2, nkv, DV), mask
    (m3, m2, >=nq1, >=nkv) repeating over the head dimensions, sinks (nq2,).
    Returns (nq3, nq1, nq2, DV): ggml's layout, heads innermost after DV.
    """
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    nq3, nq2, nq1, _ = q.shape
    nkv = k.shape[2]
    kk = np.repeat(k, nq2 // k.shape[1], axis=1)
    vv = np.repeat(v, nq2 // v.shape[1], axis=1)
    s = np.einsum("abqd,abkd->abqk", q, kk) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    if mask is not None:
        m = np.asarray(mask, np.float64)[:, :, :nq1, :nkv]
        m = np.tile(m, (nq3 // m.shape[0], nq2 // m.shape[1], 1, 1))
        s = s + alibi_slopes(nq2, max_bias).astype(np.float64)[None, :, None, None] * m
    mx = s.max(axis=-1, keepdims=True) if nkv else np.full(s.shape[:-1] + (1,), -np.inf)
    if sinks is not None:
        mx = np.maximum(mx, np.asarray(sinks, np.float64)[None, :, None, None])
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(s - mx)
    denom = e.sum(axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + np.exp(np.asarray(sinks, np.float64)[None, :, None, None] - mx)
    with np.errstate(all="ignore"):
        o = np.einsum("abqk,abkd->abqd", e, vv) / denom
    o = np.where(denom > 0, o, 0.0)
    return o.transpose(0, 2, 1, 3).astype(np.float32)


def _divides(d: int, n: int) -> bool:
    return d > 0 and n % d == 0


def _packed_f32(t: Node) -> np.ndarray:
    """The tensor's values as a C-contiguous float32 copy (F32, F16 or BF16)."""
    if t.type == BF16:
        return bf16_to_f32(np.ascontiguousarray(view(t)))
    return np.array(view(t), dtype=np.float32, order="C", copy=True)


def _row_block(n_items: int, rows: int) -> int:
    threads = numba.get_num_threads()
    qb = max(1, min(16, rows))
    while qb > 1 and n_items * -(-rows // qb) < 4 * threads:
        qb = (qb + 1) // 2
    return qb


@register
class FlashAttnExt(OpImpl):
    """FLASH_ATTN_EXT (ggml_flash_attn_ext) with F32, F16 or BF16 K and V."""

    ops = (Op.FLASH_ATTN_EXT,)

    def check(self, node: Node) -> None:
        q, k, v = src(node, 0, "q"), src(node, 1, "k"), src(node, 2, "v")
        no_src_beyond(node, 5)
        type_in(node, {F32}, node, "dst")
        type_in(q, {F32}, node, "q")
        type_in(k, _KV_TYPES, node, "k")
        type_in(v, _KV_TYPES, node, "v")
        for t, what in ((node, "dst"), (q, "q"), (k, "k"), (v, "v")):
            elementwise_strides(t, node, what)
            require(t.nb[0] == t.traits.type_size, node, f"{what} rows must be packed (nb[0])")
        require(is_contiguous(node), node, "dst must be contiguous")
        dk, dv, nkv = k.ne[0], v.ne[0], k.ne[1]
        require(q.ne[0] == dk, node, f"q head size {q.ne[0]} differs from k head size {dk}")
        require(v.ne[1] == nkv, node, f"v has {v.ne[1]} rows, k has {nkv}")
        require(q.ne[3] == k.ne[3] == v.ne[3], node,
                f"q, k and v differ in ne[3] ({q.ne[3]}, {k.ne[3]}, {v.ne[3]})")
        require(_divides(k.ne[2], q.ne[2]), node, f"k heads {k.ne[2]} do not divide q heads {q.ne[2]}")
        require(_divides(v.ne[2], q.ne[2]), node, f"v heads {v.ne[2]} do not divide q heads {q.ne[2]}")
        expect = (dv, q.ne[2], q.ne[1], q.ne[3])
        require(node.ne == expect, node, f"dst shape {list(node.ne)}, expected {list(expect)}")
        mask = node.src[3] if len(node.src) > 3 else None
        if mask is not None:
            mask = src(node, 3, "mask")
            type_in(mask, {F16}, node, "mask")
            elementwise_strides(mask, node, "mask")
            require(is_contiguous(mask), node, "mask must be contiguous")
            require(mask.ne[0] >= nkv, node, f"mask ne[0]={mask.ne[0]} is shorter than n_kv={nkv}")
            require(mask.ne[1] >= q.ne[1], node, f"mask has {mask.ne[1]} rows, q has {q.ne[1]}")
            for d in (2, 3):
                require(_divides(mask.ne[d], q.ne[d]), node,
                        f"mask ne[{d}]={mask.ne[d]} does not divide q ne[{d}]={q.ne[d]}")
        if node.param_f32(1) > 0.0 and mask is None:
            fail(node, "ALiBi (max_bias > 0) needs a mask")
        sinks = node.src[4] if len(node.src) > 4 else None
        if sinks is not None:
            sinks = src(node, 4, "sinks")
            type_in(sinks, {F32}, node, "sinks")
            elementwise_strides(sinks, node, "sinks")
            require(sinks.ne[0] == q.ne[2], node, f"sinks ne[0]={sinks.ne[0]} differs from the "
                                                  f"number of heads {q.ne[2]}")
        prec = node.param_i32(3)
        require(prec in (PREC_DEFAULT, PREC_F32), node, f"precision {prec} is not 0 (default) or 10 (f32)")
        require(node.param_i32(4) >= 0, node, f"n_kv_max={node.param_i32(4)} is negative")

    def bind(self, node: Node, device_kind: str):
        if device_kind != "cpu":
            return None
        q_t, k_t, v_t = node.src[0], node.src[1], node.src[2]
        mask_t = node.src[3] if len(node.src) > 3 else None
        sinks_t = node.src[4] if len(node.src) > 4 else None
        scale = np.float32(node.param_f32(0))
        softcap = np.float32(node.param_f32(2))
        if softcap != 0:
            scale = np.float32(scale / softcap)
        nq3, nq2, nq1 = q_t.ne[3], q_t.ne[2], q_t.ne[1]
        slopes = alibi_slopes(nq2, node.param_f32(1))
        tiled = k_t.type == v_t.type and k_t.type in (F32, F16) and nq1 >= TILED_MIN_ROWS
        v_f16 = (not tiled) and v_t.type == F16
        group = math.gcd(nq2 // k_t.ne[2], nq2 // v_t.ne[2]) if nq2 else 1
        qb = _row_block(nq3 * (nq2 // group if nq2 else 0), group * nq1)

        def run():
            if node.nelements == 0:
                return
            q = np.array(view(q_t), dtype=np.float32, order="C", copy=True)
            if not tiled:
                q = np.ascontiguousarray(round_to(q, k_t.type))
            k, v = _packed_f32(k_t), _packed_f32(v_t)
            if mask_t is not None:
                mask = _packed_f32(mask_t)
            else:
                mask = np.zeros((1, 1, 1, 1), np.float32)
            if sinks_t is not None:
                sinks = np.array(view(sinks_t)[0, 0, 0, :], dtype=np.float32, order="C", copy=True)
            else:
                sinks = np.zeros(1, np.float32)
            flash_attn_f32(q, k, v, mask, sinks, slopes, view(node), scale, softcap,
                           mask_t is not None, sinks_t is not None, v_f16, group, qb)
        return run
