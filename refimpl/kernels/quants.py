"""Block formats: dequantisation, activation quantisation and block dot products.

ggml stores weights in blocks: ``block_size`` values share one or two half-precision scales
and are packed as small integers.  This module knows the byte layout of the formats refimpl
serves (spec/ops/matmul.md, "Block formats"):

=========  =====  =====  =====================================================================
type       block  bytes  layout (little-endian; ``f16`` is an IEEE half)
=========  =====  =====  =====================================================================
Q4_0       32     18     d:f16, qs[16] (low nibbles are values 0..15, high nibbles 16..31)
Q4_1       32     20     d:f16, m:f16, qs[16]
Q5_0       32     22     d:f16, qh:u32 (bit j is the fifth bit of value j), qs[16]
Q5_1       32     24     d:f16, m:f16, qh:u32, qs[16]
Q8_0       32     34     d:f16, qs:i8[32]
Q8_1       32     36     d:f16, s:f16 (d times the sum of qs), qs:i8[32]
Q2_K       256    84     scales[16] (low nibble scale, high nibble min), qs[64], d:f16, dmin:f16
Q3_K       256    110    hmask[32], qs[64], scales[12] (sixteen 6-bit scales), d:f16
Q4_K       256    144    d:f16, dmin:f16, scales[12] (eight 6-bit scales and mins), qs[128]
Q5_K       256    176    d:f16, dmin:f16, scales[12], qh[32], qs[128]
Q6_K       256    210    ql[128], qh[64], scales:i8[16], d:f16
Q8_K       256    292    d:f32, qs:i8[256], bsums:i16[16] (sums of 16 consecutive qs)
=========  =====  =====  =====================================================================

Three groups of functions:

* dequantisation (:func:`dequantize_rows`): block rows to float32, exactly as ggml's
  ``dequantize_row_*`` (every product involved is exact in float32, so results are bit-equal);
* activation quantisation (:func:`quantize_activations`): what ggml's CPU backend does to the
  activations (src1) of a matrix product before the integer dot products: Q8_0, Q8_1 or Q8_K
  with the x86 rounding (round half to even, scales rounded to f16 where the format stores
  f16);
* row unpacking for the matrix product (:func:`unpack_q32_row`, :func:`unpack_k_row`): a
  weight row as the small integers, per-group scales and minimums that ggml's x86 integer dot
  products work on (refimpl.kernels.matmul reproduces those dot products bit for bit).

Numba has no float16 on the CPU: half-precision scales are decoded through a 65536-entry
table (:data:`F16_TABLE`) and rounded to half precision arithmetically (:func:`.numeric.round_f16`).
The plain-numpy ``reference_*`` functions are independent oracles for the tests.
"""

from __future__ import annotations


import numpy as np
from numba import njit, prange

from ..graph.validators.types import (K_QUANT_TYPES, MORE_WEIGHT_TYPES,  # noqa: F401
                                      QUANT_WEIGHT_TYPES, VEC_DOT_TYPE)
from ..protocol.ggml_types import GgmlType
from .numeric import round_f16
from .parallel import sized_kernel

F32, F16, BF16, I32 = int(GgmlType.F32), int(GgmlType.F16), int(GgmlType.BF16), int(GgmlType.I32)
Q4_0, Q4_1 = int(GgmlType.Q4_0), int(GgmlType.Q4_1)
Q5_0, Q5_1 = int(GgmlType.Q5_0), int(GgmlType.Q5_1)
Q8_0, Q8_1, Q4_K, Q6_K, Q8_K = (int(GgmlType.Q8_0), int(GgmlType.Q8_1), int(GgmlType.Q4_K),
                                int(GgmlType.Q6_K), int(GgmlType.Q8_K))
Q2_K, Q3_K, Q5_K = int(GgmlType.Q2_K), int(GgmlType.Q3_K), int(GgmlType.Q5_K)

#: (values per block, bytes per block) of every format this module reads or writes.
BLOCK = {Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34),
         Q8_1: (32, 36), Q2_K: (256, 84), Q3_K: (256, 110), Q4_K: (256, 144),
         Q5_K: (256, 176), Q6_K: (256, 210), Q8_K: (256, 292)}

