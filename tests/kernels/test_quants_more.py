"""The weight formats of refimpl.kernels.quants_more (IQ4_NL, IQ4_XS, MXFP4, NVFP4, TQ1_0,
TQ2_0, Q1_0, Q2_0) and the codebook formats of refimpl.kernels.quants_grid (IQ1_S, IQ1_M,
IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S): dequantisation against the numpy oracles and the gguf
package (bit for bit); GET_ROWS and CPY to F32 against ggml's CPU backend (bit for bit); MUL_MAT against it
within the numerics contract for every kernel (T below and above BLAS_MIN_ROWS, broadcast
batches, pre-quantised activations); the IQ4_NL quantiser against ggml's
``quantize_row_iq4_nl_ref`` (bit for bit) and its numpy oracle."""

from __future__ import annotations

import ctypes as C

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.graph import GraphInvalid, Op
from refimpl.kernels import quants as Q
from refimpl.kernels import quants_grid as G
from refimpl.kernels import quants_more as M
from refimpl.protocol import GgmlType as T
from tools.contract import assert_op_within_contract
from tools.graphs import GraphBuilder

from .test_quants import pack_activations

GRID = [T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S]
TYPES = [T.IQ4_NL, T.IQ4_XS, T.MXFP4, T.NVFP4, T.TQ1_0, T.TQ2_0, T.Q1_0, T.Q2_0] + GRID
GGUF = {M.IQ4_NL: QT.IQ4_NL, M.IQ4_XS: QT.IQ4_XS, M.MXFP4: QT.MXFP4, M.NVFP4: QT.NVFP4,
        M.TQ1_0: QT.TQ1_0, M.TQ2_0: QT.TQ2_0} | {int(t): QT[t.name] for t in GRID}
#: Byte offset of the f16 scale in a block, for the formats that have one (IQ1_M spreads
#: its over the top nibbles of its four 16-bit scale words).
F16_SCALE = {M.IQ4_NL: 0, M.IQ4_XS: 0, M.TQ1_0: 52, M.TQ2_0: 64, M.Q1_0: 0,
             M.Q2_0: 0} | {int(t): 0 for t in GRID if t != T.IQ1_M}


def random_rows(rng, code: int, nrows: int, k: int, scale: float = 0.05) -> np.ndarray:
    """Random block rows (uint8 (nrows, row_bytes)) of ``code`` with finite scales making
    values of about ``scale`` (every other bit random)."""
    bs, size = M.BLOCK[code]
    nb = k // bs
    raw = rng.integers(0, 256, (nrows, nb, size), dtype=np.uint8)
    if code in F16_SCALE:
        d = rng.uniform(-scale, scale, (nrows, nb)) / (4000 if code == M.IQ4_XS else 100
                                                       if code == M.IQ4_NL else 1)
        o = F16_SCALE[code]
        raw[:, :, o:o + 2] = d.astype(np.float16).view(np.uint8).reshape(nrows, nb, 2)
    elif code == G.IQ1_M:                                        # d's nibbles over 4 words
        d = rng.uniform(-scale, scale, (nrows, nb)).astype(np.float16).view(np.uint16)
        for i in range(4):
            raw[:, :, 49 + 2 * i] = (raw[:, :, 49 + 2 * i] & 0x0F) | (((d >> (4 * i)) & 15) << 4)
    elif code == M.MXFP4:
        raw[:, :, 0] = rng.integers(118, 126, (nrows, nb))       # 2^-10 .. 2^-3
    else:                                                        # NVFP4: UE4M3 exponents 1..6
        raw[:, :, 0:4] = (rng.integers(1, 7, (nrows, nb, 4)) << 3) | rng.integers(0, 8, (nrows, nb, 4))
    return raw.reshape(nrows, nb * size)


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def cpu(peer_bin):
    from tools.ggml_cpu import GgmlCpu
    return GgmlCpu.load(peer_bin)


# ------------------------------------------------------------------------------------------
# dequantisation


