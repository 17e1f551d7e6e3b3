"""Block formats: dequantisation against the gguf package, activation quantisation against the
numpy oracle (bit for bit), half-precision rounding, and the packed Q8 layouts."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.kernels import quants as Q

GGUF_TYPE = {Q.Q4_0: QT.Q4_0, Q.Q4_1: QT.Q4_1, Q.Q5_0: QT.Q5_0, Q.Q5_1: QT.Q5_1,
             Q.Q8_0: QT.Q8_0, Q.Q2_K: QT.Q2_K, Q.Q3_K: QT.Q3_K, Q.Q4_K: QT.Q4_K,
             Q.Q5_K: QT.Q5_K, Q.Q6_K: QT.Q6_K}
WEIGHTS = sorted(GGUF_TYPE)

#: Byte offsets of the f16 scales (d, then m/dmin where the format has one) inside a block.
SCALE_OFFSETS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
                 Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
                 Q.Q6_K: (208,)}


def random_rows(rng: np.random.Generator, code: int, nrows: int, k: int,
                scale: float = 0.05) -> np.ndarray:
    """Random block rows (uint8 (nrows, row_bytes)) of type ``code`` with finite scales of
    about ``scale`` (all other bits random)."""
    bs, size = Q.BLOCK[code]
    nb = k // bs
    raw = rng.integers(0, 256, (nrows, nb, size), dtype=np.uint8)
    for off in SCALE_OFFSETS[code]:
        vals = rng.uniform(-scale, scale, (nrows, nb))
        if code in (Q.Q2_K, Q.Q4_K, Q.Q5_K):
            vals = np.abs(vals)
        raw[:, :, off:off + 2] = vals.astype(np.float16).view(np.uint8).reshape(nrows, nb, 2)
    return raw.reshape(nrows, nb * size)


def pack_activations(qs, d, extra, vec_type) -> np.ndarray:
    """Quantised activations (as the oracle returns them) in ggml's packed block layout."""
    m, k = qs.shape
    bs, size = Q.BLOCK[vec_type]
    nb = k // bs
    out = np.zeros((m, nb, size), np.uint8)
    q = qs.reshape(m, nb, bs).view(np.uint8)
    if vec_type == Q.Q8_K:
        out[:, :, 0:4] = d.astype(np.float32).view(np.uint8).reshape(m, nb, 4)
        out[:, :, 4:260] = q
        out[:, :, 260:292] = extra.astype(np.int16).view(np.uint8).reshape(m, nb, 32)
    else:
        out[:, :, 0:2] = d.astype(np.float16).view(np.uint8).reshape(m, nb, 2)
        if vec_type == Q.Q8_1:
            out[:, :, 2:4] = extra.astype(np.float16).view(np.uint8).reshape(m, nb, 2)
            out[:, :, 4:36] = q
        else:
            out[:, :, 2:34] = q
    return out.reshape(m, nb * size)


def test_f16_table():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    np.testing.assert_array_equal(Q.F16_TABLE, bits.view(np.float16).astype(np.float32))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(code=st.sampled_from(WEIGHTS), nrows=st.integers(1, 6), nblocks=st.integers(1, 4),
       random_scales=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_dequantize_matches_gguf(code, nrows, nblocks, random_scales, seed):
    rng = np.random.default_rng(seed)
    k = nblocks * Q.BLOCK[code][0]
    raw = random_rows(rng, code, nrows, k)
    if random_scales:  # every bit random: subnormal, infinite and NaN scales included
        raw = rng.integers(0, 256, raw.shape, dtype=np.uint8)
    with np.errstate(all="ignore"):
        expect = gguf_dequantize(raw, GGUF_TYPE[code]).astype(np.float32)
    np.testing.assert_array_equal(Q.dequantize_rows(code, raw, k), expect)


def test_dequantize_without_minimum():
    rng = np.random.default_rng(1)
    for code in (Q.Q4_1, Q.Q5_1):
        raw = random_rows(rng, code, 3, 64)
        full = Q.dequantize_rows(code, raw, 64)
        mins = raw.reshape(3, 2, -1)[:, :, 2:4].copy().view(np.float16).astype(np.float32)
        bare = Q.dequantize_rows(code, raw, 64, with_min=False)
        np.testing.assert_array_equal(bare + np.repeat(mins[:, :, 0], 32, axis=1), full)


@st.composite
def activations(draw, bs):
    """float32 rows (m, k) with k a multiple of ``bs``: varied magnitudes, zero blocks,
    exact ties for the rounding, occasional huge values."""
    m = draw(st.integers(1, 4))
    nb = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, nb * bs)) * 10.0 ** rng.integers(-6, 5, (m, 1))
    kind = draw(st.sampled_from(["plain", "zeros", "ties", "halves", "big"]))
    if kind == "zeros":
        x[:, :bs] = 0
    elif kind == "ties":       # amax 127: x * 127/amax hits .5 exactly
        x = rng.integers(-254, 255, x.shape) / 2.0
        x[:, ::bs] = 127.0
    elif kind == "halves":
        x = np.round(x) + 0.5
    elif kind == "big":
        x[:, 0] = 6e4
    return x.astype(np.float32)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(vec=st.sampled_from([Q.Q8_0, Q.Q8_1, Q.Q8_K]), data=st.data())
