"""refimpl.kernels.quantize_k (float rows into Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, as SET_ROWS and
CPY write them) against its numpy reference, ggml's own quantiser and refimpl's dequantiser,
and the validators' refusals of k-quant destinations whose rows are not whole blocks."""

from __future__ import annotations

import numpy as np
import pytest

from refimpl.graph import GraphInvalid, Op
from refimpl.kernels import quantize_k as QK
from refimpl.kernels.quants import dequantize_rows
from refimpl.protocol import GgmlType as T
from tools.ggml_cpu import GgmlCpu
from tools.graphs import GraphBuilder

TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]

#: Largest NMSE of a dequantised round trip on the Gaussian rows below (measured 0.10, 0.034,
#: 0.0078, 0.0019, 0.0012 for the five types), with some slack: a packing or scale
#: mistake lands far above.
ROUND_TRIP = {T.Q2_K: 0.15, T.Q3_K: 0.05, T.Q4_K: 0.012, T.Q5_K: 0.003, T.Q6_K: 0.002}


def _rows(seed: int) -> np.ndarray:
    """(24, 512) float32: Gaussian rows of scales 1e-3 … 1e3, rows uniform in [-1, 1] (as
    test-backend-ops draws them) and the special blocks every search must get right."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((24, 512)) * rng.uniform(1e-3, 1e3, (24, 1))).astype(np.float32)
    x[1:6] = rng.uniform(-1, 1, (5, 512))
    x[2, :256] = 0.0                            # an all-zero block
    x[3, :256] = 5.0                            # a constant block (the minimum clamps to 0)
    x[4, 16:48] = 0.0                           # zero sub-blocks beside non-zero ones
    x[5, 256:] = np.abs(x[5, 256:])             # all positive
    x[6, :256] = -3.0                           # constant and negative: max == min
    x[7, :256] *= np.float32(1e-14)             # near ggml's all-zero threshold (1e-15)
    return x


@pytest.fixture(scope="module")
def ggml(peer_bin) -> GgmlCpu:
    return GgmlCpu.load(peer_bin)


@pytest.mark.parametrize("code", TYPES, ids=lambda t: T(t).name)
def test_rows_match_the_reference_and_ggml(ggml, code):
    """Byte for byte: the kernel, its numpy reference and ggml_quantize_chunk (without an
    importance matrix it is quantize_row_*_ref, the CPU backend's from_float).  The tolerance
    against ggml is zero: these quantisers live in ggml-base, which CMake compiles for plain
    x86-64 (no FMA, so no contraction) whatever the CPU backend's flags, and refimpl evaluates
    the same float32 operations in the same order."""
    x = _rows(int(code))
    out = np.zeros((x.shape[0], 2 * QK.BLOCK_BYTES[code]), np.uint8)
    QK.quantize_rows(code, x, out)
    np.testing.assert_array_equal(out, QK.reference(code, x))
    np.testing.assert_array_equal(out, ggml.quantize(code, x))
    back = dequantize_rows(code, out, 512).reshape(x.shape)
    assert np.all(back[2, :256] == 0)
    g = slice(8, None)                            # the Gaussian rows
    nmse = np.sum((back[g] - x[g]) ** 2, axis=1) / np.sum(x[g] ** 2, axis=1)
    assert nmse.max() < ROUND_TRIP[code], nmse.max()


def test_non_finite_values_stay_in_range():
    """NaN and infinities have no meaningful code; the kernel must still write every block
    without reading or writing outside it (the row beside it is untouched)."""
    x = np.zeros((3, 256), np.float32)
    x[0, 5], x[0, 40], x[1, 7], x[1, 200] = np.nan, np.inf, -np.inf, np.nan
    for code in TYPES:
        out = np.full((4, QK.BLOCK_BYTES[code]), 0xA5, np.uint8)
        QK.quantize_rows(code, x, out[:3])
        assert np.all(out[3] == 0xA5)
        assert np.all(out[2] == QK.reference(code, x[2:])[0])


def test_cpy_and_set_rows_write_the_quantised_rows():
    """The graph ops: CPY F16 -> Q6_K and SET_ROWS F32 -> Q4_K store the kernel's bytes."""
    rng = np.random.default_rng(5)
    vals = rng.uniform(-1, 1, (4, 256)).astype(np.float32)
    g = GraphBuilder(1 << 20)
    src = g.input(T.F16, (256, 4), vals)
    dst = g.input(T.Q6_K, (256, 4))
    cpy = g.node(Op.CPY, T.Q6_K, (256, 4), [src, dst], inplace_of=dst)
    cache = g.input(T.Q4_K, (256, 6))
    rows = g.input(T.F32, (256, 2), vals[:2])
    idx = g.input(T.I32, (2,), np.array([4, 1]))
    put = g.node(Op.SET_ROWS, T.Q4_K, (256, 6), [rows, idx, cache], inplace_of=cache)
    g.write(cache, np.zeros(6 * 144, np.uint8))
    g.run()
    want = QK.reference(T.Q6_K, vals.astype(np.float16).astype(np.float32))
    assert g.read(cpy).tobytes() == want.tobytes()
    got = g.read(put).reshape(6, 144)
    want = QK.reference(T.Q4_K, vals[:2])
    np.testing.assert_array_equal(got[[4, 1]], want)
    assert not got[[0, 2, 3, 5]].any()


@pytest.mark.parametrize("op", [Op.CPY, Op.SET_ROWS])
def test_rows_of_partial_blocks_are_refused(op):
    """A k-quant destination takes whole 256-value blocks per row (ggml asserts it)."""
    g = GraphBuilder(1 << 20)
    if op == Op.CPY:                            # 512 values, but in rows of 128
        dst = g.input(T.Q5_K, (256, 2))
        g.node(Op.CPY, T.Q5_K, (256, 2), [g.input(T.F32, (128, 4)), dst], inplace_of=dst)
    else:                                       # a Q2_K tensor claiming rows of 128 values
        dst = g.input(T.Q2_K, (128, 2), nb=(84, 84, 168, 168))
        g.node(Op.SET_ROWS, T.Q2_K, (128, 2), [g.input(T.F32, (128, 1)),
                                               g.input(T.I32, (1,), np.array([0])), dst],
               nb=(84, 84, 168, 168), inplace_of=dst)
    with pytest.raises(GraphInvalid, match="block"):
        g.compile()


def test_output_rows_of_the_wrong_size_are_rejected():
    """The kernels do not bounds-check: the Python entry point checks the row sizes."""
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError):
        QK.quantize_rows(T.Q4_K, x, np.zeros((2, 143), np.uint8))
    with pytest.raises(ValueError):
        QK.quantize_rows(T.Q6_K, np.zeros((2, 200), np.float32), np.zeros((2, 210), np.uint8))
