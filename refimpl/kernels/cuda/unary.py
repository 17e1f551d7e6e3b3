"""UNARY, GLU and SCALE on CUDA (spec/ops/unary.md).

One thread per destination element, float32 arithmetic with the GPU's math functions.  Unlike
ggml's CPU backend, GELU and GELU_QUICK evaluate their formula for every type (no F16 lookup
table), which is what ggml's CUDA backend does too; the oracles' ``table=False`` mode.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ...graph.ops import Op, UnaryOp
from ...graph.registry import kernel
from ._common import (device, hi, is_bf16, launch, ld, lo, reads_safely, runner, st,
                      tables, targ, unravel)

_SQRT_2_OVER_PI = 0.79788456080286535587989211986876
_GELU_COEF_A = 0.044715
_GELU_QUICK_COEF = -1.702
_SQRT_2_INV = 0.70710678118654752440084436210484
_BIG = 8388608.0  # 2**23: float32 values this large are integers


@device
def _floor(x):
    if not abs(x) < _BIG:           # large, infinite or NaN: already its own floor
        return x
    r = np.float32(math.floor(x))
    return math.copysign(r, x) if r == 0 else r


@device
def _gelu(x):
    return np.float32(0.5) * x * (np.float32(1.0) + math.tanh(
        np.float32(_SQRT_2_OVER_PI) * x * (np.float32(1.0) + np.float32(_GELU_COEF_A) * x * x)))


@device
def _gelu_quick(x):
    return x * (np.float32(1.0) / (np.float32(1.0) + math.exp(np.float32(_GELU_QUICK_COEF) * x)))


@device
def activation(code, x, p0, p1, p2, p3):
    """One unary op (``UnaryOp`` code) on a float32 value; p0..p3 are XIELU's parameters."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    if code == 0:
        return abs(x)
    if code == 1:
        return one if x > zero else (-one if x < zero else zero)
    if code == 2:
        return -x
    if code == 3:
        return one if x > zero else zero
    if code == 4:
        return np.float32(math.tanh(x))
    if code == 5:
        return x if x > zero else np.float32(math.expm1(x))
    if code == 6:
        return x if x > zero else zero
    if code == 7:
        return one / (one + np.float32(math.exp(-x)))
    if code == 8:
        return _gelu(x)
    if code == 9:
        return _gelu_quick(x)
    if code == 10:
        return x / (one + np.float32(math.exp(-x)))
    if code == 11:
        return x * lo(one, hi(zero, (x + np.float32(3.0)) / np.float32(6.0)))
    if code == 12:
        return lo(one, hi(zero, (x + np.float32(3.0)) / np.float32(6.0)))
    if code == 13:
        return np.float32(math.exp(x))
    if code == 14:
        return np.float32(math.exp(x)) - one
    if code == 15:
        return x if x > np.float32(20.0) else np.float32(math.log(one + np.float32(math.exp(x))))
    if code == 16:
        return np.float32(0.5) * x * (one + np.float32(math.erf(x * np.float32(_SQRT_2_INV))))
    if code == 17:
        if x > zero:
            return p1 * x * x + p2 * x
        return (np.float32(math.expm1(lo(x, p3))) - x) * p0 + p2 * x
    if code == 18:
        return _floor(x)
    if code == 19:
        return -_floor(-x)
    if code == 20:
        return math.copysign(_floor(abs(x) + np.float32(0.5)), x) if abs(x) < _BIG else x
    return math.copysign(_floor(abs(x)), x)


@cuda.jit
def unary_kernel(code, n0, n1, n2, n3, a, ao, as0, as1, as2, as3, abf,
                 d, do, ds0, ds1, ds2, ds3, dbf, bft, p0, p1, p2, p3, s, bias):
    n = n0 * n1 * n2 * n3
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        i0, i1, i2, i3 = unravel(i, n0, n1, n2)
        x = ld(a, ao + i0 * as0 + i1 * as1 + i2 * as2 + i3 * as3, abf, bft)
        if code < 0:           # SCALE
            v = x * s if bias == 0 else cuda.fma(x, s, bias)
        else:
            v = activation(code, x, p0, p1, p2, p3)
        st(d, do + i0 * ds0 + i1 * ds1 + i2 * ds2 + i3 * ds3, v, dbf)


