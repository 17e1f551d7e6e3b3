"""More block formats: the non-linear, FP4, ternary and 1/2-bit weight types of ggml 0.3.36.

refimpl.kernels.quants holds the classic formats (Q4_0 … Q6_K) and ggml's activation formats;
this module adds the weight formats below, whose values are a small integer code looked up in
(or equal to) a fixed list, times one or two scales (spec/ops/matmul.md, "Block formats"):

=======  =====  =====  ====================================================================
type     block  bytes  layout (little-endian; ``f16`` is an IEEE half)
=======  =====  =====  ====================================================================
IQ4_NL   32     18     d:f16, qs[16] (nibbles as Q4_0); value ``d·NL[q]``
IQ4_XS   256    136    d:f16, scales_h:u16, scales_l[4], qs[128]; eight 32-value sub-blocks
                       with a 6-bit scale ``ls`` (low nibble from scales_l, two high bits
                       from scales_h); value ``d·(ls − 32)·NL[q]``
MXFP4    32     17     e:u8 (E8M0 shared exponent), qs[16]; value ``2^(e−128)·FP4[q]``
NVFP4    64     36     d:u8[4] (UE4M3 scale per 16 values), qs[32]; value ``d_s/2·FP4[q]``
TQ1_0    256    54     qs[48] (five base-3 digits a byte), qh[4] (four a byte), d:f16;
                       value ``d·(t − 1)``, ``t`` in 0…2
TQ2_0    256    66     qs[64] (four 2-bit codes a byte, as Q2_K), d:f16; value ``d·(q − 1)``
Q1_0     128    18     d:f16, qs[16] (one bit a value); value ``+d`` (bit set) or ``−d``
Q2_0     64     18     d:f16, qs[16] (four 2-bit codes a byte, value j at bits 2·(j mod 4));
                       value ``d·(q − 1)``
=======  =====  =====  ====================================================================

:func:`dequantize_rows` and :func:`mm_dequant` take the codebook formats of
refimpl.kernels.quants_grid too (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, all
with Q8_K activations), whose rows :func:`.quants_grid.dequantize_row_grid` decodes.

``NL`` is the 16-entry non-linear table of the IQ4 formats (:data:`KVALUES_IQ4NL`), ``FP4``
the e2m1 values doubled (:data:`KVALUES_FP4`); both are part of the format definitions.

Every product of a dequantisation is exact in float32 (a half or power of two times a small
integer), so :func:`dequantize_rows` is bit-equal to ggml's ``dequantize_row_*``.  ggml's CPU
backend multiplies these weights with activations quantised to Q8_0 (IQ4_NL, MXFP4, NVFP4,
Q1_0, Q2_0) or Q8_K (IQ4_XS, TQ1_0, TQ2_0); refimpl.kernels.matmul quantises them the same
way (refimpl.kernels.quants) and multiplies the exact values: :func:`mm_dequant` for a few
activation rows (each weight row decoded once into scratch), decoded tiles and BLAS for more.

:func:`quantize_rows` is ggml's CPU ``from_float`` for IQ4_NL (the quantiser SET_ROWS and CPY
use).  The plain-numpy ``reference_*`` functions are independent oracles for the tests.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..protocol.ggml_types import GgmlType
from .parallel import sized_kernel
from . import quants_grid
from .quants import F16_TABLE, _f16_at
from .quants_grid import GRID_TYPES, GRIDS, KSIGNS, dequantize_row_grid

IQ4_NL, IQ4_XS = int(GgmlType.IQ4_NL), int(GgmlType.IQ4_XS)
MXFP4, NVFP4 = int(GgmlType.MXFP4), int(GgmlType.NVFP4)
TQ1_0, TQ2_0 = int(GgmlType.TQ1_0), int(GgmlType.TQ2_0)
Q1_0, Q2_0 = int(GgmlType.Q1_0), int(GgmlType.Q2_0)

#: (values per block, bytes per block) of every format of this module, and of the codebook
#: formats of refimpl.kernels.quants_grid (IQ1, IQ2, IQ3), which it dequantises too.
BLOCK = {IQ4_NL: (32, 18), IQ4_XS: (256, 136), MXFP4: (32, 17), NVFP4: (64, 36),
         TQ1_0: (256, 54), TQ2_0: (256, 66), Q1_0: (128, 18), Q2_0: (64, 18)} | quants_grid.BLOCK

#: The formats this module dequantises.
MORE_TYPES = frozenset(BLOCK)

#: IQ4_NL / IQ4_XS code -> value (the non-linear 4-bit grid, ggml-common.h ``kvalues_iq4nl``).
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10,
                          1, 13, 25, 38, 53, 69, 89, 113], np.int8)

#: FP4 (e2m1) code -> twice its value: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6.
KVALUES_FP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)


def _e8m0_half_table() -> np.ndarray:
    """E8M0 byte ``e`` -> ``2^(e-128)`` (half the shared scale, as :data:`KVALUES_FP4` is
    doubled), float32; ``e`` 0 and 1 are float32 subnormals."""
    e = np.arange(256, dtype=np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32)
    return bits.view(np.float32)


def _ue4m3_half_table() -> np.ndarray:
    """UE4M3 byte -> half its value (unsigned, 4 exponent bits with bias 7, 3 mantissa bits;
    0x00 and 0x7F read as 0), float32."""
    x = np.arange(256)
    exp, man = (x >> 3) & 15, x & 7
    raw = np.where(exp == 0, np.ldexp(man.astype(np.float64), -9),
                   np.ldexp(1.0 + man / 8.0, exp - 7))
    raw[(x == 0) | (x == 0x7F)] = 0.0
    return (raw * 0.5).astype(np.float32)


#: E8M0 byte -> float32 scale for MXFP4 (with the halving of the doubled FP4 values).
E8M0_HALF = _e8m0_half_table()
#: UE4M3 byte -> float32 scale for NVFP4 (likewise halved).
UE4M3_HALF = _ue4m3_half_table()


# ------------------------------------------------------------------------------------------
# dequantisation


@njit(cache=True, nogil=True, inline="always")
def _nibbles(row, o, base, scale, lut, out):
    """16 packed bytes at ``row[o:]`` -> out[base:base+32] as ``scale·lut[nibble]``: the low
    nibble of byte j is value j, the high nibble value j + 16 (IQ4, MXFP4; NVFP4 per 8)."""
    for j in range(16):
        v = np.int32(row[o + j])
        out[base + j] = scale * np.float32(lut[v & 15])
        out[base + j + 16] = scale * np.float32(lut[v >> 4])


@njit(cache=True, nogil=True, inline="always")
def _base3_digit(byte, n):
    """Digit ``n`` (0…4, most significant first) of a TQ1_0 byte, which stores five base-3
    digits as ``ceil(value · 256 / 243)``: multiplying by 3^n modulo 256 shifts digit n to
    the top, and ``(b · 3) >> 8`` reads it."""
    q = (np.int32(byte) * (1, 3, 9, 27, 81)[n]) & 255
    return (q * 3) >> 8


@njit(cache=True, nogil=True)
def dequantize_row_more(code, row, out, table, nl, fp4, e8m0, ue4m3, grids, ksigns):
    """Dequantise one packed row (uint8) of a format of this module (or of
    refimpl.kernels.quants_grid) into ``out`` (float32).  ``table`` is
    :data:`~.quants.F16_TABLE`; ``nl``, ``fp4``, ``e8m0``, ``ue4m3``, ``grids`` and
    ``ksigns`` are :data:`KVALUES_IQ4NL`, :data:`KVALUES_FP4`, :data:`E8M0_HALF`,
    :data:`UE4M3_HALF`, :data:`.quants_grid.GRIDS` and :data:`.quants_grid.KSIGNS`."""
    n = out.shape[0]
    if code == IQ4_NL:
        for b in range(n // 32):
            _nibbles(row, 18 * b + 2, 32 * b, _f16_at(row, 18 * b, table), nl, out)
    elif code == IQ4_XS:
        for b in range(n // 256):
            o = 136 * b
            d = _f16_at(row, o, table)
            sh = np.int32(row[o + 2]) | (np.int32(row[o + 3]) << 8)
            for s in range(8):
                low = (np.int32(row[o + 4 + s // 2]) >> (4 * (s % 2))) & 15
                ls = low | (((sh >> (2 * s)) & 3) << 4)
                _nibbles(row, o + 8 + 16 * s, 256 * b + 32 * s, d * np.float32(ls - 32), nl,
                         out)
    elif code == MXFP4:
        for b in range(n // 32):
            _nibbles(row, 17 * b + 1, 32 * b, e8m0[row[17 * b]], fp4, out)
    elif code == NVFP4:
        for b in range(n // 64):
            o = 36 * b
            for s in range(4):
                d = ue4m3[row[o + s]]
                for j in range(8):
                    v = np.int32(row[o + 4 + 8 * s + j])
                    out[64 * b + 16 * s + j] = np.float32(fp4[v & 15]) * d
                    out[64 * b + 16 * s + 8 + j] = np.float32(fp4[v >> 4]) * d
    elif code == TQ1_0:
        for b in range(n // 256):
            o = 54 * b
            d = _f16_at(row, o + 52, table)
            e = 256 * b
            for n5 in range(5):                 # bytes 0..31: values n5·32 + m
                for m in range(32):
                    out[e + 32 * n5 + m] = np.float32(_base3_digit(row[o + m], n5) - 1) * d
            for n5 in range(5):                 # bytes 32..47: values 160 + n5·16 + m
                for m in range(16):
                    t = _base3_digit(row[o + 32 + m], n5)
                    out[e + 160 + 16 * n5 + m] = np.float32(t - 1) * d
            for n4 in range(4):                 # qh: values 240 + n4·4 + j
                for j in range(4):
                    t = _base3_digit(row[o + 48 + j], n4)
                    out[e + 240 + 4 * n4 + j] = np.float32(t - 1) * d
    elif code == TQ2_0:
        for b in range(n // 256):
            o = 66 * b
            d = _f16_at(row, o + 64, table)
            for h in range(2):                  # 128-value halves over bytes 32h..32h+31
                for sh in range(4):
                    for m in range(32):
                        q = (np.int32(row[o + 32 * h + m]) >> (2 * sh)) & 3
                        out[256 * b + 128 * h + 32 * sh + m] = np.float32(q - 1) * d
    elif code == Q1_0:
        for b in range(n // 128):
            o = 18 * b
            d = _f16_at(row, o, table)
            for j in range(128):
                bit = (np.int32(row[o + 2 + j // 8]) >> (j % 8)) & 1
                out[128 * b + j] = d if bit else -d
    elif code == Q2_0:
        for b in range(n // 64):
            o = 18 * b
            d = _f16_at(row, o, table)
            for j in range(64):
                q = (np.int32(row[o + 2 + j // 4]) >> (2 * (j % 4))) & 3
                out[64 * b + j] = np.float32(q - 1) * d
    else:                                       # IQ1, IQ2, IQ3 (codebooks)
        dequantize_row_grid(code, row, out, table, grids, ksigns)


@sized_kernel(2, cache=True, nogil=True)
def _dequantize_rows_2d(code, rows, out, table, nl, fp4, e8m0, ue4m3, grids, ksigns):
    """Dequantise every row of ``rows`` (uint8 (n, row_bytes)) into ``out`` (n, ne0)."""
    for r in prange(rows.shape[0]):
        dequantize_row_more(code, rows[r], out[r], table, nl, fp4, e8m0, ue4m3, grids, ksigns)


def dequantize_rows(code: int, rows: np.ndarray, ne0: int) -> np.ndarray:
    """Block rows (uint8, shape (..., row_bytes)) of a format of this module to float32
    (..., ne0), bit-equal to ggml's ``dequantize_row_*``."""
    lead = rows.shape[:-1]
    flat = np.ascontiguousarray(rows).reshape(-1, rows.shape[-1])
    out = np.empty((flat.shape[0], ne0), np.float32)
    if flat.shape[0] and ne0:
        _dequantize_rows_2d(code, flat, out, F16_TABLE, KVALUES_IQ4NL, KVALUES_FP4,
                            E8M0_HALF, UE4M3_HALF, GRIDS, KSIGNS)
    return out.reshape(*lead, ne0)


