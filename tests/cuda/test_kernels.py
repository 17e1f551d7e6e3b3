"""CUDA kernels of GET_ROWS, SET_ROWS, MUL_MAT, SOFT_MAX, ROPE and FLASH_ATTN_EXT against the
same numpy oracles as the CPU kernels, on small shapes (the simulator runs every CUDA thread
as a Python thread)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from refimpl.graph import GraphInvalid, Op
from refimpl.kernels import quants as Q
from refimpl.kernels.cpu_tensors import bf16_to_f32, f32_to_bf16
from refimpl.kernels.flash_attn import reference as fa_reference
from refimpl.kernels.get_rows import reference as get_rows_reference
from refimpl.kernels.matmul import reference as mm_reference
from refimpl.kernels.rope import MODE_IMROPE, MODE_MROPE, MODE_NEOX, MODE_NORMAL, MODE_VISION
from refimpl.kernels.rope import reference as rope_reference
from refimpl.kernels.set_rows import reference as set_rows_reference
from refimpl.kernels.softmax import reference as softmax_reference
from refimpl.protocol import GgmlType as T

from ..kernels.test_quants import GGUF_TYPE, random_rows
from tools.graphs import GraphBuilder

from .graphs import CudaGraphBuilder

QUANT = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def nmse(got, want):
    want = np.asarray(want, np.float64)
    return float(np.sum((got - want) ** 2) / max(np.sum(want ** 2), 1e-30))


# -- GET_ROWS ---------------------------------------------------------------------------------

@pytest.mark.parametrize("type_", [T.F32, T.F16, T.BF16, T.I32] + QUANT)
def test_get_rows(cuda_device, type_):
    rng = np.random.default_rng(10)
    ne0 = 256 if type_ in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K) else 32
    nrows, a2 = 3, 2
    g = CudaGraphBuilder(cuda_device)
    if type_ in QUANT:
        raw = random_rows(rng, int(type_), nrows * a2, ne0)
        src = g.input(type_, (ne0, nrows, a2), raw)
        vals = gguf_dequantize(raw, GGUF_TYPE[int(type_)]).astype(np.float32)
    elif type_ == T.I32:
        vals = rng.integers(-1000, 1000, (a2 * nrows, ne0))
        src = g.input(type_, (ne0, nrows, a2), vals)
    else:
        src = g.input(type_, (ne0, nrows, a2), rng.standard_normal((a2 * nrows, ne0)))
        vals = g.read(src)
    vals = np.asarray(vals).reshape(1, a2, nrows, ne0)
    idx = np.array([[2, 0], [1, 1]], np.int32).reshape(1, a2, 2)
    ids = g.input(T.I32, (2, a2), idx)
    out = g.node(Op.GET_ROWS, T.I32 if type_ == T.I32 else T.F32, (ne0, 2, a2), [src, ids])
    g.run()
    np.testing.assert_array_equal(g.read(out), get_rows_reference(vals, idx[0][None])
                                  .astype(g.read(out).dtype))


def test_get_rows_index_out_of_range_stops_the_graph(cuda_device):
    g = CudaGraphBuilder(cuda_device)
    src = g.input(T.F32, (4, 3), np.zeros((3, 4)))
    ids = g.input(T.I32, (2,), np.array([1, 3]))
    g.node(Op.GET_ROWS, T.F32, (4, 2), [src, ids])
    with pytest.raises(GraphInvalid, match="row index 3"):
        g.run()


# -- SET_ROWS ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dst_type,src_type,idx_type", [
    (T.F32, T.F32, T.I64), (T.F16, T.F32, T.I32), (T.BF16, T.F16, T.I64), (T.F16, T.F16, T.I32)])
def test_set_rows_last_duplicate_wins(cuda_device, dst_type, src_type, idx_type):
    rng = np.random.default_rng(11)
    g = CudaGraphBuilder(cuda_device)
    before = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    cache = g.input(dst_type, (8, 6, 2), before)
    rows = g.input(src_type, (8, 3, 2), rng.standard_normal((1, 2, 3, 8)))
    idx = np.array([4, 1, 4], np.int64).reshape(1, 1, 1, 3)
    ids = g.input(idx_type, (3, 1), idx)
    before, rv = g.read(cache), g.read(rows)
    out = g.node(Op.SET_ROWS, dst_type, (8, 6, 2), [rows, ids, cache], inplace_of=cache)
    g.run()
    want = set_rows_reference(before, rv, idx)
    if dst_type == T.F16:
        want = want.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(g.read(out), want, rtol=1e-2 if dst_type == T.BF16 else 0)


def test_set_rows_index_out_of_range_stops_the_graph(cuda_device):
    g = CudaGraphBuilder(cuda_device)
    cache = g.input(T.F32, (4, 3))
    rows = g.input(T.F32, (4, 1), np.ones((1, 4)))
    ids = g.input(T.I64, (1,), np.array([3]))
    g.node(Op.SET_ROWS, T.F32, (4, 3), [rows, ids, cache], inplace_of=cache)
    with pytest.raises(GraphInvalid, match="outside"):
        g.run()


# -- MUL_MAT ----------------------------------------------------------------------------------

def _weights(g, rng, type_, k, n, a2):
    if type_ in QUANT:
        raw = random_rows(rng, int(type_), n * a2, k)
        t = g.input(type_, (k, n, a2), raw)
        vals = gguf_dequantize(raw, GGUF_TYPE[int(type_)]).astype(np.float64)
        return t, vals.reshape(1, a2, n, k)
    t = g.input(type_, (k, n, a2), rng.standard_normal((a2 * n, k)))
    return t, g.read(t).astype(np.float64)


@pytest.mark.parametrize("wtype", [T.F32, T.F16, T.BF16] + QUANT)
def test_mul_mat(cuda_device, wtype):
    rng = np.random.default_rng(12)
    k = 256 if wtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K) else 64
    n, t, a2, b2 = 3, 2, 1, 2
    g = CudaGraphBuilder(cuda_device)
    w, wv = _weights(g, rng, wtype, k, n, a2)
    x = g.input(T.F32, (k, t, b2), rng.standard_normal((b2, t, k)))
    out = g.node(Op.MUL_MAT, T.F32, (n, t, b2), [w, x])
    g.run()
    xv = g.read(x).astype(np.float64)
    if wtype in QUANT:
        # block weights see the activations quantised as the CPU device quantises them
        # (numpy oracle of the Q8_0 / Q8_1 / Q8_K rounding)
        vt = Q.VEC_DOT_TYPE[int(wtype)]
        q, d, _ = Q.reference_quantize(g.read(x).reshape(-1, k), vt)
        bs = 32 if vt in (Q.Q8_0, Q.Q8_1) else 256
        xv = (q.reshape(-1, k // bs, bs) * d[:, :, None].astype(np.float64)).reshape(xv.shape)
    elif wtype in (T.F16, T.BF16):  # F32 activations meet F16 / BF16 weights in their type
        if wtype == T.F16:
            rounded = g.read(x).astype(np.float16).astype(np.float32)
        else:
            rounded = bf16_to_f32(f32_to_bf16(g.read(x).ravel())).reshape(xv.shape)
        xv = rounded.astype(np.float64)
    want = mm_reference(wv, xv)
    scale = mm_reference(np.abs(wv), np.abs(xv))
    assert np.all(np.abs(g.read(out) - want) <= 1e-5 * scale + 1e-6)
    # ... and so the CPU device's product (ggml's CPU arithmetic) agrees to float rounding.
    cpu = GraphBuilder(1 << 20)
    cw = cpu.input(wtype, (k, n, a2), g.raw(w) if wtype in QUANT else g.read(w))
    cx = cpu.input(T.F32, (k, t, b2), g.read(x))
    cout = cpu.node(Op.MUL_MAT, T.F32, (n, t, b2), [cw, cx])
    cpu.run()
    # (Q4_1 / Q5_1: ggml uses the F16-rounded Q8_1 block sum for the weights' minimum term)
    rtol = 1e-3 if wtype in (T.Q4_1, T.Q5_1) else 1e-5
    assert np.all(np.abs(g.read(out) - cpu.read(cout)) <= rtol * scale + 1e-6)


@pytest.mark.parametrize("xtype", [T.F16, T.BF16, T.Q8_0])
def test_mul_mat_activation_types_and_transposed_weights_view(cuda_device, xtype):
    rng = np.random.default_rng(13)
    k, n, t = 32, 4, 3
    g = CudaGraphBuilder(cuda_device)
    wtype = T.Q4_0 if xtype == T.Q8_0 else T.F32
    w, wv = _weights(g, rng, wtype, k, n, 1)
    if xtype == T.Q8_0:
        raw = random_rows(rng, int(T.Q8_0), t, k)
        x = g.input(T.Q8_0, (k, t), raw)
        xv = gguf_dequantize(raw, GGUF_TYPE[int(T.Q8_0)]).reshape(1, 1, t, k)
    else:
        x = g.input(xtype, (k, t), rng.standard_normal((t, k)))
        xv = g.read(x)
    out = g.node(Op.MUL_MAT, T.F32, (n, t), [w, x])
    g.run()
    want = mm_reference(wv, xv.astype(np.float64))
    np.testing.assert_allclose(g.read(out), want, rtol=1e-4, atol=1e-4)


def _activation_rows(rng, k):
    """Rows of float32 activations that probe the conversion's edges: ordinary values, a
    zero block, ties of the Q8 rounding (amax 127, halves), NaN, infinity, overflow of the
    F16 scale, and a negative largest magnitude (Q8_K takes the scale's sign from it)."""
    rows = rng.standard_normal((6, k)).astype(np.float32) * 3
    rows[1, :32] = 0                                        # a zero block
    rows[2, :32] = np.arange(32, dtype=np.float32) - 15.5   # halves...
    rows[2, 0] = 127                                        # ...with inv = 1: exact ties
    rows[3, 5] = np.nan
    rows[3, 40] = np.inf
    rows[4, :32] *= 1e7                                     # scale beyond F16's range
    rows[5, 7] = -50                                        # largest magnitude negative
    return rows


def _stored_as(values, xtype):
    """``values`` as src1 of type ``xtype`` stores them (F32, F16 or BF16 bits), and the
    float32 values those stand for."""
    if xtype == T.F16:
        with np.errstate(over="ignore"):
            stored = values.astype(np.float16)
        return stored, stored.astype(np.float32)
    if xtype == T.BF16:
        stored = f32_to_bf16(values.ravel()).reshape(values.shape)
        return stored, bf16_to_f32(stored.ravel()).reshape(values.shape)
    return values, values


@pytest.mark.parametrize("vt", [Q.Q8_0, Q.Q8_1, Q.Q8_K])
@pytest.mark.parametrize("xtype", [T.F32, T.F16, T.BF16])
def test_activation_quantisation_on_the_gpu_is_the_cpus_bit_for_bit(cuda_device, vt, xtype):
    """refimpl/kernels/cuda/_activations.py against quantize_activations (the CPU device's):
    src1 read through strides (a transposed view), in every float type."""
    from numba import cuda
    from refimpl.kernels.cuda._activations import q8_values_kernel
    from refimpl.kernels.cuda._common import launch, tables
    k = 256
    values = _activation_rows(np.random.default_rng(21), k)         # (t = 6, k)
    stored, host = _stored_as(values, xtype)
    # stored transposed: element (k, t) at t + 6 k, so src1's strides are (6, 1, 6 k, 6 k)
    dev = cuda.to_device(np.ascontiguousarray(stored.T).ravel())
    out = cuda.device_array(values.size, np.float32)
    _, bft = tables(cuda_device)
    bs = 256 if vt == Q.Q8_K else 32
    blocks, threads = launch(values.size // bs)
    q8_values_kernel[blocks, threads](vt, k, 6, 1, 1, dev, 0, 6, 1, 6 * k, 6 * k,
                                      xtype == T.BF16, bft, out)
    with np.errstate(all="ignore"):
        want = Q.quantize_activations(host, vt).dequantized().ravel()
    got = out.copy_to_host()
    assert np.array_equal(got, want, equal_nan=True)
    assert np.isnan(want).any() and (want == 0).any()        # the edges were reached


@pytest.mark.parametrize("wtype", [T.F16, T.BF16])
@pytest.mark.parametrize("xtype", [T.F32, T.F16, T.BF16])
def test_activation_rounding_on_the_gpu_is_the_cpus_bit_for_bit(cuda_device, wtype, xtype):
    from numba import cuda
    from refimpl.kernels.cuda._activations import round_kernel
    from refimpl.kernels.cuda._common import launch, tables
    from refimpl.kernels.cpu_tensors import round_to
    values = _activation_rows(np.random.default_rng(22), 64)
    values[0, :4] = [65520.0, -65519.0, 1e-8, 3.0000002]     # F16 overflow, tie, subnormal
    stored, host = _stored_as(values, xtype)
    out_bf16 = wtype == T.BF16
    out = cuda.device_array(values.size, np.uint16 if out_bf16 else np.float16)
    _, bft = tables(cuda_device)
    blocks, threads = launch(values.size)
    round_kernel[blocks, threads](64, 6, 1, 1, cuda.to_device(stored.ravel()), 0, 1, 64, 384,
                                  384, xtype == T.BF16, bft, out, out_bf16)
    got = out.copy_to_host()
    got = bf16_to_f32(got) if out_bf16 else got.astype(np.float32)
    want = round_to(host.reshape(-1, 64), int(wtype)).ravel()
    assert np.array_equal(got, want, equal_nan=True)


def test_mul_mat_q8_k_activations_are_refused_on_cuda(cuda_device):
    g = CudaGraphBuilder(cuda_device)
    w = g.input(T.Q4_K, (256, 2), random_rows(np.random.default_rng(0), int(T.Q4_K), 2, 256))
    x = g.input(T.Q8_K, (256, 1), np.zeros(292, np.uint8))
    g.node(Op.MUL_MAT, T.F32, (2, 1), [w, x])
    with pytest.raises(GraphInvalid, match="no cuda kernel"):
        g.compile()


@pytest.mark.parametrize("wtype", [T.IQ4_NL, T.IQ3_S], ids=lambda t: t.name)
@pytest.mark.parametrize("op", [Op.MUL_MAT, Op.GET_ROWS, Op.CPY])
def test_new_weight_types_are_refused_on_cuda(cuda_device, op, wtype):
    """IQ4_NL (and the other formats of refimpl.kernels.quants_more), IQ3_S (and the other
    codebook formats of refimpl.kernels.quants_grid) run on the CPU only: a CUDA node with
    them is refused at compile time, naming the op."""
    g = CudaGraphBuilder(cuda_device)
    k = 32 if wtype == T.IQ4_NL else 256
    w = g.input(wtype, (k, 2), np.zeros((2, 18 if wtype == T.IQ4_NL else 110), np.uint8))
    if op == Op.MUL_MAT:
        g.node(op, T.F32, (2, 1), [w, g.input(T.F32, (k, 1))])
    elif op == Op.GET_ROWS:
        g.node(op, T.F32, (k, 1), [w, g.input(T.I32, (1,), np.zeros(1, np.int32))])
    else:
        b = g.input(T.F32, (k, 2))
        g.node(op, T.F32, (k, 2), [w, b], inplace_of=b)
    with pytest.raises(GraphInvalid, match="no cuda kernel"):
        g.compile()


# -- SOFT_MAX ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_type,max_bias,sinks", [(None, 0.0, False), (T.F16, 0.0, False),
                                                      (T.F32, 8.0, False), (T.F16, 0.0, True)])
