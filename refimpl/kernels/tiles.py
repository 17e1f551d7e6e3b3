"""Prompt-sized products with packed weights, tile by tile (spec/ops/matmul.md, "How
refimpl computes").

A prompt multiplies every weight row with many activation rows.  The packed kernel
(refimpl.kernels.matmul_fast) decodes a weight block once per four activation rows and keeps
one output per vector of lanes; here, as ggml's tiled CPU kernels do for the k-quants on
AVX-512 VNNI hosts, the weights of 16 rows are decoded once for the whole product into a
**tile**, laid out so that one ``vpdpbusd`` computes four products for each of the 16 rows:

* codes, unsigned: for every four consecutive values of a block (a *chunk*), the 16 rows'
  four byte codes side by side, 64 bytes, one 512-bit vector (``codes[b][chunk][row][4]``);
* Q4_K, Q5_K, Q6_K: every group's integer scale for the 16 rows as int32
  (``scales[b][group][row]``), Q4_K's and Q5_K's 6-bit minimums likewise (``mins``);
* the blocks' float scales ``d`` (and ``dmin``, or Q4_1's and Q5_1's ``m``) for the 16
  rows as float32.

Then, per block and activation row ``t`` (eight at a time), the chunk vectors times the four
activation bytes of that chunk, broadcast to every lane, accumulate exact int32 sums for the
16 rows (:func:`_dot4`).  The k-quants weigh each group's sum with the group's scales, and
in float32, once per super-block, ``acc += d_a · (d_w · isum - dmin · msum)`` (Q4_K, Q5_K,
``msum = Σ_j min_j · Σ a`` over group ``j``) or ``acc += d_a · d_w · (isum - 32 · Σ_g
scale_g · Σ a)`` (Q6_K, whose codes are stored plus 32; exact in int32).  The 32-value
formats take, per block, ``acc += float32(isum - bias · Σa) · (d_w · d_a)`` (the codes were
raised by ``bias`` to be unsigned: Q4_0's 8, Q5_0's 16, Q8_0's 128) and, with a minimum,
``acc += m_w · s_a``, ggml's per-block arithmetic.

The integer part is exact, so only the float32 order may differ from the packed kernel's
(one sum instead of eight lanes), within spec/numerics.md's bound for MUL_MAT
(tests/kernels/test_tiles.py checks every form against the float64 product).  The
plain-numpy reference of the product is refimpl.kernels.matmul.reference.

``vpdpbusd`` is called by name where the host has AVX-512 VNNI (:data:`NATIVE`); the
portable form computes the same integers with plain vector IR (slow, for the tests and for
hosts without it, where the packed kernel serves prompts instead: :func:`tiles_pay`).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .parallel import renamed_copy, sized_kernel
from .quants import Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from .simd import (_F32, _I8, _I32, _Q32_LAYOUT, X86_AVX2, _at, _f16_via, _kquant_codes, _load,
                   _q32_codes, _q4k_scales_mins, _splat, _vec, _x86)

#: Weight rows per tile (the int32 lanes of one 512-bit vector).
TILE_ROWS = 16

#: Activation rows one call of a tile product takes.
TILE_TOKENS = 8

#: Activation rows from which a product takes tiles (fewer: the packed kernel, where decoding
#: the weights once per product would not pay for itself).
TILED_FROM_TOKENS = 16

#: Per k-quant format: groups per super-block, packed bytes per super-block.
_LAYOUT = {Q4_K: (8, 144), Q5_K: (8, 176), Q6_K: (16, 210)}

#: Per 32-value format: its name in refimpl.kernels.simd's tables, and what its codes are
#: raised by to make them unsigned (the offset its values are less, or 128 for Q8_0's int8).
_LAYOUT32 = {Q4_0: ("q4_0", 8), Q4_1: ("q4_1", 0), Q5_0: ("q5_0", 16), Q5_1: ("q5_1", 0),
             Q8_0: ("q8_0", 128)}

#: Every format with tile products.
TILED_TYPES = frozenset(_LAYOUT) | frozenset(_LAYOUT32)


def _target_has_avx512_vnni() -> bool:
    """Whether numba compiles for a CPU with 512-bit ``vpdpbusd`` (AVX512F and AVX512_VNNI),
    under refimpl.kernels.simd's conditions (the host's CPU, no NUMBA_CPU_NAME override)."""
    if not X86_AVX2:
        return False
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512f", False) and features.get("avx512vnni", False))


#: Whether the tile products call ``vpdpbusd`` by name (else they are portable IR).
NATIVE = _target_has_avx512_vnni()


def tiles_pay(code: int, tokens: int) -> bool:
    """Whether a product with weights of type ``code`` and ``tokens`` activation rows per
    batch runs tile by tile: a format of :data:`TILED_TYPES`, a prompt's worth of rows, and
    a host with AVX-512 VNNI (the portable form is far slower than the packed kernel)."""
    return NATIVE and code in TILED_TYPES and tokens >= TILED_FROM_TOKENS


# ------------------------------------------------------------------------------------------
# LLVM IR building blocks


def _dot4(builder, acc, codes, acts, native):
    """``acc`` (16 int32 lanes) plus, per lane, the four products of the lane's four unsigned
    byte ``codes`` with the four signed bytes of ``acts`` (both as 16 int32 lanes): x86's
    ``vpdpbusd``, or the same sums in portable IR.  Exact: codes below 64, activations int8."""
    v16 = _vec(_I32, 16)
    if native:
        return _x86(builder, "llvm.x86.avx512.vpdpbusd.512", v16, [acc, codes, acts])
    v64 = _vec(_I32, 64)
    p = builder.mul(builder.zext(builder.bitcast(codes, _vec(_I8, 64)), v64),
                    builder.sext(builder.bitcast(acts, _vec(_I8, 64)), v64))
    for j in range(4):
        acc = builder.add(acc, builder.shuffle_vector(
            p, p, ir.Constant(_vec(_I32, 16), list(range(j, 64, 4)))))
    return acc


def _times(builder, x, k):
    return builder.mul(x, ir.Constant(x.type, k))


def _clamped(builder, base, step, count, n):
    """The ``n`` addresses ``base + min(i, count - 1) · step``: rows past the ``count`` there
    are repeat the last one (their results are not used)."""
    last = builder.sub(count, ir.Constant(count.type, 1))
    out = []
    for i in range(n):
        at = ir.Constant(count.type, i)
        at = builder.select(builder.icmp_signed("<", at, count), at, last)
        out.append(builder.add(base, builder.mul(at, step)))
    return out


def _vec_at(builder, addr, t):
    """The vector of type ``t`` at integer address ``addr`` (4-byte aligned)."""
    return builder.load(builder.inttoptr(addr, t.as_pointer()), align=4)


def _token_rows(builder, aa, astep, ada, adstep, xa, xstep, ntok, extra_type):
    """The eight activation rows of a tile product, as (int8 values' address, pointer to
    the float32 block scales, pointer to the per-block extra of ``extra_type``)."""
    return list(zip(_clamped(builder, aa, astep, ntok, TILE_TOKENS),
                    [builder.inttoptr(x, _F32.as_pointer())
                     for x in _clamped(builder, ada, adstep, ntok, TILE_TOKENS)],
                    [builder.inttoptr(x, extra_type.as_pointer())
                     for x in _clamped(builder, xa, xstep, ntok, TILE_TOKENS)]))


def _store_outputs(builder, accs, oa):
    """Store the eight tokens' 16 float32 outputs (stack slots ``accs``) at ``oa[8][16]``."""
    for t, acc in enumerate(accs):
        _store_vec(builder, builder.load(acc), _at(builder, oa, 64 * t))


