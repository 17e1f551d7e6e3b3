"""Every op on the llama path other than MUL_MAT against ggml's own CPU backend (the peer
build's libggml-cpu, run in process through tools.ggml_cpu_ops), judged by the numerics
contract of spec/numerics.md: NaN and infinities where ggml has them, and the NMSE within the
bound test-backend-ops gives the op (tools.contract).  SOFT_MAX, the UNARY and GLU
activations, RMS_NORM and NORM, SCALE, the binary ops, ROPE in every mode, FLASH_ATTN_EXT on
both of ggml's paths, SET_ROWS and CPY.  Rows of 8k, 8k+1 .. 8k+7 elements exercise ggml's
8-lane SIMD groups and their scalar tails; ggml runs with 1 and 2 threads.

The oracle is built for the host (-march=native), so its last bits differ between hosts (AVX2
or AVX-512): nothing here compares bits.
"""

from __future__ import annotations

import numpy as np
import pytest

from refimpl.graph import Op
from refimpl.graph.ops import GluOp, UnaryOp
from refimpl.kernels import flash_attn
from refimpl.kernels.quantize import quantize_into, row_bytes
from refimpl.kernels.quantize import reference as _quantize_oracle
from refimpl.kernels.rope import MODE_IMROPE, MODE_MROPE, MODE_NEOX, MODE_NORMAL, MODE_VISION
from refimpl.protocol import GgmlType as T
from tools.contract import assert_op_within_contract
from tools.ggml_cpu_ops import GgmlCpu
from tools.graphs import GraphBuilder

pytestmark = pytest.mark.peer

ROW_LENGTHS = [5, 8, 32, 37, 256, 1003, 4099]


@pytest.fixture(scope="module")
def cpu(peer_bin) -> GgmlCpu:
    return GgmlCpu(peer_bin)


def run_ours(op, type_, ne, inputs, params=None):
    """One node over fresh inputs ((values, type) pairs, or (bytes, type, ne) for a block
    format; None for an absent source)."""
    g = GraphBuilder(64 << 20)
    srcs = [None if x[0] is None else g.input(x[1], x[2] if len(x) > 2 else x[0].shape[::-1], x[0])
            for x in inputs]
    while srcs and srcs[-1] is None:
        srcs.pop()
    out = g.node(op, type_, ne, srcs, params=params)
    g.run()
    return g.read(out)


# -- SOFT_MAX ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n0", ROW_LENGTHS)
@pytest.mark.parametrize("mask,scale,max_bias,sinks,threads", [
    (None, 1.0, 0.0, False, 1),
    (T.F16, 0.125, 0.0, False, 2),
    (T.F32, 0.37, 5.0, True, 2),     # non-power-of-two ALiBi slopes: the mask term is fused
    (T.F16, 0.37, 3.0, False, 1),
])
def test_soft_max(cpu, n0, mask, scale, max_bias, sinks, threads):
    rng = np.random.default_rng(n0)
    x = (rng.standard_normal((2, 6, 5, n0)) * 3).astype(np.float32)
    m = sk = None
    if mask is not None:
        m = rng.uniform(-2, 2, (1, 1, 5, n0)).astype(np.float32)
        m[rng.random(m.shape) < 0.2] = -np.inf
        m[..., 0] = 0.0
    if sinks:
        sk = rng.uniform(-3, 3, 6).astype(np.float32)
    with cpu.graph() as g:
        out = g.call("ggml_soft_max_ext", g.tensor(x), None if m is None else g.tensor(m, mask),
                     scale, max_bias)
        if sinks:
            g.call("ggml_soft_max_add_sinks", out, g.tensor(sk))
        want = g.compute(out, threads)
    got = run_ours(Op.SOFT_MAX, T.F32, x.shape[::-1], [(x, T.F32), (m, mask), (sk, T.F32)],
                   [scale, max_bias])
    assert_op_within_contract(got, want, "SOFT_MAX")


