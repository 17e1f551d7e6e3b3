"""UNARY, GLU, SCALE, CLAMP and FILL: elementwise activations (spec/ops/unary.md).

Everything is computed in float32, bit-exact with ggml's x86 AVX2 CPU backend, including its
shortcuts: GELU and GELU_QUICK (alone or as the gate of GEGLU and GEGLU_QUICK) are looked up in
a table indexed by the input rounded to F16, which also rounds the result to F16.  Rounding
input and output to half precision reproduces the table exactly (:func:`.numeric.round_f16`).
For BF16 tensors ggml evaluates the exact formula, and so do we.  SILU and SWIGLU on F32 rows
use ggml's 8-lane exp on whole groups of eight (:func:`.numeric.vsilu_f32`) and libm on the
rest; products that ggml's compiler fuses into an addition are fused here too
(:func:`.numeric.fma32`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..graph.build import Node
from ..graph.checks import (F32, overlaps)
from ..graph.ops import GluOp, Op, UnaryOp
from ..graph.registry import kernel
from ..protocol.ggml_types import GgmlType
from ..graph.validators.types import QUANTIZE_TYPES
from .cpu_tensors import load_f32, rows_u8, store_f32, view
from .numeric import fma32, round_f16, vsilu_f32
from .parallel import sized_kernel
from .quantize import quantize_into
from .quants import dequantize_rows

_SQRT_2_OVER_PI = 0.79788456080286535587989211986876
_GELU_COEF_A = 0.044715
_GELU_QUICK_COEF = -1.702
_SQRT_2_INV = 0.70710678118654752440084436210484


@njit(cache=True, inline="always")
def _gelu(x):
    # ggml's compiler fuses ``1 + A*x*x`` into fma(A*x, x, 1); the rest has no multiply-add
    inner = fma32(np.float32(_GELU_COEF_A) * x, x, np.float32(1.0))
    t = math.tanh(np.float32(_SQRT_2_OVER_PI) * x * inner)
    return np.float32(0.5) * x * (np.float32(1.0) + t)


@njit(cache=True, inline="always")
def _gelu_quick(x):
    return x * (np.float32(1.0) / (np.float32(1.0) + math.exp(np.float32(_GELU_QUICK_COEF) * x)))


@njit(cache=True, inline="always")
def activation(code, x, table, p0, p1, p2, p3):
    """One unary op (``UnaryOp`` code) on a float32 value; p0..p3 are XIELU's parameters.

    ``table`` selects ggml's F16 lookup-table behaviour for GELU/GELU_QUICK: 0 evaluates the
    formula (BF16 tensors), 1 looks every value up (F16 tensors), 2 looks up only inputs in
    (-10, 10) and returns 0 below and the input above (F32 tensors).
    """
    one = np.float32(1.0)
    zero = np.float32(0.0)
    if code == 0:    # ABS
        return abs(x)
    if code == 1:    # SGN
        return one if x > zero else (-one if x < zero else zero)
    if code == 2:    # NEG
        return -x
    if code == 3:    # STEP
        return one if x > zero else zero
    if code == 4:    # TANH
        return math.tanh(x)
    if code == 5:    # ELU
        return x if x > zero else np.float32(math.expm1(x))
    if code == 6:    # RELU
        return x if x > zero else zero
    if code == 7:    # SIGMOID
        return one / (one + math.exp(-x))
    if code == 8:    # GELU
        if table:
            if table == 2 and x <= np.float32(-10.0):
                return zero
            if table == 2 and x >= np.float32(10.0):
                return x
            return round_f16(_gelu(round_f16(x)))
        return _gelu(x)
    if code == 9:    # GELU_QUICK
        if table:
            return round_f16(_gelu_quick(round_f16(x)))
        return _gelu_quick(x)
    if code == 10:   # SILU
        return x / (one + math.exp(-x))
    if code == 11:   # HARDSWISH
        return x * min(one, max(zero, (x + np.float32(3.0)) / np.float32(6.0)))
    if code == 12:   # HARDSIGMOID
        return min(one, max(zero, (x + np.float32(3.0)) / np.float32(6.0)))
    if code == 13:   # EXP
        return math.exp(x)
    if code == 14:   # EXPM1 (ggml computes exp(x) - 1)
        return math.exp(x) - one
    if code == 15:   # SOFTPLUS
        return x if x > np.float32(20.0) else math.log(one + math.exp(x))
    if code == 16:   # GELU_ERF
        return np.float32(0.5) * x * (one + math.erf(x * np.float32(_SQRT_2_INV)))
    if code == 17:   # XIELU: p0=alpha_n, p1=alpha_p, p2=beta, p3=eps; one product fused as in ggml
        if x > zero:
            return fma32(p1 * x, x, p2 * x)
        return fma32(np.float32(math.expm1(min(x, p3))) - x, p0, p2 * x)
    if code == 18:   # FLOOR (np.floor keeps a float, and the sign of a zero)
        return np.floor(x)
    if code == 19:   # CEIL
        return np.ceil(x)
    if code == 20:   # ROUND: half away from zero, like C's roundf
        return math.copysign(math.floor(abs(x) + np.float32(0.5)), x)
    if code == 21:   # TRUNC
        return np.trunc(x)
    # the ops of their own that share this pattern (MATH_CODES), p0 the op's scalar
    if code == 22:   # SQR
        return x * x
    if code == 23:   # SQRT (NaN below zero)
        return math.sqrt(x) if x >= zero else np.float32(np.nan)
    if code == 24:   # LOG (-inf at zero, NaN below)
        if x > zero:
            return math.log(x)
        return -np.float32(np.inf) if x == zero else np.float32(np.nan)
    if code == 25:   # SIN
        return math.sin(x)
    if code == 26:   # COS
        return math.cos(x)
    if code == 27:   # LEAKY_RELU: the positive part plus p0 times the negative part
        return (x if x > zero else zero) + p0 * (x if x < zero else zero)
    return x + p0    # 28 ADD1: p0 is src1's one value


#: ``activation`` codes of the ops that are not UNARY sub-ops but compute one value from one
#: (spec/ops/elementwise.md): the same kernel, past the end of ``UnaryOp``.
MATH_CODES = {Op.SQR: 22, Op.SQRT: 23, Op.LOG: 24, Op.SIN: 25, Op.COS: 26, Op.LEAKY_RELU: 27,
              Op.ADD1: 28}


@sized_kernel(0, cache=True, nogil=True)
def unary_f32(a, out, code, table, simd, p0, p1, p2, p3):
    """out = activation(a) over 4-D float32 arrays of one shape.

    With ``simd`` (F32 tensors), SILU takes ggml's AVX2 path: whole groups of eight from the
    start of each row through :func:`.numeric.vsilu_f32`, the rest of the row through libm.
    """
    n3, n2, n1, n0 = out.shape
    n8 = n0 - n0 % 8 if simd and code == 10 else 0
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        for i0 in range(n8):
            out[i3, i2, i1, i0] = vsilu_f32(a[i3, i2, i1, i0])
        for i0 in range(n8, n0):
            out[i3, i2, i1, i0] = activation(code, a[i3, i2, i1, i0], table, p0, p1, p2, p3)


@sized_kernel(2, cache=True, nogil=True)
def glu_f32(x, g, out, code, table, simd, alpha, limit):
    """out = act(x) * g for the GLU ops (``GluOp`` code); x, g, out share one shape.

    With ``simd`` (F32 tensors), SWIGLU takes ggml's AVX2 path: groups of eight from the start
    of each row through :func:`.numeric.vsilu_f32`, the rest of the row through libm.
    """
    n3, n2, n1, n0 = out.shape
    one = np.float32(1.0)
    n8 = n0 - n0 % 8 if simd and code == 2 else 0
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        for i0 in range(n8):
            out[i3, i2, i1, i0] = vsilu_f32(x[i3, i2, i1, i0]) * g[i3, i2, i1, i0]
        for i0 in range(n8, n0):
            a = x[i3, i2, i1, i0]
            b = g[i3, i2, i1, i0]
            if code == 0:      # REGLU
                v = a * b if a > 0 else np.float32(0.0)
            elif code == 1:    # GEGLU (F32: exactly +0 below -10, x*g above 10)
                if table == 2 and a <= np.float32(-10.0):
                    v = np.float32(0.0)
                else:
                    v = activation(8, a, table, 0, 0, 0, 0) * b
            elif code == 2:    # SWIGLU
                v = a / (one + math.exp(-a)) * b
            elif code == 3:    # SWIGLU_OAI
                a = min(a, limit)
                b = min(max(b, -limit), limit)
                v = a / (one + math.exp(alpha * (-a))) * (b + one)
            elif code == 4:    # GEGLU_ERF
                v = activation(16, a, table, 0, 0, 0, 0) * b
            elif code == 5:    # GEGLU_QUICK
                v = activation(9, a, table, 0, 0, 0, 0) * b
            else:              # SWIGLU_CLAMP
                a = min(a, limit)
                b = min(max(b, -limit), limit)
                v = a / (one + math.exp(-a)) * b
            out[i3, i2, i1, i0] = v


@sized_kernel(0, cache=True, nogil=True)
def scale_f32(a, out, s, b):
    """out = a * s + b in one rounding (a fused multiply-add); with b == 0, ggml multiplies
    only, which keeps the sign of a zero product."""
    n3, n2, n1, n0 = out.shape
    s = np.float32(s)
    b = np.float32(b)
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        if b == np.float32(0.0):
            for i0 in range(n0):
                out[i3, i2, i1, i0] = a[i3, i2, i1, i0] * s
        else:
            for i0 in range(n0):
                out[i3, i2, i1, i0] = fma32(a[i3, i2, i1, i0], s, b)


# -- numpy oracles ----------------------------------------------------------------------------

def _half(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float64)


def reference_unary(code: int, x: np.ndarray, table: bool, params=(0.0, 0.0, 0.0, 0.0)) -> np.ndarray:
    """Numpy oracle of one unary op in float64 (with the F16 table rounding when ``table``)."""
    erf = np.vectorize(math.erf, otypes=[np.float64])
    x = np.asarray(x, np.float64)
    gelu = lambda v: 0.5 * v * (1 + np.tanh(_SQRT_2_OVER_PI * v * (1 + _GELU_COEF_A * v * v)))
    quick = lambda v: v / (1 + np.exp(_GELU_QUICK_COEF * v))
    u = UnaryOp(code)
    with np.errstate(all="ignore"):
        if u is UnaryOp.GELU:
            if table:
                return np.where(x <= -10, 0.0, np.where(x >= 10, x, _half(gelu(_half(x)))))
            return gelu(x)
        if u is UnaryOp.GELU_QUICK:
            return _half(quick(_half(x))) if table else quick(x)
        an, ap, beta, eps = params
        return {
            UnaryOp.ABS: np.abs, UnaryOp.SGN: np.sign, UnaryOp.NEG: np.negative,
            UnaryOp.STEP: lambda v: (v > 0).astype(np.float64), UnaryOp.TANH: np.tanh,
            UnaryOp.ELU: lambda v: np.where(v > 0, v, np.expm1(v)),
            UnaryOp.RELU: lambda v: np.maximum(v, 0), UnaryOp.SIGMOID: lambda v: 1 / (1 + np.exp(-v)),
            UnaryOp.SILU: lambda v: v / (1 + np.exp(-v)),
            UnaryOp.HARDSWISH: lambda v: v * np.clip((v + 3) / 6, 0, 1),
            UnaryOp.HARDSIGMOID: lambda v: np.clip((v + 3) / 6, 0, 1), UnaryOp.EXP: np.exp,
            UnaryOp.EXPM1: lambda v: np.exp(v) - 1,
            UnaryOp.SOFTPLUS: lambda v: np.where(v > 20, v, np.log1p(np.exp(v))),
            UnaryOp.GELU_ERF: lambda v: 0.5 * v * (1 + erf(v * _SQRT_2_INV)),
            UnaryOp.XIELU: lambda v: np.where(v > 0, ap * v * v + beta * v,
                                              (np.expm1(np.minimum(v, eps)) - v) * an + beta * v),
            UnaryOp.FLOOR: np.floor, UnaryOp.CEIL: np.ceil,
            UnaryOp.ROUND: lambda v: np.sign(v) * np.floor(np.abs(v) + 0.5),
            UnaryOp.TRUNC: np.trunc,
        }[u](x)


def reference_glu(code: int, x: np.ndarray, g: np.ndarray, table: bool, alpha=0.0, limit=0.0):
    """Numpy oracle of one GLU op in float64."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    op = GluOp(code)
    with np.errstate(all="ignore"):
        if op is GluOp.REGLU:
            return np.maximum(x, 0) * g
        if op is GluOp.GEGLU:
            return reference_unary(UnaryOp.GELU, x, table) * g
        if op is GluOp.SWIGLU:
            return x / (1 + np.exp(-x)) * g
        if op is GluOp.GEGLU_ERF:
            return reference_unary(UnaryOp.GELU_ERF, x, table) * g
        if op is GluOp.GEGLU_QUICK:
            return reference_unary(UnaryOp.GELU_QUICK, x, table) * g
        x = np.minimum(x, limit)
        g = np.clip(g, -limit, limit)
        if op is GluOp.SWIGLU_OAI:
            return x / (1 + np.exp(-alpha * x)) * (g + 1)
        return x / (1 + np.exp(-x)) * g