def _transpose(builder, vecs):
    """One vector whose lane ``c·R + r`` is lane ``c`` of ``vecs[r]``, for ``R`` (a power of
    two) vectors of the same lanes: rows into columns, by halving the vector count with
    two-operand shuffles (lanes of the same column stay together and double each time), as
    a SIMD transpose is written."""
    width = 1                                   # lanes per column so far
    while len(vecs) > 1:
        n = vecs[0].type.count // width         # columns
        mask = []
        for c in range(n):
            mask += [c * width + i for i in range(width)]
            mask += [n * width + c * width + i for i in range(width)]
        vecs = [builder.shuffle_vector(x, y, ir.Constant(_vec(_I32, len(mask)), mask))
                for x, y in zip(vecs[::2], vecs[1::2])]
        width *= 2
    return vecs[0]


def _store_vec(builder, value, addr):
    builder.store(value, builder.inttoptr(addr, value.type.as_pointer()), align=4)


def _unpack_codegen(code):
    """The codegen of ``unpack_<kind>(w, w_step, rows, nb, codes, scales, mins, d, dmin,
    table)``: the tile (module docstring) of the ``rows`` (at most 16) weight rows at ``w``,
    ``w + w_step``, ...; lanes past ``rows`` repeat the last row (their outputs are not
    used).  Per super-block, each group of 32 values of the 16 rows (16 vectors of eight
    four-byte chunks) is transposed into eight chunk vectors of 16 rows (:func:`_transpose`),
    stored together; the scales and minimums likewise."""
    groups, nbytes = _LAYOUT[code]

    def codegen(context, builder, signature, args):
        wa, wstep, rows, nbv, ca, sa, ma, da, dma, ta = args
        table_p = builder.inttoptr(ta, _F32.as_pointer())
        starts = _clamped(builder, wa, wstep, rows, TILE_ROWS)
        with cgutils.for_range(builder, nbv) as bl:
            b = bl.index
            wbs = [builder.add(start, _times(builder, b, nbytes)) for start in starts]
            decoded = [dict(_kquant_codes(builder, _NAMES[code], wb)) for wb in wbs]
            cbase = builder.add(ca, _times(builder, b, 64 * 64))
            for first in decoded[0]:        # 32 values = 8 chunks, at (b·64 + chunk)·64
                words = [builder.bitcast(row[first], _vec(_I32, 8)) for row in decoded]
                _store_vec(builder, _transpose(builder, words), _at(builder, cbase, first * 16))
            gbase = _times(builder, b, groups * 64)
            fbase = _times(builder, b, TILE_ROWS * 4)
            if code == Q6_K:
                scales = [builder.sext(_load(builder, _at(builder, wb, 192), _I8, 16),
                                       _vec(_I32, 16)) for wb in wbs]
                dw = [_f16_via(builder, table_p, _at(builder, wb, 208)) for wb in wbs]
            else:
                both = [_q4k_scales_mins(builder, _at(builder, wb, 4)) for wb in wbs]
                scales = [sm[0] for sm in both]
                _store_vec(builder, _transpose(builder, [sm[1] for sm in both]),
                           builder.add(ma, gbase))
                dw = [_f16_via(builder, table_p, wb) for wb in wbs]
                _store_vec(builder, _gather(builder, [_f16_via(builder, table_p, _at(builder, wb, 2))
                                                      for wb in wbs]), builder.add(dma, fbase))
            _store_vec(builder, _transpose(builder, scales), builder.add(sa, gbase))
            _store_vec(builder, _gather(builder, dw), builder.add(da, fbase))
        return context.get_dummy_value()
    return codegen