# -- UNARY, GLU, SCALE, binary ops ------------------------------------------------------------

@pytest.mark.parametrize("n0", [5, 37, 1003])
@pytest.mark.parametrize("type_", [T.F32, T.F16, T.BF16])
@pytest.mark.parametrize("code", [u for u in UnaryOp if u is not UnaryOp.XIELU])
def test_unary(cpu, code, type_, n0):
    rng = np.random.default_rng(n0)
    x = (rng.standard_normal((2, 3, n0)) * 3).astype(np.float32)
    x[0, 0, :4] = [-12.0, 11.0, -0.25, 0.0]        # GELU's table bounds, signed zeros
    with cpu.graph() as g:
        want = g.compute(g.call("ggml_unary", g.tensor(x, type_), int(code)), 2)
    got = run_ours(Op.UNARY, type_, x.shape[::-1], [(x, type_)], [int(code)])
    assert_op_within_contract(got, want, "UNARY")


@pytest.mark.parametrize("type_", [T.F32, T.F16])
def test_xielu(cpu, type_):
    x = (np.random.default_rng(1).standard_normal((2, 3, 1003)) * 3).astype(np.float32)
    with cpu.graph() as g:
        out = g.call("ggml_xielu", g.tensor(x, type_), 0.8, 0.6, 0.5, -1e-6)
        want = g.compute(out, 1)
        params = [int(UnaryOp.XIELU)] + g.op_params_f32(out, 1, 5)
    got = run_ours(Op.UNARY, type_, x.shape[::-1], [(x, type_)], params)
    assert_op_within_contract(got, want, "UNARY")


@pytest.mark.parametrize("n0", [5, 8, 37, 1003])
# ggml has SWIGLU_OAI for F32 only and SWIGLU_CLAMP for F32 and F16 only
@pytest.mark.parametrize("code,type_", [
    (c, t) for c in GluOp for t in (T.F32, T.F16, T.BF16)
    if not (c == GluOp.SWIGLU_OAI and t != T.F32) and (c, t) != (GluOp.SWIGLU_CLAMP, T.BF16)])
def test_glu_split(cpu, code, type_, n0):
    rng = np.random.default_rng(n0 + int(code))
    x = (rng.standard_normal((2, 3, n0)) * 3).astype(np.float32)
    y = (rng.standard_normal((2, 3, n0)) * 3).astype(np.float32)
    x[0, 0, :3] = [-12.0, 11.0, 0.0]
    alpha, limit = 0.0, 0.0
    with cpu.graph() as g:
        a, b = g.tensor(x, type_), g.tensor(y, type_)
        if code == GluOp.SWIGLU_OAI:
            alpha, limit = 1.702, 7.0
            out = g.call("ggml_swiglu_oai", a, b, alpha, limit)
        elif code == GluOp.SWIGLU_CLAMP:
            limit = 2.5
            out = g.call("ggml_swiglu_clamp", a, b, limit)
        else:
            out = g.call("ggml_glu_split", a, b, int(code))
        want = g.compute(out, 2)
    got = run_ours(Op.GLU, type_, x.shape[::-1], [(x, type_), (y, type_)],
                   [int(code), 0, alpha, limit])
    assert_op_within_contract(got, want, "GLU")


@pytest.mark.parametrize("swapped", [False, True])
@pytest.mark.parametrize("code", [GluOp.SWIGLU, GluOp.GEGLU, GluOp.REGLU])
def test_glu_halves(cpu, code, swapped):
    x = (np.random.default_rng(3).standard_normal((2, 3, 2 * 1003)) * 3).astype(np.float32)
    with cpu.graph() as g:
        want = g.compute(g.call("ggml_glu", g.tensor(x), int(code), swapped), 1)
    got = run_ours(Op.GLU, T.F32, (1003, 3, 2), [(x, T.F32)], [int(code), int(swapped)])
    assert_op_within_contract(got, want, "GLU")


