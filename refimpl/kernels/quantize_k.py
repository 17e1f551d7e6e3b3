"""Float rows into the k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), as ggml's CPU backend's
``from_float`` writes them: what SET_ROWS and CPY store into a k-quant tensor
(spec/ops/set_rows.md, spec/ops/copy.md).  Layouts: spec/ops/matmul.md, "Block formats", and
:mod:`.quants` (which reads them back).

Every format has 256-value super-blocks cut into sub-blocks (16 values for Q2_K, Q3_K and
Q6_K, 32 for Q4_K and Q5_K).  Quantising a super-block takes three steps:

1. each sub-block gets a float scale (and, for Q2_K, Q4_K and Q5_K, a minimum) by a small
   search that minimises a weighted error over a few candidate scales:

   * :func:`_fit_scale_min` (Q2_K, Q4_K, Q5_K; codes ``0..nmax``): start from
     ``(max - min)/nmax``; then for ``nstep + 1`` candidate inverse scales
     ``(rmin + rdelta·s + nmax)/(max - min)`` round every value, solve the weighted
     least-squares scale and minimum for those codes, and keep the candidate with the smallest
     weighted error (absolute for Q2_K, squared for the others).  Weights are ``|x|`` (Q2_K)
     or ``rms(sub-block) + |x|`` (Q4_K, Q5_K).
   * :func:`_fit_signed` (Q6_K; codes ``-32..31``): start from ``-32/m``, ``m`` the value of
     largest magnitude, and try ``-(32 + s/10)/m`` for ``s`` in ±1…±9, keeping the one whose
     least-squares scale explains most of the ``x²``-weighted energy.
   * :func:`_fit_signed_iterative` (Q3_K; codes ``-4..3``): start from ``-4/m`` and move one
     code at a time while the ``x²``-weighted fit improves (at most five passes).

2. the scales (and minimums) of the sub-blocks are themselves quantised against the largest
   one (4 bits for Q2_K, 6 for Q3_K, Q4_K and Q5_K, 8 signed for Q6_K) with one F16
   super-scale each;
3. every value is re-rounded against the scale the block really stores
   (``round((x + min)/scale)`` or ``round(x/scale)``, clamped), then the codes are packed.

"Round" is ggml's ``nearest_int``: add 1.5·2²³ in float32 and read the low mantissa bits
(:func:`_nearest_int`), which is round-half-to-even for every value below 2²² in magnitude and
well defined (if meaningless) for the others, NaN included.  All arithmetic is float32 in the
order ggml's reference C code evaluates it, without fused multiply-adds (ggml-base, where these
quantisers live, is built for plain x86-64), so the bytes come out as ggml's.  The plain-numpy
:func:`reference` is an independent oracle for the tests (vectorised over sub-blocks).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..graph.validators.types import K_QUANT_TYPES, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K  # noqa: F401
from .numeric import f16_bits, f32_bits
from .parallel import sized_kernel
from .quants import F16_TABLE
from .quants_more import _largest

#: Bytes of one 256-value block of each k-quant.
BLOCK_BYTES = {Q2_K: 84, Q3_K: 110, Q4_K: 144, Q5_K: 176, Q6_K: 210}

_EPS = np.float32(1e-15)         # ggml's GROUP_MAX_EPS: a sub-block below it is all zero
_JIT = dict(cache=True, nogil=True, error_model="numpy")


@njit(**_JIT)
def _nearest_int(v):
    """ggml's ``nearest_int`` of the float32 ``v``: round half to even below 2^22."""
    bits = f32_bits(np.float32(v + np.float32(12582912.0)))
    return np.int32(bits & np.uint32(0x7FFFFF)) - np.int32(0x400000)


@njit(**_JIT)
def _clamp(v, lo, hi):
    """C's ``MAX(lo, MIN(hi, v))``."""
    return max(lo, min(hi, v))


@njit(**_JIT)
def _byte(out, i):
    """``out[i]`` (uint8) as a signed int, so that bit operations stay integer in numba."""
    return np.int32(out[i])


@njit(**_JIT)
def _put_f16(out, o, x, table):
    """Store ``x`` as an IEEE half at ``out[o:o+2]``; returns the stored value as float32."""
    bits = f16_bits(x)
    out[o] = bits & 0xFF
    out[o + 1] = (bits >> 8) & 0xFF
    return table[bits & 0xFFFF]


