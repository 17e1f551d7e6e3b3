"""The codebook weight formats of ggml 0.3.36: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and
IQ3_S (spec/ops/matmul.md, "Block formats").

Each 256-value super-block is eight 32-value sub-blocks; each sub-block is four groups of 8
values, and a group is one entry of a fixed codebook (a *grid*: 8 small non-negative values,
or two entries of 4 for the IQ3 formats) with a sign per value, times the sub-block's scale.
The IQ1 formats have no signs: their grid holds -1, 0 and 1, and a shift ``±1/8`` is added.

=======  =====  ====================================================================
type     bytes  layout (little-endian; ``f16`` is an IEEE half)
=======  =====  ====================================================================
IQ2_XXS  66     d:f16, then per sub-block two u32: four grid indices (a byte each), and
                four 7-bit sign indices (bits 0, 7, 14, 21) with a 4-bit scale ``s``
                (bits 28..31); value ``d·(0.5 + s)·0.25·grid·sign``
IQ2_XS   74     d:f16, qs:u16[32] (9-bit grid index, 7-bit sign index above it),
                scales[8] (a nibble per 16 values, low first); ``d·(0.5 + s)·0.25·…``
IQ2_S    82     d:f16, qs[32] (index low 8 bits), signs[32] (a byte per group),
                qh[8] (index bits 8..9, two a group), scales[8] (as IQ2_XS)
IQ3_XXS  98     d:f16, qs[64] (an index a 4-value half-group), then per sub-block a u32:
                sign indices and ``s`` as IQ2_XXS; value ``d·(0.5 + s)·0.5·grid·sign``
IQ3_S    110    d:f16, qs[64], qh[8] (bit 8 of each index, one a half-group), signs[32],
                scales[4] (a nibble a sub-block); value ``d·(1 + 2s)·grid·sign``
IQ1_S    50     d:f16, qs[32] (index low 8 bits), qh:u16[8] per sub-block: index bits
                8..10 (three a group), ``s`` (bits 12..14), shift sign (bit 15);
                value ``d·(2s + 1)·(grid ± 1/8)``
IQ1_M    56     qs[32], qh[16] (a byte per two groups: index bits 8..10 and the shift
                sign, low nibble first), scales:u16[4]: 3-bit scales (two per sub-block,
                one per 16 values) in bits 0..11, and the f16 ``d`` spread over the top
                nibbles (bits 12..15 of scales[0] are its lowest four bits)
=======  =====  ====================================================================

A *sign index* (7 bits) selects a byte of :data:`KSIGNS`: the 7 bits themselves plus an 8th
making the count of set bits even; bit ``j`` of a sign byte negates value ``j`` of the group.

The codebooks are not written out in this repository: they are built at import from the
``gguf`` package (a runtime dependency of refimpl, the GGUF library of the llama.cpp project),
whose ``gguf.quants`` classes carry each grid as hexadecimal text (2 or 3 bits a value,
``grid_hex``) and the values those codes stand for (``grid_map``).  :func:`_grid_from_gguf`
decodes them; the tests compare with gguf's own decoding and with ggml's ``to_float``.

Every index the kernels read is in range by construction, whatever the wire sends: a grid
index of ``b`` bits into a codebook of ``2^b`` entries, a 7-bit sign index into 128 sign
bytes, a 16-bit pattern into the F16 table; the validators guarantee whole rows of blocks.

Every product of a dequantisation is computed as ggml's ``dequantize_row_*`` computes it
(float32, the same order), so :func:`dequantize_row_grid` is bit-equal to it.  ggml's CPU
backend multiplies these weights with Q8_K activations, summing exact integers per
super-block; refimpl.kernels.matmul quantises the activations the same way and
:func:`mm_grid` sums as ggml does (for every number of activation rows: ggml has no other
kernel for these formats).  ggml has
no quantiser (``from_float``) for these formats, and neither has refimpl.
"""

from __future__ import annotations

import gguf.quants as gq
import numpy as np
from numba import njit, prange

from ..protocol.ggml_types import GgmlType
from .quants import F16_TABLE, _f16_at, _u32_at

IQ2_XXS, IQ2_XS, IQ2_S = int(GgmlType.IQ2_XXS), int(GgmlType.IQ2_XS), int(GgmlType.IQ2_S)
IQ3_XXS, IQ3_S = int(GgmlType.IQ3_XXS), int(GgmlType.IQ3_S)
IQ1_S, IQ1_M = int(GgmlType.IQ1_S), int(GgmlType.IQ1_M)