@pytest.mark.parametrize("s,b", [(0.37, 0.0), (-2.5, 0.0), (0.37, 1.25), (3.0, -0.5)])
def test_scale(cpu, s, b):
    x = (np.random.default_rng(4).standard_normal((2, 3, 1003)) * 3).astype(np.float32)
    x[0, 0, :3] = [0.0, -0.0, 1e-30]               # b == 0 keeps the sign of a zero product
    with cpu.graph() as g:
        want = g.compute(g.call("ggml_scale_bias", g.tensor(x), s, b), 2)
    got = run_ours(Op.SCALE, T.F32, x.shape[::-1], [(x, T.F32)], [s, b])
    assert_op_within_contract(got, want, "SCALE")


@pytest.mark.parametrize("types", [(T.F32, T.F32), (T.F16, T.F32), (T.F16, T.F16),
                                   (T.BF16, T.BF16), (T.BF16, T.F32)])
@pytest.mark.parametrize("name,op", [("ggml_add", Op.ADD), ("ggml_sub", Op.SUB),
                                     ("ggml_mul", Op.MUL), ("ggml_div", Op.DIV)])
def test_binary(cpu, name, op, types):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 3, 1003)) * 3).astype(np.float32)
    y = (rng.standard_normal((1, 1, 1003)) * 3).astype(np.float32)
    with cpu.graph() as g:
        want = g.compute(g.call(name, g.tensor(x, types[0]), g.tensor(y, types[1])), 2)
    got = run_ours(op, types[0], x.shape[::-1], [(x, types[0]), (y, types[1])])
    assert_op_within_contract(got, want, op.name)


# -- RMS_NORM and NORM ------------------------------------------------------------------------

@pytest.mark.parametrize("n0", ROW_LENGTHS)
@pytest.mark.parametrize("name,op", [("ggml_rms_norm", Op.RMS_NORM), ("ggml_norm", Op.NORM)])
def test_norms(cpu, name, op, n0):
    rng = np.random.default_rng(n0)
    x = (rng.standard_normal((2, 4, n0)) * 3 + 5.0).astype(np.float32)
    for eps, threads in ((1e-5, 1), (1e-6, 2)):
        with cpu.graph() as g:
            want = g.compute(g.call(name, g.tensor(x), eps), threads)
        got = run_ours(op, T.F32, x.shape[::-1], [(x, T.F32)], [eps])
        assert_op_within_contract(got, want, op.name)


# -- ROPE ---------------------------------------------------------------------------------------

YARN = dict(fs=0.25, ef=1.0, af=1.0, n_ctx_orig=4096)


@pytest.mark.parametrize("mode,n0,n_dims,sections", [
    (MODE_NORMAL, 128, 128, None), (MODE_NORMAL, 64, 32, None), (MODE_NEOX, 128, 128, None),
    (MODE_NEOX, 128, 96, None), (MODE_MROPE, 96, 96, (16, 16, 16, 0)),
    (MODE_IMROPE, 96, 96, (16, 16, 16, 0)), (MODE_VISION, 64, 32, (8, 8, 0, 0)),
])
@pytest.mark.parametrize("type_", [T.F32, T.F16])
@pytest.mark.parametrize("yarn,ff", [(False, False), (True, False), (True, True)])
def test_rope(cpu, mode, n0, n_dims, sections, type_, yarn, ff):
    rng = np.random.default_rng(n0 + n_dims + mode)
    n1, n2 = 4, 37
    x = rng.standard_normal((1, n2, n1, n0)).astype(np.float32)
    pos = rng.integers(0, 4096, n2 * (4 if sections else 1)).astype(np.int32)
    n_ff = n0 // 2 if mode == MODE_VISION else n_dims // 2
    ffv = rng.uniform(1, 8, n_ff).astype(np.float32) if ff else None
    fs, ef, af, n_ctx_orig = ((YARN["fs"], YARN["ef"], 1.3, YARN["n_ctx_orig"]) if yarn
                              else (1.0, 0.0, 1.0, 0))
    fb, bf, bs = (500000.0 if ff else 10000.0), 32.0, 1.0
    with cpu.graph() as g:
        a, p = g.tensor(x, type_), g.tensor(pos, T.I32)
        c = g.tensor(ffv) if ff else None
        if sections:
            out = g.call("ggml_rope_multi", a, p, c, n_dims, sections, mode, n_ctx_orig, fb, fs,
                         ef, af, bf, bs)
        else:
            out = g.call("ggml_rope_ext", a, p, c, n_dims, mode, n_ctx_orig, fb, fs, ef, af,
                         bf, bs)
        want = g.compute(out, 2)
    params = [0, n_dims, mode, 0, n_ctx_orig, fb, fs, ef, af, bf, bs,
              *(sections or (0, 0, 0, 0)), 0]
    got = run_ours(Op.ROPE, type_, x.shape[::-1], [(x, type_), (pos, T.I32), (ffv, T.F32)],
                   params)
    assert_op_within_contract(got, want, "ROPE")