# ------------------------------------------------------------------------------------------
# matrix product for few activation rows


@njit(parallel=True, cache=True, nogil=True)
def mm_dequant(code, w, x, out, table, nl, fp4, e8m0, ue4m3, grids, ksigns):
    """Weights ``w`` (uint8 rows (A3, A2, N, row_bytes)) of a format of this module times
    activations ``x`` (float32 (B3, B2, T, K), the exact values of their Q8 quantisation)
    into ``out`` float32 (B3, B2, T, N).  Parallel over weight rows: each is decoded once
    into scratch and met with every activation row of the batches it serves (src0 is
    broadcast over B2/A2 × B3/A3 batches); each output is one float32 dot product."""
    a3, a2, n, _ = w.shape
    b3, b2, nt, k = x.shape
    r3, r2 = b3 // a3, b2 // a2
    for job in prange(a3 * a2 * n):
        i03, rest = job // (a2 * n), job % (a2 * n)
        i02, r = rest // n, rest % n
        vals = np.empty(k, np.float32)
        dequantize_row_more(code, w[i03, i02, r], vals, table, nl, fp4, e8m0, ue4m3, grids,
                            ksigns)
        for i13 in range(i03 * r3, i03 * r3 + r3):
            for i12 in range(i02 * r2, i02 * r2 + r2):
                for t in range(nt):
                    acc = np.float32(0.0)
                    xt = x[i13, i12, t]
                    for e in range(k):
                        acc += vals[e] * xt[e]
                    out[i13, i12, t, r] = acc