def test_soft_max(cuda_device, mask_type, max_bias, sinks):
    rng = np.random.default_rng(14)
    ne = (10, 3, 4, 1)
    g = CudaGraphBuilder(cuda_device)
    x = g.input(T.F32, ne, rng.standard_normal(ne[::-1]) * 3)
    srcs = [x]
    mv = None
    if mask_type is not None:
        mv = rng.standard_normal((1, 1, 4, 10)).astype(np.float32)
        mv[0, 0, 0, 3:] = -np.inf
        mask = g.input(mask_type, (10, 4), mv)
        mv = g.read(mask)
        srcs.append(mask)
    sv = None
    if sinks:
        sv = rng.standard_normal(4).astype(np.float32)
        srcs.append(g.input(T.F32, (4,), sv))
    out = g.node(Op.SOFT_MAX, T.F32, ne, srcs, params=[0.7, max_bias])
    g.run()
    want = softmax_reference(g.read(x), mv, 0.7, max_bias, sv)
    np.testing.assert_allclose(g.read(out), want, rtol=2e-5, atol=1e-7)


# -- ROPE -------------------------------------------------------------------------------------

def _rope_params(n_dims, mode, fs=1.0, ef=0.0, af=1.0, sections=(0, 0, 0, 0), n_offs=0,
                 n_ctx_orig=0):
    return [0, n_dims, mode, 0, n_ctx_orig, 10000.0, fs, ef, af, 32.0, 1.0, *sections, n_offs]


