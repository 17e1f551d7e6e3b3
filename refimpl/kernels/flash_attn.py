"""FLASH_ATTN_EXT: fused attention with an online softmax (spec/ops/flash_attn.md).

For every query row ``q[:, iq1, h, i3]`` the kernel computes
``softmax(scale · K·q (soft-capped) + slope(h) · mask) · V`` over the ``n_kv`` keys of the K/V
head that ``h`` maps to (grouped-query broadcast), optionally with a per-head sink logit in the
denominator, and writes it to ``dst[:, h, iq1, i3]`` (ggml's permuted output layout).

The arithmetic is bit-exact with the path ggml's x86 AVX2 CPU backend takes for the same node:

* with F32 or F16 K and V of one type and at least 64 query rows, its tiled path: float32
  throughout, scores as chains of fused multiply-adds, keys in tiles of 64 with ggml's vector
  exp (:func:`_attend_tiled`);
* otherwise its one-row path: Q rounded to K's type, ggml's vec_dot for that type
  (:func:`key_dots`), ``expf`` per key, and with an F16 V a running sum rounded to half
  precision after every update (:func:`_attend_rows`);
* for one query row over at least 512 F32/F16 keys, its split decode, which depends on ggml's
  thread count (:data:`SPLIT_THREADS`, :func:`_split_decode`).

K, V, Q, the mask and the sinks are copied into packed float32 arrays before the kernel runs,
so a destination that overlaps an input cannot change what the kernel reads.  The exception is
the common decode, F16 K and V (llama.cpp's default cache) on a CPU with F16C: when the
destination overlaps no source, :func:`flash_attn_f16_in_place` reads the cache where it lies,
and nothing is made per run (the one-row path with the dot product in another order).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from ..graph.build import Node
from ..graph.checks import BF16, F16, F32, overlaps
from ..graph.ops import Op
from ..graph.registry import kernel
from ..graph.validators.types import ATTENTION_BLOCK_TYPES, VEC_DOT_TYPE
from .cpu_tensors import bf16_to_f32, f16_to_f32, round_to, rows_u8, view
from .numeric import fma32, hsum8_f32, vexp8_sub_f32
from .parallel import sized_kernel
from .quants import F16_TABLE, dequantize_rows, quantize_activations
from .simd import HAS_F16C, mad_round_f16, round_f16_row, row_dot_f16, scale_round_f16
from .softmax import alibi_slopes

#: ggml's CPU backend switches to its tiled (all-float32) kernel from this many query rows.
TILED_MIN_ROWS = 64
#: ggml splits a one-query decode over its threads from this many keys (F32 or F16 K and V).
SPLIT_MIN_KV = 512
#: The ggml thread count whose split decode refimpl reproduces.  With one thread ggml's split
#: decode is exactly its one-row path; set this to the thread count of the ggml run to compare
#: with (ggml-rpc-server's ``-t``, llama.cpp's ``-t``).
SPLIT_THREADS = 1
#: ggml's tiled kernel works through the keys in tiles of this many.
KV_TILE = 64
#: Which of ggml's dot products the one-row path uses (by K's type).
DOT_F32, DOT_F16, DOT_BF16 = 0, 1, 2


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



@njit(cache=True, nogil=True)
def _load_tile(k, ik3, ik2, ic, nt, kt):
    """Keys ``ic .. ic+nt`` of one K head, transposed into ``kt`` (DK, KV_TILE), so that the
    loops over keys below run along contiguous memory and vectorise."""
    for t in range(nt):
        krow = k[ik3, ik2, ic + t]
        for d in range(krow.shape[0]):
            kt[d, t] = krow[d]


@njit(cache=True, nogil=True)
def key_dots(kind, kt, q, nt, lanes, wide, out):
    """``out[t]`` = ggml's vec_dot of key ``t`` of the transposed tile ``kt`` with ``q``, for
    ``t < nt``, bit-exact with ggml's AVX2 routine of ``kind``:

    * all kinds accumulate the first multiple of 32 elements in 32 lanes (four registers of
      eight) of fused multiply-adds, ``lanes`` (32, KV_TILE) holding them for every key;
    * DOT_F32 (ggml_vec_dot_f32) folds the four registers as (1+3)+(2+4), then the upper four
      lanes onto the lower four, then lanes pairwise ((0+1)+(2+3)), in float32, and adds the
      leftovers to that float32 sum in order; the build vectorises that loop, so groups of
      eight, then one of four, are added as rounded products, and only the last one to three
      leftovers are fused multiply-adds;
    * DOT_F16 (ggml_vec_dot_f16) folds the same way, then adds the leftovers' float32 products
      in float64 (``wide``, KV_TILE float64);
    * DOT_BF16 (ggml_vec_dot_bf16) folds as (1+3)+(2+4) and sums the register horizontally
      (:func:`.numeric.hsum8_f32`), then adds the leftovers' products in float64.
    """
    dk = q.shape[0]
    n32 = dk - dk % 32
    for lane in range(32):
        lr = lanes[lane]
        for t in range(nt):
            lr[t] = np.float32(0.0)
    for i in range(0, n32, 32):
        for lane in range(32):
            qv = q[i + lane]
            kr = kt[i + lane]
            lr = lanes[lane]
            for t in range(nt):
                lr[t] = fma32(kr[t], qv, lr[t])
    for t in range(nt):
        f0 = (lanes[0, t] + lanes[16, t]) + (lanes[8, t] + lanes[24, t])
        f1 = (lanes[1, t] + lanes[17, t]) + (lanes[9, t] + lanes[25, t])
        f2 = (lanes[2, t] + lanes[18, t]) + (lanes[10, t] + lanes[26, t])
        f3 = (lanes[3, t] + lanes[19, t]) + (lanes[11, t] + lanes[27, t])
        f4 = (lanes[4, t] + lanes[20, t]) + (lanes[12, t] + lanes[28, t])
        f5 = (lanes[5, t] + lanes[21, t]) + (lanes[13, t] + lanes[29, t])
        f6 = (lanes[6, t] + lanes[22, t]) + (lanes[14, t] + lanes[30, t])
        f7 = (lanes[7, t] + lanes[23, t]) + (lanes[15, t] + lanes[31, t])
        if kind == DOT_BF16:
            out[t] = hsum8_f32(f0, f1, f2, f3, f4, f5, f6, f7)
        else:
            out[t] = ((f0 + f4) + (f1 + f5)) + ((f2 + f6) + (f3 + f7))
    if kind == DOT_F32:
        left = dk - n32
        plain = n32 + (left // 8) * 8 + (4 if left % 8 >= 4 else 0)
        for i in range(n32, plain):
            qv = q[i]
            kr = kt[i]
            for t in range(nt):
                out[t] = out[t] + kr[t] * qv
        for i in range(plain, dk):
            qv = q[i]
            kr = kt[i]
            for t in range(nt):
                out[t] = fma32(kr[t], qv, out[t])
    elif n32 < dk:
        for t in range(nt):
            wide[t] = np.float64(out[t])
        for i in range(n32, dk):
            qv = q[i]
            kr = kt[i]
            for t in range(nt):
                wide[t] += np.float64(kr[t] * qv)
        for t in range(nt):
            out[t] = np.float32(wide[t])


@njit(cache=True, nogil=True)
def _scale(a, x):
    for d in range(a.shape[0]):
        a[d] = a[d] * x


@njit(cache=True, nogil=True)
def _mad(a, v, x):
    for d in range(a.shape[0]):
        a[d] = fma32(v[d], x, a[d])


@njit(cache=True, nogil=True)
def _row_ids(h0, r0, nr, nq1):
    """Head and query index of rows ``r0 .. r0+nr`` (head-major) of the group starting at
    head ``h0``."""
    heads = np.empty(nr, np.int64)
    qrows = np.empty(nr, np.int64)
    for r in range(nr):
        heads[r] = h0 + (r0 + r) // nq1
        qrows[r] = (r0 + r) % nq1
    return heads, qrows


@njit(cache=True, nogil=True, error_model="numpy")
def _attend_rows(q, k, v, mask, slopes, scale, softcap, use_mask, dot_kind, v_f16, exact,
                 iq3, ik2, ik3, iv2, iv3, heads, qrows, kv0, kv1):
    """ggml's one-row path for the given rows over keys ``kv0 .. kv1``: keys one at a time in
    order, an online softmax with libm's ``expf``, V accumulated with fused multiply-adds in
    float32, or (``v_f16``) rounded to half precision after every update.  Scores are computed
    a tile of keys at a time (:func:`key_dots`); that changes no arithmetic.

    Returns ``(ok, acc, mx, total)``: the unnormalised output rows, running maxima and sums.
    ``ok`` is False when ``v_f16`` and not ``exact`` and the half-precision accumulator met a
    non-finite value; the caller then runs the rows again with ``exact``.
    """
    nr = heads.shape[0]
    dk = q.shape[3]
    dv = v.shape[3]
    m3, m2 = mask.shape[0], mask.shape[1]
    neg_inf = np.float32(-np.inf)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    acc = np.zeros((nr, dv), np.float32)
    accu = acc.view(np.uint32)
    tmp = np.empty(dv, np.float32)
    tmpu = tmp.view(np.uint32)
    kt = np.empty((dk, KV_TILE), np.float32)
    lanes = np.empty((32, KV_TILE), np.float32)
    wide = np.empty(KV_TILE, np.float64)
    sc = np.empty((nr, KV_TILE), np.float32)
    mx = np.full(nr, neg_inf, np.float32)
    total = np.zeros(nr, np.float32)
    for ic in range(kv0, kv1, KV_TILE):
        nt = min(KV_TILE, kv1 - ic)
        _load_tile(k, ik3, ik2, ic, nt, kt)
        for r in range(nr):
            key_dots(dot_kind, kt, q[iq3, heads[r], qrows[r]], nt, lanes, wide, sc[r])
        for t in range(nt):
            vrow = v[iv3, iv2, ic + t]
            for r in range(nr):
                mv = zero
                if use_mask:
                    mv = slopes[heads[r]] * mask[iq3 % m3, heads[r] % m2, qrows[r], ic + t]
                    if mv == neg_inf:
                        continue
                # separately rounded: ggml's build fuses neither multiply here
                if softcap != zero:
                    s = softcap * np.float32(math.tanh(sc[r, t] * scale)) + mv
                else:
                    s = sc[r, t] * scale + mv
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
                total[r] = fma32(total[r], ms, vs)
    ok = True
    if v_f16 and not exact:
        for r in range(nr):
            for d in range(dv):
                if not math.isfinite(acc[r, d]):
                    ok = False
    return ok, acc, mx, total


@njit(cache=True, nogil=True, error_model="numpy")
def _one_row_block(q, k, v, mask, slopes, scale, softcap, use_mask, dot_kind, v_f16,
                   iq3, ik2, ik3, iv2, iv3, heads, qrows, kv0, kv1):
    """:func:`_attend_rows`, run again exactly when the fast half-precision rounding met a
    non-finite value."""
    ok, acc, mx, total = _attend_rows(q, k, v, mask, slopes, scale, softcap, use_mask,
                                      dot_kind, v_f16, False, iq3, ik2, ik3, iv2, iv3, heads,
                                      qrows, kv0, kv1)
    if not ok:
        ok, acc, mx, total = _attend_rows(q, k, v, mask, slopes, scale, softcap, use_mask,
                                          dot_kind, v_f16, True, iq3, ik2, ik3, iv2, iv3,
                                          heads, qrows, kv0, kv1)
    return acc, mx, total


@njit(cache=True, nogil=True, inline="always")
def _work_item(item, n_groups, nblk, group, qb, rows_per_group):
    """Work item ``item`` of a kernel's parallel loop: batch ``iq3``, first head ``h0`` of its
    group, and rows ``r0 .. r0+nr`` (head-major) of that group."""
    iq3 = item // (n_groups * nblk)
    rem = item % (n_groups * nblk)
    r0 = (rem % nblk) * qb
    return iq3, (rem // nblk) * group, r0, min(qb, rows_per_group - r0)


@njit(cache=True, nogil=True, error_model="numpy")
def _attend_rows_f16(q, k, v, mask, slopes, table, scale, softcap, use_mask,
                     iq3, ik2, ik3, iv2, iv3, heads, qrows, acc, mx, total):
    """ggml's one-row path for F16 K and F16 V, both read where they lie (no copy), keys one
    at a time in order: Q rounded to half precision, its dot product with each key's widened
    values in sixteen float32 lanes (:func:`.simd.row_dot_f16`), an online softmax with
    libm's ``expf``, and V accumulated with one fused multiply-add per value, the sum rounded
    to half precision after every update (:func:`.simd.mad_round_f16`), as ggml keeps it.
    A masked key (-inf) is skipped before its dot product, as ggml skips it.

    Fills ``acc`` (rows, DV), ``mx`` and ``total`` for the rows ``heads``/``qrows``.  Needs
    F16C, DK a multiple of 16 and DV of 8 (the caller checks; :data:`.simd.HAS_F16C`)."""
    nr = heads.shape[0]
    dk = q.shape[3]
    dv = v.shape[3]
    m3, m2 = mask.shape[0], mask.shape[1]
    neg_inf = np.float32(-np.inf)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    qh = np.empty((nr, dk), np.float32)
    mrow = np.empty(nr, np.int64)          # where each row's mask row starts in ``flat``
    flat = mask.reshape(-1)                # the mask is contiguous (validated)
    for r in range(nr):
        round_f16_row(q[iq3, heads[r], qrows[r]].ctypes.data, qh[r].ctypes.data, dk)
        mrow[r] = (((iq3 % m3) * m2 + heads[r] % m2) * mask.shape[2] + qrows[r]) * mask.shape[3]
        mx[r] = neg_inf
        total[r] = zero
        for d in range(dv):
            acc[r, d] = zero
    kp = k.ctypes.data + ik3 * k.strides[0] + ik2 * k.strides[1]
    vp = v.ctypes.data + iv3 * v.strides[0] + iv2 * v.strides[1]
    for ic in range(k.shape[2]):
        for r in range(nr):
            h = heads[r]
            mv = zero
            if use_mask:
                mv = slopes[h] * table[flat[mrow[r] + ic]]
                if mv == neg_inf:
                    continue
            dot = row_dot_f16(kp, qh[r].ctypes.data, dk)
            if softcap != zero:
                s = softcap * np.float32(math.tanh(dot * scale)) + mv
            else:
                s = dot * scale + mv
            m_old = mx[r]
            ms = one
            vs = one
            ap = acc[r].ctypes.data
            if s > m_old:
                mx[r] = s
                ms = np.float32(math.exp(m_old - s))
                scale_round_f16(ap, dv, ms)
            else:
                vs = np.float32(math.exp(s - m_old))
            mad_round_f16(ap, vp, dv, vs)
            total[r] = fma32(total[r], ms, vs)
        kp += k.strides[2]
        vp += v.strides[2]


@sized_kernel(1, cache=True, nogil=True)
def flash_attn_f16_in_place(q, k, v, mask, sinks, slopes, table, out, scale, softcap,
                            use_mask, use_sinks, group, qb):
    """The one-row path over F16 K and V in place (:func:`_attend_rows_f16`), ``qb`` rows
    (head, query) of one group of ``group`` heads sharing a K and a V head at a time.
    Arrays as :func:`flash_attn_f32` takes them, except ``k``, ``v`` and ``mask``: the
    tensors' own uint16 views (rows contiguous), and ``q``: the tensor's own float32 view."""
    nq3, nq2, nq1 = q.shape[0], q.shape[1], q.shape[2]
    rk2, rk3 = nq2 // k.shape[1], nq3 // k.shape[0]
    rv2, rv3 = nq2 // v.shape[1], nq3 // v.shape[0]
    dv = v.shape[3]
    n_groups = nq2 // group
    rows_per_group = group * nq1
    nblk = (rows_per_group + qb - 1) // qb
    for item in prange(nq3 * n_groups * nblk):
        iq3, h0, r0, nr = _work_item(item, n_groups, nblk, group, qb, rows_per_group)
        heads, qrows = _row_ids(h0, r0, nr, nq1)
        acc = np.empty((nr, dv), np.float32)
        mx = np.empty(nr, np.float32)
        total = np.empty(nr, np.float32)
        _attend_rows_f16(q, k, v, mask, slopes, table, scale, softcap, use_mask, iq3,
                         h0 // rk2, iq3 // rk3, h0 // rv2, iq3 // rv3, heads, qrows, acc, mx,
                         total)
        if use_sinks:
            _add_sinks(acc, mx, total, sinks, heads, False)
        _store(acc, total, out, iq3, heads, qrows)


@njit(cache=True, nogil=True, error_model="numpy")
def _add_sinks(acc, mx, total, sinks, heads, fused):
    """Fold each row's sink logit into its softmax after the last key, as ggml does (the
    one-row path also moves the maximum; the update of the sum is fused on the tiled path
    only)."""
    one = np.float32(1.0)
    for r in range(acc.shape[0]):
        sk = sinks[heads[r]]
        ms = one
        vs = one
        if sk > mx[r]:
            ms = np.float32(math.exp(mx[r] - sk))
            mx[r] = sk
            _scale(acc[r], ms)
        else:
            vs = np.float32(math.exp(sk - mx[r]))
        total[r] = fma32(total[r], ms, vs) if fused else total[r] * ms + vs


@njit(cache=True, nogil=True, error_model="numpy")
def _store(acc, total, out, iq3, heads, qrows):
    """Normalise the rows by their sums (a zero sum gives zeros) and store them."""
    one = np.float32(1.0)
    for r in range(acc.shape[0]):
        t = total[r]
        inv = np.float32(0.0) if t == np.float32(0.0) else one / t
        a = acc[r]
        o = out[iq3, qrows[r], heads[r]]
        for d in range(a.shape[0]):
            o[d] = a[d] * inv


@njit(cache=True, nogil=True, error_model="numpy")
def _attend_tiled(q, k, v, mask, sinks, slopes, out, scale, softcap, use_mask, use_sinks,
                  iq3, ik2, ik3, iv2, iv3, h0, r0, nr):
    """ggml's tiled path (float32 throughout) for rows ``r0 .. r0+nr`` of the head group
    starting at ``h0``.

    Keys are taken :data:`KV_TILE` at a time.  Each score is a chain of fused multiply-adds
    over the head dimension, then scaled, soft-capped and masked; the running maximum moves
    once per tile; the tile's exponentials come from :func:`.numeric.vexp_f32` and are summed
    eight at a time; V is accumulated with one fused multiply-add per key.
    """
    nq1, dk = q.shape[2], q.shape[3]
    nkv = k.shape[2]
    dv = v.shape[3]
    m3, m2 = mask.shape[0], mask.shape[1]
    neg_inf = np.float32(-np.inf)
    zero = np.float32(0.0)
    heads, qrows = _row_ids(h0, r0, nr, nq1)
    acc = np.zeros((nr, dv), np.float32)
    mx = np.full(nr, neg_inf, np.float32)
    total = np.zeros(nr, np.float32)
    kt = np.empty((dk, KV_TILE), np.float32)
    sc = np.empty(KV_TILE, np.float32)
    for ic in range(0, nkv, KV_TILE):
        nt = min(KV_TILE, nkv - ic)
        _load_tile(k, ik3, ik2, ic, nt, kt)
        for r in range(nr):
            qrow = q[iq3, heads[r], qrows[r]]
            for t in range(KV_TILE):
                sc[t] = zero
            for d in range(dk):
                qd = qrow[d]
                ktd = kt[d]
                for t in range(nt):
                    sc[t] = fma32(qd, ktd[t], sc[t])
            for t in range(nt):
                sc[t] = sc[t] * scale
            if softcap != zero:
                for t in range(nt):
                    sc[t] = np.float32(math.tanh(sc[t])) * softcap
            if use_mask:
                mrow = mask[iq3 % m3, heads[r] % m2, qrows[r]]
                sl = slopes[heads[r]]
                for t in range(nt):
                    sc[t] = sc[t] + sl * mrow[ic + t]
            for t in range(nt, KV_TILE):
                sc[t] = neg_inf
            tmax = neg_inf
            for t in range(nt):
                tmax = tmax if tmax > sc[t] else sc[t]
            if tmax == neg_inf:
                continue
            m_old = mx[r]
            m_new = m_old if m_old > tmax else tmax
            a = acc[r]
            if m_new > m_old:
                ms = np.float32(math.exp(m_old - m_new))
                _scale(a, ms)
                total[r] = total[r] * ms
            mx[r] = m_new
            part = 0.0
            for c in range(0, KV_TILE, 8):
                part += np.float64(vexp8_sub_f32(sc, c, m_new))
            total[r] = np.float32(np.float64(total[r]) + part)
            for t in range(nt):
                _mad(a, v[iv3, iv2, ic + t], sc[t])
    if use_sinks:
        _add_sinks(acc, mx, total, sinks, heads, True)
    _store(acc, total, out, iq3, heads, qrows)


@njit(cache=True, nogil=True, error_model="numpy")
def _merge_chunks(pm, ps, pacc, out, h):
    """ggml's merge of the per-thread partial results of a split decode, for head ``h``:
    chunks in order (empty ones skipped), the running and the new part each rescaled to the
    larger maximum with ``expf`` and added with the first product fused, then normalised."""
    dv = pacc.shape[2]
    m_fin = np.float32(-np.inf)
    s_fin = np.float32(0.0)
    acc = np.zeros(dv, np.float32)
    for c in range(pm.shape[0]):
        s_c = ps[c, h]
        if s_c == np.float32(0.0):
            continue
        m_c = pm[c, h]
        m_new = m_fin if m_fin > m_c else m_c
        so = np.float32(math.exp(m_fin - m_new))
        sn = np.float32(math.exp(m_c - m_new))
        part = pacc[c, h]
        for d in range(dv):
            acc[d] = fma32(acc[d], so, part[d] * sn)
        s_fin = fma32(s_fin, so, s_c * sn)
        m_fin = m_new
    o = out[0, 0, h]
    if s_fin != np.float32(0.0):
        inv = np.float32(1.0) / s_fin
        for d in range(dv):
            o[d] = acc[d] * inv
    else:
        for d in range(dv):
            o[d] = acc[d]


@njit(parallel=True, cache=True, nogil=True)
def _split_decode(q, k, v, mask, sinks, slopes, out, scale, softcap, use_mask, use_sinks,
                  dot_kind, v_f16, group, n_split):
    """ggml's split decode (one query row, n_kv >= 512, K and V both F32 or both F16): the keys
    are cut into ``n_split`` chunks (ggml's thread count), each attended on the one-row path
    (the sinks with the first chunk only), and the partial results merged in chunk order."""
    nq2 = q.shape[1]
    nkv, dv = k.shape[2], v.shape[3]
    rk2, rv2 = nq2 // k.shape[1], nq2 // v.shape[1]
    chunk = (nkv + n_split - 1) // n_split
    pm = np.full((n_split, nq2), -np.inf, np.float32)
    ps = np.zeros((n_split, nq2), np.float32)
    pacc = np.zeros((n_split, nq2, dv), np.float32)
    n_groups = nq2 // group
    for item in prange(n_split * n_groups):
        c = item // n_groups
        h0 = (item % n_groups) * group
        kv0 = c * chunk
        if kv0 >= nkv:
            continue
        kv1 = min(kv0 + chunk, nkv)
        heads, qrows = _row_ids(h0, 0, group, 1)
        acc, mx, total = _one_row_block(q, k, v, mask, slopes, scale, softcap, use_mask,
                                        dot_kind, v_f16, 0, h0 // rk2, 0, h0 // rv2, 0,
                                        heads, qrows, kv0, kv1)
        if use_sinks and c == 0:
            _add_sinks(acc, mx, total, sinks, heads, False)
        for r in range(group):
            pm[c, heads[r]] = mx[r]
            ps[c, heads[r]] = total[r]
            pacc[c, heads[r], :] = acc[r]
    for h in prange(nq2):
        _merge_chunks(pm, ps, pacc, out, h)


@njit(parallel=True, cache=True, nogil=True)
def flash_attn_f32(q, k, v, mask, sinks, slopes, out, scale, softcap, use_mask, use_sinks,
                   tiled, dot_kind, v_f16, group, qb, n_split):
    """Attention over packed float32 arrays, bit-exact with ggml's CPU backend.

    q (nq3, nq2, nq1, DK), k (nk3, nk2, nkv, DK), v (nv3, nv2, nkv, DV), mask (m3, m2, m1, m0)
    with m1 >= nq1 and m0 >= nkv, sinks and slopes (nq2,), out (nq3, nq1, nq2, DV).
    ``tiled`` selects ggml's tiled path (:func:`_attend_tiled`), ``n_split`` > 1 its split
    decode (:func:`_split_decode`), otherwise the one-row path (:func:`_attend_rows`) with the
    dot product ``dot_kind`` (DOT_F32, DOT_F16, DOT_BF16; Q already rounded to K's type) and,
    with ``v_f16``, a half-precision V accumulator.
    ``group`` query heads that share one K head and one V head are processed together, ``qb``
    rows (head, query) at a time, so that each K and V row is reused from cache.
    ``scale`` is already divided by ``softcap`` when soft-capping is on.
    """
    if n_split > 1:
        _split_decode(q, k, v, mask, sinks, slopes, out, scale, softcap, use_mask, use_sinks,
                      dot_kind, v_f16, group, n_split)
        return
    nq3, nq2, nq1 = q.shape[0], q.shape[1], q.shape[2]
    nk3, nk2 = k.shape[0], k.shape[1]
    nv3, nv2 = v.shape[0], v.shape[1]
    nkv = k.shape[2]
    rk2, rk3 = nq2 // nk2, nq3 // nk3
    rv2, rv3 = nq2 // nv2, nq3 // nv3
    n_groups = nq2 // group
    rows_per_group = group * nq1
    nblk = (rows_per_group + qb - 1) // qb
    for item in prange(nq3 * n_groups * nblk):
        iq3, h0, r0, nr = _work_item(item, n_groups, nblk, group, qb, rows_per_group)
        ik2, ik3 = h0 // rk2, iq3 // rk3
        iv2, iv3 = h0 // rv2, iq3 // rv3
        if tiled:
            _attend_tiled(q, k, v, mask, sinks, slopes, out, scale, softcap, use_mask,
                          use_sinks, iq3, ik2, ik3, iv2, iv3, h0, r0, nr)
            continue
        heads, qrows = _row_ids(h0, r0, nr, nq1)
        acc, mx, total = _one_row_block(q, k, v, mask, slopes, scale, softcap, use_mask,
                                        dot_kind, v_f16, iq3, ik2, ik3, iv2, iv3, heads, qrows,
                                        0, nkv)
        if use_sinks:
            _add_sinks(acc, mx, total, sinks, heads, False)
        _store(acc, total, out, iq3, heads, qrows)


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



def _q_as_k_meets_it(q: np.ndarray, k_type: int) -> np.ndarray:
    """Q converted to K's ``vec_dot_type``, as ggml's one-row path converts it before the dot
    products, as float32 values: rounded to F16 or BF16 for such K; for a block-format K,
    quantised to Q8_0 or Q8_1 (:func:`.quants.quantize_activations`) and taken as the exact
    values ``d · q`` those blocks stand for."""
    if k_type in ATTENTION_BLOCK_TYPES:
        rows = q.reshape(-1, q.shape[-1])
        return quantize_activations(rows, VEC_DOT_TYPE[k_type]).dequantized().reshape(q.shape)
    return np.ascontiguousarray(round_to(q, k_type))


def _packed_f32(t: Node) -> np.ndarray:
    """The tensor's values as a C-contiguous float32 copy (F32, F16, BF16, or a block format
    dequantised as ggml's ``to_float`` does)."""
    if t.type in ATTENTION_BLOCK_TYPES:
        return dequantize_rows(t.type, rows_u8(t), t.ne[0])
    if t.type == BF16:
        return bf16_to_f32(np.ascontiguousarray(view(t)))
    if t.type == F16:
        return f16_to_f32(view(t))
    return np.array(view(t), dtype=np.float32, order="C", copy=True)


def _row_block(n_items: int, rows: int) -> int:
    threads = numba.get_num_threads()
    qb = max(1, min(16, rows))
    while qb > 1 and n_items * -(-rows // qb) < 4 * threads:
        qb = (qb + 1) // 2
    return qb


@kernel("cpu", Op.FLASH_ATTN_EXT)
def bind_flash_attn_ext(node: Node):
    """FLASH_ATTN_EXT (ggml_flash_attn_ext) with F32, F16 or BF16 K and V: the CPU runner of a
    validated node."""
    q_t, k_t, v_t = node.src[0], node.src[1], node.src[2]
    mask_t = node.src[3] if len(node.src) > 3 else None
    sinks_t = node.src[4] if len(node.src) > 4 else None
    scale = np.float32(node.param_f32(0))
    softcap = np.float32(node.param_f32(2))
    if softcap != 0:
        scale = np.float32(scale / softcap)
    nq3, nq2, nq1 = q_t.ne[3], q_t.ne[2], q_t.ne[1]
    n_kv = k_t.ne[1]
    slopes = alibi_slopes(nq2, node.param_f32(1))
    tiled = k_t.type == v_t.type and k_t.type in (F32, F16) and nq1 >= TILED_MIN_ROWS
    v_f16 = (not tiled) and v_t.type == F16
    dot_kind = {F16: DOT_F16, BF16: DOT_BF16}.get(k_t.type, DOT_F32)
    group = math.gcd(nq2 // k_t.ne[2], nq2 // v_t.ne[2]) if nq2 else 1
    qb = _row_block(nq3 * (nq2 // group if nq2 else 0), group * nq1)
    split = (nq1 == 1 and nq3 == 1 and k_t.type == v_t.type and k_t.type in (F32, F16)
             and k_t.ne[1] >= SPLIT_MIN_KV)
    n_split = SPLIT_THREADS if split else 1
    if (HAS_F16C and k_t.type == v_t.type == F16 and not tiled and n_split == 1
            and k_t.ne[0] % 16 == 0 and v_t.ne[0] % 8 == 0
            and not any(overlaps(node, t) for t in (q_t, k_t, v_t, mask_t, sinks_t))):
        return _bind_f16_in_place(node, scale, softcap, slopes, group, qb)

    def run():
        if node.nelements == 0:
            return
        q = np.array(view(q_t), dtype=np.float32, order="C", copy=True)
        if not tiled:
            q = _q_as_k_meets_it(q, k_t.type)
        k, v = _packed_f32(k_t), _packed_f32(v_t)
        if mask_t is not None:      # only the rows of the queries and columns of the keys
            mask = f16_to_f32(view(mask_t)[:, :, :nq1, :n_kv])
        else:
            mask = np.zeros((1, 1, 1, 1), np.float32)
        if sinks_t is not None:
            sinks = np.array(view(sinks_t)[0, 0, 0, :], dtype=np.float32, order="C", copy=True)
        else:
            sinks = np.zeros(1, np.float32)
        flash_attn_f32(q, k, v, mask, sinks, slopes, view(node), scale, softcap,
                       mask_t is not None, sinks_t is not None, tiled, dot_kind, v_f16,
                       group, qb, n_split)
    return run


def _bind_f16_in_place(node: Node, scale, softcap, slopes, group: int, qb: int):
    """The common decode: F16 K/V cache read in place, nothing copied per run."""
    q_t, k_t, v_t = node.src[0], node.src[1], node.src[2]
    mask_t = node.src[3] if len(node.src) > 3 else None
    sinks_t = node.src[4] if len(node.src) > 4 else None
    no_mask = np.zeros((1, 1, 1, 1), np.uint16)
    no_sinks = np.zeros(1, np.float32)

    def run():
        if node.nelements == 0:
            return
        mask = view(mask_t, np.uint16) if mask_t is not None else no_mask
        sinks = view(sinks_t)[0, 0, 0, :] if sinks_t is not None else no_sinks
        flash_attn_f16_in_place(view(q_t), view(k_t, np.uint16), view(v_t, np.uint16),
                                mask, sinks, slopes, F16_TABLE, view(node), scale, softcap,
                                mask_t is not None, sinks_t is not None, group, qb)
    return run