@settings(max_examples=40, deadline=None, derandomize=True)
@given(code=st.sampled_from([int(t) for t in TYPES]), nrows=st.integers(1, 5),
       nblocks=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_dequantize_matches_oracles(code, nrows, nblocks, seed):
    rng = np.random.default_rng(seed)
    k = nblocks * M.BLOCK[code][0]
    raw = random_rows(rng, code, nrows, k)
    got = M.dequantize_rows(code, raw, k)
    np.testing.assert_array_equal(bits(got), bits(M.reference_dequantize(code, raw, k)))
    np.testing.assert_array_equal(bits(Q.dequantize_rows(code, raw, k)), bits(got))
    if code in GGUF:
        want = gguf_dequantize(raw, GGUF[code]).astype(np.float32)
        np.testing.assert_array_equal(got, want.reshape(nrows, k))


def test_tables():
    assert M.E8M0_HALF[127] == 0.5 and M.E8M0_HALF[128] == 1.0 and M.E8M0_HALF[0] == 2.0**-128
    assert M.UE4M3_HALF[0x38] == 0.5 and M.UE4M3_HALF[0x7F] == 0 and M.UE4M3_HALF[1] == 2.0**-10


def test_codebooks_as_gguf_decodes_them():
    """The grids refimpl builds from gguf's hexadecimal text equal gguf's own decoding, and
    every sign byte is its 7-bit index with an even number of set bits."""
    import gguf.quants as gq
    for code, cls, width in ((G.IQ2_XXS, gq.IQ2_XXS, 8), (G.IQ2_XS, gq.IQ2_XS, 8),
                             (G.IQ2_S, gq.IQ2_S, 8), (G.IQ3_XXS, gq.IQ3_XXS, 4),
                             (G.IQ3_S, gq.IQ3_S, 4), (G.IQ1_S, gq.IQ1_S, 8)):
        cls.init_grid()
        want = np.asarray(cls.grid, np.float32).reshape(cls.grid_shape)
        at = G.GRID_AT[code]
        np.testing.assert_array_equal(G.GRIDS[at:at + want.size].reshape(-1, width), want)
    k = np.arange(128)
    assert (G.KSIGNS & 127 == k).all()
    assert all(bin(int(s)).count("1") % 2 == 0 for s in G.KSIGNS)


# ------------------------------------------------------------------------------------------
# GET_ROWS and CPY against ggml (bit for bit)


@pytest.mark.peer
@pytest.mark.parametrize("type_", TYPES, ids=lambda t: t.name)
def test_get_rows_matches_ggml(cpu, type_):
    rng = np.random.default_rng(int(type_))
    ne0, nrows = 2 * M.BLOCK[int(type_)][0], 7
    raw = random_rows(rng, int(type_), 2 * nrows, ne0)
    idx = rng.integers(0, nrows, (2, 5)).astype(np.int32)
    g = GraphBuilder(1 << 20)
    src = g.input(type_, (ne0, nrows, 2), raw)
    out = g.node(Op.GET_ROWS, T.F32, (ne0, 5, 2), [src, g.input(T.I32, (5, 2), idx)])
    g.run()
    with cpu.context() as ctx:
        theirs = ctx.compute(ctx.call("ggml_get_rows", ctx.tensor(type_, (ne0, nrows, 2), raw),
                                      ctx.tensor(T.I32, (5, 2), idx)), 1)
    np.testing.assert_array_equal(bits(g.read(out)), bits(theirs))


@pytest.mark.peer
@pytest.mark.parametrize("dst", [T.F32], ids=lambda t: t.name)  # ggml: only to F32
@pytest.mark.parametrize("type_", TYPES, ids=lambda t: t.name)
def test_cpy_to_float_matches_ggml(cpu, type_, dst):
    rng = np.random.default_rng(int(type_) + 100)
    ne0 = 2 * M.BLOCK[int(type_)][0]
    raw = random_rows(rng, int(type_), 6, ne0)
    g = GraphBuilder(1 << 20)
    src = g.input(type_, (ne0, 3, 2), raw)
    b = g.input(dst, (ne0, 6))
    out = g.node(Op.CPY, dst, (ne0, 6), [src, b], inplace_of=b)
    g.run()
    with cpu.context() as ctx:
        theirs = ctx.compute(ctx.call("ggml_cpy", ctx.tensor(type_, (ne0, 3, 2), raw),
                                      ctx.tensor(dst, (ne0, 6))), 1)
    ours = g.read(out)
    if dst == T.F16:
        np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(np.uint16))
    else:
        np.testing.assert_array_equal(bits(ours), bits(theirs))


