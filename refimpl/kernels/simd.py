"""Small vector building blocks for the block-format kernels, written as LLVM vector IR.

Numba compiles Python loops to LLVM, but a loop over 16 packed bytes is too short for LLVM's
loop vectoriser, and numba widens every small integer to 64 bits: the natural numba loop
``s += (w & 15) * a`` runs one 64-bit multiply per value.  These few functions say what ggml's
SIMD code says, as LLVM vector operations, portable where LLVM finds the host's instructions
itself (e.g. ``vpmaddwd`` on AVX2), x86's by name only where it does not (and then with a
portable twin):

* ``row_dot_*``: one whole output of a product with a 32-value block format (Q4_0, Q4_1,
  Q5_0, Q5_1, Q8_0), ggml's way: eight integer lanes per block (``vpdpbusd`` by name on
  AVX-512 VNNI hosts, ``pmaddubsw`` and ``pmaddwd`` on AVX2 ones), scaled into eight float32
  lanes;
* ``row_dot_q4_k``, ``row_dot_q5_k``, ``row_dot_q6_k``: the same for the k-quants, per
  super-block the exact integer sums of every group times its scale in eight int32 lanes
  (``pmaddubsw`` and ``pmaddwd`` by name on AVX2 hosts, where LLVM does not find them);
* ``row_dots4_*``, ``row_dots2_*``: the same, four or two activation rows at a time, each
  weight block decoded once;
* ``row_dot_f16``, ``row_dot_f32``: one output of a product with F16 or F32 weights (sixteen
  float32 lanes).

Every function takes raw addresses (``array.ctypes.data + offset``): the caller has validated
the tensors and computed the offsets; nothing here checks bounds (DEVELOPERS.md: validation
happens before dispatch).  The tests compare whole products with
:func:`refimpl.kernels.matmul.reference` (plain numpy) and the native forms with their
portable twins.

Weight codes, by format (spec/ops/matmul.md, "Block formats"):

* ``nibbles``: value ``(byte >> shift) & 15`` of ``n`` consecutive bytes (Q4_0 and Q5_0 less
  their offset, Q4_1, Q4_K; Q5_* add a fifth bit);
* ``q6``: ``((ql >> ls) & 15) | (((qh >> hs) & 3) << 4)``, the value plus 32 (Q6_K);
* ``i8``: the signed bytes themselves (Q8_0).
"""

from __future__ import annotations

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


def _f16_via(builder, table_p, addr):
    """The IEEE half stored at ``addr``, widened through the float32 table at ``table_p``."""
    bits = builder.load(builder.inttoptr(addr, _I16.as_pointer()), align=1)
    return builder.load(builder.gep(table_p, [builder.zext(bits, ir.IntType(64))]))


def _accumulate(builder, acc_p, lanes, scale):
    """``acc += float32(lanes) · scale``: eight int32 lanes of exact sums, scaled into the
    eight float32 lanes at ``acc_p`` with one rounding where the CPU has fused multiply-add
    (``llvm.fmuladd``), as ggml's ``_mm256_fmadd_ps`` does per block."""
    v8 = _vec(_F32, 8)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8, v8, v8]),
                                        "llvm.fmuladd.v8f32")
    acc = builder.call(fn, [builder.sitofp(lanes, v8), _splat(builder, scale, _F32, 8),
                            builder.load(acc_p)])
    builder.store(acc, acc_p)


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


