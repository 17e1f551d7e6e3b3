"""ROPE against the float64 oracle in every supported mode (normal, NeoX, MRoPE, IMRoPE,
vision), with YaRN, frequency factors, rotation offsets, strided views and in-place results;
and refusal of modes and parameters ggml would not accept."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.graph import GraphInvalid, Op
from refimpl.kernels.rope import (MODE_IMROPE, MODE_MROPE, MODE_NEOX, MODE_NORMAL, MODE_VISION,
                                  reference)
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder

# angles are accumulated in float32 by repeated multiplication (as ggml does), the oracle uses
# the closed form in float64: allow for that drift (positions < 512) and for F16 storage
ATOL = {T.F32: 2e-4, T.F16: 2e-3}


def _params(n_dims, mode, fs=1.0, ef=0.0, af=1.0, sections=(0, 0, 0, 0), n_offs=0, n_ctx_orig=0):
    return [0, n_dims, mode, 0, n_ctx_orig, 10000.0, fs, ef, af, 32.0, 1.0, *sections, n_offs]


@st.composite
def cases(draw):
    mode = draw(st.sampled_from([MODE_NORMAL, MODE_NEOX, MODE_MROPE, MODE_IMROPE, MODE_VISION]))
    sections, n_offs = (0, 0, 0, 0), 0
    if mode == MODE_VISION:
        q = draw(st.integers(1, 6))
        n0, n_dims = 4 * q, 2 * q
        sections = (q, q, 0, 0)
    elif mode in (MODE_MROPE, MODE_IMROPE):
        s = draw(st.integers(1, 4))
        n_dims = 6 * s
        n0 = n_dims + 2 * draw(st.integers(0, 3))
        sections = (s, s, s, 0)
        n_offs = 2 * draw(st.integers(0, (n0 - n_dims) // 2))
    else:
        n_dims = 2 * draw(st.integers(1, 10))
        n0 = n_dims + 2 * draw(st.integers(0, 4))
        n_offs = 2 * draw(st.integers(0, (n0 - n_dims) // 2))
    ne = (n0, draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 2)))
    yarn = draw(st.booleans())
    return dict(mode=mode, ne=ne, n_dims=n_dims, sections=sections, n_offs=n_offs,
                type=draw(st.sampled_from([T.F32, T.F16])),
                fs=1.4245 if yarn else 1.0, ef=0.7465 if yarn else 0.0,
                af=draw(st.sampled_from([1.0, 1.4245])), n_ctx_orig=draw(st.sampled_from([0, 512])),
                ff=draw(st.booleans()), view=draw(st.booleans()),
                inplace=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=50, deadline=None, derandomize=True)
@given(c=cases())
def test_matches_oracle(c):
    rng = np.random.default_rng(c["seed"])
    ne, ty = c["ne"], c["type"]
    g = GraphBuilder(1 << 20)
    if c["view"]:
        big_ne = (2 * ne[0], 3 * ne[1], 2 * ne[2], ne[3])
        big = g.input(ty, big_ne, rng.uniform(-1, 1, big_ne[::-1]))
        x = g.view(big, ne, big.nb, offset=ne[0] * big.nb[0])   # second half of each row
        xvals = g.read(big)[:, :ne[2], :ne[1], ne[0]:]
    else:
        x = g.input(ty, ne, rng.uniform(-1, 1, ne[::-1]))
        xvals = g.read(x)
    npos = ne[2] * (4 if c["mode"] & MODE_MROPE else 1)
    pos = rng.integers(0, 512, npos)
    srcs = [x, g.input(T.I32, (npos,), pos)]
    n_ff = ne[0] // 2 if c["mode"] == MODE_VISION else c["n_dims"] // 2
    ff = rng.uniform(0.9, 1.1, n_ff).astype(np.float32) if c["ff"] else None
    if ff is not None:
        srcs.append(g.input(T.F32, (n_ff,), ff))
    params = _params(c["n_dims"], c["mode"], c["fs"], c["ef"], c["af"], c["sections"], c["n_offs"],
                     c["n_ctx_orig"])
    out = g.node(Op.ROPE, ty, ne, srcs, params=params, nb=x.nb if c["inplace"] else None,
                 inplace_of=x if c["inplace"] else None)
    g.run()
    expect = reference(xvals, pos, c["n_dims"], c["mode"], 10000.0, c["fs"], c["ef"], c["af"],
                       32.0, 1.0, c["n_ctx_orig"], ff, c["sections"], c["n_offs"])
    if c["inplace"] and c["view"]:
        got = g.read(big)[:, :ne[2], :ne[1], ne[0]:]
    else:
        got = g.read(out)
    np.testing.assert_allclose(got, expect, atol=ATOL[ty], rtol=0)


def test_llama_shape_is_exact_on_position_zero():
    """llama.cpp's ROPE: f32 [16,4,2,1], positions I32; position 0 rotates by nothing."""
    rng = np.random.default_rng(2)
    g = GraphBuilder(1 << 20)
    xv = rng.standard_normal((1, 2, 4, 16)).astype(np.float32)
    x = g.input(T.F32, (16, 4, 2, 1), xv)
    pos = g.input(T.I32, (2,), [0, 7])
    out = g.node(Op.ROPE, T.F32, (16, 4, 2, 1), [x, pos], params=_params(16, MODE_NORMAL, n_ctx_orig=512))
    g.run()
    r = g.read(out)
    np.testing.assert_array_equal(r[0, 0], xv[0, 0])
    np.testing.assert_allclose(r, reference(xv, [0, 7], 16, n_ctx_orig=512), atol=1e-5)
    # a rotation keeps the length of every pair
    np.testing.assert_allclose(np.hypot(r[..., 0::2], r[..., 1::2]),
                               np.hypot(xv[..., 0::2], xv[..., 1::2]), rtol=1e-5)


