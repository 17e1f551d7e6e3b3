"""Small vector building blocks for the block-format kernels, written as LLVM vector IR.

Numba compiles Python loops to LLVM, but a loop over 16 packed bytes is too short for LLVM's
loop vectoriser, and numba widens every small integer to 64 bits: the natural numba loop
``s += (w & 15) * a`` runs one 64-bit multiply per value.  These few functions say what ggml's
SIMD code says, as portable LLVM vector operations (no x86 intrinsic; LLVM picks the host's
instructions, e.g. ``vpmaddwd`` on AVX2):

* ``row_dot_*``: one whole output of a product with a 32-value block format (Q4_0, Q4_1,
  Q8_0), ggml's way: eight integer lanes per block, scaled into eight float32 lanes;
* ``dot_*``: the exact integer sum of products of one group of weight codes with int8
  activations (the k-quants' sub-blocks);
* ``decode_*``: one group of weight codes times a float32 scale, stored as float32 (the
  dequantisation that feeds the BLAS path of a batched product).

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


def _reduce_add(builder, v, n):
    """The integer sum of the ``n`` int32 lanes of ``v``."""
    name = f"llvm.vector.reduce.add.v{n}i32"
    fn = builder.module.globals.get(name)
    if fn is None:
        fn = ir.Function(builder.module, ir.FunctionType(_I32, [_vec(_I32, n)]), name)
    return builder.call(fn, [v])


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


def _dot(builder, codes, a_addr, n):
    """Σ codes[j] · a[j] over ``n`` int16 lanes and ``n`` int8 activations at ``a_addr``.
    Products fit int16 (|code| ≤ 128, |a| ≤ 128 gives at most 16384); the sum is int32."""
    a = builder.sext(_load(builder, a_addr, _I8, n), _vec(_I16, n))
    p = builder.mul(codes, a)
    return _reduce_add(builder, builder.sext(p, _vec(_I32, n)), n)


def _store_scaled(builder, codes, scale, out_addr, n):
    """float32(codes) · scale into ``n`` floats at ``out_addr``."""
    f = builder.sitofp(codes, _vec(_F32, n))
    v = builder.fmul(f, _splat(builder, scale, _F32, n))
    builder.store(v, builder.inttoptr(out_addr, _vec(_F32, n).as_pointer()), align=1)


# ------------------------------------------------------------------------------------------
# integer dot products


@intrinsic
def dot_nibbles32(typingctx, w, shift, a):
    """Σ_j ((w[j] >> shift) & 15) · a[j], j < 32 (one 32-value sub-block of Q4_K)."""
    sig = types.int32(types.intp, types.int32, types.intp)

    def codegen(context, builder, signature, args):
        wa, sh, aa = args
        return _dot(builder, _nibbles(builder, wa, sh, 32), aa, 32)

    return sig, codegen


@intrinsic
def dot_q6_16(typingctx, ql, ls, qh, hs, a):
    """Σ_j q6[j] · a[j], j < 16, with the Q6_K codes of ``ql``/``qh`` (see module doc)."""
    sig = types.int32(types.intp, types.int32, types.intp, types.int32, types.intp)

    def codegen(context, builder, signature, args):
        la, lsh, ha, hsh, aa = args
        return _dot(builder, _q6_codes(builder, la, lsh, ha, hsh), aa, 16)

    return sig, codegen


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
    """The sum of eight float32 lanes (halves, then pairs, then the last two)."""
    def half(x, lanes):
        return builder.shuffle_vector(x, x, ir.Constant(_vec(_I32, len(lanes)), lanes))
    s4 = builder.fadd(half(v, [0, 1, 2, 3]), half(v, [4, 5, 6, 7]))
    s2 = builder.fadd(half(s4, [0, 1]), half(s4, [2, 3]))
    return builder.fadd(builder.extract_element(s2, ir.Constant(_I32, 0)),
                        builder.extract_element(s2, ir.Constant(_I32, 1)))


#: Bytes per block, offset of the codes in a block, and whether the format has a minimum.
_Q32_LAYOUT = {"q4_0": (18, 2, False), "q4_1": (20, 4, True), "q8_0": (34, 2, False)}


def _row_dot_q32(kind):
    """An intrinsic ``row_dot_<kind>(w, a, ad, asum, nb, table) -> float32``: one output of a
    product of the packed row at ``w`` (``nb`` blocks of 32 values) with the Q8_0/Q8_1
    activations at ``a`` (int8), their block scales at ``ad`` and (Q4_1) stored sums ``s``
    at ``asum`` (float32), the weights' f16 scales widened through ``table`` (float32[65536]).

    As ggml's SIMD dot products: per block, eight int32 lanes of exact integer sums of four
    products each, converted to float32 and multiplied by ``d_w · d_a`` into eight float32
    lanes, summed at the end; Q4_1's ``m · s`` goes into a separate float32 sum."""
    nbytes, qoff, has_min = _Q32_LAYOUT[kind]

    @intrinsic
    def row_dot(typingctx, w, a, ad, asum, nb, table):
        sig = types.float32(types.intp, types.intp, types.intp, types.intp, types.intp,
                            types.intp)

        def codegen(context, builder, signature, args):
            wa, aa, da, sa, nbv, ta = args
            fp = _F32.as_pointer()
            acc_p = cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, 8), [0.0] * 8))
            min_p = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
            table_p, d_p, s_p = (builder.inttoptr(x, fp) for x in (ta, da, sa))
            with cgutils.for_range(builder, nbv) as loop:
                b = loop.index
                wb = builder.add(wa, builder.mul(b, ir.Constant(b.type, nbytes)))
                ab = builder.add(aa, builder.mul(b, ir.Constant(b.type, 32)))
                qa = builder.add(wb, ir.Constant(wb.type, qoff))

                def f16_at(addr):
                    bits = builder.load(builder.inttoptr(addr, _I16.as_pointer()), align=1)
                    return builder.load(builder.gep(table_p, [builder.zext(bits, ir.IntType(64))]))

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
                    if kind == "q4_0":
                        eight = ir.Constant(_vec(_I16, 16), [8] * 16)
                        lo, hi = builder.sub(lo, eight), builder.sub(hi, eight)
                lanes = builder.add(_madd(builder, lo, a_lo), _madd(builder, hi, a_hi))
                d = builder.fmul(f16_at(wb), builder.load(builder.gep(d_p, [b])))
                part = builder.fmul(builder.sitofp(lanes, _vec(_F32, 8)),
                                    _splat(builder, d, _F32, 8))
                builder.store(builder.fadd(builder.load(acc_p), part), acc_p)
                if has_min:
                    m = builder.fmul(f16_at(builder.add(wb, ir.Constant(wb.type, 2))),
                                     builder.load(builder.gep(s_p, [b])))
                    builder.store(builder.fadd(builder.load(min_p), m), min_p)
            return builder.fadd(_hsum8f(builder, builder.load(acc_p)), builder.load(min_p))

        return sig, codegen

    row_dot.__name__ = f"row_dot_{kind}"
    return row_dot