#: IEEE half bit pattern -> float32 value, for every one of the 65536 patterns.
F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

#: BF16 bit pattern -> float32 value (the pattern followed by 16 zero bits).
BF16_TABLE = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)

_F32_127 = np.float32(127.0)
_F32_M127 = np.float32(-127.0)
_F32_ONE = np.float32(1.0)


def table_for(code: int) -> np.ndarray:
    """The half-precision table :func:`dequantize_row` needs for rows of type ``code``."""
    return BF16_TABLE if code == BF16 else F16_TABLE


# ------------------------------------------------------------------------------------------
# scalar helpers


@njit(cache=True, nogil=True, inline="always")
def _f16_at(row, o, table):
    """The half-precision value stored little-endian at ``row[o:o+2]``, as float32."""
    return table[np.int32(row[o]) | (np.int32(row[o + 1]) << 8)]


@njit(cache=True, nogil=True, inline="always")
def _u32_at(row, o):
    """The little-endian uint32 at ``row[o:o+4]`` (as int64)."""
    return (np.int64(row[o]) | (np.int64(row[o + 1]) << 8) | (np.int64(row[o + 2]) << 16)
            | (np.int64(row[o + 3]) << 24))


@njit(cache=True, nogil=True, inline="always")
def _k4_scale_min(sb, j):
    """The 6-bit scale and min of sub-block ``j`` (0..7) from Q4_K's 12 packed bytes ``sb``."""
    if j < 4:
        return np.int32(sb[j]) & 63, np.int32(sb[j + 4]) & 63
    sc = (np.int32(sb[j + 4]) & 15) | ((np.int32(sb[j - 4]) >> 6) << 4)
    mn = (np.int32(sb[j + 4]) >> 4) | ((np.int32(sb[j]) >> 6) << 4)
    return sc, mn


@njit(cache=True, nogil=True, inline="always")
def _block_bytes_32(code):
    """Bytes per block of the 32-value formats."""
    if code == Q4_0:
        return 18
    if code == Q4_1:
        return 20
    if code == Q5_0:
        return 22
    if code == Q5_1:
        return 24
    return 34


# ------------------------------------------------------------------------------------------
# integer unpacking: one block to small integers (shared by dequantisation and dot products)


@njit(cache=True, nogil=True, inline="always")
def _unpack_q4(row, o, q, base, offset):
    """16 packed bytes at ``row[o:]`` -> q[base:base+32] as nibble - ``offset``."""
    for j in range(16):
        v = np.int32(row[o + j])
        q[base + j] = (v & 15) - offset
        q[base + j + 16] = (v >> 4) - offset


@njit(cache=True, nogil=True, inline="always")
def _unpack_q5(row, o_qh, o_qs, q, base, offset):
    """Q5 block: nibbles at ``row[o_qs:]`` plus fifth bits from the u32 at ``row[o_qh:]``."""
    qh = _u32_at(row, o_qh)
    for j in range(16):
        v = np.int32(row[o_qs + j])
        hi0 = np.int32((qh >> j) & 1) << 4
        hi1 = np.int32((qh >> (j + 16)) & 1) << 4
        q[base + j] = ((v & 15) | hi0) - offset
        q[base + j + 16] = ((v >> 4) | hi1) - offset


@njit(cache=True, nogil=True, inline="always")
def _unpack_q4_k(row, o, q):
    """The 256 4-bit values of the Q4_K block at ``row[o:]`` into q[0:256] (0..15)."""
    for j in range(4):
        for l in range(32):
            v = np.int32(row[o + 16 + 32 * j + l])
            q[64 * j + l] = v & 15
            q[64 * j + 32 + l] = v >> 4


