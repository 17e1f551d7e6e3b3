"""refimpl.kernels.simd: half-precision helpers against their references, the k-quant row
products' native and portable forms against each other and the exact product, and the
four-rows-at-once products against the one-row ones (whole products against the plain-numpy
reference: tests/kernels/test_matmul.py)."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from refimpl.kernels import matmul_fast as fast
from refimpl.kernels.matmul import table_for
from refimpl.kernels import quants as Q
from refimpl.kernels import simd
from refimpl.kernels.cpu_tensors import f16_to_f32

from .test_quants import SCALE_OFFSETS, random_rows


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


def _dots_of_forms(*forms):
    """A kernel running each of up to three forms of one row product (the first repeated
    where fewer are given) over every weight row and activation row: ``out[f, r, m]``."""
    f0, f1, f2 = (forms + (forms[0],) * 2)[:3]

    @njit
    def dots(rows, qs, d, extra, table, out):
        nb = d.shape[1]
        for r in range(rows.shape[0]):
            for m in range(qs.shape[0]):
                args = (rows[r].ctypes.data, qs[m].ctypes.data, d[m].ctypes.data,
                        extra[m].ctypes.data, nb, table.ctypes.data)
                out[0, r, m] = f0(*args)
                out[1, r, m] = f1(*args)
                out[2, r, m] = f2(*args)
    return dots


def _kquant_dots(kind):
    return _dots_of_forms(getattr(simd, "row_dot_" + kind), simd.PORTABLE_KQUANT[kind])


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
    out = np.zeros((3, 4, 3), np.float32)
    _kquant_dots(kind)(rows, qs, d, bsums, Q.F16_TABLE, out)
    np.testing.assert_array_equal(out[0], out[1])
    w = Q.dequantize_rows(code, rows, k).astype(np.float64)
    a = qs.astype(np.float64) * np.repeat(d, 256, axis=1)
    want = w @ a.T
    scale = np.abs(w) @ np.abs(a).T
    assert np.all(np.abs(out[0] - want) <= 1e-5 * scale), (out[0], want)


_Q32_CODES = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1, "q8_0": Q.Q8_0}


def _q32_dots(forms, kind):
    return _dots_of_forms(*(simd.Q32_FORMS[f][kind] for f in forms))


@pytest.mark.parametrize("kind", sorted(_Q32_CODES))
def test_q32_row_dots_every_form_agrees(kind):
    """The 32-value formats' row products give the same float32 in every form this host runs:
    portable vector IR, x86's ``pmaddubsw``/``pmaddwd``/``psignb`` (AVX2 hosts) and
    ``vpdpbusd`` (AVX-512 VNNI hosts); and it is the documented sum, within float32 rounding
    of the float64 product of the dequantised rows.  Extreme codes (every nibble and fifth bit
    set, Q8_0's -128) and activations (+127, and -128 for the unsigned formats, which take no
    sign trick) check that no pair sum saturates."""
    code = _Q32_CODES[kind]
    forms = list(simd.Q32_FORMS)
    if simd.X86_AVX2:
        assert "avx2" in forms          # on an AVX2 host the native form is checked too
    rng = np.random.default_rng(13)
    k = 256
    rows = random_rows(rng, code, 4, k)
    blocks = rows[3].reshape(k // 32, -1)
    start = {Q.Q4_0: 2, Q.Q4_1: 4, Q.Q5_0: 2, Q.Q5_1: 4, Q.Q8_0: 2}[code]
    blocks[:, start:] = 0x80 if code == Q.Q8_0 else 0xFF     # codes -128, or all bits set
    qs = rng.integers(-127, 128, (3, k), dtype=np.int8)
    qs[2] = 127
    if code in (Q.Q4_1, Q.Q5_1):
        qs[1] = -128
    acts = Q.quantize_activations(qs.astype(np.float32), Q.VEC_DOT_TYPE[code])
    d = rng.uniform(0.001, 0.01, (3, k // 32)).astype(np.float32)
    s = acts.s if acts.s.size else np.zeros((3, k // 32), np.float32)
    out = np.zeros((3, 4, 3), np.float32)
    _q32_dots(forms, kind)(rows, qs, d, s, Q.F16_TABLE, out)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    w = Q.dequantize_rows(code, rows, k).astype(np.float64)
    a = qs.astype(np.float64) * np.repeat(d, 32, axis=1)
    want = w @ a.T
    scale = np.abs(w) @ np.abs(a).T
    if code in (Q.Q4_1, Q.Q5_1):          # the minimum meets the stored sums, not Σ a
        codes = Q.dequantize_rows(code, rows, k, with_min=False).astype(np.float64)
        m = (w - codes).reshape(4, k // 32, 32)[:, :, 0]
        want = codes @ a.T + m @ s.T.astype(np.float64)
        scale = np.abs(codes) @ np.abs(a).T + np.abs(m) @ np.abs(s.T.astype(np.float64))
    assert np.all(np.abs(out[0] - want) <= 1e-5 * scale), (out[0], want)


@pytest.mark.parametrize("nt", [3, 7, 2 * fast.TOKENS_PER_JOB + 6])
@pytest.mark.parametrize("wtype", sorted(fast.PACKED_TYPES), ids=lambda t: Q.GgmlType(t).name)
def test_four_rows_at_once_equal_one_row_at_a_time(wtype, nt):
    """The packed kernel over 7 activation rows (four through ``row_dots4_*``, two through
    ``row_dots2_*``, the last alone) or 3 (two, one), or over more than one parallel job's
    activation rows (the last job's six: four, two), gives bit for bit what it gives for each
    row alone (one-row intrinsics only), in its serial and its parallel twin."""
    rng = np.random.default_rng(5)
    k, n = 512, 70
    rows = random_rows(rng, wtype, n, k).reshape(1, 1, n, -1)
    x = rng.standard_normal((nt, k)).astype(np.float32)
    acts = Q.quantize_activations(x, Q.VEC_DOT_TYPE[wtype])
    s = acts.s if acts.s.size else np.zeros((nt, k // 32), np.float32)
    bsums = acts.bsums if acts.bsums.size else np.zeros((nt, 1), np.int32)
    together = np.zeros((1, 1, nt, n), np.float32)
    kernel = fast._PACKED_KERNELS[wtype]        # (mm_packed may take tiles for prompts)
    kernel(rows, acts.qs, acts.d, s, bsums, together, table_for(wtype))
    for twin in (kernel.serial, kernel.parallel):
        again = np.zeros_like(together)
        twin(rows, acts.qs, acts.d, s, bsums, again, table_for(wtype))
        np.testing.assert_array_equal(again, together)
    alone = np.zeros((1, 1, nt, n), np.float32)
    for t in range(nt):
        kernel(rows, acts.qs[t:t + 1], acts.d[t:t + 1], s[t:t + 1], bsums[t:t + 1],
               alone[:, :, t:t + 1], table_for(wtype))
    np.testing.assert_array_equal(together, alone)
    assert np.all(np.isfinite(together)) and np.any(together != 0)
