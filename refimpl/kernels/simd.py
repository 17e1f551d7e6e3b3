"""Small vector building blocks for the block-format kernels, written as LLVM vector IR.

Numba compiles Python loops to LLVM, but a loop over 16 packed bytes is too short for LLVM's
loop vectoriser, and numba widens every small integer to 64 bits: the natural numba loop
``s += (w & 15) * a`` runs one 64-bit multiply per value.  These few functions say what ggml's
SIMD code says, as portable LLVM vector operations (no x86 intrinsic; LLVM picks the host's
instructions, e.g. ``vpmaddwd`` on AVX2):

* ``dot_*``: the exact integer sum of products of one group of weight codes with int8
  activations (the core of every quantised dot product);
* ``decode_*``: one group of weight codes times a float32 scale, stored as float32 (the
  dequantisation that feeds the BLAS path of a batched product).

Every function takes raw addresses (``array.ctypes.data + offset``): the caller has validated
the tensors and computed the offsets; nothing here checks bounds (DEVELOPERS.md: validation
happens before dispatch).  Each has a plain-numpy reference (``ref_*``) that the tests compare
it with.

Weight codes, by format (spec/ops/matmul.md, "Block formats"):

* ``nibbles``: value ``(byte >> shift) & 15`` of ``n`` consecutive bytes (Q4_0, Q4_1, Q4_K);
* ``q6``: ``((ql >> ls) & 15) | (((qh >> hs) & 3) << 4)`` minus 32 (Q6_K);
* ``i8``: the signed bytes themselves (Q8_0).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
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
def dot_nibbles16_pair(typingctx, w, a):
    """Σ_j lo(w[j])·a[j] + hi(w[j])·a[16+j], j < 16: the 16 packed bytes of a Q4_0/Q4_1 block
    (low nibbles are values 0..15, high nibbles 16..31) against 32 int8 activations."""
    sig = types.int32(types.intp, types.intp)

    def codegen(context, builder, signature, args):
        wa, aa = args
        zero, four = ir.Constant(_I32, 0), ir.Constant(_I32, 4)
        lo = _dot(builder, _nibbles(builder, wa, zero, 16), aa, 16)
        a_hi = builder.add(aa, ir.Constant(aa.type, 16))
        hi = _dot(builder, _nibbles(builder, wa, four, 16), a_hi, 16)
        return builder.add(lo, hi)

    return sig, codegen


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


@intrinsic
def dot_i8_32(typingctx, w, a):
    """Σ_j w[j] · a[j], j < 32, both int8 (one Q8_0 block)."""
    sig = types.int32(types.intp, types.intp)

    def codegen(context, builder, signature, args):
        wa, aa = args
        codes = builder.sext(_load(builder, wa, _I8, 32), _vec(_I16, 32))
        return _dot(builder, codes, aa, 32)

    return sig, codegen


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