@pytest.mark.parametrize("mode", [MODE_NORMAL, MODE_NEOX])
def test_shared_angle_table_follows_new_positions(mode):
    """A layer's ROPEs share their positions and one angle table; a run after the positions
    or the frequency factors change (a client's next token) must rotate by the new ones."""
    rng = np.random.default_rng(5)
    g = GraphBuilder(1 << 20)
    ne = (16, 3, 4, 1)
    q, k = (g.input(T.F32, ne, rng.uniform(-1, 1, ne[::-1])) for _ in range(2))
    pos = g.input(T.I32, (4,), [0, 1, 2, 3])
    ff = g.input(T.F32, (8,), np.ones(8))
    params = _params(16, mode, n_ctx_orig=512)
    outs = [g.node(Op.ROPE, T.F32, ne, [x, pos, ff], params=params) for x in (q, k)]
    g.run()
    for positions, factors in (([7, 8, 9, 10], np.ones(8)), ([7, 8, 9, 10], np.full(8, 1.5)),
                               ([0, 1, 2, 3], np.ones(8))):
        g.write(pos, positions)
        g.write(ff, factors)
        g.plan.run()                              # GRAPH_RECOMPUTE: bound once, run again
        for x, out in zip((q, k), outs):
            expect = reference(g.read(x), positions, 16, mode, n_ctx_orig=512,
                               freq_factors=factors.astype(np.float32))
            np.testing.assert_allclose(g.read(out), expect, atol=ATOL[T.F32], rtol=0)


@pytest.mark.parametrize("case", ["mode 1", "mode 10", "odd ne0", "odd n_dims", "n_dims 0",
                                  "n_dims > ne0", "odd n_offs", "offset window", "pos type",
                                  "pos count", "pos matrix", "ff short", "ff type", "bf16",
                                  "dst type", "unpacked", "vision n_dims", "vision offset",
                                  "negative section", "no sections", "sections > ne0"])