def _q32_codes(builder, kind, wb):
    """The 32 weight codes of the block at ``wb`` as 32 bytes in value order (values 0-15
    from the low nibbles, 16-31 from the high ones, as ggml's ``bytes_from_nibbles_32``):
    signed for the formats with an offset and Q8_0 (code less offset), unsigned for Q4_1 and
    Q5_1."""
    nbytes, qoff, has_min, qh_off, offset = _Q32_LAYOUT[kind]
    qa = builder.add(wb, ir.Constant(wb.type, qoff))
    v32 = _vec(_I8, 32)
    if kind == "q8_0":
        return _load(builder, qa, _I8, 32)
    raw = _load(builder, qa, _I8, 16)
    v16, mask = _vec(_I8, 16), ir.Constant(_vec(_I8, 16), [15] * 16)
    low = builder.and_(raw, mask)
    high = builder.and_(builder.lshr(raw, ir.Constant(v16, [4] * 16)), mask)
    codes = builder.shuffle_vector(low, high, ir.Constant(_vec(_I32, 32), list(range(32))))
    if qh_off:      # bit j of the little-endian u32 qh is the fifth bit of value j
        qh = _load(builder, builder.add(wb, ir.Constant(wb.type, qh_off)), _I8, 4)
        spread = builder.shuffle_vector(qh, qh, ir.Constant(_vec(_I32, 32),
                                                            [j // 8 for j in range(32)]))
        bit = ir.Constant(v32, [1 << (j % 8) for j in range(32)])
        on = builder.icmp_unsigned("!=", builder.and_(spread, bit), ir.Constant(v32, [0] * 32))
        codes = builder.or_(codes, builder.select(on, ir.Constant(v32, [16] * 32),
                                                  ir.Constant(v32, [0] * 32)))
    if offset:
        codes = builder.sub(codes, ir.Constant(v32, [offset] * 32))
    return codes


def _x86(builder, name, ret, args):
    """Call x86's intrinsic ``name`` (LLVM's name for it) on ``args``, returning ``ret``."""
    fn = cgutils.get_or_insert_function(builder.module,
                                        ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _sums_of_four(builder, u, s, native):
    """Eight int32 lanes, lane ``i`` = ``Σ_{j<4} u[4i+j]·s[4i+j]`` of 32 unsigned bytes ``u``
    and 32 signed bytes ``s``: x86's ``vpdpbusd`` (``native == "vnni"``), or ``pmaddubsw``
    then ``pmaddwd`` by ones (``"avx2"``, ggml's AVX2 code), or portable IR (None).  Exact in
    all three wherever every pair sum fits int16 (``pmaddubsw`` saturates): the callers' codes
    are at most 31, or 128 against activations that are never -128."""
    if native == "vnni":
        v8 = _vec(_I32, 8)
        return _x86(builder, "llvm.x86.avx512.vpdpbusd.256", v8,
                    [ir.Constant(v8, [0] * 8), builder.bitcast(u, v8), builder.bitcast(s, v8)])
    by_name = native == "avx2"
    return _madd_wd(builder, _maddubs(builder, u, s, by_name),
                    ir.Constant(_vec(_I16, 16), [1] * 16), by_name)


def _sign_of(builder, a, w, native):
    """``a`` with the sign of ``w`` applied, lane by lane (0 where ``w`` is 0): x86's
    ``psignb``, ggml's sign trick, which lets an unsigned ``|w|`` meet the activations.  An
    activation of -128 against a negative ``w`` wraps to -128: the callers never give one
    (refimpl.kernels.matmul routes such activations to the unpacked kernel)."""
    if native:
        return _x86(builder, "llvm.x86.avx2.psign.b", a.type, [a, w])
    zero = ir.Constant(a.type, [0] * 32)
    neg = builder.select(builder.icmp_signed("<", w, zero), builder.sub(zero, a), a)
    return builder.select(builder.icmp_signed("==", w, zero), zero, neg)


def _q32_rows(builder, kind, native, wa, tokens, nbv, table_p):
    """The codegen of a 32-value block format's row products: the packed row at ``wa``
    (``nb`` blocks) against each of ``tokens`` activation rows, given as tuples of integer
    addresses ``(a, ad, asum)`` (int8 values, float32 block scales, float32 block sums).
    Each block's weight codes are decoded once, for all the rows.  Returns one float32 per
    activation row.

    As ggml's x86 code (``mul_sum_i8_pairs_float``, ``mul_sum_us8_pairs_float``): per block,
    eight int32 lanes, lane ``i`` the exact sum of the products of values ``4i..4i+3``
    (:func:`_sums_of_four`); signed codes meet the activations as ``|w|`` times the
    activations with ``w``'s sign (:func:`_sign_of`)."""
    nbytes, qoff, has_min, qh_off, offset = _Q32_LAYOUT[kind]
    signed = kind == "q8_0" or bool(offset)
    fp = _F32.as_pointer()
    accs = [_float_lanes(builder, 8) for _ in tokens]
    mins = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in tokens]
    ptrs = [(aa, builder.inttoptr(da, fp), builder.inttoptr(sa, fp)) for aa, da, sa in tokens]
    with cgutils.for_range(builder, nbv) as loop:
        b = loop.index
        wb = builder.add(wa, builder.mul(b, ir.Constant(b.type, nbytes)))
        codes = _q32_codes(builder, kind, wb)
        if signed:
            zero = ir.Constant(codes.type, [0] * 32)
            magnitude = builder.select(builder.icmp_signed("<", codes, zero),
                                       builder.sub(zero, codes), codes)
        else:
            magnitude = codes
        dw = _f16_via(builder, table_p, wb)
        mw = _f16_via(builder, table_p, builder.add(wb, ir.Constant(wb.type, 2))) \
            if has_min else None
        for (aa, d_p, s_p), acc_p, min_p in zip(ptrs, accs, mins):
            a = _load(builder, builder.add(aa, builder.mul(b, ir.Constant(b.type, 32))),
                      _I8, 32)
            if signed:
                a = _sign_of(builder, a, codes, native)
            lanes = _sums_of_four(builder, magnitude, a, native)
            _accumulate(builder, acc_p, lanes,
                        builder.fmul(dw, builder.load(builder.gep(d_p, [b]))))
            if has_min:
                m = builder.fmul(mw, builder.load(builder.gep(s_p, [b])))
                builder.store(builder.fadd(builder.load(min_p), m), min_p)
    return [builder.fadd(_hsum8f(builder, builder.load(acc_p)), builder.load(min_p))
            for acc_p, min_p in zip(accs, mins)]


def _row_dot_q32(kind, native="host"):
    """An intrinsic ``row_dot_<kind>(w, a, ad, asum, nb, table) -> float32``: one output of a
    product of the packed row at ``w`` (``nb`` blocks of 32 values) with the Q8_0/Q8_1
    activations at ``a`` (int8), their block scales at ``ad`` and (Q4_1) stored sums ``s``
    at ``asum`` (float32), the weights' f16 scales widened through ``table`` (float32[65536]).

    As ggml's SIMD dot products: per block, eight int32 lanes of exact integer sums of four
    products each (:func:`_q32_rows`), converted to float32, multiplied by ``d_w · d_a`` and
    added into eight float32 lanes (:func:`_accumulate`: one fused multiply-add where the CPU
    has one), summed at the end; Q4_1's and Q5_1's ``m · s`` go into a separate float32 sum.
    ``native`` picks x86's instructions by name ("vnni", "avx2"), the portable forms (None),
    or by default ("host") :data:`X86_Q32`, the host's best; all give the same integers."""
    return _one_row(f"row_dot_{kind}", lambda builder, wa, rows, nbv, table_p:
                    _q32_rows(builder, kind, X86_Q32 if native == "host" else native, wa,
                              rows, nbv, table_p))


def _one_row(name, rows_codegen):
    """An intrinsic ``name(w, a, ad, extra, nb, table) -> float32``: the product of one packed
    weight row (``nb`` blocks at ``w``) with one activation row (int8 at ``a``, block scales
    at ``ad``, the format's extra at ``extra``), emitted by ``rows_codegen`` as
    :func:`_many_rows` emits several."""

    @intrinsic
    def row_dot(typingctx, w, a, ad, extra, nb, table):
        sig = types.float32(types.intp, types.intp, types.intp, types.intp, types.intp,
                            types.intp)

        def codegen(context, builder, signature, args):
            wa, aa, da, xa, nbv, ta = args
            table_p = builder.inttoptr(ta, _F32.as_pointer())
            return rows_codegen(builder, wa, [(aa, da, xa)], nbv, table_p)[0]

        return sig, codegen

    row_dot.__name__ = name
    return row_dot


#: Activation rows one call of a ``row_dots4_*`` intrinsic takes (``row_dots2_*``: two).
ROWS_AT_ONCE = 4


def _many_rows(name, rows_codegen, count):
    """An intrinsic ``name(w, a, a_step, ad, ad_step, extra, extra_step, nb, table, out,
    out_step)``: the product of one packed weight row (``nb`` blocks at ``w``) with ``count``
    activation rows, row ``t`` at ``a + t·a_step``, its block scales at ``ad + t·ad_step`` and
    its format's extra (Q8_1's sums, Q8_K's sums of 16) at ``extra + t·extra_step``; output
    ``t`` is stored as float32 at ``out + t·out_step``.  ``rows_codegen(builder, w, rows, nb,
    table_p)`` emits the products (:func:`_q32_rows`, :func:`_kquant_rows`), each weight block
    decoded once for all rows, as ggml's matrix kernels (llamafile's) reuse it; each output is
    the one-row intrinsic's, bit for bit: the same operations in the same order per row."""

    @intrinsic
    def row_dots(typingctx, w, a, a_step, ad, ad_step, extra, extra_step, nb, table, out,
                 out_step):
        sig = types.void(*([types.intp] * 11))

        def codegen(context, builder, signature, args):
            wa, aa, astep, da, dstep, xa, xstep, nbv, ta, oa, ostep = args
            table_p = builder.inttoptr(ta, _F32.as_pointer())

            def nth(base, step, t):
                return builder.add(base, builder.mul(step, ir.Constant(step.type, t)))
            rows = [(nth(aa, astep, t), nth(da, dstep, t), nth(xa, xstep, t))
                    for t in range(count)]
            for t, value in enumerate(rows_codegen(builder, wa, rows, nbv, table_p)):
                builder.store(value, builder.inttoptr(nth(oa, ostep, t), _F32.as_pointer()),
                              align=1)
            return context.get_dummy_value()

        return sig, codegen

    row_dots.__name__ = name
    return row_dots


def _row_dots_q32(kind, count):
    """:func:`_many_rows` of :func:`_row_dot_q32` (extra: Q8_1's block sums)."""
    return _many_rows(f"row_dots{count}_{kind}", lambda builder, wa, rows, nbv, table_p:
                      _q32_rows(builder, kind, X86_Q32, wa, rows, nbv, table_p), count)


row_dot_q4_0 = _row_dot_q32("q4_0")
row_dot_q4_1 = _row_dot_q32("q4_1")
row_dot_q5_0 = _row_dot_q32("q5_0")
row_dot_q5_1 = _row_dot_q32("q5_1")
row_dot_q8_0 = _row_dot_q32("q8_0")
row_dots4_q4_0 = _row_dots_q32("q4_0", 4)
row_dots2_q4_0 = _row_dots_q32("q4_0", 2)
row_dots4_q4_1 = _row_dots_q32("q4_1", 4)
row_dots2_q4_1 = _row_dots_q32("q4_1", 2)
row_dots4_q5_0 = _row_dots_q32("q5_0", 4)
row_dots2_q5_0 = _row_dots_q32("q5_0", 2)
row_dots4_q5_1 = _row_dots_q32("q5_1", 4)
row_dots2_q5_1 = _row_dots_q32("q5_1", 2)
row_dots4_q8_0 = _row_dots_q32("q8_0", 4)
row_dots2_q8_0 = _row_dots_q32("q8_0", 2)


def _lanes8(builder, v):
    """An int32 vector of 8·k lanes folded to 8 (lane ``i`` plus lanes ``i+8``, ...)."""
    n = v.type.count
    out = None
    for start in range(0, n, 8):
        part = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 8),
                                                        list(range(start, start + 8))))
        out = part if out is None else builder.add(out, part)
    return out