# -- FLASH_ATTN_EXT -----------------------------------------------------------------------------

def _ggml_input(g, values, type_, ne=None):
    """A ggml tensor of float ``values``, or of a block format's bytes with shape ``ne``."""
    if ne is None:
        return g.tensor(values, type_)
    t = g.empty(type_, ne)
    g.write(t, values)
    return t


def flash_attn_case(cpu, *, dk, dv, nkv, nq1, nq2=4, nk2=2, nr3=1, kt=T.F16, vt=None,
                    mask=True, max_bias=0.0, softcap=0.0, sinks=False, prec=0, threads=1,
                    seed=0, inf_frac=0.3, causal=False, qscale=1.0):
    """One FLASH_ATTN_EXT node on both sides; refimpl reproduces ggml's split decode for
    ``threads`` threads."""
    vt = kt if vt is None else vt
    rng = np.random.default_rng(seed)
    q = (rng.uniform(-1, 1, (nr3, nq2, nq1, dk)) * qscale).astype(np.float32)
    k = rng.uniform(-1, 1, (nr3, nk2, nkv, dk)).astype(np.float32)
    v = rng.uniform(-1, 1, (nr3, nk2, nkv, dv)).astype(np.float32)
    # a quantised cache arrives as its blocks (what SET_ROWS stored), on both sides
    k_in, v_in = (k, kt), (v, vt)
    if kt in KV_QUANT_TYPES:
        k_in = (quantize_reference(kt, k.reshape(-1, dk)).reshape(-1), kt, (dk, nkv, nk2, nr3))
    if vt in KV_QUANT_TYPES:
        v_in = (quantize_reference(vt, v.reshape(-1, dv)).reshape(-1), vt, (dv, nkv, nk2, nr3))
    m = sk = None
    if mask:
        m = rng.uniform(-1, 1, (1, 1, nq1, nkv)).astype(np.float32)
        if causal:
            m[:] = 0.0
            for i in range(nq1):
                m[0, 0, i, nkv - nq1 + i + 1:] = -np.inf
        else:
            m[rng.random(m.shape) < inf_frac] = -np.inf
    if sinks:
        sk = rng.uniform(-3, 3, nq2).astype(np.float32)
    scale = float(np.float32(1 / np.sqrt(dk)))
    with cpu.graph() as g:
        out = g.call("ggml_flash_attn_ext", g.tensor(q), _ggml_input(g, *k_in), _ggml_input(g, *v_in),
                     None if m is None else g.tensor(m, T.F16), scale, max_bias, softcap)
        if prec:
            g.call("ggml_flash_attn_ext_set_prec", out, prec)
        if sinks:
            g.call("ggml_flash_attn_ext_add_sinks", out, g.tensor(sk))
        want = g.compute(out, threads)
    saved = flash_attn.SPLIT_THREADS
    flash_attn.SPLIT_THREADS = threads
    try:
        got = run_ours(Op.FLASH_ATTN_EXT, T.F32, (dv, nq2, nq1, nr3),
                       [(q, T.F32), k_in, v_in, (m, T.F16), (sk, T.F32)],
                       [scale, max_bias, softcap, prec])
    finally:
        flash_attn.SPLIT_THREADS = saved
    assert_op_within_contract(got, want, "FLASH_ATTN_EXT")


