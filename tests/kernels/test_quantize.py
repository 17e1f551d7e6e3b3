"""refimpl.kernels.quantize (float rows into Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, as SET_ROWS and
CPY write a quantised KV cache) against its numpy reference and ggml's own quantiser, and the
portable half-precision conversion it stores scales with."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from refimpl.kernels import quantize as QZ
from refimpl.kernels.numeric import f16_bits
from refimpl.protocol import GgmlType as T
from tools.ggml_cpu import GgmlCpu

TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]


@njit
def _bits(x, out):
    for i in range(x.shape[0]):
        out[i] = f16_bits(x[i])


def test_f16_bits_is_the_ieee_rounding():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([x, np.array([65504, 65519.99, 65520, 2**-24, 2**-25, 3 * 2**-25, 0.0,
                                     -0.0, np.inf, -np.inf], np.float32)])
    got = np.empty(x.shape, np.int32)
    _bits(x, got)
    with np.errstate(all="ignore"):
        want = x.astype(np.float16).view(np.uint16).astype(np.int32)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.all((got[nan] & 0x7C00) == 0x7C00) and np.all(got[nan] & 0x3FF)


@pytest.fixture(scope="module")
def ggml(peer_bin) -> GgmlCpu:
    return GgmlCpu.load(peer_bin)


@pytest.mark.parametrize("code", TYPES, ids=lambda t: T(t).name)
def test_rows_match_the_reference_and_ggml(ggml, code):
    """Byte for byte: refimpl's kernel, its numpy reference and ggml_quantize_chunk (whose Q8_0
    rounds ties away from zero where the CPU backend's from_float rounds them to even: random
    values meet no tie)."""
    rng = np.random.default_rng(int(code))
    x = (rng.standard_normal((48, 256)) * rng.uniform(1e-3, 1e3, (48, 1))).astype(np.float32)
    x[0, :32] = 0.0                                  # an all-zero block: d = 0
    x[1, :32] = 5.0                                  # a constant block (min == max)
    out = np.zeros((48, QZ.row_bytes(code, 256)), np.uint8)
    QZ.quantize_rows(code, x, out)
    np.testing.assert_array_equal(out, QZ.reference(code, x))
    np.testing.assert_array_equal(out, ggml.quantize(code, x))