# -- op implementations -----------------------------------------------------------------------

def _uses_table(t: int) -> int:
    """``activation``'s table mode for a tensor type."""
    return {GgmlType.F32: 2, GgmlType.F16: 1}.get(t, 0)


def _run_into(node: Node, compute, *inputs) -> None:
    """Call ``compute(out)`` writing straight into an F32 dst when nothing else aliases it."""
    if node.type == GgmlType.F32 and not any(np.may_share_memory(view(node), i) for i in inputs[1:]):
        compute(view(node))
    else:
        out = np.empty((node.ne[3], node.ne[2], node.ne[1], node.ne[0]), np.float32)
        compute(out)
        store_f32(node, out)





def _bind_map(node: Node, code: int, params=(0.0, 0.0, 0.0, 0.0), scalar: Node | None = None):
    """A runner computing ``activation(code)`` of every element of src0 into dst (any of the
    float types ggml pairs, converted at the edges); with ``scalar``, p0 is that one-element
    tensor's value, read at each run (ADD1)."""
    a = node.src[0]
    table = _uses_table(node.type) if a.type == node.type else 0
    simd = node.type == GgmlType.F32 and a.type == node.type
    ps = [np.float32(p) for p in params]

    def run():
        av = load_f32(a)
        if scalar is not None:
            ps[0] = load_f32(scalar).reshape(-1)[0]
        _run_into(node, lambda out: unary_f32(av, out, code, table, simd, *ps), av)
    return run