def test_quantize_matches_oracle(vec, data):
    x = data.draw(activations(32 if vec != Q.Q8_K else 256))
    acts = Q.quantize_activations(x, vec)
    qs, d, extra = Q.reference_quantize(x, vec)
    np.testing.assert_array_equal(acts.qs, qs)
    np.testing.assert_array_equal(acts.d, d)
    if vec == Q.Q8_1:
        np.testing.assert_array_equal(acts.s, extra)
    if vec == Q.Q8_K:
        np.testing.assert_array_equal(acts.bsums, extra)
    # The quantised values stay within half a step of the input.
    bs = 32 if vec != Q.Q8_K else 256
    err = np.abs(acts.dequantized() - x).reshape(x.shape[0], -1, bs).max(axis=2)
    assert np.all(err <= np.abs(d) * 0.5001 + 127 * (np.abs(d) * 2.0 ** -10 + 2.0 ** -24))


def test_quantize_survives_nan_and_inf():
    x = np.ones((2, 256), np.float32)
    x[0, 3] = np.nan
    x[1, 7] = np.inf
    for vec in (Q.Q8_0, Q.Q8_1, Q.Q8_K):
        acts = Q.quantize_activations(x, vec)
        assert acts.qs.shape == (2, 256)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_round_f16_matches_numpy(bits):
    x = np.array(bits, np.uint32).view(np.float32)
    got = np.array([Q.round_f16(v) for v in x], np.float32)
    np.testing.assert_array_equal(got, Q.reference_round_f16(x))


def test_round_f16_edges():
    edges = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                      2.0**-14, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, np.inf, -np.inf],
                     np.float32)
    got = np.array([Q.round_f16(v) for v in edges], np.float32)
    np.testing.assert_array_equal(got, Q.reference_round_f16(edges))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(vec=st.sampled_from([Q.Q8_0, Q.Q8_1, Q.Q8_K]), data=st.data())
def test_packed_activations_round_trip(vec, data):
    x = data.draw(activations(32 if vec != Q.Q8_K else 256))
    qs, d, extra = Q.reference_quantize(x, vec)
    packed = pack_activations(qs, d, extra, vec)
    acts = Q.unpack_activations(packed, vec, x.shape[1])
    np.testing.assert_array_equal(acts.qs, qs)
    np.testing.assert_array_equal(acts.d, d)
    if vec == Q.Q8_0:  # the layout agrees with gguf's reading of Q8_0
        np.testing.assert_array_equal(gguf_dequantize(packed, QT.Q8_0), acts.dequantized())
    if vec == Q.Q8_1:
        np.testing.assert_array_equal(acts.s, extra)
    if vec == Q.Q8_K:
        np.testing.assert_array_equal(acts.bsums, extra)
        assert packed.shape[1] == 292 * (x.shape[1] // 256)


def test_half_rows_widen_exactly():
    bits = np.random.default_rng(5).integers(0, 65536, (3, 40), dtype=np.uint16)
    raw = bits.view(np.uint8)
    np.testing.assert_array_equal(Q.dequantize_rows(Q.F16, raw, 40),
                                  bits.view(np.float16).astype(np.float32))
    np.testing.assert_array_equal(Q.dequantize_rows(Q.BF16, raw, 40).view(np.uint32),
                                  bits.astype(np.uint32) << 16)