def _gather(builder, values):
    """One vector of the float32 scalars ``values``."""
    v = ir.Constant(_vec(_F32, len(values)), ir.Undefined)
    for i, x in enumerate(values):
        v = builder.insert_element(v, x, ir.Constant(_I32, i))
    return v


def _dots_codegen(code, native):
    """The codegen of ``tile_dots_<kind>(codes, scales, mins, d, dmin, nb, a, a_step, ad,
    ad_step, bs, bs_step, tokens, out)``: the tile's 16 rows times ``tokens`` (1 to 8)
    activation rows of Q8_K (int8 at ``a + t·a_step``, float32 scales at ``ad + t·ad_step``,
    int32 sums of 16 at ``bs + t·bs_step``) into float32 ``out[8][16]`` (rows past
    ``tokens`` repeat the last one)."""
    groups, _ = _LAYOUT[code]
    size = 256 // groups          # values per group
    v16, f16 = _vec(_I32, 16), _vec(_F32, 16)
    zero = ir.Constant(v16, [0] * 16)

    def codegen(context, builder, signature, args):
        ca, sa, ma, da, dma, nbv, aa, astep, ada, adstep, bsa, bsstep, ntok, oa = args
        rows = _token_rows(builder, aa, astep, ada, adstep, bsa, bsstep, ntok, _I32)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(f16, [0.0] * 16))
                for _ in range(TILE_TOKENS)]
        slots = [cgutils.alloca_once_value(builder, zero) for _ in range(TILE_TOKENS)]

        def vec_at(base, off, t=v16):
            return _vec_at(builder, builder.add(base, off), t)

        def bsum(t, b, g):      # Q8_K's sum of 16 values number g of super-block b
            return builder.load(builder.gep(rows[t][2], [_at(builder, _times(builder, b, 16), g)]))

        with cgutils.for_range(builder, nbv) as bl:
            b = bl.index
            isum = [zero] * TILE_TOKENS
            cbase = _times(builder, b, 64 * 64)
            sbase = _times(builder, b, groups * 64)
            scales = []
            for g in range(groups):
                # the group's chunks in a loop of their own: one copy of its body in the IR
                # (eight tokens' worth of dot products), which LLVM unrolls as it sees fit
                for slot in slots:
                    builder.store(zero, slot)
                with cgutils.for_range(builder, ir.Constant(b.type, size // 4)) as cl:
                    chunk = builder.add(cl.index, ir.Constant(b.type, g * size // 4))
                    w = vec_at(ca, builder.add(cbase, _times(builder, chunk, 64)))
                    aoff = builder.add(_times(builder, b, 256), _times(builder, chunk, 4))
                    for t in range(TILE_TOKENS):
                        word = builder.load(builder.inttoptr(builder.add(rows[t][0], aoff),
                                                             _I32.as_pointer()), align=1)
                        builder.store(_dot4(builder, builder.load(slots[t]), w,
                                            _splat(builder, word, _I32, 16), native), slots[t])
                s = vec_at(sa, _at(builder, sbase, 64 * g))
                scales.append(s)
                isum = [builder.add(i, builder.mul(builder.load(p), s))
                        for i, p in zip(isum, slots)]
            fbase = _times(builder, b, 64)
            dw = vec_at(da, fbase, f16)
            if code != Q6_K:
                dmin = vec_at(dma, fbase, f16)
                mins = [vec_at(ma, _at(builder, sbase, 64 * g)) for g in range(groups)]
            for t in range(TILE_TOKENS):
                msum = zero
                if code == Q6_K:        # Σ_g scale_g · Σa_g, the stored codes' extra 32 each
                    for g in range(groups):
                        msum = builder.add(msum, builder.mul(scales[g], _splat(builder, bsum(t, b, g), _I32, 16)))
                    exact = builder.sub(isum[t], builder.shl(msum, ir.Constant(v16, [5] * 16)))
                    part = builder.fmul(builder.sitofp(exact, f16), dw)
                else:                   # minimum j meets the sum of 32: two sums of 16
                    for g in range(groups):
                        pair = builder.add(bsum(t, b, 2 * g), bsum(t, b, 2 * g + 1))
                        msum = builder.add(msum, builder.mul(mins[g], _splat(builder, pair, _I32, 16)))
                    part = builder.fsub(builder.fmul(builder.sitofp(isum[t], f16), dw),
                                        builder.fmul(builder.sitofp(msum, f16), dmin))
                d_a = builder.load(builder.gep(rows[t][1], [b]))
                acc = builder.fadd(builder.load(accs[t]),
                                   builder.fmul(part, _splat(builder, d_a, _F32, 16)))
                builder.store(acc, accs[t])
        _store_outputs(builder, accs, oa)
        return context.get_dummy_value()
    return codegen


def _unpack32_codegen(code):
    """:func:`_unpack_codegen` for a 32-value block format: per block of the 16 rows, their
    codes made unsigned (:data:`_LAYOUT32`), transposed into eight chunk vectors, stored
    together (``codes[b][chunk][row][4]``, 512 bytes a block); the scales ``d`` (and Q4_1's
    and Q5_1's minimums ``m``, in ``dmin``) as float32 ``[b][row]``."""
    kind, bias = _LAYOUT32[code]
    nbytes, _, has_min, _, offset = _Q32_LAYOUT[kind]

    def codegen(context, builder, signature, args):
        wa, wstep, rows, nbv, ca, _sa, _ma, da, dma, ta = args
        table_p = builder.inttoptr(ta, _F32.as_pointer())
        starts = _clamped(builder, wa, wstep, rows, TILE_ROWS)
        raise_by = ir.Constant(_vec(_I8, 32), [bias] * 32)
        with cgutils.for_range(builder, nbv) as bl:
            b = bl.index
            wbs = [builder.add(start, _times(builder, b, nbytes)) for start in starts]
            words = [builder.bitcast(builder.add(_q32_codes(builder, kind, wb), raise_by),
                                     _vec(_I32, 8)) for wb in wbs]
            _store_vec(builder, _transpose(builder, words),
                       builder.add(ca, _times(builder, b, 512)))
            fbase = _times(builder, b, TILE_ROWS * 4)
            _store_vec(builder, _gather(builder, [_f16_via(builder, table_p, wb) for wb in wbs]),
                       builder.add(da, fbase))
            if has_min:
                _store_vec(builder, _gather(builder, [_f16_via(builder, table_p, _at(builder, wb, 2))
                                                      for wb in wbs]), builder.add(dma, fbase))
        return context.get_dummy_value()
    return codegen


def _dots32_codegen(code, native):
    """:func:`_dots_codegen` for a 32-value block format, against Q8_0 activations (Q8_1 for
    Q4_1 and Q5_1) with, as ``bs``, each block's integer sum of the activations (int32) or
    Q8_1's ``s`` (float32): per block, per output, the exact ``Σ c·a`` of the unsigned codes
    ``c``, less ``bias · Σa`` (the codes' offset, exact in int32), then
    ``acc += float32(that) · (d_w · d_a)`` and, with a minimum, ``acc += m_w · s_a`` (ggml's
    per-block arithmetic)."""
    kind, bias = _LAYOUT32[code]
    has_min = _Q32_LAYOUT[kind][2]
    v16, f16 = _vec(_I32, 16), _vec(_F32, 16)
    zero = ir.Constant(v16, [0] * 16)

    def codegen(context, builder, signature, args):
        ca, _sa, _ma, da, dma, nbv, aa, astep, ada, adstep, bsa, bsstep, ntok, oa = args
        rows = _token_rows(builder, aa, astep, ada, adstep, bsa, bsstep, ntok,
                           _F32 if has_min else _I32)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(f16, [0.0] * 16))
                for _ in range(TILE_TOKENS)]

        def vec_at(base, off, t=v16):
            return _vec_at(builder, builder.add(base, off), t)

        with cgutils.for_range(builder, nbv) as bl:
            b = bl.index
            cbase = _times(builder, b, 512)
            part = [zero] * TILE_TOKENS
            for c in range(8):
                w = vec_at(ca, _at(builder, cbase, 64 * c))
                aoff = _at(builder, _times(builder, b, 32), 4 * c)
                for t in range(TILE_TOKENS):
                    word = builder.load(builder.inttoptr(builder.add(rows[t][0], aoff),
                                                         _I32.as_pointer()), align=1)
                    part[t] = _dot4(builder, part[t], w, _splat(builder, word, _I32, 16), native)
            fbase = _times(builder, b, 64)
            dw = vec_at(da, fbase, f16)
            if has_min:
                mw = vec_at(dma, fbase, f16)
            for t in range(TILE_TOKENS):
                exact = part[t]
                extra = builder.load(builder.gep(rows[t][2], [b]))
                if bias:
                    exact = builder.sub(exact, _splat(builder, builder.mul(extra, ir.Constant(_I32, bias)),
                                                      _I32, 16))
                d_a = builder.load(builder.gep(rows[t][1], [b]))
                acc = builder.fadd(builder.load(accs[t]), builder.fmul(
                    builder.sitofp(exact, f16), builder.fmul(dw, _splat(builder, d_a, _F32, 16))))
                if has_min:
                    acc = builder.fadd(acc, builder.fmul(mw, _splat(builder, extra, _F32, 16)))
                builder.store(acc, accs[t])
        _store_outputs(builder, accs, oa)
        return context.get_dummy_value()
    return codegen


def _unpack_intrinsic(code, name):
    codegen = _unpack_codegen(code) if code in _LAYOUT else _unpack32_codegen(code)

    @intrinsic
    def unpack(typingctx, w, w_step, rows, nb, codes, scales, mins, d, dmin, table):
        return types.void(*([types.intp] * 10)), codegen
    unpack.__name__ = name
    return unpack


def _dots_intrinsic(code, native, name):
    codegen = _dots_codegen(code, native) if code in _LAYOUT else _dots32_codegen(code, native)

    @intrinsic
    def dots(typingctx, codes, scales, mins, d, dmin, nb, a, a_step, ad, ad_step, bs,
             bs_step, tokens, out):
        return types.void(*([types.intp] * 14)), codegen
    dots.__name__ = name
    return dots


# ------------------------------------------------------------------------------------------
# the product


def _mm_tiles(w, aq, ad, extra, out, table):
    """Weights ``w`` (uint8 rows (A3, A2, N, row_bytes)) of one format of
    :data:`TILED_TYPES` times its quantised activations (per row m = (batch, token): ``aq``
    int8 (M, K), ``ad`` float32 (M, blocks), ``extra`` per row: Q8_K's int32 sums of 16 for
    the k-quants, Q8_1's float32 ``s`` for Q4_1 and Q5_1, the int32 sum of each block's
    activations for the others) into ``out`` float32 (B3, B2, T, N), any strides; src0 is
    broadcast over the batches.  Parallel over tiles of 16 weight rows: each job decodes its
    tile (``UNPACK``) into scratch of its own, then runs ``TILE_DOTS`` over the activation
    rows eight at a time.  ``UNPACK``, ``TILE_DOTS``, ``GROUPS`` (integer scales per block)
    and ``UNIT_BYTES`` (tile bytes per block) are globals bound per format
    (:func:`_tile_kernel`)."""
    a3, a2, n, _ = w.shape
    b3, b2, nt, _ = out.shape
    r3, r2 = b3 // a3, b2 // a2
    nb = ad.shape[1]
    tiles = (n + TILE_ROWS - 1) // TILE_ROWS
    wp, ws3, ws2, ws1 = w.ctypes.data, w.strides[0], w.strides[1], w.strides[2]
    ap0, as0 = aq.ctypes.data, aq.strides[0]
    dp0, ds0 = ad.ctypes.data, ad.strides[0]
    xp0, xs0 = extra.ctypes.data, extra.strides[0]
    tp = table.ctypes.data
    for job in prange(b3 * b2 * tiles):
        g = job // tiles
        r0 = (job - g * tiles) * TILE_ROWS
        rows = min(TILE_ROWS, n - r0)
        i13, i12 = g // b2, g % b2
        codes = np.empty(nb * UNIT_BYTES, np.uint8)
        scales = np.empty(nb * GROUPS * TILE_ROWS, np.int32)
        mins = np.empty(nb * GROUPS * TILE_ROWS, np.int32)
        d = np.empty(nb * TILE_ROWS, np.float32)
        dmin = np.empty(nb * TILE_ROWS, np.float32)
        res = np.empty(TILE_TOKENS * TILE_ROWS, np.float32)
        cp, sp, mp = codes.ctypes.data, scales.ctypes.data, mins.ctypes.data
        wdp, wmp, rp = d.ctypes.data, dmin.ctypes.data, res.ctypes.data
        UNPACK(wp + (i13 // r3) * ws3 + (i12 // r2) * ws2 + r0 * ws1, ws1, rows, nb,
               cp, sp, mp, wdp, wmp, tp)
        for t0 in range(0, nt, TILE_TOKENS):
            m = g * nt + t0
            k = min(TILE_TOKENS, nt - t0)
            TILE_DOTS(cp, sp, mp, wdp, wmp, nb, ap0 + m * as0, as0, dp0 + m * ds0, ds0,
                      xp0 + m * xs0, xs0, k, rp)
            for t in range(k):
                for r in range(rows):
                    out[i13, i12, t0 + t, r0 + r] = res[t * TILE_ROWS + r]


UNPACK = TILE_DOTS = None       # bound per compiled copy of _mm_tiles
GROUPS = UNIT_BYTES = 0

#: Tiles of 16 weight rows below which a product runs in the calling thread.
TILES_SERIAL_BELOW = 2

_NAMES = {Q4_K: "q4_k", Q5_K: "q5_k", Q6_K: "q6_k", Q4_0: "q4_0", Q4_1: "q4_1", Q5_0: "q5_0",
          Q5_1: "q5_1", Q8_0: "q8_0"}


def _tile_kernel(code, native):
    """:func:`_mm_tiles` compiled for one format and form (serial and parallel twins)."""
    kind, form = _NAMES[code], "vnni" if native else "portable"
    k_quant = code in _LAYOUT
    twin = renamed_copy(_mm_tiles, f"_{kind}_{form}",
                        UNPACK=_unpack_intrinsic(code, f"unpack_{kind}"),
                        TILE_DOTS=_dots_intrinsic(code, native, f"tile_dots_{kind}_{form}"),
                        GROUPS=_LAYOUT[code][0] if k_quant else 0,
                        UNIT_BYTES=(256 if k_quant else 32) * TILE_ROWS)
    return sized_kernel(0, TILES_SERIAL_BELOW, work=lambda w, *_: w.shape[2] // TILE_ROWS,
                        cache=True, nogil=True)(twin)


#: The tile products in every form this host runs, by form ("vnni", "portable") and format.
FORMS = {form: {code: _tile_kernel(code, form == "vnni") for code in sorted(TILED_TYPES)}
         for form in (("vnni", "portable") if NATIVE else ("portable",))}


def tile_extra(code, aq, asum, bsums):
    """The per-row ``extra`` argument of :func:`_mm_tiles` for weights of type ``code``,
    from the activations' int8 values ``aq``, Q8_1's ``asum`` and Q8_K's ``bsums``."""
    if code in _LAYOUT:
        return bsums
    if _Q32_LAYOUT[_LAYOUT32[code][0]][2]:        # Q4_1, Q5_1: Q8_1's s
        return asum
    return aq.reshape(aq.shape[0], -1, 32).sum(axis=2, dtype=np.int32)


def mm_tiles(code, w, aq, ad, asum, bsums, out, table, form=None):
    """The product of weights ``w`` of type ``code`` (:data:`TILED_TYPES`) with quantised
    activations (as refimpl.kernels.matmul_fast.mm_packed takes them) into ``out``, tile by
    tile (:func:`_mm_tiles`), in ``form`` (default: the host's best)."""
    form = form or ("vnni" if NATIVE else "portable")
    FORMS[form][code](w, aq, ad, tile_extra(code, aq, asum, bsums), out, table)