row_dot_q4_0 = _row_dot_q32("q4_0")
row_dot_q4_1 = _row_dot_q32("q4_1")
row_dot_q8_0 = _row_dot_q32("q8_0")


# ------------------------------------------------------------------------------------------
# decoding to float32


@intrinsic
def decode_nibbles16_pair(typingctx, w, offset, scale, out):
    """out[j] = (lo(w[j]) - offset)·scale, out[16+j] = (hi(w[j]) - offset)·scale, j < 16."""
    sig = types.void(types.intp, types.int32, types.float32, types.intp)

    def codegen(context, builder, signature, args):
        wa, off, sc, oa = args
        o16 = _splat(builder, builder.trunc(off, _I16), _I16, 16)
        for half, shift in ((0, 0), (1, 4)):
            codes = builder.sub(_nibbles(builder, wa, ir.Constant(_I32, shift), 16), o16)
            _store_scaled(builder, codes, sc, builder.add(oa, ir.Constant(oa.type, 64 * half)), 16)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def decode_nibbles32(typingctx, w, shift, scale, out):
    """out[j] = ((w[j] >> shift) & 15)·scale, j < 32 (one Q4_K sub-block, before its min)."""
    sig = types.void(types.intp, types.int32, types.float32, types.intp)

    def codegen(context, builder, signature, args):
        wa, sh, sc, oa = args
        _store_scaled(builder, _nibbles(builder, wa, sh, 32), sc, oa, 32)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def decode_q6_16(typingctx, ql, ls, qh, hs, scale, out):
    """out[j] = q6[j]·scale, j < 16 (one Q6_K group of 16)."""
    sig = types.void(types.intp, types.int32, types.intp, types.int32, types.float32, types.intp)

    def codegen(context, builder, signature, args):
        la, lsh, ha, hsh, sc, oa = args
        _store_scaled(builder, _q6_codes(builder, la, lsh, ha, hsh), sc, oa, 16)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def decode_i8_32(typingctx, w, scale, out):
    """out[j] = w[j]·scale, j < 32 (one Q8_0 block)."""
    sig = types.void(types.intp, types.float32, types.intp)

    def codegen(context, builder, signature, args):
        wa, sc, oa = args
        codes = builder.sext(_load(builder, wa, _I8, 32), _vec(_I16, 32))
        _store_scaled(builder, codes, sc, oa, 32)
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


def ref_dot(codes: np.ndarray, a: np.ndarray) -> int:
    """The exact integer dot product of codes and int8 activations."""
    return int(np.dot(codes.astype(np.int64), a.astype(np.int64)))