#: (values per block, bytes per block) of every format of this module.
BLOCK = {IQ2_XXS: (256, 66), IQ2_XS: (256, 74), IQ2_S: (256, 82), IQ3_XXS: (256, 98),
         IQ3_S: (256, 110), IQ1_S: (256, 50), IQ1_M: (256, 56)}

#: The formats of this module.
GRID_TYPES = frozenset(BLOCK)

#: The shift of the IQ1 formats' values (ggml's ``IQ1S_DELTA``).
IQ1_DELTA = np.float32(0.125)


def _grid_from_gguf(cls) -> np.ndarray:
    """The codebook of gguf quant class ``cls`` as float32 (entries, width): each byte of
    the hexadecimal text holds ``per = 8 // bits`` codes of ``bits`` bits, the first in the
    lowest bits, one every ``8 // per`` bits (3-bit codes sit in nibbles), and code ``c``
    stands for ``grid_map[c]``."""
    bits = int(np.ceil(np.log2(len(cls.grid_map))))
    packed = np.frombuffer(bytes.fromhex(cls.grid_hex.decode("ascii")), np.uint8)
    shifts = np.arange(0, 8, 8 // (8 // bits), dtype=np.uint8)
    codes = (packed[:, None] >> shifts) & ((1 << bits) - 1)
    values = np.asarray(cls.grid_map, np.float32)[codes.ravel()]
    return values.reshape(cls.grid_shape)


#: Where each codebook starts in :data:`GRIDS` (a format constant: the grids' sizes are
#: fixed by the index widths of the block layouts).
GRID_AT = {IQ2_XXS: 0, IQ2_XS: 2048, IQ2_S: 6144, IQ3_XXS: 14336, IQ3_S: 15360, IQ1_S: 17408}
_AT_IQ2_XXS, _AT_IQ2_XS, _AT_IQ2_S, _AT_IQ3_XXS, _AT_IQ3_S, _AT_IQ1 = (
    0, 2048, 6144, 14336, 15360, 17408)

#: Every codebook, flattened into one float32 array (IQ1_M shares IQ1_S's): entry ``i`` of
#: a grid of width ``w`` is ``GRIDS[GRID_AT[type] + w·i :][:w]``.
GRIDS = np.concatenate([_grid_from_gguf(c).ravel() for c in
                        (gq.IQ2_XXS, gq.IQ2_XS, gq.IQ2_S, gq.IQ3_XXS, gq.IQ3_S, gq.IQ1_S)])
assert GRIDS.size == 17408 + 2048 * 8 and GRID_AT[IQ1_S] == _AT_IQ1

#: Sign index (7 bits) -> sign byte (the index with an even-parity 8th bit), from gguf.
KSIGNS = np.frombuffer(gq.IQ2_XXS.ksigns, np.uint8).copy()


# ------------------------------------------------------------------------------------------
# dequantisation


@njit(cache=True, nogil=True, inline="always")
def _signed(out, o, grids, g, width, scale, signs, first):
    """``out[o:o+width] = scale·grids[g:g+width]``, value j negated where bit ``first + j``
    of ``signs`` is set (ggml multiplies by ±1 after the scale)."""
    for j in range(width):
        v = scale * grids[g + j]
        out[o + j] = -v if (signs >> (first + j)) & 1 else v


@njit(cache=True, nogil=True, inline="always")
def _shifted(out, o, grids, g, scale, delta):
    """``out[o:o+8] = scale·(grids[g:g+8] + delta)`` (the IQ1 formats)."""
    for j in range(8):
        out[o + j] = scale * (grids[g + j] + delta)


@njit(cache=True, nogil=True, inline="always")
def _half_scale(d, s, quarter):
    """``d·(0.5 + s)·0.25`` (``quarter``) or ``d·(0.5 + s)·0.5``, in float32 as ggml."""
    f = np.float32(0.25) if quarter else np.float32(0.5)
    return d * (np.float32(0.5) + np.float32(s)) * f


@njit(cache=True, nogil=True)
def dequantize_row_grid(code, row, out, table, grids, ksigns):
    """Dequantise one packed row (uint8) of a format of this module into ``out`` (float32),
    bit-equal to ggml's ``dequantize_row_*``.  ``table`` is :data:`~.quants.F16_TABLE`,
    ``grids`` :data:`GRIDS` and ``ksigns`` :data:`KSIGNS`."""
    for b in range(out.shape[0] // 256):
        e = 256 * b
        if code == IQ2_XXS:
            o = 66 * b
            d = _f16_at(row, o, table)
            for ib in range(8):
                q = o + 2 + 8 * ib
                aux = _u32_at(row, q + 4)
                db = _half_scale(d, aux >> 28, True)
                for l in range(4):
                    _signed(out, e + 32 * ib + 8 * l, grids, _AT_IQ2_XXS + 8 * np.int64(row[q + l]),
                            8, db, ksigns[(aux >> (7 * l)) & 127], 0)
        elif code == IQ2_XS:
            o = 74 * b
            d = _f16_at(row, o, table)
            for ib in range(8):
                sc = np.int64(row[o + 66 + ib])
                for l in range(4):
                    q = np.int64(row[o + 2 + 8 * ib + 2 * l]) | (np.int64(row[o + 3 + 8 * ib + 2 * l]) << 8)
                    db = _half_scale(d, (sc >> (4 * (l // 2))) & 15, True)
                    _signed(out, e + 32 * ib + 8 * l, grids, _AT_IQ2_XS + 8 * (q & 511), 8, db,
                            ksigns[q >> 9], 0)
        elif code == IQ2_S:
            o = 82 * b
            d = _f16_at(row, o, table)
            for ib in range(8):
                sc = np.int64(row[o + 74 + ib])
                qh = np.int64(row[o + 66 + ib])
                for l in range(4):
                    idx = np.int64(row[o + 2 + 4 * ib + l]) | (((qh >> (2 * l)) & 3) << 8)
                    db = _half_scale(d, (sc >> (4 * (l // 2))) & 15, True)
                    _signed(out, e + 32 * ib + 8 * l, grids, _AT_IQ2_S + 8 * idx, 8, db,
                            row[o + 34 + 4 * ib + l], 0)
        elif code == IQ3_XXS:
            o = 98 * b
            d = _f16_at(row, o, table)
            for ib in range(8):
                aux = _u32_at(row, o + 66 + 4 * ib)
                db = _half_scale(d, aux >> 28, False)
                for l in range(4):
                    signs = ksigns[(aux >> (7 * l)) & 127]
                    q = o + 2 + 8 * ib + 2 * l
                    _signed(out, e + 32 * ib + 8 * l, grids,
                            _AT_IQ3_XXS + 4 * np.int64(row[q]), 4, db, signs, 0)
                    _signed(out, e + 32 * ib + 8 * l + 4, grids,
                            _AT_IQ3_XXS + 4 * np.int64(row[q + 1]), 4, db, signs, 4)
        elif code == IQ3_S:
            o = 110 * b
            d = _f16_at(row, o, table)
            for ib in range(8):
                s = (np.int64(row[o + 106 + ib // 2]) >> (4 * (ib % 2))) & 15
                db = d * np.float32(1 + 2 * s)
                qh = np.int64(row[o + 66 + ib])
                for l in range(4):
                    signs = row[o + 74 + 4 * ib + l]
                    q = o + 2 + 8 * ib + 2 * l
                    i1 = np.int64(row[q]) | (((qh >> (2 * l)) & 1) << 8)
                    i2 = np.int64(row[q + 1]) | (((qh >> (2 * l + 1)) & 1) << 8)
                    _signed(out, e + 32 * ib + 8 * l, grids, _AT_IQ3_S + 4 * i1, 4, db, signs, 0)
                    _signed(out, e + 32 * ib + 8 * l + 4, grids, _AT_IQ3_S + 4 * i2, 4, db,
                            signs, 4)
        elif code == IQ1_S:
            o = 50 * b
            d = _f16_at(row, o, table)
            for ib in range(8):
                qh = np.int64(row[o + 34 + 2 * ib]) | (np.int64(row[o + 35 + 2 * ib]) << 8)
                dl = d * np.float32(2 * ((qh >> 12) & 7) + 1)
                delta = -IQ1_DELTA if qh & 0x8000 else IQ1_DELTA
                for l in range(4):
                    idx = np.int64(row[o + 2 + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)
                    _shifted(out, e + 32 * ib + 8 * l, grids, _AT_IQ1 + 8 * idx, dl, delta)
        elif code == IQ1_M:
            o = 56 * b
            sc0 = np.int64(row[o + 48]) | (np.int64(row[o + 49]) << 8)
            sc1 = np.int64(row[o + 50]) | (np.int64(row[o + 51]) << 8)
            sc2 = np.int64(row[o + 52]) | (np.int64(row[o + 53]) << 8)
            sc3 = np.int64(row[o + 54]) | (np.int64(row[o + 55]) << 8)
            d = table[(sc0 >> 12) | ((sc1 >> 8) & 0xF0) | ((sc2 >> 4) & 0xF00) | (sc3 & 0xF000)]
            for ib in range(8):
                s = np.int64(row[o + 48 + 2 * (ib // 2)]) | (np.int64(row[o + 49 + 2 * (ib // 2)]) << 8)
                for l in range(4):
                    three = (s >> (6 * (ib % 2) + 3 * (l // 2))) & 7
                    dl = d * np.float32(2 * three + 1)
                    h = np.int64(row[o + 32 + 2 * ib + l // 2]) >> (4 * (l % 2))
                    idx = np.int64(row[o + 4 * ib + l]) | ((h & 7) << 8)
                    delta = -IQ1_DELTA if h & 8 else IQ1_DELTA
                    _shifted(out, e + 32 * ib + 8 * l, grids, _AT_IQ1 + 8 * idx, dl, delta)


# ------------------------------------------------------------------------------------------
# matrix product (ggml's vec_dot arithmetic: an exact integer sum per super-block)


#: An F16 table that reads every half as 1.0: :func:`dequantize_row_grid` with it gives each
#: value divided by its super-block's ``d`` (exact: a multiple of 1/8 below 2^11).
UNIT_TABLE = np.ones(65536, np.float32)


@njit(cache=True, nogil=True, inline="always")
def block_scale(code, row, b, table):
    """The f16 scale ``d`` of super-block ``b`` of a packed row, as float32."""
    if code == IQ1_M:
        o = 56 * b + 48
        bits = 0
        for i in range(4):
            word = np.int64(row[o + 2 * i]) | (np.int64(row[o + 2 * i + 1]) << 8)
            bits |= ((word >> 12) & 15) << (4 * i)
        return table[bits]
    size = 66 if code == IQ2_XXS else 74 if code == IQ2_XS else 82 if code == IQ2_S else \
        98 if code == IQ3_XXS else 110 if code == IQ3_S else 50
    return _f16_at(row, size * b, table)


@njit(parallel=True, cache=True, nogil=True)
def mm_grid(code, w, aq, ad, out, table, unit, grids, ksigns):
    """Weights ``w`` (uint8 rows (A3, A2, N, row_bytes)) of a format of this module times
    Q8_K activations (``aq`` int8 (B3*B2*T, K), ``ad`` float32 per 256 values) into ``out``
    float32 (B3, B2, T, N), as ggml's ``ggml_vec_dot_iq*_q8_K`` compute it: per super-block
    the exact sum ``S`` of (value / d_w) · q over its 256 values (ggml's integer sums, with
    its constant factors 1/8 or 1/4 applied; a float64 sum of multiples of 1/8, exact), then
    ``acc += (d_w·d_a)·S`` in float32, super-block after super-block.  Parallel over weight
    rows: each is decoded once and met with every activation row of the batches it serves."""
    a3, a2, n, _ = w.shape
    b3, b2, nt, k = out.shape[0], out.shape[1], out.shape[2], aq.shape[1]
    r3, r2 = b3 // a3, b2 // a2
    nb = k // 256
    for job in prange(a3 * a2 * n):
        i03, rest = job // (a2 * n), job % (a2 * n)
        i02, r = rest // n, rest % n
        row = w[i03, i02, r]
        units = np.empty(k, np.float64)
        vals = np.empty(k, np.float32)
        dequantize_row_grid(code, row, vals, unit, grids, ksigns)
        for e in range(k):
            units[e] = vals[e]
        dw = np.empty(nb, np.float32)
        for b in range(nb):
            dw[b] = block_scale(code, row, b, table)
        for i13 in range(i03 * r3, i03 * r3 + r3):
            for i12 in range(i02 * r2, i02 * r2 + r2):
                for t in range(nt):
                    m = (i13 * b2 + i12) * nt + t
                    acc = np.float32(0.0)
                    for b in range(nb):
                        s = 0.0
                        for e in range(256 * b, 256 * b + 256):
                            s += units[e] * np.float64(aq[m, e])
                        acc += (dw[b] * ad[m, b]) * np.float32(s)
                    out[i13, i12, t, r] = acc


def matmul(code: int, w: np.ndarray, qs: np.ndarray, d: np.ndarray, out: np.ndarray) -> None:
    """:func:`mm_grid` with this module's tables."""
    mm_grid(code, w, qs, d, out, F16_TABLE, UNIT_TABLE, GRIDS, KSIGNS)


# ------------------------------------------------------------------------------------------
# numpy oracle (independent of the kernel above; used by the tests)


def _ref_grid(code: int) -> np.ndarray:
    """The codebook of ``code`` as float32 (entries, width)."""
    cls = {IQ2_XXS: gq.IQ2_XXS, IQ2_XS: gq.IQ2_XS, IQ2_S: gq.IQ2_S, IQ3_XXS: gq.IQ3_XXS,
           IQ3_S: gq.IQ3_S, IQ1_S: gq.IQ1_S, IQ1_M: gq.IQ1_S}[code]
    return _grid_from_gguf(cls)


def _ref_sign_bits(signs: np.ndarray) -> np.ndarray:
    """Sign bytes (...) -> float32 (..., 8): -1 where bit j is set, else 1."""
    bits = (signs[..., None].astype(np.int64) >> np.arange(8)) & 1
    return np.where(bits == 1, np.float32(-1), np.float32(1))


def reference_dequantize(code: int, rows: np.ndarray, ne0: int) -> np.ndarray:
    """Numpy oracle of :func:`dequantize_row_grid` for uint8 rows (m, row_bytes): vectorised
    over every group of 8 values, shaped (m, blocks, 8 sub-blocks, 4 groups, 8)."""
    size = BLOCK[code][1]
    m = rows.shape[0]
    blk = np.ascontiguousarray(rows).reshape(m, ne0 // 256, size).astype(np.int64)
    grid = _ref_grid(code)
    d = blk[:, :, 0] | (blk[:, :, 1] << 8)
    half = (d.astype(np.uint16).view(np.float16).astype(np.float32))[:, :, None, None, None]
    four = np.arange(4)
    if code in (IQ2_XXS, IQ3_XXS):
        width = 8 if code == IQ2_XXS else 4
        if code == IQ2_XXS:
            words = blk[:, :, 2:].reshape(m, -1, 8, 2, 4)
            idx = words[:, :, :, 0, :]                                        # (m, nb, 8, 4)
            aux = (words[:, :, :, 1, :] << (8 * four)).sum(axis=-1)
        else:
            idx = blk[:, :, 2:66].reshape(m, -1, 8, 8)
            aux = (blk[:, :, 66:98].reshape(m, -1, 8, 4) << (8 * four)).sum(axis=-1)
        signs = KSIGNS[(aux[..., None] >> (7 * four)) & 127]                  # (m, nb, 8, 4)
        scale = (np.float32(0.5) + (aux >> 28).astype(np.float32))
        scale = half * scale[..., None, None] * np.float32(0.25 if width == 8 else 0.5)
        vals = grid[idx].reshape(m, -1, 8, 4, 8)
        return (scale * vals * _ref_sign_bits(signs)).astype(np.float32).reshape(m, ne0)
    if code in (IQ2_XS, IQ2_S):
        if code == IQ2_XS:
            q = blk[:, :, 2:66:2] | (blk[:, :, 3:66:2] << 8)                   # (m, nb, 32)
            idx, signs = q & 511, KSIGNS[q >> 9]
            sc = blk[:, :, 66:74]
        else:
            qh = blk[:, :, 66:74]
            idx = blk[:, :, 2:34] | ((qh[..., None] >> (2 * four) & 3) << 8).reshape(m, -1, 32)
            signs, sc = blk[:, :, 34:66], blk[:, :, 74:82]
        s = np.stack([sc & 15, sc >> 4], axis=-1).repeat(2, axis=-1)         # (m, nb, 8, 4)
        scale = half * (np.float32(0.5) + s.astype(np.float32))[..., None] * np.float32(0.25)
        vals = grid[idx].reshape(m, -1, 8, 4, 8)
        return (scale * vals * _ref_sign_bits(signs.reshape(m, -1, 8, 4))).astype(
            np.float32).reshape(m, ne0)
    if code == IQ3_S:
        qh = blk[:, :, 66:74]
        high = (qh[..., None] >> np.arange(8)) & 1                           # (m, nb, 8, 8)
        idx = blk[:, :, 2:66].reshape(m, -1, 8, 8) | (high << 8)
        sc = blk[:, :, 106:110]
        s = np.stack([sc & 15, sc >> 4], axis=-1).reshape(m, -1, 8)
        scale = half * (1 + 2 * s).astype(np.float32)[..., None, None]
        vals = grid[idx].reshape(m, -1, 8, 4, 8)
        signs = _ref_sign_bits(blk[:, :, 74:106].reshape(m, -1, 8, 4))
        return (scale * vals * signs).astype(np.float32).reshape(m, ne0)
    # IQ1_S, IQ1_M: d·(2s + 1)·(grid ± 1/8)
    if code == IQ1_S:
        qh = blk[:, :, 34:50:2] | (blk[:, :, 35:50:2] << 8)                  # (m, nb, 8)
        idx = blk[:, :, 2:34].reshape(m, -1, 8, 4) | (((qh[..., None] >> (3 * four)) & 7) << 8)
        s = np.repeat(((qh >> 12) & 7)[..., None], 4, axis=-1)
        neg = np.repeat((qh >> 15)[..., None], 4, axis=-1) == 1
    else:
        sc = blk[:, :, 48:56:2] | (blk[:, :, 49:56:2] << 8)                  # (m, nb, 4)
        bits = sum(((sc[:, :, i] >> 12) & 15) << (4 * i) for i in range(4))
        half = bits.astype(np.uint16).view(np.float16).astype(np.float32)[:, :, None, None, None]
        s = ((sc[..., None] >> (3 * four)) & 7).reshape(m, -1, 8, 2).repeat(2, axis=-1)
        h = (blk[:, :, 32:48, None] >> np.array([0, 4])).reshape(m, -1, 8, 4)
        idx = blk[:, :, 0:32].reshape(m, -1, 8, 4) | ((h & 7) << 8)
        neg = (h & 8) != 0
    delta = np.where(neg, -IQ1_DELTA, IQ1_DELTA)[..., None]
    scale = half * (2 * s + 1).astype(np.float32)[..., None]
    vals = grid[idx].reshape(m, -1, 8, 4, 8)
    return (scale * (vals + delta)).astype(np.float32).reshape(m, ne0)


def _ref_scales(code: int, blk: np.ndarray) -> np.ndarray:
    """The f16 scale ``d`` of every block of ``blk`` (uint8 (n, blocks, bytes)), float32."""
    if code == IQ1_M:
        words = blk[..., 48:56:2].astype(np.uint16) | (blk[..., 49:56:2].astype(np.uint16) << 8)
        bits = sum(((words[..., i] >> 12) & 15) << (4 * i) for i in range(4)).astype(np.uint16)
    else:
        bits = blk[..., 0].astype(np.uint16) | (blk[..., 1].astype(np.uint16) << 8)
    return bits.view(np.float16).astype(np.float32)


def reference_matmul(code: int, rows: np.ndarray, qs: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Numpy oracle of :func:`mm_grid` for one weight matrix: packed rows (n, row_bytes)
    times Q8_K activations (``qs`` int8 (m, k), ``d`` float32 (m, k/256)); float32 (m, n).
    The values over ``d_w`` come from :func:`reference_dequantize` of the rows with every
    ``d`` set to 1 (f16 0x3C00)."""
    n, k = rows.shape[0], qs.shape[1]
    nb = k // 256
    blk = np.ascontiguousarray(rows).reshape(n, nb, BLOCK[code][1]).copy()
    dw = _ref_scales(code, blk)
    if code == IQ1_M:                      # the top nibbles of the four scale words
        for i, nib in enumerate((0x0, 0x0, 0xC, 0x3)):
            blk[..., 49 + 2 * i] = (blk[..., 49 + 2 * i] & 0x0F) | (nib << 4)
    else:
        blk[..., 0], blk[..., 1] = 0x00, 0x3C
    units = reference_dequantize(code, blk.reshape(n, -1), k).astype(np.float64)
    sums = np.einsum("nbe,mbe->mnb", units.reshape(n, nb, 256),
                     qs.reshape(-1, nb, 256).astype(np.float64))         # exact
    out = np.zeros((qs.shape[0], n), np.float32)
    for b in range(nb):
        out += (d[:, b, None] * dw[None, :, b]) * sums[:, :, b].astype(np.float32)
    return out