def test_invalid_nodes_are_refused(case):
    g = GraphBuilder(1 << 20)
    mode = {"mode 1": 1, "mode 10": 10, "vision n_dims": MODE_VISION, "vision offset": MODE_VISION,
            "negative section": MODE_MROPE, "no sections": MODE_MROPE,
            "sections > ne0": MODE_MROPE}.get(case, MODE_NEOX)
    n0 = 17 if case == "odd ne0" else 16
    n_dims = {"odd n_dims": 5, "n_dims 0": 0, "n_dims > ne0": 18, "vision n_dims": 4}.get(case, 8)
    n_offs = {"odd n_offs": 1, "offset window": 10, "vision offset": 2}.get(case, 0)
    sections = {"negative section": (6, -2, 2, 0), "no sections": (0, 0, 0, 0),
                "sections > ne0": (8, 8, 8, 0)}.get(case, (2, 2, 0, 0) if mode & 8 else (0, 0, 0, 0))
    ty = T.BF16 if case == "bf16" else T.F32
    ne = (n0, 2, 3, 1)
    x = g.input(ty, ne, nb=(8, 8 * n0, 16 * n0, 48 * n0) if case == "unpacked" else None)
    npos = 3 * (4 if mode & 8 else 1) + (1 if case == "pos count" else 0)
    pos = g.input(T.I64 if case == "pos type" else T.I32,
                  (npos, 2) if case == "pos matrix" else (npos,))
    srcs = [x, pos]
    if case in ("ff short", "ff type"):
        srcs.append(g.input(T.F16 if case == "ff type" else T.F32, (3 if case == "ff short" else 8,)))
    g.node(Op.ROPE, T.F16 if case == "dst type" else ty, ne, srcs,
           params=_params(n_dims, mode, sections=sections, n_offs=n_offs))
    with pytest.raises(GraphInvalid):
        g.compile()


def _libm_powf():
    import ctypes
    import ctypes.util
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.powf.restype = ctypes.c_float
    libm.powf.argtypes = [ctypes.c_float, ctypes.c_float]
    return lambda a, b: np.float32(libm.powf(float(a), float(b)))


def test_frequency_step_and_alibi_slopes_are_the_c_librarys_powf():
    """ROPE's ``base^(-2/n_dims)`` and ALiBi's slopes are ggml's ``powf``, whatever CPU numpy
    runs on: numpy's float32 power differs from it in the last bit for one exponent in six on
    an AVX-512 host (base 10000, 64-wide heads among them), and every angle with it."""
    from types import SimpleNamespace

    from refimpl.kernels.rope import _angle_constants
    from refimpl.kernels.softmax import alibi_slopes
    powf = _libm_powf()
    rng = np.random.default_rng(3)
    bases = np.concatenate([np.float32([10000, 500000, 1e6, 1e4 + 0.5, 8e6]),
                            rng.uniform(1.5, 2e6, 300).astype(np.float32)])
    for base in bases:
        for n_dims in range(2, 258, 2):
            p = SimpleNamespace(freq_base=np.float32(base), n_dims=n_dims, n_ctx_orig=0,
                                beta_fast=np.float32(32), beta_slow=np.float32(1),
                                mode=MODE_NORMAL, sections=(0, 0, 0, 0),
                                freq_scale=np.float32(1), ext_factor=np.float32(0),
                                attn_factor=np.float32(1))
            step = _angle_constants(p, n_dims)[-1]
            want = powf(base, np.float32(np.float32(-2.0) / np.float32(n_dims)))
            assert step == want, (base, n_dims, step, want)
    for n_head, max_bias in ((12, 8.0), (32, 8.0), (6, 3.7), (40, 16.0)):
        slopes = alibi_slopes(n_head, max_bias)
        log2 = 1 << int(np.floor(np.log2(n_head)))
        m0 = powf(2.0, np.float32(-np.float32(max_bias) / np.float32(log2)))
        m1 = powf(2.0, np.float32(-(np.float32(max_bias) / np.float32(2.0)) / np.float32(log2)))
        want = [powf(m0, h + 1) if h < log2 else powf(m1, 2 * (h - log2) + 1)
                for h in range(n_head)]
        np.testing.assert_array_equal(slopes, np.array(want, np.float32))