@njit(**_JIT)
def _fit_scale_min(x, o, n, nmax, w, L, laux, rmin, rdelta, nstep, use_mad):
    """Codes ``L[o:o+n]`` (0..nmax) for ``x[o:o+n]`` with weights ``w[0:n]``: returns
    ``(scale, min)`` with ``x ≈ scale·L − min`` (min ≥ 0), the best of ``nstep + 1`` candidate
    scales by weighted error (``|e|`` if ``use_mad``, else ``e²``).  ggml's make_qkx2_quants."""
    f32 = np.float32
    lo = x[o]
    hi = x[o]
    sum_w = w[0]
    sum_x = sum_w * x[o]
    for i in range(1, n):
        v = x[o + i]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
        sum_w += w[i]
        sum_x += w[i] * v
    if lo > 0:
        lo = f32(0.0)
    if hi == lo:
        for i in range(n):
            L[o + i] = 0
        return f32(0.0), -lo
    iscale = f32(nmax) / (hi - lo)
    scale = f32(1.0) / iscale
    best = f32(0.0)
    for i in range(n):
        q = _clamp(_nearest_int(iscale * (x[o + i] - lo)), 0, nmax)
        L[o + i] = q
        e = scale * f32(q) + lo - x[o + i]
        best += w[i] * (abs(e) if use_mad else e * e)
    for s in range(nstep + 1):
        iscale = (rmin + rdelta * f32(s) + f32(nmax)) / (hi - lo)
        sum_l = f32(0.0)
        sum_l2 = f32(0.0)
        sum_xl = f32(0.0)
        for i in range(n):
            q = _clamp(_nearest_int(iscale * (x[o + i] - lo)), 0, nmax)
            laux[i] = q
            fq = f32(q)
            sum_l += w[i] * fq
            sum_l2 += w[i] * fq * fq
            sum_xl += w[i] * fq * x[o + i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min = f32(0.0)
                this_scale = sum_xl / sum_l2
            err = f32(0.0)
            for i in range(n):
                e = this_scale * f32(laux[i]) + this_min - x[o + i]
                err += w[i] * (abs(e) if use_mad else e * e)
            if err < best:
                for i in range(n):
                    L[o + i] = laux[i]
                best = err
                scale = this_scale
                lo = this_min
    return scale, -lo


@njit(**_JIT)
def _start_signed(x, o, n, nmax, L, offset):
    """The first step of both signed fits: codes ``l`` of ``x[o:o+n]`` at inverse scale
    ``-nmax/m`` (``m`` the first value of largest magnitude), clamped to −nmax..nmax−1 and
    stored as ``l + offset``, with their ``x²``-weighted sums ``Σ w·x·l`` and ``Σ w·l²``.
    Returns ``(m, sumlx, suml2)``; ``m`` is 0 (and every code 0) for a sub-block whose largest
    magnitude is below ggml's all-zero threshold."""
    f32 = np.float32
    amax, m = _largest(x, o, n)
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    if amax < _EPS:
        for i in range(n):
            L[o + i] = 0
        return f32(0.0), sumlx, suml2
    iscale = f32(-nmax) / m
    for i in range(n):
        v = x[o + i]
        q = _clamp(_nearest_int(iscale * v), -nmax, nmax - 1)
        L[o + i] = q + offset
        wv = v * v
        sumlx += wv * v * f32(q)
        suml2 += wv * f32(q) * f32(q)
    return m, sumlx, suml2


@njit(**_JIT)
def _fit_signed(x, o, n, nmax, L):
    """Codes ``L[o:o+n]`` (0..2·nmax−1, i.e. ``l + nmax`` for ``l`` in −nmax..nmax−1) and the
    scale with ``x ≈ scale·l``: the best of 19 inverse scales by ``x²``-weighted fit.  ggml's
    make_qx_quants with rmse_type 1 (Q6_K)."""
    f32 = np.float32
    m, sumlx, suml2 = _start_signed(x, o, n, nmax, L, nmax)
    if m == 0:
        return f32(0.0)
    scale = sumlx / suml2 if suml2 != 0 else f32(0.0)
    best = scale * sumlx
    for s in range(-9, 10):
        if s == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(s)) / m
        sumlx = f32(0.0)
        suml2 = f32(0.0)
        for i in range(n):
            v = x[o + i]
            q = _clamp(_nearest_int(iscale * v), -nmax, nmax - 1)
            wv = v * v
            sumlx += wv * v * f32(q)
            suml2 += wv * f32(q) * f32(q)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[o + i] = nmax + _clamp(_nearest_int(iscale * x[o + i]), -nmax, nmax - 1)
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(**_JIT)
def _fit_signed_iterative(x, o, n, nmax, L):
    """Codes ``L[o:o+n]`` (``l + nmax``) and the scale with ``x ≈ scale·l``: start from
    ``-nmax/m`` and re-round one value at a time against the least-squares scale of the others
    while the ``x²``-weighted fit improves (five passes at most).  ggml's make_q3_quants with
    do_rmse (Q3_K)."""
    f32 = np.float32
    m, sumlx, suml2 = _start_signed(x, o, n, nmax, L, 0)
    if m == 0:
        return f32(0.0)
    for _ in range(5):
        changed = 0
        for i in range(n):
            v = x[o + i]
            wv = v * v
            fl = f32(L[o + i])
            slx = sumlx - wv * v * fl
            if slx > 0:
                sl2 = suml2 - wv * fl * fl
                q = _clamp(_nearest_int(v * sl2 / slx), -nmax, nmax - 1)
                if q != L[o + i]:
                    slx += wv * v * f32(q)
                    sl2 += wv * f32(q) * f32(q)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[o + i] = q
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    for i in range(n):
        L[o + i] += nmax
    return sumlx / suml2 if suml2 > 0 else f32(0.0)