KV_QUANT_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL]


def quantize_reference(code, x):
    """Float rows as blocks of ``code``: refimpl's numpy oracle for the five 32-value formats,
    refimpl's quantiser for the others (each checked against ggml in its own tests)."""
    if code in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        return _quantize_oracle(code, x)
    out = np.zeros((x.shape[0], row_bytes(code, x.shape[1])), np.uint8)
    quantize_into(int(code), np.asarray(x, np.float32), out)
    return out
KV_PAIRS = [(T.F16, T.F16), (T.F32, T.F32), (T.F16, T.F32), (T.BF16, T.BF16), (T.F32, T.F16)]


@pytest.mark.parametrize("kt,vt", KV_PAIRS)
@pytest.mark.parametrize("nq1", [1, 7, 64, 100])   # one-row path below 64 rows, tiled from 64
@pytest.mark.parametrize("dk,dv,nkv", [(64, 64, 100), (37, 37, 130), (128, 128, 64),
                                       (40, 24, 77)])
def test_flash_attn(cpu, kt, vt, nq1, dk, dv, nkv):
    flash_attn_case(cpu, dk=dk, dv=dv, nkv=nkv, nq1=nq1, kt=kt, vt=vt)


@pytest.mark.parametrize("kt,vt", KV_PAIRS)
@pytest.mark.parametrize("nq1", [2, 65])
@pytest.mark.parametrize("extras", [
    dict(max_bias=5.0, sinks=True), dict(softcap=10.0), dict(softcap=30.0, mask=False),
    dict(sinks=True, causal=True, qscale=20.0), dict(max_bias=8.0, softcap=10.0, inf_frac=0.9),
])
def test_flash_attn_options(cpu, kt, vt, nq1, extras):
    flash_attn_case(cpu, dk=80, dv=80, nkv=150, nq1=nq1, kt=kt, vt=vt, threads=2, seed=nq1,
                    **extras)


@pytest.mark.parametrize("seed", range(30))
def test_flash_attn_random(cpu, seed):
    rng = np.random.default_rng(seed)
    kt, vt = [(T.F16, T.F16), (T.F32, T.F32), (T.F16, T.F32), (T.BF16, T.BF16), (T.F32, T.F16),
              (T.BF16, T.F16)][rng.integers(6)]
    nq1 = int(rng.choice([1, 2, 5, 63, 64, 65, 130]))
    dk = int(rng.choice([16, 37, 40, 64, 80, 96, 128, 133]))
    dv = dk if rng.random() < 0.7 else int(rng.choice([16, 24, 64, 100]))
    nkv = int(rng.integers(1, 300))
    gqa, nk2 = int(rng.choice([1, 2, 4])), int(rng.choice([1, 2]))
    mask = bool(rng.random() < 0.8)
    flash_attn_case(
        cpu, dk=dk, dv=dv, nkv=nkv, nq1=nq1, nq2=nk2 * gqa, nk2=nk2,
        nr3=int(rng.choice([1, 2])), kt=kt, vt=vt, mask=mask,
        max_bias=float(rng.choice([0.0, 0.0, 5.0, 8.0])) if mask else 0.0,
        softcap=float(rng.choice([0.0, 0.0, 0.0, 10.0, 30.0])), sinks=bool(rng.random() < 0.4),
        prec=int(rng.choice([0, 10])), threads=int(rng.choice([1, 2])),
        seed=int(rng.integers(1 << 30)), inf_frac=float(rng.choice([0.0, 0.3, 0.9])),
        causal=bool(rng.random() < 0.3) and nkv >= nq1, qscale=float(rng.choice([1.0, 4.0, 20.0])))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("kt", [T.F16, T.F32])