@cuda.jit
def glu_kernel(code, n0, n1, n2, n3, x, xo, xs0, xs1, xs2, xs3,
               g, go, gs0, gs1, gs2, gs3, bf, d, do, ds0, ds1, ds2, ds3, bft, alpha, limit):
    n = n0 * n1 * n2 * n3
    one = np.float32(1.0)
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        i0, i1, i2, i3 = unravel(i, n0, n1, n2)
        a = ld(x, xo + i0 * xs0 + i1 * xs1 + i2 * xs2 + i3 * xs3, bf, bft)
        b = ld(g, go + i0 * gs0 + i1 * gs1 + i2 * gs2 + i3 * gs3, bf, bft)
        if code == 0:
            v = a * b if a > 0 else np.float32(0.0)
        elif code == 1:
            v = _gelu(a) * b
        elif code == 2:
            v = a / (one + np.float32(math.exp(-a))) * b
        elif code == 3:
            a = lo(a, limit)
            b = lo(hi(b, -limit), limit)
            v = a / (one + np.float32(math.exp(alpha * (-a)))) * (b + one)
        elif code == 4:
            v = activation(16, a, 0.0, 0.0, 0.0, 0.0) * b
        elif code == 5:
            v = _gelu_quick(a) * b
        else:
            a = lo(a, limit)
            b = lo(hi(b, -limit), limit)
            v = a / (one + np.float32(math.exp(-a))) * b
        st(d, do + i0 * ds0 + i1 * ds1 + i2 * ds2 + i3 * ds3, v, bf)


def _unary_like(node, code, ps, s, bias):
    a = node.src[0]
    f32 = np.float32

    def run():
        n = node.nelements
        if not n:
            return
        _, bft = tables(node.buffer.memory.device)
        ta = targ(a, snapshot=not reads_safely(node, a))
        blocks, threads = launch(n)
        unary_kernel[blocks, threads](code, *node.ne, *ta, is_bf16(a), *targ(node),
                                      is_bf16(node), bft, *[f32(p) for p in ps], f32(s), f32(bias))
    return runner(node, run)


@kernel("cuda", Op.UNARY)
def bind_unary(node):
    if node.type != node.src[0].type:     # F16/BF16 widened into F32: CPU only
        return None
    code = node.param_i32(0)
    ps = [node.param_f32(i) for i in (1, 2, 3, 4)] if code == UnaryOp.XIELU else [0.0] * 4
    return _unary_like(node, code, ps, 1.0, 0.0)


@kernel("cuda", Op.SCALE)
def bind_scale(node):
    return _unary_like(node, -1, [0.0] * 4, node.param_f32(0), node.param_f32(1))


@kernel("cuda", Op.GLU)
def bind_glu(node):
    a, b = node.src[0], node.src[1]
    code = node.param_i32(0)
    swapped = node.param_i32(1) != 0
    alpha, limit = np.float32(node.param_f32(2)), np.float32(node.param_f32(3))
    nc = node.ne[0]

    def run():
        n = node.nelements
        if not n:
            return
        _, bft = tables(node.buffer.memory.device)
        ta = targ(a, snapshot=not reads_safely(node, a, elementwise=b is not None))
        if b is not None:
            tx, tg = ta, targ(b, snapshot=not reads_safely(node, b))
        else:
            hi = (ta[0], ta[1] + nc * ta[2]) + ta[2:]
            tx, tg = (hi, ta) if swapped else (ta, hi)
        blocks, threads = launch(n)
        glu_kernel[blocks, threads](code, *node.ne, *tx, *tg, is_bf16(node), *targ(node), bft,
                                    alpha, limit)
    return runner(node, run)