@njit(**_JIT)
def _pack_2bit(L, out, o):
    """256 codes (0..3) into 64 bytes at ``out[o:]``: byte ``32h + l`` holds values
    ``128h + l + 32s`` at bits ``2s`` (Q2_K and the low bits of Q3_K)."""
    for h in range(2):
        for l in range(32):
            j = 128 * h + l
            out[o + 32 * h + l] = (L[j] | (L[j + 32] << 2) | (L[j + 64] << 4) |
                                   (L[j + 96] << 6)) & 0xFF


@njit(**_JIT)
def _block_q2_k(x, out, o, L, laux, w, sc, mn, table):
    """One Q2_K block: scales[16] (scale nibble, min nibble), qs[64], d, dmin."""
    f32 = np.float32
    max_scale = f32(0.0)
    max_min = f32(0.0)
    for j in range(16):
        for i in range(16):
            w[i] = abs(x[16 * j + i])
        sc[j], mn[j] = _fit_scale_min(x, 16 * j, 16, 3, w, L, laux, f32(-0.5), f32(0.1), 15,
                                      True)
        if sc[j] > max_scale:
            max_scale = sc[j]
        if mn[j] > max_min:
            max_min = mn[j]
    if max_scale > 0:
        inv = f32(15.0) / max_scale
        for j in range(16):
            out[o + j] = _nearest_int(inv * sc[j]) & 0xFF
        d = _put_f16(out, o + 80, max_scale / f32(15.0), table)
    else:
        for j in range(16):
            out[o + j] = 0
        d = _put_f16(out, o + 80, f32(0.0), table)
    if max_min > 0:
        inv = f32(15.0) / max_min
        for j in range(16):
            out[o + j] = (_byte(out, o + j) | (_nearest_int(inv * mn[j]) << 4)) & 0xFF
        dmin = _put_f16(out, o + 82, max_min / f32(15.0), table)
    else:
        dmin = _put_f16(out, o + 82, f32(0.0), table)
    for j in range(16):
        dj = d * f32(_byte(out, o + j) & 15)
        if dj == 0:
            continue
        mj = dmin * f32(_byte(out, o + j) >> 4)
        for i in range(16):
            L[16 * j + i] = _clamp(_nearest_int((x[16 * j + i] + mj) / dj), 0, 3)
    _pack_2bit(L, out, o + 16)