@njit(cache=True, nogil=True, inline="always")
def _unpack_q6_k(row, o, q):
    """The 256 6-bit values of the Q6_K block at ``row[o:]`` into q[0:256] (-32..31)."""
    for n in range(2):
        ql = o + 64 * n
        qh = o + 128 + 32 * n
        e = 128 * n
        for l in range(32):
            lo_a = np.int32(row[ql + l])
            lo_b = np.int32(row[ql + l + 32])
            h = np.int32(row[qh + l])
            q[e + l] = ((lo_a & 15) | ((h & 3) << 4)) - 32
            q[e + l + 32] = ((lo_b & 15) | (((h >> 2) & 3) << 4)) - 32
            q[e + l + 64] = ((lo_a >> 4) | (((h >> 4) & 3) << 4)) - 32
            q[e + l + 96] = ((lo_b >> 4) | (((h >> 6) & 3) << 4)) - 32


@njit(cache=True, nogil=True, inline="always")
def _unpack_q5_k(row, o, q):
    """The 256 5-bit values of the Q5_K block at ``row[o:]`` into q[0:256] (0..31): nibbles
    as in Q4_K (from ``qs`` at offset 48), fifth bits from ``qh`` (offset 16), where bit
    ``2j`` of ``qh[l]`` belongs to value ``64j + l`` and bit ``2j+1`` to ``64j + 32 + l``."""
    for j in range(4):
        for l in range(32):
            v = np.int32(row[o + 48 + 32 * j + l])
            h = np.int32(row[o + 16 + l])
            q[64 * j + l] = (v & 15) | (((h >> (2 * j)) & 1) << 4)
            q[64 * j + 32 + l] = (v >> 4) | (((h >> (2 * j + 1)) & 1) << 4)


@njit(cache=True, nogil=True, inline="always")
def _unpack_q2_k(row, o, q):
    """The 256 2-bit values of the Q2_K block at ``row[o:]`` into q[0:256] (0..3): in each
    128-value half ``n``, value ``32j + l`` is bits ``2j, 2j+1`` of ``qs[32n + l]``."""
    for n in range(2):
        for j in range(4):
            for l in range(32):
                q[128 * n + 32 * j + l] = (np.int32(row[o + 16 + 32 * n + l]) >> (2 * j)) & 3


@njit(cache=True, nogil=True, inline="always")
def _unpack_q3_k(row, o, q):
    """The 256 3-bit values of the Q3_K block at ``row[o:]`` into q[0:256] (-4..3): two low
    bits laid out as in Q2_K (``qs`` at offset 32), and value ``128n + 32j + l`` is 4 lower
    unless bit ``4n + j`` of ``hmask[l]`` is set."""
    for n in range(2):
        for j in range(4):
            for l in range(32):
                low = (np.int32(row[o + 32 + 32 * n + l]) >> (2 * j)) & 3
                high = (np.int32(row[o + l]) >> (4 * n + j)) & 1
                q[128 * n + 32 * j + l] = low + 4 * high - 4