@kernel("cpu", Op.UNARY)
def bind_unary_ops(node: Node):
    """UNARY: op_params[0] selects the function (``UnaryOp``): the CPU runner of a validated
    node."""
    code = node.param_i32(0)
    ps = [node.param_f32(i) for i in (1, 2, 3, 4)] if code == UnaryOp.XIELU else [0.0] * 4
    return _bind_map(node, code, ps)


@kernel("cpu", *MATH_CODES)
def bind_math_ops(node: Node):
    """SQR, SQRT, LOG, SIN, COS, LEAKY_RELU (slope in op_params[0]) and ADD1 (src1's one
    value added): the CPU runner of a validated node, through ``unary_f32``."""
    if node.op == Op.ADD1 and node.type in QUANTIZE_TYPES:
        return _bind_add1_quantized(node)
    code = MATH_CODES[Op(node.op)]
    slope = node.param_f32(0) if node.op == Op.LEAKY_RELU else 0.0
    scalar = node.src[1] if node.op == Op.ADD1 else None
    return _bind_map(node, code, (slope, 0.0, 0.0, 0.0), scalar)


def _bind_add1_quantized(node: Node):
    """ADD1 on a block-format src0, as ggml-cpu computes it: each row dequantised, the value
    added in float32, and the row quantised into dst (``from_float``, :func:`.quantize.
    quantize_into`)."""
    a, b = node.src[0], node.src[1]
    k = node.ne[0]
    src_rows, dst_rows = rows_u8(a), rows_u8(node)
    width = dst_rows.shape[-1]

    def run():
        v = load_f32(b).reshape(-1)[0]
        x = dequantize_rows(a.type, src_rows, k).reshape(-1, k) + v
        out = np.empty((x.shape[0], width), np.uint8)
        quantize_into(node.type, np.ascontiguousarray(x, np.float32), out)
        dst_rows[...] = out.reshape(dst_rows.shape)
    return run


