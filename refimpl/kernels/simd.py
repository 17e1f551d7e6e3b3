"""Small vector building blocks for the block-format kernels, written as LLVM vector IR.

Numba compiles Python loops to LLVM, but a loop over 16 packed bytes is too short for LLVM's
loop vectoriser, and numba widens every small integer to 64 bits: the natural numba loop
``s += (w & 15) * a`` runs one 64-bit multiply per value.  These few functions say what ggml's
SIMD code says, as portable LLVM vector operations (no x86 intrinsic; LLVM picks the host's
instructions, e.g. ``vpmaddwd`` on AVX2):

* ``row_dot_*``: one whole output of a product with a 32-value block format (Q4_0, Q4_1,
  Q5_0, Q5_1, Q8_0), ggml's way: eight integer lanes per block, scaled into eight float32 lanes;
* ``row_dot_q4_k``, ``row_dot_q6_k``: the same for the k-quants, per super-block the exact
  integer sums of every group times its scale in eight int32 lanes;
* ``row_dot_f16``: one output of a product with F16 weights (sixteen float32 lanes);
* ``decode_*``: one group of weight codes, stored as float32 (what the BLAS path of a
  batched product multiplies, exactly).

Every function takes raw addresses (``array.ctypes.data + offset``): the caller has validated
the tensors and computed the offsets; nothing here checks bounds (DEVELOPERS.md: validation
happens before dispatch).  The tests compare each with a plain-numpy reference (``ref_*``
here; :func:`refimpl.kernels.matmul.reference` for whole products).

Weight codes, by format (spec/ops/matmul.md, "Block formats"):

* ``nibbles``: value ``(byte >> shift) & 15`` of ``n`` consecutive bytes (Q4_0, Q4_1, Q4_K);
* ``q6``: ``((ql >> ls) & 15) | (((qh >> hs) & 3) << 4)`` minus 32 (Q6_K);
* ``i8``: the signed bytes themselves (Q8_0).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat(builder, value, t, n):
    """A vector of ``n`` copies of scalar ``value`` of type ``t``."""
    undef = ir.Constant(_vec(t, n), ir.Undefined)
    first = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, undef, ir.Constant(_vec(_I32, n), [0] * n))


def _load(builder, addr, t, n):
    """``n`` values of type ``t`` at integer address ``addr`` (no alignment assumed)."""
    return builder.load(builder.inttoptr(addr, _vec(t, n).as_pointer()), align=1)


def _nibbles(builder, addr, shift, n):
    """``(byte >> shift) & 15`` of ``n`` bytes at ``addr``, as int16 lanes."""
    b = builder.zext(_load(builder, addr, _I8, n), _vec(_I16, n))
    s = _splat(builder, builder.trunc(shift, _I16), _I16, n)
    return builder.and_(builder.lshr(b, s), ir.Constant(_vec(_I16, n), [15] * n))


def _q6_codes(builder, ql, ls, qh, hs):
    """Sixteen Q6_K codes (-32..31) as int16 lanes."""
    low = _nibbles(builder, ql, ls, 16)
    h = builder.zext(_load(builder, qh, _I8, 16), _vec(_I16, 16))
    h = builder.lshr(h, _splat(builder, builder.trunc(hs, _I16), _I16, 16))
    h = builder.shl(builder.and_(h, ir.Constant(_vec(_I16, 16), [3] * 16)),
                    ir.Constant(_vec(_I16, 16), [4] * 16))
    return builder.sub(builder.or_(low, h), ir.Constant(_vec(_I16, 16), [32] * 16))


def _store_codes(builder, codes, out_addr, n):
    """float32(codes) into ``n`` floats at ``out_addr``."""
    f = builder.sitofp(codes, _vec(_F32, n))
    builder.store(f, builder.inttoptr(out_addr, _vec(_F32, n).as_pointer()), align=1)


def _f16_via(builder, table_p, addr):
    """The IEEE half stored at ``addr``, widened through the float32 table at ``table_p``."""
    bits = builder.load(builder.inttoptr(addr, _I16.as_pointer()), align=1)
    return builder.load(builder.gep(table_p, [builder.zext(bits, ir.IntType(64))]))


def _accumulate(builder, acc_p, lanes, scale):
    """``acc += float32(lanes) · scale``: eight int32 lanes of exact sums, scaled into the
    eight float32 lanes at ``acc_p`` (ggml's step per block)."""
    part = builder.fmul(builder.sitofp(lanes, _vec(_F32, 8)), _splat(builder, scale, _F32, 8))
    builder.store(builder.fadd(builder.load(acc_p), part), acc_p)


def _float_lanes(builder, n):
    """A stack slot of ``n`` float32 lanes, zeroed (LLVM keeps it in a register)."""
    return cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, n), [0.0] * n))


