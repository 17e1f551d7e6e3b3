"""The exact float32 building blocks of refimpl.kernels.numeric: the fused multiply-add, bit
casts, ggml's 8-lane exp approximation and its horizontal sum.  (ggml itself is the
oracle op by op in test_ops_vs_ggml.py, under the numerics contract.)"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from refimpl.kernels.numeric import f32_bits, f32_from_bits, fma32, hsum8_f32, vexp_f32, vsilu_f32


@njit
def _fma_all(a, b, c, out):
    for i in range(a.shape[0]):
        out[i] = fma32(a[i], b[i], c[i])


@njit
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = vexp_f32(x[i])


@njit
def _bits_round_trip(x, out):
    for i in range(x.shape[0]):
        out[i] = f32_from_bits(f32_bits(x[i]))


def test_fma_rounds_once():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(20000).astype(np.float32)
    b = rng.standard_normal(20000).astype(np.float32)
    c = (-(a.astype(np.float64) * b)).astype(np.float32)     # heavy cancellation
    out = np.empty_like(a)
    _fma_all(a, b, c, out)
    exact = a.astype(np.float64) * b + c                       # exact: the product fits
    np.testing.assert_array_equal(out, exact.astype(np.float32))
    # a case a separate multiply and add gets wrong: (1 + 2^-12)^2 - (1 + 2^-11) = 2^-24
    x = np.float32(1 + 2**-12)
    _fma_all(np.array([x]), np.array([x]), np.array([-(1 + 2**-11)], np.float32), out[:1])
    assert out[0] == np.float32(2**-24)


def test_bit_casts():
    x = np.array([0.0, -0.0, 1.0, -2.5, np.inf, 1e-45], np.float32)
    out = np.empty_like(x)
    _bits_round_trip(x, out)
    np.testing.assert_array_equal(out.view(np.uint32), x.view(np.uint32))
    assert njit(lambda v: f32_bits(v))(np.float32(1.0)) == 0x3F800000


def test_vector_exp_accuracy_and_specials():
    x = np.concatenate([np.linspace(-110, 90, 400001, dtype=np.float32),
                        np.random.default_rng(1).uniform(-20, 20, 100000).astype(np.float32)])
    got = np.empty_like(x)
    _exp_all(x, got)
    with np.errstate(over="ignore", under="ignore"):
        want = np.exp(x.astype(np.float64))
    normal = (want > 1.2e-38) & (want < 3.4e38)
    ulp = np.spacing(want[normal].astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got[normal] - want[normal]) / ulp) < 2.0   # ggml quotes 1.45 + 0.5
    assert np.all(got[x > 88.8] == np.inf)
    tiny = want < 1e-38
    assert np.all(np.abs(got[tiny] - want[tiny]) <= 2.0**-148)      # gradual underflow
    specials = np.array([0.0, -0.0, -np.inf, np.inf, np.nan, -200.0, 200.0], np.float32)
    out = np.empty_like(specials)
    _exp_all(specials, out)
    assert out[0] == 1.0 and out[1] == 1.0 and out[2] == 0.0 and out[3] == np.inf
    assert math.isnan(out[4]) and out[5] == 0.0 and out[6] == np.inf


def test_silu_and_horizontal_sum():
    f = njit(lambda v: vsilu_f32(v))
    assert f(np.float32(0.0)) == 0.0
    assert abs(f(np.float32(2.0)) - 2.0 / (1.0 + math.exp(-2.0))) < 1e-6
    h = njit(lambda a: hsum8_f32(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]))
    v = np.array([1e8, 1.0, -1e8, 1.0, 1.0, 1.0, 1.0, 1.0], np.float32)
    # ((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7)): the big terms cancel before the small ones
    # would be lost, unlike a left-to-right sum
    assert h(v) == np.float32(4.0)
    assert np.float32(np.float32(np.float32(1e8) + 1) + np.float32(-1e8)) != 4.0