@pytest.mark.parametrize("mode,type_,yarn,ff,inplace", [
    (MODE_NORMAL, T.F32, False, False, False), (MODE_NEOX, T.F32, True, True, True),
    (MODE_NORMAL, T.F16, True, False, True), (MODE_NEOX, T.F16, False, False, False),
    (MODE_MROPE, T.F32, False, True, False), (MODE_IMROPE, T.F32, True, False, False),
    (MODE_VISION, T.F32, False, False, False)])
def test_rope(cuda_device, mode, type_, yarn, ff, inplace):
    rng = np.random.default_rng(15)
    sections, n_offs = (0, 0, 0, 0), 0
    if mode == MODE_VISION:
        n0, n_dims, sections = 8, 4, (2, 2, 0, 0)
    elif mode in (MODE_MROPE, MODE_IMROPE):
        n0, n_dims, sections = 14, 12, (2, 2, 2, 0)
    else:
        n0, n_dims, n_offs = 12, 8, 2
    ne = (n0, 2, 3, 1)
    g = CudaGraphBuilder(cuda_device)
    x = g.input(type_, ne, rng.uniform(-1, 1, ne[::-1]))
    xvals = g.read(x)
    npos = ne[2] * (4 if mode & MODE_MROPE else 1)
    pos = rng.integers(0, 100, npos)
    srcs = [x, g.input(T.I32, (npos,), pos)]
    n_ff = n0 // 2 if mode == MODE_VISION else n_dims // 2
    ffv = rng.uniform(0.9, 1.1, n_ff).astype(np.float32) if ff else None
    if ffv is not None:
        srcs.append(g.input(T.F32, (n_ff,), ffv))
    fs, ef = (1.4245, 0.7465) if yarn else (1.0, 0.0)
    out = g.node(Op.ROPE, type_, ne, srcs,
                 params=_rope_params(n_dims, mode, fs, ef, 1.0, sections, n_offs, 512 if yarn else 0),
                 inplace_of=x if inplace else None)
    g.run()
    want = rope_reference(xvals, pos, n_dims, mode, 10000.0, fs, ef, 1.0, 32.0, 1.0,
                          512 if yarn else 0, ffv, sections, n_offs)
    tol = 2e-3 if type_ == T.F16 else 1e-4
    np.testing.assert_allclose(g.read(out), want, rtol=tol, atol=tol)