@kernel("cpu", Op.GLU)
def bind_glu_ops(node: Node):
    """GLU: ``act(x) * g`` with x and g the two halves of src0 (op_params[1] swaps them) or: the
    CPU runner of a validated node."""
    a, b = node.src[0], node.src[1]
    code = node.param_i32(0)
    swapped = node.param_i32(1) != 0
    alpha, limit = np.float32(node.param_f32(2)), np.float32(node.param_f32(3))
    table = _uses_table(node.type)
    nc = node.ne[0]
    simd = node.type == GgmlType.F32
    if simd and a.type == F32 and not overlaps(node, a) and not overlaps(node, b):
        # bound once: float32 views straight into the kernel, nothing made per run
        av, out = view(a), view(node)
        if b is not None:
            x, g = av, view(b)
        else:
            lo, hi = av[..., :nc], av[..., nc:2 * nc]
            x, g = (hi, lo) if swapped else (lo, hi)
        return lambda: glu_f32(x, g, out, code, table, True, alpha, limit)

    def run():
        av = load_f32(a)
        if b is not None:
            x, g = av, load_f32(b)
        else:
            lo, hi = av[..., :nc], av[..., nc:2 * nc]
            x, g = (hi, lo) if swapped else (lo, hi)
        simd = node.type == GgmlType.F32
        _run_into(node, lambda out: glu_f32(x, g, out, code, table, simd, alpha, limit), x, g)
    return run