@njit(cache=True, nogil=True, inline="always")
def _k3_scale(sb, s):
    """The signed scale (6 bits minus 32) of 16-value group ``s`` (0..15) from Q3_K's 12
    packed bytes ``sb``: four low bits from byte ``s`` (low nibble) or ``s - 8`` (high
    nibble), two high bits from byte ``8 + s % 4`` at bit ``2 * (s // 4)``."""
    if s < 8:
        low = np.int32(sb[s]) & 15
    else:
        low = np.int32(sb[s - 8]) >> 4
    high = (np.int32(sb[8 + s % 4]) >> (2 * (s // 4))) & 3
    return (low | (high << 4)) - 32


# ------------------------------------------------------------------------------------------
# dequantisation


@njit(cache=True, nogil=True)
def dequantize_row(code, row, out, table, with_min, q):
    """Dequantise one packed row (uint8) of type ``code`` into ``out`` (float32); ``q`` is
    int32 scratch space of 256 entries.

    ``table`` is :data:`F16_TABLE`, or :data:`BF16_TABLE` for BF16 rows (F16 and BF16 rows
    are widened through it).  ``with_min=False`` leaves out the additive minimum of Q4_1 and
    Q5_1 (for a caller that adds it separately); other formats ignore it.
    """
    n = out.shape[0]
    if code == F16 or code == BF16:
        for i in range(n):
            out[i] = table[np.int32(row[2 * i]) | (np.int32(row[2 * i + 1]) << 8)]
    elif code == Q4_0 or code == Q4_1 or code == Q5_0 or code == Q5_1 or code == Q8_0:
        nbytes = _block_bytes_32(code)
        for b in range(n // 32):
            o = b * nbytes
            d = _f16_at(row, o, table)
            m = np.float32(0.0)
            if code == Q4_0:
                _unpack_q4(row, o + 2, q, 0, 8)
            elif code == Q4_1:
                m = _f16_at(row, o + 2, table)
                _unpack_q4(row, o + 4, q, 0, 0)
            elif code == Q5_0:
                _unpack_q5(row, o + 2, o + 6, q, 0, 16)
            elif code == Q5_1:
                m = _f16_at(row, o + 2, table)
                _unpack_q5(row, o + 4, o + 8, q, 0, 0)
            else:
                for i in range(32):
                    q[i] = np.int32(np.int8(row[o + 2 + i]))
            if with_min and (code == Q4_1 or code == Q5_1):
                for i in range(32):
                    out[b * 32 + i] = np.float32(q[i]) * d + m
            else:
                for i in range(32):
                    out[b * 32 + i] = np.float32(q[i]) * d
    elif code == Q4_K or code == Q5_K:     # the same header; Q5_K adds the fifth bits
        for b in range(n // 256):
            o = b * (144 if code == Q4_K else 176)
            d = _f16_at(row, o, table)
            dmin = _f16_at(row, o + 2, table)
            if code == Q4_K:
                _unpack_q4_k(row, o, q)
            else:
                _unpack_q5_k(row, o, q)
            for j in range(8):
                sc, mn = _k4_scale_min(row[o + 4:o + 16], j)
                d1 = d * np.float32(sc)
                m1 = dmin * np.float32(mn)
                for l in range(32):
                    out[b * 256 + 32 * j + l] = d1 * np.float32(q[32 * j + l]) - m1
    elif code == Q2_K:
        for b in range(n // 256):
            o = b * 84
            d = _f16_at(row, o + 80, table)
            dmin = _f16_at(row, o + 82, table)
            _unpack_q2_k(row, o, q)
            for g in range(16):
                sb = np.int32(row[o + g])
                dl = d * np.float32(sb & 15)
                ml = dmin * np.float32(sb >> 4)
                for l in range(16):
                    out[b * 256 + 16 * g + l] = dl * np.float32(q[16 * g + l]) - ml
    elif code == Q3_K:
        for b in range(n // 256):
            o = b * 110
            d = _f16_at(row, o + 108, table)
            _unpack_q3_k(row, o, q)
            for g in range(16):
                dl = d * np.float32(_k3_scale(row[o + 96:o + 108], g))
                for l in range(16):
                    out[b * 256 + 16 * g + l] = dl * np.float32(q[16 * g + l])
    elif code == Q6_K:
        for b in range(n // 256):
            o = b * 210
            d = _f16_at(row, o + 208, table)
            _unpack_q6_k(row, o, q)
            for g in range(16):
                dg = d * np.float32(np.int8(row[o + 192 + g]))
                for l in range(16):
                    out[b * 256 + 16 * g + l] = dg * np.float32(q[16 * g + l])


@njit(cache=True, nogil=True)
def unpack_q32_row(code, row, codes, dw, mw, table):
    """One packed row of a 32-value format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) as the integers
    ggml's x86 dot products multiply: ``codes`` (int32, one per value: signed for Q4_0,
    Q5_0 and Q8_0, the unsigned 0..15 / 0..31 for Q4_1 and Q5_1), the scale ``d`` of every
    block into ``dw`` and, for Q4_1 and Q5_1, the minimum ``m`` into ``mw`` (float32)."""
    nbytes = _block_bytes_32(code)
    for b in range(codes.shape[0] // 32):
        o = b * nbytes
        dw[b] = _f16_at(row, o, table)
        if code == Q4_0:
            _unpack_q4(row, o + 2, codes, 32 * b, 8)
        elif code == Q4_1:
            mw[b] = _f16_at(row, o + 2, table)
            _unpack_q4(row, o + 4, codes, 32 * b, 0)
        elif code == Q5_0:
            _unpack_q5(row, o + 2, o + 6, codes, 32 * b, 16)
        elif code == Q5_1:
            mw[b] = _f16_at(row, o + 2, table)
            _unpack_q5(row, o + 4, o + 8, codes, 32 * b, 0)
        else:
            for i in range(32):
                codes[32 * b + i] = np.int32(np.int8(row[o + 2 + i]))


@njit(cache=True, nogil=True)
def unpack_k_row(code, row, codes, sc16, mn16, dw, dmw, table):
    """One packed k-quant row (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) as integers: ``codes`` (int32
    per value: 0..3, -4..3, 0..15, 0..31 and 0..63 respectively; Q6_K's offset of 32 is left
    to the dot product), the scale and minimum of every 16 values ``sc16`` / ``mn16`` (int32;
    formats with 32-value sub-blocks repeat them; Q3_K's scales are signed, minimums are 0
    where the format has none) and the super-block's ``d`` / ``dmin`` in ``dw`` / ``dmw``."""
    for b in range(codes.shape[0] // 256):
        q = codes[256 * b:256 * b + 256]
        s0 = 16 * b
        if code == Q4_K or code == Q5_K:
            o = b * (144 if code == Q4_K else 176)
            dw[b] = _f16_at(row, o, table)
            dmw[b] = _f16_at(row, o + 2, table)
            if code == Q4_K:
                _unpack_q4_k(row, o, q)
            else:
                _unpack_q5_k(row, o, q)
            for j in range(8):
                sc, mn = _k4_scale_min(row[o + 4:o + 16], j)
                sc16[s0 + 2 * j] = sc
                sc16[s0 + 2 * j + 1] = sc
                mn16[s0 + 2 * j] = mn
                mn16[s0 + 2 * j + 1] = mn
        elif code == Q6_K:
            o = b * 210
            dw[b] = _f16_at(row, o + 208, table)
            dmw[b] = 0
            _unpack_q6_k(row, o, q)
            for i in range(256):
                q[i] += 32
            for g in range(16):
                sc16[s0 + g] = np.int32(np.int8(row[o + 192 + g]))
                mn16[s0 + g] = 0
        elif code == Q2_K:
            o = b * 84
            dw[b] = _f16_at(row, o + 80, table)
            dmw[b] = _f16_at(row, o + 82, table)
            _unpack_q2_k(row, o, q)
            for g in range(16):
                sc16[s0 + g] = np.int32(row[o + g]) & 15
                mn16[s0 + g] = np.int32(row[o + g]) >> 4
        else:
            o = b * 110
            dw[b] = _f16_at(row, o + 108, table)
            dmw[b] = 0
            _unpack_q3_k(row, o, q)
            for g in range(16):
                sc16[s0 + g] = _k3_scale(row[o + 96:o + 108], g)
                mn16[s0 + g] = 0


@sized_kernel(2, cache=True, nogil=True)
def dequantize_rows_2d(code, rows, out, table, with_min):
    """Dequantise every row of ``rows`` (uint8, shape (n, row_bytes)) into ``out`` (n, ne0)."""
    for r in prange(rows.shape[0]):
        q = np.empty(256, np.int32)
        dequantize_row(code, rows[r], out[r], table, with_min, q)


def dequantize_rows(code: int, rows: np.ndarray, ne0: int, with_min: bool = True) -> np.ndarray:
    """Block (or F16/BF16) rows (uint8, shape (..., row_bytes)) of type ``code`` to float32
    (..., ne0)."""
    if code in MORE_WEIGHT_TYPES:      # IQ4, FP4, ternary, 1/2-bit formats
        from .quants_more import dequantize_rows as dequantize_more
        return dequantize_more(code, rows, ne0)
    lead = rows.shape[:-1]
    flat = rows.reshape(-1, rows.shape[-1])
    out = np.empty((flat.shape[0], ne0), np.float32)
    if flat.shape[0] and ne0:
        dequantize_rows_2d(code, flat, out, table_for(code), with_min)
    return out.reshape(*lead, ne0)


# ------------------------------------------------------------------------------------------
# activation quantisation (float32 rows -> Q8_0, Q8_1, Q8_K)


@sized_kernel(0, cache=True, nogil=True)
def quantize_q8_32(x, qs, d, s, want_sum):
    """Q8_0 / Q8_1 of every row of ``x`` (float32 (m, k)): per 32 values d = amax/127
    (rounded to f16), q = rint(x * 127/amax); with ``want_sum`` also s = f16(d * sum(q)).
    Returns how many codes are -128 (only a NaN makes one; see matmul's sign trick)."""
    m, k = x.shape
    nb = k // 32
    lowest = 0
    for r in prange(m):
        for b in range(nb):
            amax = np.float32(0.0)
            for i in range(32):
                v = abs(x[r, b * 32 + i])
                if v > amax:
                    amax = v
            dd = amax / _F32_127
            inv = _F32_127 / amax if amax != 0 else np.float32(0.0)
            total = 0
            for i in range(32):
                v = np.rint(x[r, b * 32 + i] * inv)
                if v != v:
                    qi = -128
                elif v > 127.0:
                    qi = 127
                elif v < -128.0:
                    qi = -128
                else:
                    qi = np.int32(v)
                if qi == -128:
                    lowest += 1
                qs[r, b * 32 + i] = qi
                total += qi
            d[r, b] = round_f16(dd)
            if want_sum:
                s[r, b] = round_f16(dd * np.float32(total))
    return lowest


@sized_kernel(0, cache=True, nogil=True)
def quantize_q8_k(x, qs, d, bsums):
    """Q8_K of every row of ``x``: per 256 values, scale from the value of largest magnitude
    (the first one found), q = rint(-127/max * x) capped at 127, d = 1/scale (float32),
    and sums of 16 consecutive q."""
    m, k = x.shape
    nb = k // 256
    for r in prange(m):
        for b in range(nb):
            o = b * 256
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for i in range(256):
                v = x[r, o + i]
                if abs(v) > amax:
                    amax = abs(v)
                    vmax = v
            if amax == 0:
                d[r, b] = 0
                for i in range(256):
                    qs[r, o + i] = 0
                for g in range(16):
                    bsums[r, b * 16 + g] = 0
                continue
            iscale = _F32_M127 / vmax
            for g in range(16):
                total = 0
                for l in range(16):
                    v = np.rint(iscale * x[r, o + 16 * g + l])
                    if v != v:
                        qi = 0
                    elif v > 127.0:
                        qi = 127
                    elif v < -128.0:
                        qi = -128
                    else:
                        qi = np.int32(v)
                    qs[r, o + 16 * g + l] = qi
                    total += qi
                bsums[r, b * 16 + g] = total
            d[r, b] = _F32_ONE / iscale


class Activations:
    """Quantised activations: ``qs`` int8 (m, k); ``d`` float32 per block (the value of the
    stored scale); ``s`` float32 per block (Q8_1 only) and ``bsums`` int32 per 16 values
    (Q8_K only).  Unused fields are empty arrays."""

    __slots__ = ("type", "qs", "d", "s", "bsums")

    def __init__(self, type_, qs, d, s=None, bsums=None):
        self.type = type_
        self.qs = qs
        self.d = d
        self.s = s if s is not None else np.zeros((0, 0), np.float32)
        self.bsums = bsums if bsums is not None else np.zeros((0, 0), np.int32)

    def dequantized(self) -> np.ndarray:
        """The values the quantised activations stand for (float32, exact for Q8_0/Q8_1)."""
        bs = 32 if self.type in (Q8_0, Q8_1) else 256
        m, k = self.qs.shape
        q = self.qs.reshape(m, k // bs, bs).astype(np.float32)
        return (q * self.d[:, :, None]).reshape(m, k)


def quantize_activations(x: np.ndarray, vec_type: int) -> Activations:
    """Quantise float32 rows ``x`` (m, k) to ``vec_type`` (Q8_0, Q8_1 or Q8_K) like ggml's
    x86 CPU backend.  ``k`` must be a multiple of the block size."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    m, k = x.shape
    qs = np.empty((m, k), np.int8)
    if vec_type in (Q8_0, Q8_1):
        d = np.empty((m, k // 32), np.float32)
        s = np.empty((m, k // 32) if vec_type == Q8_1 else (0, 0), np.float32)
        if m and k:
            quantize_q8_32(x, qs, d, s, vec_type == Q8_1)
        return Activations(vec_type, qs, d, s if vec_type == Q8_1 else None)
    if vec_type == Q8_K:
        d = np.empty((m, k // 256), np.float32)
        bsums = np.empty((m, k // 16), np.int32)
        if m and k:
            quantize_q8_k(x, qs, d, bsums)
        return Activations(Q8_K, qs, d, bsums=bsums)
    raise ValueError(f"no activation quantisation to type {vec_type}")


def unpack_activations(rows: np.ndarray, vec_type: int, k: int) -> Activations:
    """Activations already stored in a Q8 format (uint8 rows (m, row_bytes)) as
    :class:`Activations`, for a src1 that arrives quantised."""
    bs, size = BLOCK[vec_type]
    m = rows.shape[0]
    blocks = np.ascontiguousarray(rows).reshape(m, k // bs, size)
    if vec_type == Q8_K:
        d = blocks[:, :, 0:4].copy().view(np.float32)[:, :, 0]
        qs = blocks[:, :, 4:260].copy().view(np.int8).reshape(m, k)
        bsums = blocks[:, :, 260:292].copy().view(np.int16).astype(np.int32).reshape(m, k // 16)
        return Activations(Q8_K, qs, d, bsums=bsums)
    d = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    if vec_type == Q8_0:
        return Activations(Q8_0, blocks[:, :, 2:34].copy().view(np.int8).reshape(m, k), d)
    s = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
    return Activations(Q8_1, blocks[:, :, 4:36].copy().view(np.int8).reshape(m, k), d, s)


# ------------------------------------------------------------------------------------------
# numpy oracles (independent of the kernels above; used by the tests)


def reference_round_f16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to half precision (numpy's conversion, ties to even)."""
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def reference_quantize(x: np.ndarray, vec_type: int):
    """Numpy oracle of :func:`quantize_activations`: returns (qs, d, extra) where extra is
    ``s`` for Q8_1, ``bsums`` for Q8_K and None for Q8_0."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    if vec_type in (Q8_0, Q8_1):
        blocks = x.reshape(m, k // 32, 32)
        amax = np.abs(blocks).max(axis=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            dd = (amax / np.float32(127)).astype(np.float32)
            inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
            q = np.rint(blocks * inv[:, :, None]).astype(np.float32)
        q = np.where(np.isnan(q), -128, np.clip(q, -128, 127)).astype(np.int8)
        d = reference_round_f16(dd)
        extra = None
        if vec_type == Q8_1:
            extra = reference_round_f16(dd * q.astype(np.int32).sum(axis=2).astype(np.float32))
        return q.reshape(m, k), d, extra
    blocks = x.reshape(m, k // 256, 256)
    mag = np.abs(blocks)
    pick = np.where(np.isnan(mag), -1, mag).argmax(axis=2)
    vmax = np.take_along_axis(blocks, pick[:, :, None], axis=2)[:, :, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(vmax != 0, np.float32(-127) / vmax, np.float32(0)).astype(np.float32)
        q = np.rint(blocks * iscale[:, :, None]).astype(np.float32)
        d = np.where(vmax != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    q = np.where(np.isnan(q), 0, np.clip(q, -128, 127)).astype(np.int8)
    bsums = q.reshape(m, k // 16, 16).astype(np.int32).sum(axis=2)
    return q.reshape(m, k), d, bsums