def matmul_few_rows(code: int, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """:func:`mm_dequant` with this module's tables (``x`` C-contiguous float32)."""
    mm_dequant(code, w, np.ascontiguousarray(x, np.float32), out, F16_TABLE, KVALUES_IQ4NL,
               KVALUES_FP4, E8M0_HALF, UE4M3_HALF, GRIDS, KSIGNS)


# ------------------------------------------------------------------------------------------
# IQ4_NL quantisation (ggml's CPU from_float, quantize_row_iq4_nl_ref)


@njit(cache=True, nogil=True, inline="always")
def _nearest_code(lut, v):
    """The index of the table value nearest ``v`` (``lut`` ascending, 16 entries); a tie
    goes to the larger value, outside the table to the end."""
    if v <= lut[0]:
        return 0
    if v >= lut[15]:
        return 15
    lo, hi = 0, 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if v < lut[mid]:
            hi = mid
        else:
            lo = mid
    return lo if v - np.float32(lut[lo]) < np.float32(lut[hi]) - v else hi


@njit(cache=True, nogil=True, inline="always")
def _largest(x, o, n):
    """``(|v|, v)`` for the value ``v`` of largest magnitude in ``x[o:o+n]`` (the first)."""
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    for j in range(n):
        if abs(x[o + j]) > amax:
            amax = abs(x[o + j])
            vmax = x[o + j]
    return amax, vmax


@njit(cache=True, nogil=True, inline="always")
def _fit_codes(x, o, lut, inv, codes):
    """Codes of the 32 values ``x[o:o+32]`` at inverse scale ``inv`` (nearest table value of
    ``inv·x``) into ``codes[o:o+32]``, and the weighted sums ``(Σ w·q·x, Σ w·q²)`` with
    ``w = x²``, in order, float32: the least-squares scale for those codes is their ratio."""
    sumqx = np.float32(0.0)
    sumq2 = np.float32(0.0)
    for j in range(32):
        xv = x[o + j]
        c = _nearest_code(lut, inv * xv)
        codes[o + j] = c
        q = np.float32(lut[c])
        wq = (xv * xv) * q
        sumqx += wq * xv
        sumq2 += wq * q
    return sumqx, sumq2


@sized_kernel(0, cache=True, nogil=True)
def _quantize_iq4_nl(x, d_out, codes, lut):
    """Per 32 values of every row of ``x`` (float32 (m, k)): the value ``vmax`` of largest
    magnitude (first one) gives the trial scale ``vmax / NL[0]``; each value takes the
    nearest table code at that scale; the stored scale is the weighted least-squares fit
    for those codes (:func:`_fit_codes`), rounded to f16 by the caller.  Blocks with every
    ``|x| < 1e-15`` get scale 0 and codes 0."""
    m, k = x.shape
    for r in prange(m):
        for b in range(k // 32):
            amax, vmax = _largest(x[r], 32 * b, 32)
            if amax < np.float32(1e-15):
                d_out[r, b] = 0
                codes[r, 32 * b:32 * b + 32] = 0
                continue
            inv = np.float32(1.0) / (vmax / np.float32(lut[0]))
            sumqx, sumq2 = _fit_codes(x[r], 32 * b, lut, inv, codes[r])
            d_out[r, b] = sumqx / sumq2 if sumq2 > 0 else np.float32(0.0)


@sized_kernel(0, cache=True, nogil=True)
def _quantize_iq4_xs(x, d_out, ls_out, codes, lut):
    """IQ4_XS of every row of ``x`` (ggml's ``quantize_iq4_xs`` without importance weights,
    the CPU from_float).  Per 32-value sub-block: the least-squares scale of the codes at
    trial scale ``−vmax / NL[0]``, then of the codes at each inverse scale
    ``(t + NL[0]) / vmax`` for t = −7…7, keeping the best fit (largest ``(Σwqx)²/Σwq²``).
    Per super-block: ``d = −s/32`` with ``s`` the sub-block scale of largest magnitude (into
    ``d_out``, rounded to f16 by the caller), each sub-block's ``l = rint(scale/d)`` clamped
    to −32…31 (``ls_out`` gets ``l + 32``), and the final codes at scale ``d·l``."""
    m, k = x.shape
    for r in prange(m):
        xr, cr = x[r], codes[r]
        scales = np.zeros(8, np.float32)
        for b in range(k // 256):
            max_scale = np.float32(0.0)
            amax_scale = np.float32(0.0)
            for s in range(8):
                o = 256 * b + 32 * s
                amax, vmax = _largest(xr, o, 32)
                scales[s] = 0
                if amax < np.float32(1e-15):
                    continue
                sumqx, sumq2 = _fit_codes(xr, o, lut, np.float32(1.0) / (-vmax / np.float32(lut[0])), cr)
                d = sumqx / sumq2 if sumq2 > 0 else np.float32(0.0)
                best = d * sumqx
                for t in range(-7, 8):
                    inv = np.float32(t + lut[0]) / vmax
                    sumqx, sumq2 = _fit_codes(xr, o, lut, inv, cr)
                    if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                        d = sumqx / sumq2
                        best = d * sumqx
                scales[s] = d
                if abs(d) > amax_scale:
                    amax_scale = abs(d)
                    max_scale = d
            d = -max_scale / np.float32(32.0)
            d_out[r, b] = d
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            for s in range(8):
                l = min(max(np.int32(np.rint(inv * scales[s])), -32), 31)
                dl = d * np.float32(l)
                _fit_codes(xr, 256 * b + 32 * s, lut,
                           np.float32(1.0) / dl if dl != 0 else np.float32(0.0), cr)
                ls_out[r, 8 * b + s] = l + 32


def _pack_nibble_blocks(d: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Scales ``d`` (m, nb) (float32, rounded to f16 here) and codes (m, 32·nb) as blocks
    ``d:f16, qs[16]`` (value j in the low nibble of byte j, value j + 16 in the high one)."""
    m, nb = d.shape
    c = codes.reshape(m, nb, 2, 16).astype(np.uint8)
    out = np.empty((m, nb, 18), np.uint8)
    out[:, :, 0:2] = d.astype(np.float16).view(np.uint8).reshape(m, nb, 2)
    out[:, :, 2:] = c[:, :, 0] | (c[:, :, 1] << 4)
    return out.reshape(m, nb * 18)


def _pack_iq4_xs(d: np.ndarray, ls: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Super-block scales ``d`` (m, nb), 6-bit sub-block scales ``ls`` (m, 8·nb) and codes
    (m, 256·nb) as IQ4_XS blocks (``d:f16, scales_h:u16, scales_l[4], qs[128]``)."""
    m, nb = d.shape
    ls = ls.reshape(m, nb, 8).astype(np.int64)
    out = np.empty((m, nb, 136), np.uint8)
    out[:, :, 0:2] = d.astype(np.float16).view(np.uint8).reshape(m, nb, 2)
    high = ((ls >> 4) << (2 * np.arange(8))).sum(axis=2).astype(np.uint16)
    out[:, :, 2:4] = high.view(np.uint8).reshape(m, nb, 2)
    out[:, :, 4:8] = (ls[:, :, 0::2] & 15) | ((ls[:, :, 1::2] & 15) << 4)
    out[:, :, 8:] = _pack_nibble_blocks(np.zeros((m, 8 * nb), np.float32),
                                        codes).reshape(m, nb, 8, 18)[..., 2:].reshape(m, nb, 128)
    return out.reshape(m, nb * 136)


def quantize_rows(type_: int, float_rows: np.ndarray) -> np.ndarray:
    """float32 rows (m, k) quantised to ``type_`` as ggml's CPU backend quantises them for
    SET_ROWS and CPY (its ``from_float``); uint8 block rows (m, k / block · bytes).

    IQ4_NL (``quantize_row_iq4_nl_ref``): per 32 values a trial scale from the largest
    magnitude, nearest non-linear codes, then the least-squares scale for those codes; a
    block whose values are all below 1e-15 in magnitude stores scale 0 with codes 0, where
    ggml leaves the previous block's codes (the values are zero either way).
    MXFP4: exponent ``floor(log2(amax)) − 2``, nearest FP4 codes; NVFP4: per 16 values the
    UE4M3 scale of ``amax/6``, nearest FP4 codes; TQ1_0 / TQ2_0: ``d = amax``, codes
    ``round(x/d)`` (halves away from zero) in base 3 / two bits; Q1_0: ``d = mean |x|``, the
    sign bits; Q2_0: ``d = amax``, ``clamp(round(x/d), −1, 2)``; IQ4_XS: ggml's search over
    fifteen trial scales per 32 values, then 6-bit sub-block scales (:func:`_quantize_iq4_xs`).

    Bit-equal to ggml's for finite inputs (tests/kernels/test_quants_more.py)."""
    code = int(type_)
    if code not in BLOCK:
        raise ValueError(f"no quantiser here for type {type_}")
    x = np.ascontiguousarray(float_rows, np.float32)
    m, k = x.shape
    bs, size = BLOCK[code]
    if k % bs:
        raise ValueError(f"row length {k} is not a multiple of {bs}")
    if code == IQ4_NL:
        d = np.zeros((m, k // 32), np.float32)
        codes = np.zeros((m, k), np.uint8)
        if m and k:
            _quantize_iq4_nl(x, d, codes, KVALUES_IQ4NL)
        return _pack_nibble_blocks(d, codes)
    if code == IQ4_XS:
        d = np.zeros((m, k // 256), np.float32)
        ls = np.zeros((m, k // 32), np.int32)
        codes = np.zeros((m, k), np.uint8)
        if m and k:
            _quantize_iq4_xs(x, d, ls, codes, KVALUES_IQ4NL)
        return _pack_iq4_xs(d, ls, codes)
    out = np.zeros((m, k // bs, size), np.uint8)
    d = np.zeros((m, k // bs), np.float32)
    if m and k:
        _quantize_simple(x, code, out.reshape(m, -1), d, KVALUES_FP4, E8M0_HALF, UE4M3_HALF)
    if code in F16_SCALE_AT:
        o = F16_SCALE_AT[code]
        out[:, :, o:o + 2] = d.astype(np.float16).view(np.uint8).reshape(m, -1, 2)
    return out.reshape(m, -1)


#: Byte offset of the f16 scale in the blocks :func:`_quantize_simple` makes.
F16_SCALE_AT = {TQ1_0: 52, TQ2_0: 64, Q1_0: 0, Q2_0: 0}


# ------------------------------------------------------------------------------------------
# the other quantisers (ggml's CPU from_float: quantize_row_<type>_ref)


@njit(cache=True, nogil=True, inline="always")
def _round_away(v):
    """``roundf`` / ``lroundf``: to nearest, halves away from zero (float32 ``v``)."""
    r = math.floor(abs(np.float64(v)) + 0.5)
    return np.int32(r if v >= 0 else -r)


@njit(cache=True, nogil=True, inline="always")
def _nearest_fp4(fp4, v, scale):
    """The FP4 code whose value ``fp4[c]·scale`` is nearest ``v`` (the first on a tie)."""
    best, err = 0, abs(np.float32(fp4[0]) * scale - v)
    for c in range(1, 16):
        e = abs(np.float32(fp4[c]) * scale - v)
        if e < err:
            best, err = c, e
    return best


@njit(cache=True, nogil=True)
def _to_ue4m3(x):
    """float32 ``x`` as an UE4M3 byte: the exponent and top three mantissa bits of ``x``,
    rounded up on the next bit (carrying into the exponent), 0 for ``x <= 0``, subnormals
    ``round(x·512)`` (1…7), saturating at 0x7E (448)."""
    if not x > 0:
        return 0
    x = min(x, np.float32(448.0))
    bits = np.int64(np.array([x], np.float32).view(np.uint32)[0])
    e = ((bits >> 23) & 255) - 127 + 7
    if e <= 0:
        man = np.int32(x * np.float32(512.0) + np.float32(0.5))
        return 0 if man < 1 else min(man, 7)
    if e >= 15:
        return 0x7E
    man = ((bits >> 20) & 7) + ((bits >> 19) & 1)
    if man > 7:
        man = 0
        e += 1
        if e >= 15:
            return 0x7E
    return (e << 3) | man


@njit(cache=True, nogil=True)
def _base3_pack(x, o, stride, count, ntrits, inv):
    """``count`` digits ``lroundf(x·inv) + 1`` (0…2) of the values ``x[o + stride·n]``, most
    significant first, padded to five trits, stored as ``ceil(v·256/243)`` (TQ1_0)."""
    q = 0
    for n in range(count):
        q = q * 3 + _round_away(x[o + stride * n] * inv) + 1
    for n in range(ntrits - count):
        q *= 3
    return (q * 256 + 242) // 243


@sized_kernel(0, cache=True, nogil=True)
def _quantize_simple(x, code, out, d_out, fp4, e8m0, ue4m3):
    """MXFP4, NVFP4, TQ1_0, TQ2_0, Q1_0 and Q2_0 blocks of every row of ``x`` (float32
    (m, k)) into ``out`` (uint8 rows), all bytes but the f16 scale, whose float32 value goes
    to ``d_out`` (m, blocks) for the caller to round and store."""
    m, k = x.shape
    for r in prange(m):
        xr = x[r]
        o_row = out[r]
        if code == MXFP4:
            for b in range(k // 32):
                amax = np.float32(0.0)
                for j in range(32):
                    if amax < abs(xr[32 * b + j]):
                        amax = abs(xr[32 * b + j])
                e = 0
                if amax > 0:
                    e = min(max(np.int32(math.floor(math.log2(amax))) - 2 + 127, 0), 255)
                o_row[17 * b] = e
                for j in range(16):
                    lo = _nearest_fp4(fp4, xr[32 * b + j], e8m0[e])
                    hi = _nearest_fp4(fp4, xr[32 * b + 16 + j], e8m0[e])
                    o_row[17 * b + 1 + j] = lo | (hi << 4)
        elif code == NVFP4:
            for b in range(k // 64):
                for s in range(4):
                    o = 64 * b + 16 * s
                    amax = np.float32(0.0)
                    for j in range(16):
                        if amax < abs(xr[o + j]):
                            amax = abs(xr[o + j])
                    ue = _to_ue4m3(amax / np.float32(6.0))
                    o_row[36 * b + s] = ue
                    for j in range(8):
                        lo = _nearest_fp4(fp4, xr[o + j], ue4m3[ue])
                        hi = _nearest_fp4(fp4, xr[o + 8 + j], ue4m3[ue])
                        o_row[36 * b + 4 + 8 * s + j] = lo | (hi << 4)
        elif code == TQ1_0 or code == TQ2_0:
            for b in range(k // 256):
                o = 256 * b
                amax = np.float32(0.0)
                for j in range(256):
                    amax = max(amax, abs(xr[o + j]))
                d_out[r, b] = amax
                inv = np.float32(1.0) / amax if amax != 0 else np.float32(0.0)
                if code == TQ2_0:
                    for h in range(2):
                        for j in range(32):
                            q = 0
                            for n in range(4):
                                q += ((_round_away(xr[o + 128 * h + 32 * n + j] * inv) + 1)
                                      & 3) << (2 * n)
                            o_row[66 * b + 32 * h + j] = q
                else:
                    for j in range(32):
                        o_row[54 * b + j] = _base3_pack(xr, o + j, 32, 5, 5, inv)
                    for j in range(16):
                        o_row[54 * b + 32 + j] = _base3_pack(xr, o + 160 + j, 16, 5, 5, inv)
                    for j in range(4):
                        o_row[54 * b + 48 + j] = _base3_pack(xr, o + 240 + j, 4, 4, 5, inv)
        elif code == Q1_0:
            for b in range(k // 128):
                total = np.float32(0.0)
                for j in range(128):
                    total += abs(xr[128 * b + j])
                d_out[r, b] = total / np.float32(128.0)
                for j in range(16):
                    byte = 0
                    for t in range(8):
                        if xr[128 * b + 8 * j + t] >= 0:
                            byte |= 1 << t
                    o_row[18 * b + 2 + j] = byte
        elif code == Q2_0:
            for b in range(k // 64):
                amax = np.float32(0.0)
                for j in range(64):
                    if abs(xr[64 * b + j]) > amax:
                        amax = abs(xr[64 * b + j])
                d_out[r, b] = amax
                inv = np.float32(1.0) / amax if amax > 0 else np.float32(0.0)
                for j in range(16):
                    byte = 0
                    for t in range(4):
                        q = min(max(_round_away(xr[64 * b + 4 * j + t] * inv) + 1, 0), 3)
                        byte |= q << (2 * t)
                    o_row[18 * b + 2 + j] = byte


# ------------------------------------------------------------------------------------------
# numpy oracles (independent of the kernels above; used by the tests)


def _ref_nibbles(qs: np.ndarray) -> np.ndarray:
    """(…, 16) packed bytes -> (…, 32) codes: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def reference_dequantize(code: int, rows: np.ndarray, ne0: int) -> np.ndarray:
    """Numpy oracle of :func:`dequantize_rows` for uint8 rows (m, row_bytes)."""
    if code in GRID_TYPES:
        return quants_grid.reference_dequantize(code, rows, ne0)
    bs, size = BLOCK[code]
    m = rows.shape[0]
    blk = np.ascontiguousarray(rows).reshape(m, ne0 // bs, size)

    def f16(lo):
        return blk[:, :, lo:lo + 2].copy().view(np.float16)[..., 0].astype(np.float32)

    nl, fp4 = KVALUES_IQ4NL.astype(np.float32), KVALUES_FP4.astype(np.float32)
    if code == IQ4_NL:
        vals = f16(0)[..., None] * nl[_ref_nibbles(blk[:, :, 2:])]
    elif code == IQ4_XS:
        sh = blk[:, :, 2].astype(np.int32) | (blk[:, :, 3].astype(np.int32) << 8)
        s = np.arange(8)
        low = (blk[:, :, 4 + s // 2].astype(np.int32) >> (4 * (s % 2))) & 15
        ls = low | (((sh[..., None] >> (2 * s)) & 3) << 4)
        dl = f16(0)[..., None] * (ls - 32).astype(np.float32)                # (m, nb, 8)
        codes = _ref_nibbles(blk[:, :, 8:].reshape(m, -1, 8, 16))             # (m, nb, 8, 32)
        vals = dl[..., None] * nl[codes]
    elif code == MXFP4:
        vals = E8M0_HALF[blk[:, :, 0]][..., None] * fp4[_ref_nibbles(blk[:, :, 1:])]
    elif code == NVFP4:
        qs = blk[:, :, 4:].reshape(m, -1, 4, 8)
        codes = np.concatenate([qs & 15, qs >> 4], axis=-1)                  # (m, nb, 4, 16)
        vals = fp4[codes] * UE4M3_HALF[blk[:, :, 0:4]][..., None]
    elif code == TQ1_0:
        digits = [(blk[:, :, 0:32, None].astype(np.int32) * 3 ** np.arange(5)) & 255,
                  (blk[:, :, 32:48, None].astype(np.int32) * 3 ** np.arange(5)) & 255,
                  (blk[:, :, 48:52, None].astype(np.int32) * 3 ** np.arange(4)) & 255]
        t = np.concatenate([((dg * 3) >> 8).swapaxes(-1, -2).reshape(m, -1, dg[0, 0].size)
                            for dg in digits], axis=-1)
        vals = (t - 1).astype(np.float32) * f16(52)[..., None]
    elif code == TQ2_0:
        qs = blk[:, :, 0:64].reshape(m, -1, 2, 1, 32).astype(np.int32)
        q = (qs >> (2 * np.arange(4))[:, None]) & 3                          # (m, nb, 2, 4, 32)
        vals = (q - 1).astype(np.float32) * f16(64)[:, :, None, None, None]
    elif code == Q1_0:
        bits = np.unpackbits(blk[:, :, 2:], axis=-1, bitorder="little")
        d = f16(0)[..., None]
        vals = np.where(bits == 1, d, -d)
    elif code == Q2_0:
        q = (blk[:, :, 2:, None].astype(np.int32) >> (2 * np.arange(4))) & 3
        vals = (q - 1).astype(np.float32) * f16(0)[:, :, None, None]
    else:
        raise ValueError(f"not a format of this module: {code}")
    return np.asarray(vals, np.float32).reshape(m, ne0)


def _ref_fit(blk: np.ndarray, inv: np.ndarray):
    """Numpy form of :func:`_fit_codes` for blocks ``blk`` (..., 32) at inverse scales
    ``inv`` (...): (codes, Σ w·q·x, Σ w·q²), the sums in order, float32."""
    lut = KVALUES_IQ4NL.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        v = (np.asarray(inv, np.float32)[..., None] * blk).astype(np.float32)
    hi = np.clip(np.searchsorted(lut, v, side="right"), 1, 15)               # lut[hi-1] <= v
    lo = hi - 1
    codes = np.where(v - lut[lo] < lut[hi] - v, lo, hi)
    codes = np.where(v <= lut[0], 0, np.where(v >= lut[15], 15, codes))
    q = lut[codes]
    wq = (blk * blk) * q
    sumqx = np.zeros(blk.shape[:-1], np.float32)
    sumq2 = np.zeros(blk.shape[:-1], np.float32)
    for j in range(32):                       # in order, float32, as ggml sums
        sumqx += wq[..., j] * blk[..., j]
        sumq2 += wq[..., j] * q[..., j]
    return codes, sumqx, sumq2


def _ref_largest(blk: np.ndarray):
    """(value of largest magnitude (the first), whether it is below 1e-15) per block."""
    vmax = np.take_along_axis(blk, np.abs(blk).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    return vmax, np.abs(vmax) < np.float32(1e-15)


def _ref_ratio(num, den) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.float32(0)).astype(np.float32)


def _ref_inverse(d) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)


def reference_quantize_iq4_nl(x: np.ndarray) -> np.ndarray:
    """Numpy oracle of :func:`quantize_rows` for IQ4_NL (vectorised over blocks)."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    blk = x.reshape(m, k // 32, 32)
    vmax, zero = _ref_largest(blk)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.float32(1) / (vmax / np.float32(KVALUES_IQ4NL[0]))
    codes, sumqx, sumq2 = _ref_fit(blk, inv)
    d = np.where(zero, np.float32(0), _ref_ratio(sumqx, sumq2))
    codes = np.where(zero[..., None], 0, codes)
    return _pack_nibble_blocks(d, codes.reshape(m, k))


def reference_quantize_iq4_xs(x: np.ndarray) -> np.ndarray:
    """Numpy oracle of :func:`quantize_rows` for IQ4_XS (vectorised over sub-blocks)."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    sub = x.reshape(m, k // 256, 8, 32)
    nl0 = np.float32(KVALUES_IQ4NL[0])
    vmax, zero = _ref_largest(sub)
    with np.errstate(divide="ignore", invalid="ignore"):
        _, sumqx, sumq2 = _ref_fit(sub, np.float32(1) / (-vmax / nl0))
        d = _ref_ratio(sumqx, sumq2)
        best = d * sumqx
        for t in range(-7, 8):
            _, sumqx, sumq2 = _ref_fit(sub, np.float32(t + nl0) / vmax)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, _ref_ratio(sumqx, sumq2), d)
            best = np.where(better, d * sumqx, best)
    scales = np.where(zero, np.float32(0), d)
    pick = np.where(zero, np.float32(-1), np.abs(scales)).argmax(axis=2)     # first largest
    max_scale = np.take_along_axis(scales, pick[..., None], axis=2)[..., 0]
    max_scale = np.where(np.abs(scales).max(axis=2) > 0, max_scale, np.float32(0))
    dsup = (-max_scale / np.float32(32)).astype(np.float32)
    ls = np.clip(np.rint(_ref_inverse(dsup)[..., None] * scales), -32, 31).astype(np.int32)
    codes, _, _ = _ref_fit(sub, _ref_inverse(dsup[..., None] * ls.astype(np.float32)))
    return _pack_iq4_xs(dsup, (ls + 32).reshape(m, -1), codes.reshape(m, k))


def _ref_round_away(v: np.ndarray) -> np.ndarray:
    """``roundf`` on float32 values (halves away from zero), as int64."""
    v = np.asarray(v, np.float64)
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int64)


def _ref_nearest_fp4(v: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """FP4 codes nearest ``v`` at ``scale`` (broadcast; first code on a tie)."""
    cand = KVALUES_FP4.astype(np.float32) * np.asarray(scale, np.float32)[..., None]
    return np.abs(cand - np.asarray(v, np.float32)[..., None]).argmin(axis=-1).astype(np.uint8)


def _ref_ue4m3(x: np.ndarray) -> np.ndarray:
    """Numpy form of :func:`_to_ue4m3` (float32 values -> UE4M3 bytes)."""
    x = np.minimum(np.asarray(x, np.float32), np.float32(448))
    bits = x.view(np.uint32).astype(np.int64)
    e = ((bits >> 23) & 255) - 120
    man = ((bits >> 20) & 7) + ((bits >> 19) & 1)
    e, man = np.where(man > 7, e + 1, e), np.where(man > 7, 0, man)
    normal = np.where(e >= 15, 0x7E, (e << 3) | man)
    sub = np.clip((x * np.float32(512) + np.float32(0.5)).astype(np.int64), 0, 7)
    return np.where(~(x > 0), 0, np.where(e <= 0, sub, normal)).astype(np.uint8)


def reference_quantize(code: int, x: np.ndarray) -> np.ndarray:
    """Numpy oracle of :func:`quantize_rows` for MXFP4, NVFP4, TQ1_0, TQ2_0, Q1_0, Q2_0
    (vectorised over blocks; sums in float32 in element order where ggml sums)."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    bs, size = BLOCK[code]
    blk = x.reshape(m, k // bs, bs)
    out = np.zeros((m, k // bs, size), np.uint8)
    amax = np.abs(blk).max(axis=2)
    d = amax
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.where(amax > 0, np.float32(1) / amax, np.float32(0)).astype(np.float32)
        if code == MXFP4:
            e = np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0)
            e = np.clip(e, 0, 255).astype(np.uint8)
            codes = _ref_nearest_fp4(blk, E8M0_HALF[e][..., None])
            out[:, :, 0] = e
            out[:, :, 1:] = codes[:, :, :16] | (codes[:, :, 16:] << 4)
        elif code == NVFP4:
            sub = blk.reshape(m, -1, 4, 16)
            ue = _ref_ue4m3(np.abs(sub).max(axis=3) / np.float32(6))
            codes = _ref_nearest_fp4(sub, UE4M3_HALF[ue][..., None])
            out[:, :, 0:4] = ue
            out[:, :, 4:] = (codes[..., :8] | (codes[..., 8:] << 4)).reshape(m, -1, 32)
        elif code in (TQ1_0, TQ2_0):
            t = _ref_round_away(blk * inv[..., None]) + 1                     # 0..2
            if code == TQ2_0:
                g = t.reshape(m, -1, 2, 4, 32) & 3
                out[:, :, 0:64] = (g << (2 * np.arange(4))[:, None]).sum(axis=3).reshape(m, -1, 64)
            else:
                def pack(digits):                 # (..., n, bytes), most significant first
                    v = np.zeros(digits.shape[:-2] + digits.shape[-1:], np.int64)
                    for n in range(5):
                        v = v * 3 + (digits[..., n, :] if n < digits.shape[-2] else 0)
                    return ((v * 256 + 242) // 243).astype(np.uint8)
                out[:, :, 0:32] = pack(t[:, :, 0:160].reshape(m, -1, 5, 32))
                out[:, :, 32:48] = pack(t[:, :, 160:240].reshape(m, -1, 5, 16))
                out[:, :, 48:52] = pack(t[:, :, 240:256].reshape(m, -1, 4, 4))
        elif code == Q1_0:
            d = np.zeros((m, k // bs), np.float32)
            for j in range(bs):                   # in order, float32, as ggml sums
                d += np.abs(blk[:, :, j])
            d = d / np.float32(128)
            out[:, :, 2:] = np.packbits(blk >= 0, axis=-1, bitorder="little")
        elif code == Q2_0:
            q = np.clip(_ref_round_away(blk * inv[..., None]) + 1, 0, 3).reshape(m, -1, 16, 4)
            out[:, :, 2:] = (q << (2 * np.arange(4))).sum(axis=3)
        else:
            raise ValueError(f"no oracle for type {code}")
    if code in F16_SCALE_AT:
        o = F16_SCALE_AT[code]
        out[:, :, o:o + 2] = np.asarray(d, np.float32).astype(np.float16).view(np.uint8).reshape(m, -1, 2)
    return out.reshape(m, -1)