@kernel("cpu", Op.SCALE)
def bind_scale_op(node: Node):
    """SCALE: ``dst = src0 * s + b`` with s, b in op_params[0], [1] (floats): the CPU runner of
    a validated node."""
    a = node.src[0]
    s, b = node.param_f32(0), node.param_f32(1)

    def run():
        av = load_f32(a)
        _run_into(node, lambda out: scale_f32(av, out, s, b), av)
    return run


def reference_scale(x: np.ndarray, s: float, b: float) -> np.ndarray:
    """Numpy oracle of SCALE in float64."""
    return np.asarray(x, np.float64) * np.float32(s) + np.float32(b)


@sized_kernel(0, cache=True, nogil=True)
def clamp_f32(a, out, lo, hi):
    """out = max(min(a, hi), lo), with ggml's comparisons: a NaN compares false, so it
    becomes hi (then lo, where hi < lo)."""
    n3, n2, n1, n0 = out.shape
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        for i0 in range(n0):
            x = a[i3, i2, i1, i0]
            x = x if x < hi else hi
            out[i3, i2, i1, i0] = x if x > lo else lo


def reference_clamp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Numpy oracle of CLAMP in float64 (NaN becomes hi, as in ggml)."""
    x = np.asarray(x, np.float64)
    with np.errstate(invalid="ignore"):
        x = np.where(x < hi, x, hi)
        return np.where(x > lo, x, lo)


@kernel("cpu", Op.CLAMP)
def bind_clamp(node: Node):
    """CLAMP: lo, hi in op_params[0], [1] (floats): the CPU runner of a validated node."""
    a = node.src[0]
    lo, hi = np.float32(node.param_f32(0)), np.float32(node.param_f32(1))

    def run():
        av = load_f32(a)
        _run_into(node, lambda out: clamp_f32(av, out, lo, hi), av)
    return run


@kernel("cpu", Op.FILL)
def bind_fill(node: Node):
    """FILL: every element set to op_params[0], rounded to dst's type: the CPU runner of a
    validated node."""
    out = view(node)
    with np.errstate(over="ignore"):     # beyond F16's range: infinity, as ggml rounds it
        value = np.float32(node.param_f32(0)).astype(out.dtype)

    def run():
        out[...] = value
    return run


def reference_fill(shape, value: float) -> np.ndarray:
    """Numpy oracle of FILL (float64 values before the destination's rounding)."""
    return np.full(shape, np.float64(np.float32(value)))


__all__ = ["activation", "unary_f32", "glu_f32", "scale_f32", "clamp_f32", "reference_unary",
           "reference_glu", "reference_scale", "reference_clamp", "reference_fill"]