@njit(**_JIT)
def _block_q3_k(x, out, o, L, sc, table):
    """One Q3_K block: hmask[32], qs[64], scales[12] (sixteen 6-bit scales, biased by 32), d."""
    f32 = np.float32
    for j in range(16):
        sc[j] = _fit_signed_iterative(x, 16 * j, 16, 4, L)
    max_scale = _largest(sc, 0, 16)[1]
    s = o + 96                                   # the 12 scale bytes
    for j in range(12):
        out[s + j] = 0
    if max_scale != 0:
        inv = f32(-32.0) / max_scale
        for j in range(16):
            q = ((_nearest_int(inv * sc[j]) + 128) & 255) - 128     # C's int8_t
            q = _clamp(q, -32, 31) + 32
            if j < 8:
                out[s + j] = q & 15
            else:
                out[s + j - 8] = _byte(out, s + j - 8) | ((q & 15) << 4)
            out[s + 8 + j % 4] = _byte(out, s + 8 + j % 4) | ((q >> 4) << (2 * (j // 4)))
        d = _put_f16(out, o + 108, f32(1.0) / inv, table)
    else:
        d = _put_f16(out, o + 108, f32(0.0), table)
    for j in range(16):
        low = _byte(out, s + j) & 15 if j < 8 else _byte(out, s + j - 8) >> 4
        q = (low | (((_byte(out, s + 8 + j % 4) >> (2 * (j // 4))) & 3) << 4)) - 32
        dj = d * f32(q)
        if dj == 0:
            continue
        for i in range(16):
            L[16 * j + i] = _clamp(_nearest_int(x[16 * j + i] / dj), -4, 3) + 4
    for j in range(32):
        out[o + j] = 0
    for j in range(256):                          # third bits: value j at hmask[j % 32], bit j // 32
        if L[j] > 3:
            out[o + j % 32] = _byte(out, o + j % 32) | (1 << (j // 32))
            L[j] -= 4
    _pack_2bit(L, out, o + 32)


@njit(**_JIT)
def _block_q45_k(x, out, o, nmax, L, laux, w, sc, mn, table):
    """One Q4_K (``nmax`` 15: d, dmin, scales[12], qs[128]) or Q5_K block (``nmax`` 31:
    d, dmin, scales[12], qh[32], qs[128])."""
    f32 = np.float32
    max_scale = f32(0.0)
    max_min = f32(0.0)
    for j in range(8):
        sum_x2 = f32(0.0)
        for i in range(32):
            sum_x2 += x[32 * j + i] * x[32 * j + i]
        av_x = f32(np.sqrt(sum_x2 / f32(32.0)))
        for i in range(32):
            w[i] = av_x + abs(x[32 * j + i])
        if nmax == 15:
            sc[j], mn[j] = _fit_scale_min(x, 32 * j, 32, 15, w, L, laux, f32(-1.0), f32(0.1),
                                          20, False)
        else:
            sc[j], mn[j] = _fit_scale_min(x, 32 * j, 32, 31, w, L, laux, f32(-0.5), f32(0.1),
                                          15, False)
        if sc[j] > max_scale:
            max_scale = sc[j]
        if mn[j] > max_min:
            max_min = mn[j]
    inv_scale = f32(63.0) / max_scale if max_scale > 0 else f32(0.0)
    inv_min = f32(63.0) / max_min if max_min > 0 else f32(0.0)
    s = o + 4                                    # the 12 scale bytes
    for j in range(8):
        ls = min(63, _nearest_int(inv_scale * sc[j]) & 0xFF)         # C's uint8_t, then MIN
        lm = min(63, _nearest_int(inv_min * mn[j]) & 0xFF)
        if j < 4:
            out[s + j] = ls
            out[s + j + 4] = lm
        else:
            out[s + j + 4] = (ls & 15) | ((lm & 15) << 4)
            out[s + j - 4] = _byte(out, s + j - 4) | ((ls >> 4) << 6)
            out[s + j] = _byte(out, s + j) | ((lm >> 4) << 6)
    d = _put_f16(out, o, max_scale / f32(63.0), table)
    dmin = _put_f16(out, o + 2, max_min / f32(63.0), table)
    for j in range(8):
        if j < 4:
            ls = _byte(out, s + j) & 63
            lm = _byte(out, s + j + 4) & 63
        else:
            ls = (_byte(out, s + j + 4) & 15) | ((_byte(out, s + j - 4) >> 6) << 4)
            lm = (_byte(out, s + j + 4) >> 4) | ((_byte(out, s + j) >> 6) << 4)
        dj = d * f32(ls)
        if dj == 0:
            continue
        mj = dmin * f32(lm)
        for i in range(32):
            L[32 * j + i] = _clamp(_nearest_int((x[32 * j + i] + mj) / dj), 0, nmax)
    if nmax == 15:                               # qs: byte 32h + l holds 64h + l and +32
        for h in range(4):
            for l in range(32):
                out[o + 16 + 32 * h + l] = L[64 * h + l] | (L[64 * h + l + 32] << 4)
    else:                                        # fifth bits: value 64h + l at qh[l] bit 2h,
        for j in range(32):                      # value 64h + l + 32 at bit 2h + 1
            out[o + 16 + j] = 0
        for h in range(4):
            for l in range(32):
                a = L[64 * h + l]
                b = L[64 * h + l + 32]
                out[o + 16 + l] = (_byte(out, o + 16 + l) | ((a >> 4) << (2 * h)) |
                                   ((b >> 4) << (2 * h + 1)))
                out[o + 48 + 32 * h + l] = (a & 15) | ((b & 15) << 4)


@njit(**_JIT)
def _block_q6_k(x, out, o, L, sc, table):
    """One Q6_K block: ql[128], qh[64], scales:i8[16], d."""
    f32 = np.float32
    for j in range(16):
        sc[j] = _fit_signed(x, 16 * j, 16, 32, L)
    amax, max_scale = _largest(sc, 0, 16)
    if amax < _EPS:                              # an all-zero block: every byte 0
        for j in range(210):
            out[o + j] = 0
        return
    inv = f32(-128.0) / max_scale
    d = _put_f16(out, o + 208, f32(1.0) / inv, table)
    for j in range(16):
        out[o + 192 + j] = min(127, _nearest_int(inv * sc[j])) & 0xFF
    for j in range(16):
        q = ((_byte(out, o + 192 + j) + 128) & 255) - 128               # int8
        dj = d * f32(q)
        if dj == 0:
            continue
        for i in range(16):
            L[16 * j + i] = _clamp(_nearest_int(x[16 * j + i] / dj), -32, 31) + 32
    for h in range(2):                           # half h: values 128h + l + 32s, s = 0..3
        for l in range(32):
            j = 128 * h + l
            out[o + 64 * h + l] = (L[j] & 15) | ((L[j + 64] & 15) << 4)
            out[o + 64 * h + l + 32] = (L[j + 32] & 15) | ((L[j + 96] & 15) << 4)
            out[o + 128 + 32 * h + l] = ((L[j] >> 4) | ((L[j + 32] >> 4) << 2) |
                                         ((L[j + 64] >> 4) << 4) | ((L[j + 96] >> 4) << 6))


@njit(**_JIT)
def quantize_row_k(code, x, out, table):
    """Quantise the float32 row ``x`` (a multiple of 256 values) into the packed k-quant blocks
    ``out`` (uint8, the row's bytes) of format ``code``; ``table`` is :data:`.quants.F16_TABLE`."""
    L = np.empty(256, np.int32)
    laux = np.empty(32, np.int32)
    w = np.empty(32, np.float32)
    sc = np.empty(16, np.float32)
    mn = np.empty(16, np.float32)
    nbytes = 84 if code == Q2_K else 110 if code == Q3_K else 144 if code == Q4_K else \
        176 if code == Q5_K else 210
    for b in range(x.shape[0] // 256):
        v = x[256 * b:256 * b + 256]
        o = b * nbytes
        if code == Q2_K:
            _block_q2_k(v, out, o, L, laux, w, sc, mn, table)
        elif code == Q3_K:
            _block_q3_k(v, out, o, L, sc, table)
        elif code == Q4_K:
            _block_q45_k(v, out, o, 15, L, laux, w, sc, mn, table)
        elif code == Q5_K:
            _block_q45_k(v, out, o, 31, L, laux, w, sc, mn, table)
        else:
            _block_q6_k(v, out, o, L, sc, table)


@sized_kernel(1, cache=True, nogil=True)
def _quantize_rows(code, x, out, table):
    """:func:`quantize_row_k` for every row, rows in parallel when there are enough values."""
    for r in prange(x.shape[0]):
        quantize_row_k(code, x[r], out[r], table)


def quantize_rows(code: int, x: np.ndarray, out: np.ndarray) -> None:
    """:func:`quantize_row_k` for every row of ``x`` (float32 (m, k), k a multiple of 256) into
    ``out`` (uint8 (m, row_bytes); rows may be strided).  The kernels do not check bounds:
    the shapes are checked here (the validators guarantee them for graph nodes)."""
    m, k = x.shape
    if k % 256 or out.shape != (m, k // 256 * BLOCK_BYTES[code]):
        raise ValueError(f"{m} rows of {k} values do not fill uint8 rows {out.shape} of type "
                         f"{code} blocks")
    _quantize_rows(code, x, out, F16_TABLE)


# ------------------------------------------------------------------------------------------
# numpy oracle (finite inputs), vectorised over sub-blocks: each search runs for all of them
# at once, with the sums taken value by value as the C code does (not numpy's pairwise sums)

_F = np.float32


def _ref_nearest(v) -> np.ndarray:
    v = np.asarray(v, _F)
    return (((v + _F(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000).astype(np.int64)


def _ref_safe(d: np.ndarray) -> np.ndarray:
    return np.where(d != 0, d, _F(1.0)).astype(_F)


def _ref_wsum(w: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """Per row, ``sum_i w[:, i]·terms[:, i]`` accumulated left to right in float32."""
    acc = np.zeros(w.shape[0], _F)
    for i in range(w.shape[1]):
        acc = acc + w[:, i] * terms[:, i]
    return acc


def _ref_fit_scale_min(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """Oracle of :func:`_fit_scale_min` for sub-blocks ``x`` (g, n): (scale, min, codes)."""
    lo = np.minimum(x.min(axis=1), _F(0.0))
    hi = x.max(axis=1)
    flat = hi == lo
    lo0 = lo
    span = _ref_safe(hi - lo)
    ones = np.ones_like(x)
    sum_w = _ref_wsum(w, ones)
    sum_x = _ref_wsum(w, x)

    def codes(iscale):
        return np.clip(_ref_nearest(iscale[:, None] * (x - lo[:, None])), 0, nmax)

    def error(scale, mn, q):
        e = scale[:, None] * q.astype(_F) + mn[:, None] - x
        return _ref_wsum(w, np.abs(e) if use_mad else e * e)

    iscale = _F(nmax) / span
    scale = _F(1.0) / iscale
    L = codes(iscale)
    best = error(scale, lo, L)
    for s in range(nstep + 1):
        # a better candidate moves the minimum, and with it the span the next one divides
        q = codes((_F(rmin) + _F(rdelta) * _F(s) + _F(nmax)) / _ref_safe(hi - lo))
        fq = q.astype(_F)
        sum_l, sum_l2, sum_xl = _ref_wsum(w, fq), _ref_wsum(w * fq, fq), _ref_wsum(w * fq, x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        ts = (sum_w * sum_xl - sum_x * sum_l) / _ref_safe(det)
        tm = (sum_l2 * sum_x - sum_l * sum_xl) / _ref_safe(det)
        pos = tm > 0
        ts = np.where(pos, sum_xl / _ref_safe(sum_l2), ts).astype(_F)
        tm = np.where(pos, _F(0.0), tm).astype(_F)
        err = error(ts, tm, q)
        take = ok & (err < best)
        L = np.where(take[:, None], q, L)
        best = np.where(take, err, best)
        scale = np.where(take, ts, scale).astype(_F)
        lo = np.where(take, tm, lo).astype(_F)
    L[flat] = 0
    scale = np.where(flat, _F(0.0), scale).astype(_F)
    lo = np.where(flat, lo0, lo).astype(_F)
    return scale, (-lo).astype(_F), L


def _ref_largest(x):
    m = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]
    return np.abs(m), m


def _ref_fit_signed(x, nmax):
    """Oracle of :func:`_fit_signed` for sub-blocks ``x`` (g, n): (scale, codes)."""
    amax, m = _ref_largest(x)
    zero = amax < _EPS
    ms = _ref_safe(np.where(zero, _F(0.0), m))
    wx = x * x * x

    def fit(iscale):
        q = np.clip(_ref_nearest(iscale[:, None] * x), -nmax, nmax - 1)
        fq = q.astype(_F)
        return q, _ref_wsum(wx, fq), _ref_wsum(x * x * fq, fq)

    L, sumlx, suml2 = fit(_F(-nmax) / ms)
    scale = np.where(suml2 != 0, sumlx / _ref_safe(suml2), _F(0.0)).astype(_F)
    best = scale * sumlx
    for s in range(-9, 10):
        if s:
            q, sl, s2 = fit(-(_F(nmax) + _F(0.1) * _F(s)) / ms)
            take = (s2 > 0) & (sl * sl > best * s2)
            L = np.where(take[:, None], q, L)
            scale = np.where(take, sl / _ref_safe(s2), scale).astype(_F)
            best = np.where(take, scale * sl, best).astype(_F)
    L = L + nmax
    L[zero] = 0
    return np.where(zero, _F(0.0), scale).astype(_F), L


def _ref_fit_signed_iterative(x, nmax):
    """Oracle of :func:`_fit_signed_iterative` for sub-blocks ``x`` (g, n): (scale, codes).
    Five passes for every sub-block: a pass that changes nothing leaves the state as it was,
    so the passes after it change nothing either."""
    amax, m = _ref_largest(x)
    zero = amax < _EPS
    ms = _ref_safe(np.where(zero, _F(0.0), m))
    L = np.clip(_ref_nearest((_F(-nmax) / ms)[:, None] * x), -nmax, nmax - 1)
    fl = L.astype(_F)
    sumlx, suml2 = _ref_wsum(x * x * x, fl), _ref_wsum(x * x * fl, fl)
    for _ in range(5):
        for i in range(x.shape[1]):
            v = x[:, i]
            wv = v * v
            fl = L[:, i].astype(_F)
            slx = sumlx - wv * v * fl
            pos = slx > 0
            sl2 = suml2 - wv * fl * fl
            q = np.clip(_ref_nearest(v * sl2 / _ref_safe(np.where(pos, slx, 0))), -nmax, nmax - 1)
            fq = q.astype(_F)
            slx2 = slx + wv * v * fq
            sl22 = sl2 + wv * fq * fq
            better = pos & (q != L[:, i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(better, q, L[:, i])
            sumlx = np.where(better, slx2, sumlx).astype(_F)
            suml2 = np.where(better, sl22, suml2).astype(_F)
    scale = np.where(suml2 > 0, sumlx / _ref_safe(suml2), _F(0.0)).astype(_F)
    L = L + nmax
    L[zero] = 0
    return np.where(zero, _F(0.0), scale).astype(_F), L


def _ref_f16(v):
    """(stored bytes (..., 2), stored value float32) of ``v`` as IEEE halves."""
    h = np.asarray(v, _F).astype(np.float16)
    return h.view(np.uint8).reshape(*h.shape, 2), h.astype(_F)


def _ref_pack_2bit(L):
    """(B, 256) codes 0..3 -> (B, 64) bytes as :func:`_pack_2bit`."""
    q = L.reshape(-1, 2, 4, 32)                   # half, shift group, position
    return (q << (2 * np.arange(4))[None, None, :, None]).sum(axis=2).reshape(-1, 64)


def _ref_q2_k(xb):
    B = xb.shape[0]
    sc, mn, L = _ref_fit_scale_min(xb.reshape(-1, 16), np.abs(xb).reshape(-1, 16), 3, -0.5,
                                   0.1, 15, True)
    sc, mn, L = sc.reshape(B, 16), mn.reshape(B, 16), L.reshape(B, 16, 16)
    max_scale = np.maximum(sc.max(axis=1), _F(0.0))
    max_min = np.maximum(mn.max(axis=1), _F(0.0))
    has, hasm = max_scale > 0, max_min > 0
    lsc = np.where(has[:, None], _ref_nearest((_F(15.0) / _ref_safe(max_scale))[:, None] * sc)
                   & 0xFF, 0)
    lmn = np.where(hasm[:, None], _ref_nearest((_F(15.0) / _ref_safe(max_min))[:, None] * mn), 0)
    scb = (lsc | (lmn << 4)) & 0xFF
    db, d = _ref_f16(np.where(has, max_scale / _F(15.0), _F(0.0)))
    mb, dm = _ref_f16(np.where(hasm, max_min / _F(15.0), _F(0.0)))
    dj = d[:, None] * (scb & 15).astype(_F)
    mj = dm[:, None] * (scb >> 4).astype(_F)
    q = np.clip(_ref_nearest((xb + mj[..., None]) / _ref_safe(dj)[..., None]), 0, 3)
    L = np.where((dj != 0)[..., None], q, L).reshape(B, 256)
    return np.concatenate([scb.astype(np.uint8), _ref_pack_2bit(L).astype(np.uint8), db, mb],
                          axis=1)


def _ref_q3_k(xb):
    B = xb.shape[0]
    sc, L = _ref_fit_signed_iterative(xb.reshape(-1, 16), 4)
    sc, L = sc.reshape(B, 16), L.reshape(B, 16, 16)
    _, max_scale = _ref_largest(sc)
    has = max_scale != 0
    inv = _F(-32.0) / _ref_safe(max_scale)
    q = ((_ref_nearest(inv[:, None] * sc) + 128) & 255) - 128
    q = np.where(has[:, None], np.clip(q, -32, 31) + 32, 0)
    low = (q[:, :8] & 15) | ((q[:, 8:] & 15) << 4)
    high = ((q.reshape(B, 4, 4) >> 4) << (2 * np.arange(4))[None, :, None]).sum(axis=1)
    db, d = _ref_f16(np.where(has, _F(1.0) / inv, _F(0.0)))
    dj = d[:, None] * (q - 32).astype(_F)
    new = np.clip(_ref_nearest(xb / _ref_safe(dj)[..., None]), -4, 3) + 4
    L = np.where((dj != 0)[..., None], new, L).reshape(B, 256)
    top = L > 3
    hmask = (top.reshape(B, 8, 32) << np.arange(8)[None, :, None]).sum(axis=1)
    L = np.where(top, L - 4, L)
    return np.concatenate([hmask.astype(np.uint8), _ref_pack_2bit(L).astype(np.uint8),
                           low.astype(np.uint8), high.astype(np.uint8), db], axis=1)


def _ref_q45_k(xb, nmax):
    B = xb.shape[0]
    sub = xb.reshape(-1, 32)
    sum_x2 = _ref_wsum(sub, sub)
    w = np.sqrt(sum_x2 / _F(32.0)).astype(_F)[:, None] + np.abs(sub)
    rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
    sc, mn, L = _ref_fit_scale_min(sub, w, nmax, rmin, 0.1, nstep, False)
    sc, mn, L = sc.reshape(B, 8), mn.reshape(B, 8), L.reshape(B, 8, 32)
    max_scale = np.maximum(sc.max(axis=1), _F(0.0))
    max_min = np.maximum(mn.max(axis=1), _F(0.0))
    inv_s = np.where(max_scale > 0, _F(63.0) / _ref_safe(max_scale), _F(0.0)).astype(_F)
    inv_m = np.where(max_min > 0, _F(63.0) / _ref_safe(max_min), _F(0.0)).astype(_F)
    ls = np.minimum(63, _ref_nearest(inv_s[:, None] * sc) & 0xFF)
    lm = np.minimum(63, _ref_nearest(inv_m[:, None] * mn) & 0xFF)
    scales = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                             lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)], axis=1)
    db, d = _ref_f16(max_scale / _F(63.0))
    mb, dm = _ref_f16(max_min / _F(63.0))
    dj = d[:, None] * ls.astype(_F)
    mj = dm[:, None] * lm.astype(_F)
    new = np.clip(_ref_nearest((xb + mj[..., None]) / _ref_safe(dj)[..., None]), 0, nmax)
    L = np.where((dj != 0)[..., None], new, L).reshape(B, 4, 2, 32)   # 64h + 32t + l
    qs = (L[:, :, 0] & 15) | ((L[:, :, 1] & 15) << 4)
    parts = [db, mb, scales.astype(np.uint8)]
    if nmax == 31:
        bits = (L >> 4) << (2 * np.arange(4)[None, :, None, None] + np.arange(2)[None, None, :, None])
        parts.append(bits.sum(axis=(1, 2)).astype(np.uint8))
    parts.append(qs.reshape(B, 128).astype(np.uint8))
    return np.concatenate(parts, axis=1)


def _ref_q6_k(xb):
    B = xb.shape[0]
    sc, L = _ref_fit_signed(xb.reshape(-1, 16), 32)
    sc, L = sc.reshape(B, 16), L.reshape(B, 16, 16)
    amax, max_scale = _ref_largest(sc)
    zero = amax < _EPS
    inv = _F(-128.0) / _ref_safe(max_scale)
    db, d = _ref_f16(_F(1.0) / inv)
    scb = np.minimum(127, _ref_nearest(inv[:, None] * sc)) & 0xFF
    dj = d[:, None] * (((scb + 128) & 255) - 128).astype(_F)
    new = np.clip(_ref_nearest(xb / _ref_safe(dj)[..., None]), -32, 31) + 32
    L = np.where((dj != 0)[..., None], new, L).reshape(B, 2, 4, 32)   # 128h + 32s + l
    ql = np.concatenate([(L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4),
                         (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)], axis=2)
    qh = ((L >> 4) << (2 * np.arange(4))[None, None, :, None]).sum(axis=2)
    out = np.concatenate([ql.reshape(B, 128).astype(np.uint8), qh.reshape(B, 64).astype(np.uint8),
                          scb.astype(np.uint8), db], axis=1)
    out[zero] = 0
    return out


def reference(code: int, x: np.ndarray) -> np.ndarray:
    """Numpy oracle: float32 rows ``x`` (m, k), k a multiple of 256, as packed k-quant rows
    (uint8 (m, row_bytes)), written independently of :func:`quantize_row_k` (finite inputs)."""
    x = np.asarray(x, _F)
    m, k = x.shape
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if code == Q2_K:
            out = _ref_q2_k(x.reshape(-1, 16, 16))
        elif code == Q3_K:
            out = _ref_q3_k(x.reshape(-1, 16, 16))
        elif code in (Q4_K, Q5_K):
            out = _ref_q45_k(x.reshape(-1, 8, 32), 15 if code == Q4_K else 31)
        else:
            out = _ref_q6_k(x.reshape(-1, 16, 16))
    return out.reshape(m, -1)