def _broadcast_lanes(builder, v, picks):
    """A vector whose lane ``i`` is lane ``picks[i]`` of ``v``."""
    return builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, len(picks)), list(picks)))


def _q4k_scales_mins(builder, addr):
    """The eight 6-bit scales and eight 6-bit minimums of a Q4_K/Q5_K super-block, packed in
    the twelve bytes at ``addr`` (spec/ops/matmul.md), as two vectors of eight int32 lanes.

    With ``b`` those bytes: scale ``j`` is ``b[j] & 63`` for ``j < 4`` and
    ``(b[j+4] & 15) | (b[j-4] >> 6) << 4`` above; minimum ``j`` is ``b[j+4] & 63`` for
    ``j < 4`` and ``(b[j+4] >> 4) | (b[j] >> 6) << 4`` above.  Both are written here as one
    vector expression each: pick the bytes into lanes, then shift and mask per lane.  (The
    16-byte load reads four bytes past the twelve; they are the block's own codes.)"""
    v8 = _vec(_I32, 8)
    raw = builder.zext(_load(builder, addr, _I8, 16), _vec(_I32, 16))
    both = builder.shuffle_vector(raw, ir.Constant(_vec(_I32, 16), [0] * 16),
                                  ir.Constant(_vec(_I32, 32), [
                                      0, 1, 2, 3, 8, 9, 10, 11,        # low bits of scales
                                      16, 16, 16, 16, 0, 1, 2, 3,      # top bits of scales 4-7
                                      4, 5, 6, 7, 8, 9, 10, 11,        # low bits of minimums
                                      16, 16, 16, 16, 4, 5, 6, 7]))    # top bits of mins 4-7

    def part(k):
        return _broadcast_lanes(builder, both, range(8 * k, 8 * k + 8))
    mask = ir.Constant(v8, [63] * 4 + [15] * 4)

    def top(x):
        return builder.shl(builder.lshr(x, ir.Constant(v8, [6] * 8)), ir.Constant(v8, [4] * 8))
    scales = builder.or_(builder.and_(part(0), mask), top(part(1)))
    low = builder.lshr(part(2), ir.Constant(v8, [0] * 4 + [4] * 4))
    mins = builder.or_(builder.and_(low, mask), top(part(3)))
    return scales, mins


