"""refimpl.kernels.tiles: the tile-by-tile products in every form this host runs, against
each other (bit for bit: the same integers, the same float32 order), against the float64
product of the dequantised rows, and against the packed kernel; and the choice between the
two kernels."""

from __future__ import annotations

import numpy as np
import pytest

from refimpl.kernels import matmul_fast as fast
from refimpl.kernels import quants as Q
from refimpl.kernels import tiles as KT
from refimpl.kernels.matmul import table_for

from .test_quants import SCALE_OFFSETS, random_rows

#: Where each 32-value format's codes start in its block.
_CODES_AT = {Q.Q4_0: 2, Q.Q4_1: 4, Q.Q5_0: 2, Q.Q5_1: 4, Q.Q8_0: 2}


def _extreme(code, row, k):
    """Make ``row`` (packed, in place) the largest codes, scales and minimums of ``code``
    (Q8_0: codes of -128; Q6_K: scales of -128)."""
    if code in _CODES_AT:
        blocks = row.reshape(k // 32, -1)
        blocks[:, _CODES_AT[code]:] = 0x80 if code == Q.Q8_0 else 0xFF
        return
    blocks = row.reshape(k // 256, -1)
    keep = np.zeros(blocks.shape[1], bool)
    for off in SCALE_OFFSETS[code]:
        keep[off:off + 2] = True
    blocks[:, ~keep] = 0xFF
    if code == Q.Q6_K:
        blocks[:, 192:208] = 0x80


def _case(code, n, nt, k=512, batches=2, seed=3):
    """Weight rows (1, 1, n, row_bytes), the last with extreme codes, and activations of
    ``batches · nt`` rows quantised as ggml does for ``code``, row ``nt - 1`` at the extreme
    (-128, or -127 where x86's sign trick would meet it: refimpl routes -128 elsewhere
    there); returns the rows and mm_packed's activation arguments."""
    rng = np.random.default_rng(seed)
    rows = random_rows(rng, code, n, k)
    _extreme(code, rows[n - 1], k)
    x = rng.standard_normal((batches * nt, k)).astype(np.float32)
    acts = Q.quantize_activations(x, Q.VEC_DOT_TYPE[code])
    acts.qs[nt - 1] = -127 if code in (Q.Q4_0, Q.Q5_0, Q.Q8_0) else -128
    if acts.s.size:                  # Q8_1's s = d · Σq of each block
        s = acts.s
        s[nt - 1] = acts.d[nt - 1] * acts.qs[nt - 1].reshape(-1, 32).sum(axis=1)
    else:
        s = np.zeros((batches * nt, k // 32), np.float32)
    if acts.bsums.size:
        acts.bsums[nt - 1] = acts.qs[nt - 1].reshape(-1, 16).sum(axis=1)
        bsums = acts.bsums
    else:
        bsums = np.zeros((batches * nt, 1), np.int32)
    return rows.reshape(1, 1, n, -1), (acts.qs, acts.d, s, bsums)


def _exact(code, rows, acts, k):
    """The float64 product of the dequantised weights with the activations, and the sum of
    the magnitudes of its terms (the scale of float32 rounding); Q4_1's and Q5_1's minimums
    meet the activations' stored sums ``s``, as ggml's arithmetic has them."""
    qs, d, s, _ = acts
    per = 256 if code in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else 32
    w = Q.dequantize_rows(code, rows[0, 0], k).astype(np.float64)
    a = qs.astype(np.float64) * np.repeat(d, per, axis=1)
    want, scale = a @ w.T, np.abs(a) @ np.abs(w).T
    if code in (Q.Q4_1, Q.Q5_1):
        codes = Q.dequantize_rows(code, rows[0, 0], k, with_min=False).astype(np.float64)
        m = (w - codes).reshape(len(w), k // 32, 32)[:, :, 0]
        want = a @ codes.T + s.astype(np.float64) @ m.T
        scale = np.abs(a) @ np.abs(codes).T + np.abs(s.astype(np.float64)) @ np.abs(m).T
    return want, scale


@pytest.mark.parametrize("code", sorted(KT.TILED_TYPES), ids=lambda c: Q.GgmlType(c).name)
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
    extra = KT.tile_extra(code, acts[0], acts[2], acts[3])
    results = []
    for form in KT.FORMS.values():
        for twin in (form[code].serial, form[code].parallel):
            out = np.full((1, 2, n, nt), np.nan, np.float32).transpose(0, 1, 3, 2)
            twin(rows, acts[0], acts[1], extra, out, table_for(code))
            results.append(out)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    got = results[0].reshape(2 * nt, n)
    want, scale = _exact(code, rows, acts, k)
    assert np.all(np.abs(got - want) <= 1e-5 * scale), np.abs(got - want).max()
    packed = np.zeros((1, 2, nt, n), np.float32)
    fast._PACKED_KERNELS[code](rows, *acts, packed, table_for(code))
    assert np.all(np.abs(got - packed.reshape(2 * nt, n)) <= 2e-5 * scale)


@pytest.mark.parametrize("nt", [KT.TILED_FROM_TOKENS - 1, KT.TILED_FROM_TOKENS])
@pytest.mark.parametrize("code", [Q.Q4_K, Q.Q8_0], ids=lambda c: Q.GgmlType(c).name)
def test_mm_packed_takes_tiles_for_prompts(code, nt):
    """mm_packed gives, bit for bit, the tile product for a prompt's worth of activation rows
    on a host with AVX-512 VNNI, and the packed kernel's otherwise (fewer rows, another
    host)."""
    k, n = 256, 40
    rows, acts = _case(code, n, nt, k, batches=1, seed=9)
    got, tiles, packed = (np.zeros((1, 1, nt, n), np.float32) for _ in range(3))
    fast.mm_packed(code, rows, *acts, got, table_for(code))
    fast._PACKED_KERNELS[code](rows, *acts, packed, table_for(code))
    expect_tiles = KT.NATIVE and nt >= KT.TILED_FROM_TOKENS
    assert KT.tiles_pay(code, nt) == expect_tiles
    if expect_tiles:
        KT.mm_tiles(code, rows, *acts, tiles, table_for(code))
        np.testing.assert_array_equal(got, tiles)
        assert not np.array_equal(tiles, packed)      # another float order: told apart
    else:
        np.testing.assert_array_equal(got, packed)