# ------------------------------------------------------------------------------------------
# whole rows of the 32-value block formats


def _madd(builder, x, y):
    """Products of ``n`` int16 lanes, adjacent pairs summed into ``n/2`` int32 lanes (the
    shape of x86's ``pmaddwd``, which LLVM emits for it)."""
    n = x.type.count
    p = builder.mul(builder.sext(x, _vec(_I32, n)), builder.sext(y, _vec(_I32, n)))
    even = builder.shuffle_vector(p, p, ir.Constant(_vec(_I32, n // 2), list(range(0, n, 2))))
    odd = builder.shuffle_vector(p, p, ir.Constant(_vec(_I32, n // 2), list(range(1, n, 2))))
    return builder.add(even, odd)


def _hsum8f(builder, v):
    """The sum of eight float32 lanes (halves, then pairs, then the last two): the order of
    :func:`refimpl.kernels.numeric.hsum8_f32`, as vector IR."""
    def half(x, lanes):
        return builder.shuffle_vector(x, x, ir.Constant(_vec(_I32, len(lanes)), lanes))
    s4 = builder.fadd(half(v, [0, 1, 2, 3]), half(v, [4, 5, 6, 7]))
    s2 = builder.fadd(half(s4, [0, 1]), half(s4, [2, 3]))
    return builder.fadd(builder.extract_element(s2, ir.Constant(_I32, 0)),
                        builder.extract_element(s2, ir.Constant(_I32, 1)))


#: Bytes per block, offset of the codes in a block, whether the format has a minimum, the
#: offset of its fifth bits (a little-endian u32; 0: none) and the offset taken off its codes.
_Q32_LAYOUT = {"q4_0": (18, 2, False, 0, 8), "q4_1": (20, 4, True, 0, 0),
               "q5_0": (22, 6, False, 2, 16), "q5_1": (24, 8, True, 4, 0),
               "q8_0": (34, 2, False, 0, 0)}


def _row_dot_q32(kind):
    """An intrinsic ``row_dot_<kind>(w, a, ad, asum, nb, table) -> float32``: one output of a
    product of the packed row at ``w`` (``nb`` blocks of 32 values) with the Q8_0/Q8_1
    activations at ``a`` (int8), their block scales at ``ad`` and (Q4_1) stored sums ``s``
    at ``asum`` (float32), the weights' f16 scales widened through ``table`` (float32[65536]).

    As ggml's SIMD dot products: per block, eight int32 lanes of exact integer sums of four
    products each, converted to float32 and multiplied by ``d_w · d_a`` into eight float32
    lanes, summed at the end; Q4_1's and Q5_1's ``m · s`` go into a separate float32 sum."""
    nbytes, qoff, has_min, qh_off, offset = _Q32_LAYOUT[kind]

    @intrinsic
    def row_dot(typingctx, w, a, ad, asum, nb, table):
        sig = types.float32(types.intp, types.intp, types.intp, types.intp, types.intp,
                            types.intp)

        def codegen(context, builder, signature, args):
            wa, aa, da, sa, nbv, ta = args
            fp = _F32.as_pointer()
            acc_p = _float_lanes(builder, 8)
            min_p = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
            table_p, d_p, s_p = (builder.inttoptr(x, fp) for x in (ta, da, sa))
            with cgutils.for_range(builder, nbv) as loop:
                b = loop.index
                wb = builder.add(wa, builder.mul(b, ir.Constant(b.type, nbytes)))
                ab = builder.add(aa, builder.mul(b, ir.Constant(b.type, 32)))
                qa = builder.add(wb, ir.Constant(wb.type, qoff))

                a_lo = builder.sext(_load(builder, ab, _I8, 16), _vec(_I16, 16))
                a_hi = builder.sext(_load(builder, builder.add(ab, ir.Constant(ab.type, 16)),
                                          _I8, 16), _vec(_I16, 16))
                if kind == "q8_0":
                    lo = builder.sext(_load(builder, qa, _I8, 16), _vec(_I16, 16))
                    hi = builder.sext(_load(builder, builder.add(qa, ir.Constant(qa.type, 16)),
                                            _I8, 16), _vec(_I16, 16))
                else:
                    lo = _nibbles(builder, qa, ir.Constant(_I32, 0), 16)
                    hi = _nibbles(builder, qa, ir.Constant(_I32, 4), 16)
                    if qh_off:      # bit j of qh is the fifth bit of value j
                        qh = _load(builder, builder.add(wb, ir.Constant(wb.type, qh_off)),
                                   _I8, 4)
                        bit = ir.Constant(_vec(_I8, 16), [1 << (j % 8) for j in range(16)])
                        zero = ir.Constant(_vec(_I8, 16), [0] * 16)
                        for first in (0, 2):      # bytes 0-1: values 0..15, 2-3: 16..31
                            pick = ir.Constant(_vec(_I32, 16), [first] * 8 + [first + 1] * 8)
                            spread = builder.shuffle_vector(qh, qh, pick)
                            on = builder.icmp_unsigned("!=", builder.and_(spread, bit), zero)
                            high = builder.select(on, ir.Constant(_vec(_I16, 16), [16] * 16),
                                                  ir.Constant(_vec(_I16, 16), [0] * 16))
                            if first == 0:
                                lo = builder.or_(lo, high)
                            else:
                                hi = builder.or_(hi, high)
                    if offset:
                        off = ir.Constant(_vec(_I16, 16), [offset] * 16)
                        lo, hi = builder.sub(lo, off), builder.sub(hi, off)
                lanes = builder.add(_madd(builder, lo, a_lo), _madd(builder, hi, a_hi))
                d = builder.fmul(_f16_via(builder, table_p, wb),
                                 builder.load(builder.gep(d_p, [b])))
                _accumulate(builder, acc_p, lanes, d)
                if has_min:
                    m = builder.fmul(_f16_via(builder, table_p,
                                              builder.add(wb, ir.Constant(wb.type, 2))),
                                     builder.load(builder.gep(s_p, [b])))
                    builder.store(builder.fadd(builder.load(min_p), m), min_p)
            return builder.fadd(_hsum8f(builder, builder.load(acc_p)), builder.load(min_p))

        return sig, codegen

    row_dot.__name__ = f"row_dot_{kind}"
    return row_dot


row_dot_q4_0 = _row_dot_q32("q4_0")
row_dot_q4_1 = _row_dot_q32("q4_1")
row_dot_q5_0 = _row_dot_q32("q5_0")
row_dot_q5_1 = _row_dot_q32("q5_1")
row_dot_q8_0 = _row_dot_q32("q8_0")


def _lanes8(builder, v):
    """An int32 vector of 8·k lanes folded to 8 (lane ``i`` plus lanes ``i+8``, ...)."""
    n = v.type.count
    out = None
    for start in range(0, n, 8):
        part = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 8),
                                                        list(range(start, start + 8))))
        out = part if out is None else builder.add(out, part)
    return out


def _row_dot_kquant(kind):
    """An intrinsic ``row_dot_<kind>(w, a, ad, nb, table, bsums) -> float32``: one output of a product with Q4_K or Q6_K weights (``nb`` super-blocks at ``w``)
    and Q8_K activations (int8 at ``a``, float32 scales at ``ad``):
    ``Σ_b d_a·d_w · Σ_g scale_g · Σ q·a``.  Per super-block the integer sums of every group,
    times its integer scale, add up in eight int32 lanes (exact), which are then scaled into
    eight float32 lanes as ggml does.  Q6_K's scales are int8 in the row; Q4_K's eight 6-bit
    scales and minimums per super-block are unpacked from its 12 bytes here, and its
    minimums' part, ``d_a · dmin · Σ_j min_j · Σa`` per super-block with the activations'
    integer sums of every 16 values at ``bsums`` (int32), is summed in float32 and taken off
    at the end (``bsums`` is unused for Q6_K)."""
    q4 = kind in ("q4_k", "q5_k")      # Q5_K: Q4_K's layout plus a fifth bit per value
    q5 = kind == "q5_k"
    nbytes = {"q4_k": 144, "q5_k": 176, "q6_k": 210}[kind]
    qs_at = 48 if q5 else 16           # where the nibbles start (Q5_K's 32 bytes of qh at 16)

    @intrinsic
    def row_dot(typingctx, w, a, ad, nb, table, bsums):
        sig = types.float32(types.intp, types.intp, types.intp, types.intp, types.intp,
                            types.intp)

        def codegen(context, builder, signature, args):
            wa, aa, da, nbv, ta, ba = args
            fp = _F32.as_pointer()
            acc_p = _float_lanes(builder, 8)
            min_p = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
            table_p, d_p = builder.inttoptr(ta, fp), builder.inttoptr(da, fp)
            bs_p = builder.inttoptr(ba, _I32.as_pointer())

            def at(base, off):
                return builder.add(base, ir.Constant(base.type, off))

            def scaled(lanes, scale):
                return builder.mul(lanes, _splat(builder, scale, _I32, 8))

            def byte(addr):
                return builder.zext(builder.load(builder.inttoptr(addr, _I8.as_pointer())),
                                    _I32)

            def c32(v):
                return ir.Constant(_I32, v)

            with cgutils.for_range(builder, nbv) as loop:
                b = loop.index
                wb = builder.add(wa, builder.mul(b, ir.Constant(b.type, nbytes)))
                ab = builder.add(aa, builder.mul(b, ir.Constant(b.type, 256)))
                isum = ir.Constant(_vec(_I32, 8), [0] * 8)
                if q4:
                    # the 6-bit scale and min of sub-block j from the 12 bytes at offset 4
                    sb = [byte(at(wb, 4 + i)) for i in range(12)]
                    scale, low = [], []
                    for j in range(8):
                        if j < 4:
                            scale.append(builder.and_(sb[j], c32(63)))
                            low.append(builder.and_(sb[j + 4], c32(63)))
                        else:
                            top = builder.shl(builder.lshr(sb[j - 4], c32(6)), c32(4))
                            scale.append(builder.or_(builder.and_(sb[j + 4], c32(15)), top))
                            top = builder.shl(builder.lshr(sb[j], c32(6)), c32(4))
                            low.append(builder.or_(builder.lshr(sb[j + 4], c32(4)), top))
                    # sub-blocks 2j (low nibbles) and 2j+1 (high) share 32 bytes
                    if q5:      # bit 2j+half of qh[l] is the fifth bit of value 64j+32half+l
                        qh = builder.zext(_load(builder, at(wb, 16), _I8, 32), _vec(_I16, 32))
                    for j in range(4):
                        qa = at(wb, qs_at + 32 * j)
                        for half in range(2):
                            codes = _nibbles(builder, qa, ir.Constant(_I32, 4 * half), 32)
                            if q5:
                                bit = builder.and_(
                                    builder.lshr(qh, ir.Constant(_vec(_I16, 32), [2 * j + half] * 32)),
                                    ir.Constant(_vec(_I16, 32), [1] * 32))
                                codes = builder.or_(codes, builder.shl(
                                    bit, ir.Constant(_vec(_I16, 32), [4] * 32)))
                            acts = builder.sext(_load(builder, at(ab, 64 * j + 32 * half),
                                                      _I8, 32), _vec(_I16, 32))
                            lanes = _lanes8(builder, _madd(builder, codes, acts))
                            isum = builder.add(isum, scaled(lanes, scale[2 * j + half]))
                    msum = c32(0)
                    first = builder.mul(b, ir.Constant(b.type, 16))
                    for j in range(8):
                        pair = builder.add(
                            builder.load(builder.gep(bs_p, [at(first, 2 * j)])),
                            builder.load(builder.gep(bs_p, [at(first, 2 * j + 1)])))
                        msum = builder.add(msum, builder.mul(low[j], pair))
                    dmin = _f16_via(builder, table_p, at(wb, 2))
                    part = builder.fmul(builder.load(builder.gep(d_p, [b])),
                                        builder.fmul(dmin, builder.sitofp(msum, _F32)))
                    builder.store(builder.fadd(builder.load(min_p), part), min_p)
                    dw = _f16_via(builder, table_p, wb)
                else:       # 16 groups of 16: values 128n + 32i + 16h, scale 8n + h + 2i
                    for n in range(2):
                        for h in range(2):
                            for i in range(4):
                                ql = at(wb, 64 * n + 32 * (i % 2) + 16 * h)
                                qh = at(wb, 128 + 32 * n + 16 * h)
                                codes = _q6_codes(builder, ql, ir.Constant(_I32, 4 * (i // 2)),
                                                  qh, ir.Constant(_I32, 2 * i))
                                a16 = _load(builder, at(ab, 128 * n + 32 * i + 16 * h), _I8, 16)
                                acts = builder.sext(a16, _vec(_I16, 16))
                                lanes = _madd(builder, codes, acts)
                                sc = builder.load(builder.inttoptr(
                                    at(wb, 192 + 8 * n + h + 2 * i), _I8.as_pointer()))
                                isum = builder.add(isum, scaled(lanes, builder.sext(sc, _I32)))
                    dw = _f16_via(builder, table_p, at(wb, 208))
                _accumulate(builder, acc_p, isum,
                            builder.fmul(dw, builder.load(builder.gep(d_p, [b]))))
            return builder.fsub(_hsum8f(builder, builder.load(acc_p)), builder.load(min_p))

        return sig, codegen

    row_dot.__name__ = f"row_dot_{kind}"
    return row_dot


row_dot_q4_k = _row_dot_kquant("q4_k")
row_dot_q5_k = _row_dot_kquant("q5_k")
row_dot_q6_k = _row_dot_kquant("q6_k")


# ------------------------------------------------------------------------------------------
# decoding to float32


@intrinsic
def decode_nibbles16_pair(typingctx, w, offset, out):
    """out[j] = lo(w[j]) - offset, out[16+j] = hi(w[j]) - offset, j < 16, as float32."""
    sig = types.void(types.intp, types.int32, types.intp)

    def codegen(context, builder, signature, args):
        wa, off, oa = args
        o16 = _splat(builder, builder.trunc(off, _I16), _I16, 16)
        for half, shift in ((0, 0), (1, 4)):
            codes = builder.sub(_nibbles(builder, wa, ir.Constant(_I32, shift), 16), o16)
            _store_codes(builder, codes, builder.add(oa, ir.Constant(oa.type, 64 * half)), 16)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def decode_nibbles32(typingctx, w, shift, out):
    """out[j] = (w[j] >> shift) & 15, j < 32, as float32 (one Q4_K sub-block)."""
    sig = types.void(types.intp, types.int32, types.intp)

    def codegen(context, builder, signature, args):
        wa, sh, oa = args
        _store_codes(builder, _nibbles(builder, wa, sh, 32), oa, 32)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def decode_q6_16(typingctx, ql, ls, qh, hs, out):
    """out[j] = q6[j], j < 16, as float32 (one Q6_K group of 16)."""
    sig = types.void(types.intp, types.int32, types.intp, types.int32, types.intp)

    def codegen(context, builder, signature, args):
        la, lsh, ha, hsh, oa = args
        _store_codes(builder, _q6_codes(builder, la, lsh, ha, hsh), oa, 16)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def decode_i8_32(typingctx, w, out):
    """out[j] = w[j], j < 32, as float32 (one Q8_0 block)."""
    sig = types.void(types.intp, types.intp)

    def codegen(context, builder, signature, args):
        wa, oa = args
        _store_codes(builder, builder.sext(_load(builder, wa, _I8, 32), _vec(_I16, 32)), oa, 32)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def widen_f16_16(typingctx, src, dst):
    """Sixteen IEEE half-precision values at ``src`` as float32 at ``dst`` (LLVM's ``fpext``:
    one ``vcvtph2ps`` on a CPU with F16C; callers check :data:`HAS_F16C` first)."""
    sig = types.void(types.intp, types.intp)

    def codegen(context, builder, signature, args):
        sa, da = args
        h = builder.bitcast(_load(builder, sa, _I16, 16), _vec(ir.HalfType(), 16))
        builder.store(builder.fpext(h, _vec(_F32, 16)),
                      builder.inttoptr(da, _vec(_F32, 16).as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def row_dot_f16(typingctx, w, x, n):
    """``Σ_i f32(w[i]) · x[i]`` over the first ``n - n % 16`` values: IEEE half weights at
    ``w``, float32 activations at ``x``, products summed in sixteen float32 lanes (as ggml's
    F16 dot product: widened weights, float32 products and sums).  The caller adds the
    leftovers and checks :data:`HAS_F16C` first."""
    sig = types.float32(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        wa, xa, nv = args
        acc_p = _float_lanes(builder, 16)
        chunks = builder.udiv(nv, ir.Constant(nv.type, 16))
        with cgutils.for_range(builder, chunks) as loop:
            i = loop.index
            bits = _load(builder, builder.add(wa, builder.mul(i, ir.Constant(i.type, 32))),
                         _I16, 16)
            wv = builder.fpext(builder.bitcast(bits, _vec(ir.HalfType(), 16)), _vec(_F32, 16))
            xv = _load(builder, builder.add(xa, builder.mul(i, ir.Constant(i.type, 64))),
                       _F32, 16)
            builder.store(builder.fadd(builder.load(acc_p), builder.fmul(wv, xv)), acc_p)
        v = builder.load(acc_p)
        lo = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 8), list(range(8))))
        hi = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 8), list(range(8, 16))))
        return _hsum8f(builder, builder.fadd(lo, hi))

    return sig, codegen


def _half_steps(builder, n, body):
    """Run ``body(offset)`` for every eight values of ``n`` (the caller's ``n % 8`` left)."""
    with cgutils.for_range(builder, builder.udiv(n, ir.Constant(n.type, 8))) as loop:
        body(builder.mul(loop.index, ir.Constant(n.type, 8)))


def _to_half_and_back(builder, x):
    """Eight float32 lanes rounded to the nearest half-precision value, ties to even (LLVM's
    ``fptrunc`` to half, then ``fpext``: ``vcvtps2ph``/``vcvtph2ps`` with F16C)."""
    return builder.fpext(builder.fptrunc(x, _vec(ir.HalfType(), 8)), _vec(_F32, 8))


def _f32_at(builder, base, i):
    return builder.inttoptr(builder.add(base, builder.mul(i, ir.Constant(i.type, 4))),
                            _vec(_F32, 8).as_pointer())


@intrinsic
def store_f32(typingctx, addr, value):
    """Store float32 ``value`` at integer address ``addr`` (how the one-token products write
    their outputs without making a view per row: refimpl.kernels.parallel)."""
    sig = types.void(types.intp, types.float32)

    def codegen(context, builder, signature, args):
        builder.store(args[1], builder.inttoptr(args[0], _F32.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def round_f16_row(typingctx, src, dst, n):
    """``dst[i]`` = ``src[i]`` rounded to half precision (kept as float32), for the first
    ``n - n % 8`` float32 values; overflow gives infinity, NaN stays NaN.  The caller checks
    :data:`HAS_F16C` first."""
    sig = types.void(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        sa, da, nv = args

        def step(i):
            x = builder.load(_f32_at(builder, sa, i), align=1)
            builder.store(_to_half_and_back(builder, x), _f32_at(builder, da, i), align=1)
        _half_steps(builder, nv, step)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def scale_round_f16(typingctx, acc, n, s):
    """``acc[i] = half(acc[i] · s)`` for the first ``n - n % 8`` float32 values (ggml's
    ``ggml_vec_scale_f16`` on an accumulator kept in half precision).  Needs F16C."""
    sig = types.void(types.intp, types.intp, types.float32)

    def codegen(context, builder, signature, args):
        aa, nv, sv = args
        sv8 = _splat(builder, sv, _F32, 8)

        def step(i):
            p = _f32_at(builder, aa, i)
            x = builder.fmul(builder.load(p, align=1), sv8)
            builder.store(_to_half_and_back(builder, x), p, align=1)
        _half_steps(builder, nv, step)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def mad_round_f16(typingctx, acc, v, n, s):
    """``acc[i] = half(fma(f32(v[i]), s, acc[i]))`` for the first ``n - n % 8`` values: half
    precision ``v``, float32 ``acc`` holding half-precision values (ggml's
    ``ggml_vec_mad_f16``: one fused multiply-add, then rounded).  Needs F16C."""
    sig = types.void(types.intp, types.intp, types.intp, types.float32)

    def codegen(context, builder, signature, args):
        aa, va, nv, sv = args
        sv8 = _splat(builder, sv, _F32, 8)

        def step(i):
            p = _f32_at(builder, aa, i)
            vp = builder.add(va, builder.mul(i, ir.Constant(i.type, 2)))
            vv = builder.fpext(builder.bitcast(_load(builder, vp, _I16, 8),
                                               _vec(ir.HalfType(), 8)), _vec(_F32, 8))
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vv.type, [vv.type] * 3), "llvm.fma.v8f32")
            x = builder.call(fma, [vv, sv8, builder.load(p, align=1)])
            builder.store(_to_half_and_back(builder, x), p, align=1)
        _half_steps(builder, nv, step)
        return context.get_dummy_value()

    return sig, codegen


def _host_has_f16c() -> bool:
    try:
        from llvmlite import binding
        return bool(binding.get_host_cpu_features().get("f16c"))
    except Exception:                           # noqa: BLE001 - any doubt: the table path
        return False


#: Whether the host converts half precision in hardware (every AVX2 CPU does); without it
#: LLVM would call a runtime routine for :func:`widen_f16_16`, so callers use a table instead.
HAS_F16C = _host_has_f16c()


# ------------------------------------------------------------------------------------------
# plain-numpy references


def ref_nibbles(w: np.ndarray, shift: int) -> np.ndarray:
    """``(w >> shift) & 15`` of uint8 bytes, as int32."""
    return ((w.astype(np.int32) >> shift) & 15)


def ref_q6(ql: np.ndarray, ls: int, qh: np.ndarray, hs: int) -> np.ndarray:
    """Q6_K codes from 16 ql and qh bytes (int32, -32..31)."""
    return (ref_nibbles(ql, ls) | (((qh.astype(np.int32) >> hs) & 3) << 4)) - 32
