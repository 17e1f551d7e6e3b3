"""CUDA kernels of the elementwise families (binary, UNARY, GLU, SCALE, RMS_NORM, NORM, CPY,
CONT, DUP) against the same numpy oracles as the CPU kernels, on small shapes."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from refimpl.graph import GluOp, Op, UnaryOp
from refimpl.kernels import binary, norm, unary
from refimpl.kernels.copy import reference as copy_reference
from refimpl.protocol import GgmlType as T

from ..kernels.test_quants import GGUF_TYPE, random_rows
from .graphs import CudaGraphBuilder

FLOAT = [T.F32, T.F16, T.BF16]
TOL = {T.F32: 2e-6, T.F16: 2e-3, T.BF16: 1.6e-2}


def close(out, want, type_, atol=1e-6):
    np.testing.assert_allclose(out, want, rtol=TOL[type_], atol=atol + TOL[type_] * 1e-3)


@pytest.mark.parametrize("op", [Op.ADD, Op.SUB, Op.MUL, Op.DIV])
@pytest.mark.parametrize("ta,tb", [(T.F32, T.F32), (T.F16, T.F32), (T.BF16, T.BF16),
                                   (T.F32, T.F16)])
def test_binary_broadcast(cuda_device, op, ta, tb):
    rng = np.random.default_rng(1)
    g = CudaGraphBuilder(cuda_device)
    a = g.input(ta, (6, 2, 2, 2), rng.standard_normal((2, 2, 2, 6)))
    b = g.input(tb, (3, 1, 2, 1), rng.uniform(0.5, 2, (1, 2, 1, 3)))
    s = g.node(op, ta, a.ne, [a, b])
    g.run()
    close(g.read(s), binary.reference(op, g.read(a), g.read(b)), ta)


def test_binary_in_place_and_transposed_source(cuda_device):
    rng = np.random.default_rng(2)
    g = CudaGraphBuilder(cuda_device)
    x = rng.standard_normal((1, 1, 4, 6)).astype(np.float32)
    a = g.input(T.F32, (6, 4), x)
    base = g.input(T.F32, (4, 6), rng.standard_normal((1, 1, 6, 4)))
    bt = g.view(base, (6, 4, 1, 1), (base.nb[1], base.nb[0], base.nb[2], base.nb[3]),
                op=Op.TRANSPOSE)
    s = g.node(Op.ADD, T.F32, (6, 4), [a, bt], inplace_of=a)
    want = x + g.read(base)[0, 0].T[None, None]
    g.run()
    close(g.read(s), want, T.F32)


UNARY_CASES = [u for u in UnaryOp]


@pytest.mark.parametrize("code", UNARY_CASES, ids=[u.name for u in UNARY_CASES])
def test_unary(cuda_device, code):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(12) * 3, [0.0, -0.0, 2.5, -2.5]]).astype(np.float32)
    params = [0.0] * 5
    if code == UnaryOp.XIELU:
        params = [int(code), 0.8, 0.5, 0.5, -1e-6]
    else:
        params = [int(code)]
    for t in (T.F32, T.F16):
        g = CudaGraphBuilder(cuda_device)
        a = g.input(t, (16,), x)
        u = g.node(Op.UNARY, t, (16,), [a], params)
        g.run()
        xs = g.read(a)
        ps = tuple(np.float32(p) for p in params[1:5]) if code == UnaryOp.XIELU else (0, 0, 0, 0)
        want = unary.reference_unary(code, xs, False, ps)
        if t == T.F16:
            want = want.astype(np.float16).astype(np.float64)
        close(g.read(u), want, t, atol=1e-5 if t == T.F32 else 1e-3)


@pytest.mark.parametrize("code", list(GluOp), ids=[c.name for c in GluOp])
@pytest.mark.parametrize("split", [False, True])
def test_glu(cuda_device, code, split):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 1, 2, 8)).astype(np.float32) * 2
    gate = rng.standard_normal((1, 1, 2, 8)).astype(np.float32)
    alpha, limit = 1.702, 1.5
    g = CudaGraphBuilder(cuda_device)
    if split:
        a = g.input(T.F32, (8, 2), x)
        b = g.input(T.F32, (8, 2), gate)
        out = g.node(Op.GLU, T.F32, (8, 2), [a, b], [int(code), 0, alpha, limit])
        want = unary.reference_glu(code, x, gate, False, np.float32(alpha), np.float32(limit))
    else:
        a = g.input(T.F32, (16, 2), np.concatenate([x, gate], axis=-1))
        out = g.node(Op.GLU, T.F32, (8, 2), [a], [int(code), 1, alpha, limit])
        want = unary.reference_glu(code, gate, x, False, np.float32(alpha), np.float32(limit))
    g.run()
    close(g.read(out), want, T.F32, atol=1e-5)


@pytest.mark.parametrize("t", FLOAT)
def test_scale(cuda_device, t):
    rng = np.random.default_rng(5)
    g = CudaGraphBuilder(cuda_device)
    a = g.input(t, (5, 3), rng.standard_normal((1, 1, 3, 5)))
    out = g.node(Op.SCALE, t, (5, 3), [a], [0.75, 0.5])
    g.run()
    close(g.read(out), unary.reference_scale(g.read(a), 0.75, 0.5), t)


@pytest.mark.parametrize("op", [Op.RMS_NORM, Op.NORM])
def test_norm(cuda_device, op):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((2, 1, 3, 37)) * 4 + 1).astype(np.float32)
    g = CudaGraphBuilder(cuda_device)
    a = g.input(T.F32, (37, 3, 1, 2), x)
    out = g.node(op, T.F32, a.ne, [a], [1e-5])
    inplace = g.node(op, T.F32, a.ne, [out], [1e-5], inplace_of=out)
    g.run()
    ref = norm.reference_rms_norm if op == Op.RMS_NORM else norm.reference_norm
    close(g.read(inplace), ref(ref(x, 1e-5), 1e-5), T.F32, atol=2e-5)


@pytest.mark.parametrize("src,dst", [(T.F32, T.F16), (T.F16, T.F32), (T.F32, T.BF16),
                                     (T.BF16, T.F32), (T.F32, T.F32), (T.I32, T.F32),
                                     (T.F32, T.I32), (T.I32, T.I32)])
def test_cpy_conversions_between_layouts(cuda_device, src, dst):
    rng = np.random.default_rng(7)
    vals = rng.integers(-50, 50, (1, 2, 3, 4)).astype(np.float32) + 0.25 * (src != T.I32)
    g = CudaGraphBuilder(cuda_device)
    base = g.input(src, (4, 3, 2), vals)
    perm = g.view(base, (3, 4, 2, 1), (base.nb[1], base.nb[0], base.nb[2], base.nb[3]),
                  op=Op.PERMUTE)
    target = g.input(dst, (6, 4))
    out = g.node(Op.CPY, dst, (6, 4), [perm, target], inplace_of=target)
    cont = g.node(Op.CONT, src, perm.ne, [perm])
    g.run()
    values = np.ascontiguousarray(g.read(base)[0].transpose(0, 2, 1))   # perm's logical order
    want = copy_reference(values, (1, 1, 4, 6))
    if dst == T.I32:
        want = want.astype(np.int32)
    got = g.read(out)
    if dst == T.BF16:
        close(got, want, T.BF16)
    else:
        np.testing.assert_allclose(got, want.astype(np.float32) if dst != T.I32 else want,
                                   rtol=TOL.get(dst, 0))
    np.testing.assert_array_equal(g.read(cont).reshape(-1), values.reshape(-1).astype(g.read(cont).dtype))


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K])
def test_cpy_block_rows_and_dequantisation(cuda_device, qt):
    rng = np.random.default_rng(8)
    bs = 32 if qt in (T.Q4_0, T.Q8_0) else 256
    raw = random_rows(rng, int(qt), 3, bs)
    g = CudaGraphBuilder(cuda_device)
    a = g.input(qt, (bs, 3), raw)
    same = g.node(Op.CONT, qt, (bs, 3), [a])
    target = g.input(T.F32, (bs, 3))
    deq = g.node(Op.CPY, T.F32, (bs, 3), [a, target], inplace_of=target)
    g.run()
    np.testing.assert_array_equal(g.raw(same), raw.reshape(-1))
    want = gguf_dequantize(raw, GGUF_TYPE[int(qt)]).reshape(1, 1, 3, bs)
    np.testing.assert_array_equal(g.read(deq), want.astype(np.float32))