# ------------------------------------------------------------------------------------------
# MUL_MAT against ggml (within the contract)


@pytest.mark.peer
@pytest.mark.parametrize("nt", [1, 3, 4, 9])
@pytest.mark.parametrize("type_", TYPES, ids=lambda t: t.name)
def test_mul_mat_within_contract(cpu, type_, nt):
    """Both kernels (DEQUANT below BLAS_MIN_ROWS activation rows, BLAS from there), with
    src0 broadcast over two activation batches, against ggml's vec_dot."""
    rng = np.random.default_rng(int(type_) * 10 + nt)
    k, n = 2 * M.BLOCK[int(type_)][0] if M.BLOCK[int(type_)][0] < 256 else 512, 19
    raw = random_rows(rng, int(type_), 2 * n, k)
    x = rng.standard_normal((2, 2, nt, k)).astype(np.float32)
    g = GraphBuilder(8 << 20)
    w = g.input(type_, (k, n, 1, 2), raw)
    xb = g.input(T.F32, (k, nt, 2, 2), x)
    out = g.node(Op.MUL_MAT, T.F32, (n, nt, 2, 2), [w, xb])
    g.run()
    with cpu.context() as ctx:
        theirs = ctx.compute(ctx.call("ggml_mul_mat", ctx.tensor(type_, (k, n, 1, 2), raw),
                                      ctx.tensor(T.F32, (k, nt, 2, 2), x)), 2)
    assert_op_within_contract(g.read(out), theirs, "MUL_MAT")


@pytest.mark.peer
@pytest.mark.parametrize("nt", [1, 5])
@pytest.mark.parametrize("type_", TYPES, ids=lambda t: t.name)
def test_mul_mat_prequantised_activations(cpu, type_, nt):
    """src1 arriving in the weights' activation format (Q8_0 or Q8_K) is used as it is."""
    rng = np.random.default_rng(int(type_) + 7 * nt)
    k, n = 256, 11
    vec = Q.VEC_DOT_TYPE[int(type_)]
    raw = random_rows(rng, int(type_), n, k)
    x = rng.standard_normal((nt, k)).astype(np.float32)
    qs, d, extra = Q.reference_quantize(x, vec)
    packed = pack_activations(qs, d, extra, vec)
    g = GraphBuilder(4 << 20)
    out = g.node(Op.MUL_MAT, T.F32, (n, nt), [g.input(type_, (k, n), raw),
                                              g.input(T(vec), (k, nt), packed)])
    g.run()
    with cpu.context() as ctx:
        theirs = ctx.compute(ctx.call("ggml_mul_mat", ctx.tensor(type_, (k, n), raw),
                                      ctx.tensor(T(vec), (k, nt), packed)), 1)
    assert_op_within_contract(g.read(out), theirs, "MUL_MAT")