@pytest.mark.parametrize("extras", [dict(), dict(sinks=True, max_bias=5.0),
                                    dict(softcap=30.0, inf_frac=0.95, qscale=20.0)])
def test_flash_attn_split_decode(cpu, kt, threads, extras):
    """One query row over >= 512 keys: ggml cuts the keys into one chunk per thread and merges
    the partial results; with one thread that is exactly the one-row path."""
    flash_attn_case(cpu, dk=128, dv=128, nkv=1000, nq1=1, nq2=8, nk2=2, kt=kt, threads=threads,
                    seed=threads, **extras)


# -- SET_ROWS and CPY -------------------------------------------------------------------------

def _awkward(rng, shape):
    x = (rng.standard_normal(shape) * 1000).astype(np.float32)
    x.reshape(-1)[:6] = [1e-6, -3e-8, 7e4, -7e4, 1e-40, -0.0]   # half subnormals, overflow
    return x


@pytest.mark.parametrize("dst_type", [T.F32, T.F16, T.BF16])
def test_set_rows(cpu, dst_type):
    rng = np.random.default_rng(6)
    dst = (rng.standard_normal((1, 2, 40, 96)) * 100).astype(np.float32)
    rows = _awkward(rng, (1, 2, 7, 96))
    idx = rng.permutation(40)[:7].astype(np.int64)
    with cpu.graph() as g:
        out = g.call("ggml_set_rows", g.tensor(dst, dst_type), g.tensor(rows), g.tensor(idx, T.I64))
        want = g.compute(out, 2)
    gb = GraphBuilder(16 << 20)
    d = gb.input(dst_type, (96, 40, 2, 1), dst)
    out = gb.node(Op.SET_ROWS, dst_type, (96, 40, 2, 1),
                  [gb.input(T.F32, (96, 7, 2, 1), rows), gb.input(T.I64, (7,), idx)], inplace_of=d)
    gb.run()
    assert_op_within_contract(gb.read(out), want, "SET_ROWS")


@pytest.mark.parametrize("src_type", [T.F32, T.F16, T.BF16])
@pytest.mark.parametrize("dst_type", [T.F32, T.F16, T.BF16])
def test_cpy(cpu, src_type, dst_type):
    x = _awkward(np.random.default_rng(7), (2, 40, 96))
    with np.errstate(over="ignore"):
        with cpu.graph() as g:
            want = g.compute(g.call("ggml_cpy", g.tensor(x, src_type),
                                    g.empty(dst_type, (96, 40, 2))), 1)
        gb = GraphBuilder(16 << 20)
        a, b = gb.input(src_type, (96, 40, 2), x), gb.input(dst_type, (96, 40, 2))
    out = gb.node(Op.CPY, dst_type, (96, 40, 2), [a, b], inplace_of=b)
    gb.run()
    assert_op_within_contract(gb.read(out), want, "CPY",
                              same_type_copy=src_type == dst_type)


# -- quantised destinations (a quantised KV cache) --------------------------------------------


