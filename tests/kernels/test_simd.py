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

from .test_quants import SCALE_OFFSETS, random_rows


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
    """codes · group scale (− Q4_K's minimum) is ggml's dequantised value: exactly for the
    32-value blocks; for the k-quants, whose codes carry their integer group scale, up to
    ggml's own rounding of ``d · scale`` (an ulp of each term).  Q4_1's minimum is left to the
    product (ggml pairs it with the activations' sums)."""
    rng = np.random.default_rng(3)
    k, n = 512, 5
    rows = random_rows(rng, wtype, n, k)
    g = fast.group_size(wtype)
    codes = np.empty((n, k), np.float32)
    scales = np.empty((n, k // g), np.float32)
    mins = np.zeros((n, k // 32), np.float32)
    fast.split_rows(wtype, rows, codes, scales, mins, Q.F16_TABLE)
    assert np.array_equal(codes, np.round(codes)) and np.abs(codes).max() <= 128 * 32
    got = codes * np.repeat(scales, g, axis=1)
    if wtype == Q.Q4_K:
        got = got - np.repeat(mins, 32, axis=1)
    want = Q.dequantize_rows(wtype, rows, k, with_min=wtype != Q.Q4_1)
    if wtype in (Q.Q4_K, Q.Q6_K):
        assert g == 256
        terms = np.abs(codes * np.repeat(scales, g, axis=1)) + np.repeat(np.abs(mins), 32, axis=1)
        assert np.all(np.abs(got - want) <= 2.0 ** -22 * terms)
        assert not np.array_equal(codes, np.clip(codes, -32, 31)), "codes carry their scales"
    else:
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


@njit
def _half_ops(src, out_round, acc_scaled, s, acc_mad, v, t):
    n = src.shape[0]
    simd.round_f16_row(src.ctypes.data, out_round.ctypes.data, n)
    simd.scale_round_f16(acc_scaled.ctypes.data, n, s)
    simd.mad_round_f16(acc_mad.ctypes.data, v.ctypes.data, n, t)


def _to_half(x):
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x).astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
def test_half_precision_accumulator_ops_match_references(seed):
    """round_f16_row, scale_round_f16, mad_round_f16 (flash attention's F16 V accumulator)
    against numpy's float16 round trip: ties to even, overflow to infinity, NaN kept; the
    multiply-add is one rounding to float32 (fused), then one to half; the last n % 8 values
    are left alone."""
    if not simd.HAS_F16C:
        pytest.fail("this host has no F16C: the half-precision intrinsics cannot run here")
    rng = np.random.default_rng(seed)
    n = 83
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-9, 5.5, n)).astype(np.float32)
    x[:6] = [np.inf, -np.inf, np.nan, 65520.0, 65519.99, 2.0 ** -25]
    acc = _to_half(rng.standard_normal(n).astype(np.float32) * 50)
    v = rng.standard_normal(n).astype(np.float16)
    s, t = np.float32(rng.uniform(0.1, 2)), np.float32(rng.uniform(0.1, 2))
    out_round, scaled, mad = np.full(n, 7.0, np.float32), acc.copy(), acc.copy()
    _half_ops(x, out_round, scaled, s, mad, v.view(np.uint16), t)
    m = n - n % 8
    fused = (v[:m].astype(np.float64) * np.float64(t) + acc[:m]).astype(np.float32)
    for got, want, rest in ((out_round, _to_half(x[:m]), 7.0), (scaled, _to_half(acc[:m] * s), acc[m:]),
                            (mad, _to_half(fused), acc[m:])):
        np.testing.assert_array_equal(got[:m], want)
        np.testing.assert_array_equal(got[m:], rest)


def _kquant_dots(kind):
    native, portable = getattr(simd, "row_dot_" + kind), simd.PORTABLE_KQUANT[kind]

    @njit
    def dots(rows, qs, d, bsums, table, out):
        nb = d.shape[1]
        for r in range(rows.shape[0]):
            for m in range(qs.shape[0]):
                args = (rows[r].ctypes.data, qs[m].ctypes.data, d[m].ctypes.data, nb,
                        table.ctypes.data, bsums[m].ctypes.data)
                out[0, r, m] = native(*args)
                out[1, r, m] = portable(*args)
    return dots


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
def test_kquant_row_dots_native_and_portable_agree(kind):
    """The k-quant row products give the same float32 with x86's instructions by name
    (``pmaddubsw``, ``pmaddwd``; on AVX2 hosts) as in portable vector IR, and both are the
    exact integer sums scaled as documented: within float32 rounding of the float64 product
    of the dequantised rows.  Extreme codes and activations (all bits set, all -128) check
    that no int16 pair sum saturates."""
    code = {"q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K}[kind]
    rng = np.random.default_rng(11)
    k = 512
    rows = random_rows(rng, code, 4, k)
    extreme = rows[3].reshape(k // 256, -1)
    keep = np.zeros(extreme.shape[1], bool)
    for off in SCALE_OFFSETS[code]:          # the f16 scales stay finite
        keep[off:off + 2] = True
    extreme[:, ~keep] = 0xFF                            # largest codes, scales and minimums
    if code == Q.Q6_K:
        extreme[:, 192:208] = 0x80                     # scales of -128
    qs = rng.integers(-128, 128, (3, k), dtype=np.int8)
    qs[2] = -128
    d = rng.uniform(0.001, 0.01, (3, k // 256)).astype(np.float32)
    bsums = qs.reshape(3, -1, 16).astype(np.int32).sum(axis=2).astype(np.int32)
    out = np.zeros((2, 4, 3), np.float32)
    _kquant_dots(kind)(rows, qs, d, bsums, Q.F16_TABLE, out)
    np.testing.assert_array_equal(out[0], out[1])
    w = Q.dequantize_rows(code, rows, k).astype(np.float64)
    a = qs.astype(np.float64) * np.repeat(d, 256, axis=1)
    want = w @ a.T
    scale = np.abs(w) @ np.abs(a).T
    assert np.all(np.abs(out[0] - want) <= 1e-5 * scale), (out[0], want)