def _hsum_i32(builder, v):
    """The sum of the int32 lanes of ``v`` (exact, so any order)."""
    n = v.type.count
    while n > 1:
        n //= 2
        v = builder.add(_broadcast_lanes(builder, v, range(n)),
                        _broadcast_lanes(builder, v, range(n, 2 * n)))
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _target_has_avx2() -> bool:
    """Whether numba compiles for a CPU with AVX2: the host's, unless ``NUMBA_CPU_NAME`` or
    ``NUMBA_CPU_FEATURES`` asks for another target (then the portable forms are used)."""
    from numba.core import config
    if config.CPU_NAME or config.CPU_FEATURES:
        return False
    import llvmlite.binding as llvm
    return bool(llvm.get_host_cpu_features().get("avx2", False))


#: Whether :func:`_maddubs` and :func:`_madd_wd` use x86's instructions by name.
X86_AVX2 = _target_has_avx2()


def _target_has_vnni() -> bool:
    """Whether numba compiles for a CPU with AVX-512 VNNI on 256-bit vectors (``vpdpbusd``;
    AVX512_VNNI and AVX512VL), under the same conditions as :func:`_target_has_avx2`."""
    if not X86_AVX2:
        return False
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512vnni", False) and features.get("avx512vl", False))


#: The x86 instructions the 32-value formats' row products call by name (:func:`_q32_rows`):
#: "vnni" (``vpdpbusd``, as ggml's code on such a CPU), "avx2" (``pmaddubsw``, ``pmaddwd``,
#: ``psignb``), or None (portable vector IR).
X86_Q32 = "vnni" if _target_has_vnni() else "avx2" if X86_AVX2 else None


