"""refimpl.kernels.simd: each vector building block against its plain-numpy reference, and
the fast MUL_MAT decoders against ggml's dequantisation (refimpl.kernels.quants)."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from refimpl.kernels import matmul_fast as fast
from refimpl.kernels import quants as Q
from refimpl.kernels import simd
from refimpl.kernels.cpu_tensors import f16_to_f32

from .test_quants import random_rows


@njit
def _decodes(w, h, shift, hs, out):
    wp, hp, op = w.ctypes.data, h.ctypes.data, out.ctypes.data
    simd.decode_nibbles16_pair(wp, 8, op)
    simd.decode_nibbles32(wp, shift, op + 128)
    simd.decode_q6_16(wp, shift, hp, hs, op + 256)
    simd.decode_i8_32(wp, op + 320)


@pytest.mark.parametrize("seed", range(8))
def test_decoders_match_references(seed):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 256, 32, dtype=np.uint8)
    h = rng.integers(0, 256, 16, dtype=np.uint8)
    w[1] = 0x80
    shift, hs = int(rng.choice([0, 4])), int(rng.choice([0, 2, 4, 6]))
    lo, hi = simd.ref_nibbles(w[:16], 0), simd.ref_nibbles(w[:16], 4)

    out = np.zeros(112, np.float32)
    _decodes(w, h, shift, hs, out)
    want = np.concatenate([np.concatenate([lo, hi]) - 8, simd.ref_nibbles(w, shift),
                           simd.ref_q6(w[:16], shift, h, hs), w.view(np.int8)])
    np.testing.assert_array_equal(out, want.astype(np.float32))


@pytest.mark.parametrize("wtype", sorted(fast.FAST_QUANT_TYPES), ids=lambda t: Q.GgmlType(t).name)
def test_split_rows_give_ggml_dequantisation(wtype):
    """codes · group scale (− Q4_K's minimum) is ggml's dequantised value, exactly; Q4_1's
    minimum is left to the product (ggml pairs it with the activations' sums)."""
    rng = np.random.default_rng(3)
    k, n = 512, 5
    rows = random_rows(rng, wtype, n, k)
    g = fast.group_size(wtype)
    codes = np.empty((n, k), np.float32)
    scales = np.empty((n, k // g), np.float32)
    mins = np.zeros((n, k // 32), np.float32)
    fast.split_rows(wtype, rows, codes, scales, mins, Q.F16_TABLE)
    assert np.array_equal(codes, np.round(codes)) and np.abs(codes).max() <= 128
    got = codes * np.repeat(scales, g, axis=1)
    if wtype == Q.Q4_K:
        got = got - np.repeat(mins, 32, axis=1)
    want = Q.dequantize_rows(wtype, rows, k, with_min=wtype != Q.Q4_1)
    np.testing.assert_array_equal(got, want)
    if wtype == Q.Q4_1:
        np.testing.assert_array_equal(mins, fast.block_mins(rows, 20))


@pytest.mark.parametrize("hardware", [True, False], ids=["f16c", "table"])
def test_f16_widening_is_exact_both_ways(hardware):
    if hardware and not simd.HAS_F16C:
        pytest.fail("this host has no F16C: the hardware path cannot be checked here")
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    finite = ~np.isnan(bits.view(np.float16))
    rows = bits.reshape(1, 4, 256, 64)[:, :, :, 3:]          # 61 per row: both loops run
    got = f16_to_f32(rows, hardware=hardware)
    want = rows.view(np.float16).astype(np.float32)
    ok = finite.reshape(1, 4, 256, 64)[:, :, :, 3:]
    np.testing.assert_array_equal(got[ok], want[ok])
    assert np.isnan(got[~ok]).all()