def test_mul_mat_matches_numpy_reference():
    """Both kernels against refimpl.kernels.matmul.reference on the exact values."""
    from refimpl.kernels.matmul import reference
    rng = np.random.default_rng(3)
    for code in (M.IQ4_NL, M.IQ4_XS, M.MXFP4, M.TQ1_0, G.IQ2_S, G.IQ1_M):
        k, n = 256, 6
        raw = random_rows(rng, code, 2 * n, k)
        wv = M.reference_dequantize(code, raw, k).reshape(2, 1, n, k)
        for nt in (2, 6):
            x = rng.standard_normal((2, 3, nt, k)).astype(np.float32)
            acts = Q.quantize_activations(x.reshape(-1, k), Q.VEC_DOT_TYPE[code])
            g = GraphBuilder(4 << 20)
            out = g.node(Op.MUL_MAT, T.F32, (n, nt, 3, 2),
                         [g.input(T(code), (k, n, 1, 2), raw),
                          g.input(T.F32, (k, nt, 3, 2), x)])
            g.run()
            want = reference(wv, acts.dequantized().reshape(2, 3, nt, k))
            np.testing.assert_allclose(g.read(out), want, rtol=1e-4, atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(code=st.sampled_from([int(t) for t in GRID]), nt=st.integers(1, 6),
       nblocks=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_grid_mul_mat_sums_as_ggml(code, nt, nblocks, seed):
    """The codebook formats' product (every activation row count) against the numpy oracle
    of ggml's arithmetic, bit for bit: an exact sum per super-block times d_w·d_a."""
    rng = np.random.default_rng(seed)
    k, n = 256 * nblocks, 5
    raw = random_rows(rng, code, n, k)
    x = rng.standard_normal((nt, k)).astype(np.float32)
    acts = Q.quantize_activations(x, Q.Q8_K)
    g = GraphBuilder(4 << 20)
    out = g.node(Op.MUL_MAT, T.F32, (n, nt), [g.input(T(code), (k, n), raw),
                                              g.input(T.F32, (k, nt), x)])
    g.run()
    want = G.reference_matmul(code, raw, acts.qs, acts.d)
    np.testing.assert_array_equal(bits(g.read(out).reshape(nt, n)), bits(want))


@pytest.mark.peer
@pytest.mark.parametrize("type_", GRID, ids=lambda t: t.name)
def test_grid_mul_mat_close_to_ggml(cpu, type_):
    """ggml's x86 dot products of these formats differ from the oracle's sums only in how
    float32 lanes gather the per-block terms: an NMSE far below the contract's (a float32
    dot product of the dequantised values, as for IQ4_XS, lands near 1e-13)."""
    rng = np.random.default_rng(int(type_))
    k, n = 1024, 16
    raw = random_rows(rng, int(type_), n, k)
    x = rng.standard_normal((3, k)).astype(np.float32)
    g = GraphBuilder(4 << 20)
    out = g.node(Op.MUL_MAT, T.F32, (n, 3), [g.input(type_, (k, n), raw),
                                             g.input(T.F32, (k, 3), x)])
    g.run()
    with cpu.context() as ctx:
        theirs = ctx.compute(ctx.call("ggml_mul_mat", ctx.tensor(type_, (k, n), raw),
                                      ctx.tensor(T.F32, (k, 3), x)), 1)
    ours = g.read(out).astype(np.float64)
    assert ((ours - theirs) ** 2).sum() / (theirs.astype(np.float64) ** 2).sum() < 1e-13


@pytest.mark.parametrize("op", [Op.CPY, Op.SET_ROWS])
def test_quantising_into_codebook_formats_is_refused(op):
    """ggml's CPU backend has no quantiser for the IQ1/IQ2/IQ3 formats: CPY and SET_ROWS into
    them are refused at validation (reading them is not)."""
    g = GraphBuilder(1 << 20)
    x = g.input(T.F32, (256, 2))
    dst = g.input(T.IQ3_S, (256, 2))
    if op == Op.CPY:
        g.node(op, T.IQ3_S, (256, 2), [x, dst], inplace_of=dst)
    else:
        idx = g.input(T.I32, (2,), np.arange(2, dtype=np.int32))
        g.node(op, T.IQ3_S, (256, 2), [x, idx, dst], inplace_of=dst)
    with pytest.raises(GraphInvalid):
        g.compile()


# ------------------------------------------------------------------------------------------
# the IQ4_NL quantiser


def ggml_quantize_row(peer_bin, type_, x: np.ndarray) -> np.ndarray:
    """ggml's own ``quantize_row_<type>_ref`` (the CPU backend's from_float) on each row."""
    from tools.ggml_cpu import GgmlCpu
    fn = getattr(GgmlCpu.load(peer_bin).base, f"quantize_row_{T(type_).name.lower()}_ref")
    fn.restype = None
    fn.argtypes = [C.c_void_p, C.c_void_p, C.c_int64]
    bs, size = M.BLOCK[int(type_)]
    m, k = x.shape
    out = np.zeros((m, k // bs * size), np.uint8)
    for r in range(m):
        row = np.ascontiguousarray(x[r], np.float32)
        fn(row.ctypes.data, out[r].ctypes.data, k)
    return out


@pytest.mark.peer
@settings(max_examples=30, deadline=None, derandomize=True)
@given(m=st.integers(1, 6), nb=st.integers(1, 8), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       dist=st.sampled_from(["normal", "uniform", "spiky"]), seed=st.integers(0, 2**32 - 1))
def test_iq4_nl_quantiser_bit_exact(peer_bin, m, nb, scale, dist, seed):
    rng = np.random.default_rng(seed)
    shape = (m, 32 * nb)
    if dist == "normal":
        x = rng.standard_normal(shape)
    elif dist == "uniform":
        x = rng.uniform(-1, 1, shape)
    else:
        x = rng.standard_normal(shape) * (rng.uniform(0, 1, shape) < 0.1)
        x[:, ::32] += 1.0            # no all-zero block (ggml leaves stale codes in those)
    x = (x * scale).astype(np.float32)
    ours = M.quantize_rows(T.IQ4_NL, x)
    np.testing.assert_array_equal(ours, ggml_quantize_row(peer_bin, T.IQ4_NL, x))
    np.testing.assert_array_equal(ours, M.reference_quantize_iq4_nl(x))


def test_iq4_nl_quantiser_zero_blocks_and_round_trip():
    x = np.zeros((2, 64), np.float32)
    x[1, 32:] = np.linspace(-1, 1, 32, dtype=np.float32)
    q = M.quantize_rows(T.IQ4_NL, x)
    np.testing.assert_array_equal(q, M.reference_quantize_iq4_nl(x))
    back = M.dequantize_rows(M.IQ4_NL, q, 64)
    assert not back[0].any() and not back[1, :32].any()
    assert np.abs(back[1, 32:] - x[1, 32:]).max() < 0.15
    with pytest.raises(ValueError):
        M.quantize_rows(T.Q8_0, x)


SIMPLE = [T.MXFP4, T.NVFP4, T.TQ1_0, T.TQ2_0, T.Q1_0, T.Q2_0]


@pytest.mark.peer
@settings(max_examples=25, deadline=None, derandomize=True)
@given(m=st.integers(1, 3), nb=st.integers(1, 3), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       zeros=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_iq4_xs_quantiser_bit_exact(peer_bin, m, nb, scale, zeros, seed):
    """IQ4_XS against ggml's from_float (quantize_iq4_xs, also what ggml_quantize_chunk runs
    without an importance matrix) and the numpy oracle, zero sub-blocks included."""
    from tools.ggml_cpu import GgmlCpu
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((m, 256 * nb)) * scale).astype(np.float32)
    if zeros:
        x[:, 32:64] = 0
        x[0, :256] = 0
    ours = M.quantize_rows(T.IQ4_XS, x)
    np.testing.assert_array_equal(ours, GgmlCpu.load(peer_bin).quantize(T.IQ4_XS, x))
    np.testing.assert_array_equal(ours, M.reference_quantize_iq4_xs(x))


@pytest.mark.peer
@settings(max_examples=40, deadline=None, derandomize=True)
@given(type_=st.sampled_from(SIMPLE), m=st.integers(1, 4), nb=st.integers(1, 3),
       scale=st.sampled_from([1e-3, 1.0, 1e2]), zeros=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_other_quantisers_bit_exact(peer_bin, type_, m, nb, scale, zeros, seed):
    rng = np.random.default_rng(seed)
    k = 256 * nb
    x = (rng.standard_normal((m, k)) * scale).astype(np.float32)
    if zeros:
        x[:, :128] = 0
        x[:, 130] = 0.5 * scale      # exact halves of the scale, and ties
    ours = M.quantize_rows(type_, x)
    np.testing.assert_array_equal(ours, ggml_quantize_row(peer_bin, type_, x))
    np.testing.assert_array_equal(ours, M.reference_quantize(int(type_), x))
