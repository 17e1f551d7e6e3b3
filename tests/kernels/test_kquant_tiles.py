"""refimpl.kernels.kquant_tiles: the tile-by-tile k-quant products in every form this host
runs, against each other (bit for bit: the same integers, the same float32 order), against
the float64 product of the dequantised rows, and against the packed kernel; and the choice
between the two kernels."""

from __future__ import annotations

import numpy as np
import pytest

from refimpl.kernels import kquant_tiles as KT
from refimpl.kernels import matmul_fast as fast
from refimpl.kernels import quants as Q
from refimpl.kernels.matmul import table_for

from .test_quants import SCALE_OFFSETS, random_rows

KQUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]


def _case(code, n, nt, k=512, batches=2, seed=3):
    """Weight rows (1, 1, n, row_bytes), one of them with the largest codes, scales and
    minimums, and Q8_K activations of ``batches · nt`` rows, one of them all -128."""
    rng = np.random.default_rng(seed)
    rows = random_rows(rng, code, n, k)
    extreme = rows[n - 1].reshape(k // 256, -1)
    keep = np.zeros(extreme.shape[1], bool)
    for off in SCALE_OFFSETS[code]:
        keep[off:off + 2] = True
    extreme[:, ~keep] = 0xFF
    if code == Q.Q6_K:
        extreme[:, 192:208] = 0x80                      # scales of -128
    x = rng.standard_normal((batches * nt, k)).astype(np.float32)
    acts = Q.quantize_activations(x, Q.Q8_K)
    acts.qs[nt - 1] = -128
    acts.bsums[nt - 1] = -128 * 16
    return rows.reshape(1, 1, n, -1), acts


@pytest.mark.parametrize("code", KQUANTS, ids=lambda c: Q.GgmlType(c).name)
def test_every_form_agrees_and_is_the_product(code):
    """70 weight rows (four tiles and six rows of a fifth), 21 activation rows (two calls of
    eight and one of five) in two batches over one weight matrix, into an output whose rows
    are not contiguous: every form (``vpdpbusd`` by name on AVX-512 VNNI hosts, portable IR)
    and both twins (serial, parallel) give the same float32, bit for bit; it is the product
    of the dequantised rows within float32 rounding, and agrees with the packed kernel to
    the same bound."""
    n, nt, k = 70, 21, 512
    rows, acts = _case(code, n, nt, k)
    if KT.NATIVE:
        assert set(KT.FORMS) == {"vnni", "portable"}
    results = []
    for form in KT.FORMS.values():
        for twin in (form[code].serial, form[code].parallel):
            out = np.full((1, 2, n, nt), np.nan, np.float32).transpose(0, 1, 3, 2)
            twin(rows, acts.qs, acts.d, acts.bsums, out, table_for(code))
            results.append(out)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    got = results[0].reshape(2 * nt, n)
    w = Q.dequantize_rows(code, rows[0, 0], k).astype(np.float64)
    a = acts.qs.astype(np.float64) * np.repeat(acts.d, 256, axis=1)
    want = a @ w.T
    scale = np.abs(a) @ np.abs(w).T
    assert np.all(np.abs(got - want) <= 1e-5 * scale), np.abs(got - want).max()
    packed = np.zeros((1, 2, nt, n), np.float32)
    s = np.zeros((2 * nt, k // 32), np.float32)
    fast._PACKED_KERNELS[code](rows, acts.qs, acts.d, s, acts.bsums, packed, table_for(code))
    assert np.all(np.abs(got - packed.reshape(2 * nt, n)) <= 2e-5 * scale)


@pytest.mark.parametrize("nt", [KT.TILED_FROM_TOKENS - 1, KT.TILED_FROM_TOKENS])
@pytest.mark.parametrize("code", [Q.Q4_K, Q.Q6_K, Q.Q4_0], ids=lambda c: Q.GgmlType(c).name)
def test_mm_packed_takes_tiles_for_prompts_of_k_quants(code, nt):
    """mm_packed gives, bit for bit, the tile product for k-quant weights and a prompt's
    worth of activation rows on a host with AVX-512 VNNI, and the packed kernel's otherwise
    (fewer rows, another format, another host)."""
    k, n = 256, 40
    rng = np.random.default_rng(9)
    rows = random_rows(rng, code, n, k).reshape(1, 1, n, -1)
    acts = Q.quantize_activations(rng.standard_normal((nt, k)).astype(np.float32),
                                  Q.VEC_DOT_TYPE[code])
    s = acts.s if acts.s.size else np.zeros((nt, k // 32), np.float32)
    bsums = acts.bsums if acts.bsums.size else np.zeros((nt, 1), np.int32)
    got, tiles, packed = (np.zeros((1, 1, nt, n), np.float32) for _ in range(3))
    fast.mm_packed(code, rows, acts.qs, acts.d, s, bsums, got, table_for(code))
    fast._PACKED_KERNELS[code](rows, acts.qs, acts.d, s, bsums, packed, table_for(code))
    expect_tiles = KT.NATIVE and code != Q.Q4_0 and nt >= KT.TILED_FROM_TOKENS
    assert KT.tiles_pay(code, nt) == expect_tiles
    if expect_tiles:
        KT.mm_tiles(code, rows, acts.qs, acts.d, bsums, tiles, table_for(code))
        np.testing.assert_array_equal(got, tiles)
        assert not np.array_equal(tiles, packed)      # another float order: told apart
    else:
        np.testing.assert_array_equal(got, packed)