def _maddubs(builder, u, s, native):
    """``u[2i]·s[2i] + u[2i+1]·s[2i+1]`` of 32 unsigned bytes ``u`` and 32 signed bytes ``s``,
    as sixteen int16 lanes: x86's ``pmaddubsw``, which saturates; every caller here keeps the
    sums within int16 (codes below 64 times int8 activations), where both forms are exact.
    LLVM does not find ``pmaddubsw`` in the portable form, so on AVX2 it is called by name."""
    if native:
        fnty = ir.FunctionType(_vec(_I16, 16), [_vec(_I8, 32), _vec(_I8, 32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx2.pmadd.ub.sw")
        return builder.call(fn, [u, s])
    p = builder.mul(builder.zext(u, _vec(_I16, 32)), builder.sext(s, _vec(_I16, 32)))
    return builder.add(_broadcast_lanes(builder, p, range(0, 32, 2)),
                       _broadcast_lanes(builder, p, range(1, 32, 2)))


def _madd_wd(builder, x, y, native):
    """:func:`_madd` of sixteen int16 lanes; by name on AVX2, where LLVM, knowing how small
    the operands are, may otherwise widen them to int32 and multiply with ``pmulld``."""
    if native:
        fnty = ir.FunctionType(_vec(_I32, 8), [_vec(_I16, 16), _vec(_I16, 16)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx2.pmadd.wd")
        return builder.call(fn, [x, y])
    return _madd(builder, x, y)


def _row_dot_kquant(kind, native=X86_AVX2):
    """An intrinsic ``row_dot_<kind>(w, a, ad, bsums, nb, table) -> float32``: one output of
    a product with Q4_K, Q5_K or Q6_K weights (``nb`` super-blocks at ``w``) and Q8_K
    activations (int8 at ``a``, float32 scales at ``ad``, the integer sums of every 16 values
    at ``bsums``, int32): ``Σ_b d_a·d_w · Σ_g scale_g · Σ q·a``.

    As ggml's AVX2 code: per super-block everything up to ``d_a·d_w`` is integer and exact.
    For every 32 values, the unsigned codes times the activations, summed in pairs
    (:func:`_maddubs`; at most 63·128·2, within int16), times the group's scale, summed in
    pairs again (:func:`_madd_wd`), add into eight int32 lanes, which are then scaled into
    eight float32 lanes.

    Q6_K's codes are stored plus 32 and its scales are int8 in the row: the products use the
    stored codes and take ``32 · scale_g · Σa`` off, lane by lane, from the activations'
    sums.  Q4_K's and Q5_K's eight 6-bit scales and minimums are unpacked from their 12
    bytes (:func:`_q4k_scales_mins`); the minimums' part, ``d_a · dmin · Σ_j min_j · Σa`` per
    super-block, is summed in float32 and taken off at the end.  ``native`` chooses x86's
    instructions by name (the default on AVX2 hosts) or the portable forms; both give the
    same integers."""
    return _one_row(f"row_dot_{kind}", lambda builder, wa, rows, nbv, table_p:
                    _kquant_rows(builder, kind, native, wa, rows, nbv, table_p))


def _row_dots_kquant(kind, count, native=X86_AVX2):
    """:func:`_many_rows` of :func:`_row_dot_kquant` (extra: Q8_K's sums of 16)."""
    return _many_rows(f"row_dots{count}_{kind}", lambda builder, wa, rows, nbv, table_p:
                      _kquant_rows(builder, kind, native, wa, rows, nbv, table_p), count)


def _at(builder, base, off):
    """Integer address ``base + off`` (``off`` a Python int)."""
    return builder.add(base, ir.Constant(base.type, off))


def _kquant_codes(builder, kind, wb):
    """The 256 codes of the Q4_K, Q5_K or Q6_K super-block at ``wb`` (spec/ops/matmul.md,
    "Block formats"), as ``(first value, 32 codes as <32 x i8>)`` pairs, first values in
    increasing order; Q6_K's codes are the values plus 32.  Q4_K's and Q5_K's sub-blocks 2j
    (low nibbles) and 2j+1 (high) share 32 bytes; Q5_K's bit 2j+half of ``qh[l]`` is the
    fifth bit of value 64j+32half+l.  Q6_K's values 128n + 32i + l take the nibble of
    ``ql[64n + 32(i % 2) + l]`` shifted by 4(i // 2), and bits 2i of ``qh[32n + l]``."""
    def bytes_of(v):
        return ir.Constant(_vec(_I8, 32), [v] * 32)
    out = []
    if kind in ("q4_k", "q5_k"):
        q5 = kind == "q5_k"
        qs_at = 48 if q5 else 16           # where the nibbles start (Q5_K's 32 bytes of qh at 16)
        if q5:
            qh = _load(builder, _at(builder, wb, 16), _I8, 32)
        for j in range(4):
            q = _load(builder, _at(builder, wb, qs_at + 32 * j), _I8, 32)
            for half in range(2):
                codes = builder.and_(builder.lshr(q, bytes_of(4 * half)), bytes_of(15))
                if q5:
                    bit = builder.and_(builder.lshr(qh, bytes_of(2 * j + half)), bytes_of(1))
                    codes = builder.or_(codes, builder.shl(bit, bytes_of(4)))
                out.append((64 * j + 32 * half, codes))
    else:
        for n in range(2):
            qh = _load(builder, _at(builder, wb, 128 + 32 * n), _I8, 32)
            for i in range(4):          # both halves of 16 at once: 32 consecutive values
                ql = _load(builder, _at(builder, wb, 64 * n + 32 * (i % 2)), _I8, 32)
                low = builder.and_(builder.lshr(ql, bytes_of(4 * (i // 2))), bytes_of(15))
                high = builder.and_(builder.lshr(qh, bytes_of(2 * i)), bytes_of(3))
                out.append((128 * n + 32 * i, builder.or_(low, builder.shl(high, bytes_of(4)))))
    return out


def _kquant_rows(builder, kind, native, wa, tokens, nbv, table_p):
    """The codegen of :func:`_row_dot_kquant`: the weight row at ``wa`` (``nb`` super-blocks)
    against each of ``tokens`` activation rows, tuples of integer addresses ``(a, ad,
    bsums)``; each group's codes are decoded once for all of them (:func:`_kquant_codes`).
    One float32 per row."""
    q4 = kind in ("q4_k", "q5_k")      # Q5_K: Q4_K's layout plus a fifth bit per value
    nbytes = {"q4_k": 144, "q5_k": 176, "q6_k": 210}[kind]
    fp = _F32.as_pointer()

    def group_sum(isum, codes, scales16, picks, act_addr):
        """``isum`` plus 32 unsigned byte ``codes`` times 32 activations, summed in pairs,
        times their scales (``picks``: the lane of ``scales16`` for each pair), summed in
        pairs again."""
        p16 = _maddubs(builder, codes, _load(builder, act_addr, _I8, 32), native)
        s = _broadcast_lanes(builder, scales16, picks)
        return builder.add(isum, _madd_wd(builder, p16, s, native))

    accs = [_float_lanes(builder, 8) for _ in tokens]
    mins_p = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in tokens]
    ptrs = [(aa, builder.inttoptr(da, fp), ba) for aa, da, ba in tokens]
    with cgutils.for_range(builder, nbv) as loop:
        b = loop.index
        wb = builder.add(wa, builder.mul(b, ir.Constant(b.type, nbytes)))
        abs_ = [builder.add(aa, builder.mul(b, ir.Constant(b.type, 256))) for aa, _, _ in ptrs]
        bsum = [_load(builder, builder.add(ba, builder.mul(b, ir.Constant(b.type, 64))),
                      _I32, 16) for _, _, ba in ptrs]
        isum = [ir.Constant(_vec(_I32, 8), [0] * 8) for _ in ptrs]
        if q4:
            scales, mins = _q4k_scales_mins(builder, _at(builder, wb, 4))
            scales16 = builder.trunc(scales, _vec(_I16, 8))
        else:       # 16 groups of 16: the 32 values at ``first`` take scales first/16, +1
            sc8 = _load(builder, _at(builder, wb, 192), _I8, 16)
            scales16 = builder.sext(sc8, _vec(_I16, 16))
        for first, codes in _kquant_codes(builder, kind, wb):
            g = first // 32 if q4 else first // 16
            picks = [g] * 16 if q4 else [g] * 8 + [g + 1] * 8
            for t, ab in enumerate(abs_):
                isum[t] = group_sum(isum[t], codes, scales16, picks, _at(builder, ab, first))
        if q4:
            dmin = _f16_via(builder, table_p, _at(builder, wb, 2))
            for t, (_, d_p, _) in enumerate(ptrs):
                # Σ_j min_j · (bsums[2j] + bsums[2j+1]), exact in int32
                pairs = builder.add(_broadcast_lanes(builder, bsum[t], range(0, 16, 2)),
                                    _broadcast_lanes(builder, bsum[t], range(1, 16, 2)))
                msum = _hsum_i32(builder, builder.mul(mins, pairs))
                part = builder.fmul(builder.load(builder.gep(d_p, [b])),
                                    builder.fmul(dmin, builder.sitofp(msum, _F32)))
                builder.store(builder.fadd(builder.load(mins_p[t]), part), mins_p[t])
            dw = _f16_via(builder, table_p, wb)
        else:
            # the stored codes are the values plus 32: take 32 · scale_g · Σa off, group g's
            # from lane g % 8 (any lane keeps the integers exact)
            sc32 = builder.sext(sc8, _vec(_I32, 16))
            for t in range(len(ptrs)):
                offs = _lanes8(builder, builder.mul(sc32, bsum[t]))
                offs = builder.shl(offs, ir.Constant(_vec(_I32, 8), [5] * 8))
                isum[t] = builder.sub(isum[t], offs)
            dw = _f16_via(builder, table_p, _at(builder, wb, 208))
        for t, (_, d_p, _) in enumerate(ptrs):
            _accumulate(builder, accs[t], isum[t],
                        builder.fmul(dw, builder.load(builder.gep(d_p, [b]))))
    return [builder.fsub(_hsum8f(builder, builder.load(acc_p)), builder.load(min_p))
            for acc_p, min_p in zip(accs, mins_p)]


row_dot_q4_k = _row_dot_kquant("q4_k")
row_dot_q5_k = _row_dot_kquant("q5_k")
row_dot_q6_k = _row_dot_kquant("q6_k")
row_dots4_q4_k = _row_dots_kquant("q4_k", 4)
row_dots2_q4_k = _row_dots_kquant("q4_k", 2)
row_dots4_q5_k = _row_dots_kquant("q5_k", 4)
row_dots2_q5_k = _row_dots_kquant("q5_k", 2)
row_dots4_q6_k = _row_dots_kquant("q6_k", 4)
row_dots2_q6_k = _row_dots_kquant("q6_k", 2)
#: The same in portable LLVM vector IR only, whatever the host (tests compare the two).
PORTABLE_KQUANT = {k: _row_dot_kquant(k, native=False) for k in ("q4_k", "q5_k", "q6_k")}

#: The 32-value formats' one-row products in every form this host can run, by form (None:
#: portable, "avx2", "vnni") and format (tests compare them).
Q32_FORMS = {form: {k: _row_dot_q32(k, native=form) for k in _Q32_LAYOUT}
             for form in (None, "avx2", "vnni")
             if form is None or (form == "avx2" and X86_AVX2) or (form == "vnni" and X86_Q32 == "vnni")}


# ------------------------------------------------------------------------------------------
# half precision


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


def _float_row_dot(half):
    """The codegen of :func:`row_dot_f16` (``half``: IEEE half weights, widened) or
    :func:`row_dot_f32` (float32 weights): products summed in sixteen float32 lanes."""
    sig = types.float32(types.intp, types.intp, types.intp)
    width = 2 if half else 4

    def codegen(context, builder, signature, args):
        wa, xa, nv = args
        acc_p = _float_lanes(builder, 16)
        chunks = builder.udiv(nv, ir.Constant(nv.type, 16))
        with cgutils.for_range(builder, chunks) as loop:
            i = loop.index
            at = builder.add(wa, builder.mul(i, ir.Constant(i.type, 16 * width)))
            if half:
                wv = builder.fpext(builder.bitcast(_load(builder, at, _I16, 16),
                                                   _vec(ir.HalfType(), 16)), _vec(_F32, 16))
            else:
                wv = _load(builder, at, _F32, 16)
            xv = _load(builder, builder.add(xa, builder.mul(i, ir.Constant(i.type, 64))),
                       _F32, 16)
            builder.store(builder.fadd(builder.load(acc_p), builder.fmul(wv, xv)), acc_p)
        v = builder.load(acc_p)
        lo = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 8), list(range(8))))
        hi = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 8), list(range(8, 16))))
        return _hsum8f(builder, builder.fadd(lo, hi))

    return sig, codegen


@intrinsic
def row_dot_f16(typingctx, w, x, n):
    """``Σ_i f32(w[i]) · x[i]`` over the first ``n - n % 16`` values: IEEE half weights at
    ``w``, float32 activations at ``x``, products summed in sixteen float32 lanes (as ggml's
    F16 dot product: widened weights, float32 products and sums).  The caller adds the
    leftovers and checks :data:`HAS_F16C` first."""
    return _float_row_dot(True)


@intrinsic
def row_dot_f32(typingctx, w, x, n):
    """``Σ_i w[i] · x[i]`` over the first ``n - n % 16`` values: float32 weights at ``w`` and
    activations at ``x``, products summed in sixteen float32 lanes.  The caller adds the
    leftovers."""
    return _float_row_dot(False)


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