@pytest.mark.parametrize("dst_type", KV_QUANT_TYPES, ids=lambda t: T(t).name)
@pytest.mark.parametrize("src_type", [T.F32, T.F16])
def test_set_rows_into_blocks(cpu, dst_type, src_type):
    """SET_ROWS into a quantised cache: every row ggml's ``from_float`` would write, byte for
    byte; rows no index names keep their bytes."""
    rng = np.random.default_rng(int(dst_type))
    dst = (rng.standard_normal((1, 2, 40, 128)) * 3).astype(np.float32)
    rows = (rng.standard_normal((1, 2, 7, 128)) * rng.uniform(0.01, 50, (1, 2, 7, 1))).astype(np.float32)
    rows[0, 0, 0, :5] = [0.0, -0.0, 1e-30, 70000.0, -3.0]
    idx = rng.permutation(40)[:7].astype(np.int32)
    with cpu.graph() as g:
        d = g.empty(dst_type, (128, 40, 2, 1))
        g.write(d, quantize_reference(dst_type, dst.reshape(-1, 128)).reshape(-1))
        out = g.call("ggml_set_rows", d, g.tensor(rows, src_type), g.tensor(idx, T.I32))
        want = g.compute(out, 2)
    gb = GraphBuilder(16 << 20)
    dn = gb.input(dst_type, (128, 40, 2, 1), quantize_reference(dst_type, dst.reshape(-1, 128)))
    before = gb.read(dn)
    out = gb.node(Op.SET_ROWS, dst_type, (128, 40, 2, 1),
                  [gb.input(src_type, (128, 7, 2, 1), rows), gb.input(T.I32, (7,), idx)], inplace_of=dn)
    gb.run()
    got = gb.read(out)
    np.testing.assert_array_equal(got.reshape(-1), want.reshape(-1))
    assert not np.array_equal(got, before)


@pytest.mark.parametrize("dst_type", KV_QUANT_TYPES, ids=lambda t: T(t).name)
@pytest.mark.parametrize("src_type", [T.F32, T.F16, T.BF16])
def test_cpy_into_blocks(cpu, src_type, dst_type):
    """CPY of float rows into a block format, as ggml quantises them, byte for byte."""
    x = (np.random.default_rng(8).standard_normal((2, 6, 64)) * 7).astype(np.float32)
    with cpu.graph() as g:
        want = g.compute(g.call("ggml_cpy", g.tensor(x, src_type), g.empty(dst_type, (64, 6, 2))), 1)
    gb = GraphBuilder(16 << 20)
    a, b = gb.input(src_type, (64, 6, 2), x), gb.input(dst_type, (64, 6, 2))
    out = gb.node(Op.CPY, dst_type, (64, 6, 2), [a, b], inplace_of=b)
    gb.run()
    np.testing.assert_array_equal(gb.read(out).reshape(-1), want.reshape(-1))


@pytest.mark.parametrize("kt,vt", [(t, t) for t in KV_QUANT_TYPES] + [(T.Q8_0, T.F16), (T.F16, T.Q4_0),
                                                                      (T.Q4_1, T.Q5_0),
                                                                      (T.IQ4_NL, T.Q8_0)],
                         ids=lambda t: T(t).name)
@pytest.mark.parametrize("nq1", [1, 7, 70])
def test_flash_attn_quantised_cache(cpu, kt, vt, nq1):
    """A quantised KV cache (``-ctk q8_0 -ctv q8_0 -fa on``, mixed types too): Q meets K in
    K's activation format, V is dequantised and accumulated in float32, as ggml does."""
    flash_attn_case(cpu, dk=128, dv=128, nkv=96, nq1=nq1, kt=kt, vt=vt, sinks=nq1 == 7,
                    seed=int(kt) + 3 * int(vt) + nq1)


@pytest.mark.parametrize("dst_type", [T.IQ4_XS, T.MXFP4, T.NVFP4, T.TQ1_0, T.TQ2_0, T.Q1_0, T.Q2_0],
                         ids=lambda t: T(t).name)
def test_cpy_into_the_other_blocks(cpu, dst_type):
    """CPY of F32 rows into the other formats ggml quantises to, byte for byte."""
    x = (np.random.default_rng(9).standard_normal((2, 3, 256)) * 5).astype(np.float32)
    with cpu.graph() as g:
        want = g.compute(g.call("ggml_cpy", g.tensor(x), g.empty(dst_type, (256, 3, 2))), 1)
    gb = GraphBuilder(16 << 20)
    a, b = gb.input(T.F32, (256, 3, 2), x), gb.input(dst_type, (256, 3, 2))
    out = gb.node(Op.CPY, dst_type, (256, 3, 2), [a, b], inplace_of=b)
    gb.run()
    np.testing.assert_array_equal(gb.read(out).reshape(-1), want.reshape(-1))