# -- FLASH_ATTN_EXT ---------------------------------------------------------------------------

@pytest.mark.parametrize("kt,vt,mask,sinks,softcap,max_bias", [
    (T.F32, T.F32, False, False, 0.0, 0.0), (T.F16, T.F16, True, False, 0.0, 0.0),
    (T.BF16, T.F16, True, True, 0.0, 0.0), (T.F16, T.F32, True, False, 30.0, 4.0)])
def test_flash_attn_ext(cuda_device, kt, vt, mask, sinks, softcap, max_bias):
    rng = np.random.default_rng(16)
    dk, dv, nq1, nq2, nkv, nk2 = 8, 6, 2, 4, 11, 2
    g = CudaGraphBuilder(cuda_device)
    q = g.input(T.F32, (dk, nq1, nq2), rng.uniform(-1, 1, (nq2, nq1, dk)))
    k = g.input(kt, (dk, nkv, nk2), rng.uniform(-1, 1, (nk2, nkv, dk)))
    v = g.input(vt, (dv, nkv, nk2), rng.uniform(-1, 1, (nk2, nkv, dv)))
    srcs = [q, k, v]
    mv = sv = None
    if mask or sinks:
        mvals = rng.uniform(-1, 1, (1, 1, nq1, nkv)).astype(np.float32)
        mvals[0, 0, 0, 7:] = -np.inf
        mt = g.input(T.F16, (nkv, nq1), mvals)
        srcs.append(mt)
        mv = g.read(mt)
    if sinks:
        sv = rng.standard_normal(nq2).astype(np.float32)
        srcs.append(g.input(T.F32, (nq2,), sv))
    out = g.node(Op.FLASH_ATTN_EXT, T.F32, (dv, nq2, nq1, 1), srcs,
                 params=[0.35, max_bias, softcap, 10])
    g.run()
    want = fa_reference(g.read(q), g.read(k), g.read(v), mv, 0.35, max_bias, softcap, sv)
    got = g.read(out)
    assert np.all(np.isfinite(got))
    assert nmse(got, want) < 1e-9, nmse(got, want)
