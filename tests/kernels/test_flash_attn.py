"""FLASH_ATTN_EXT against the float64 oracle: F32/F16/BF16 K and V (mixed too), grouped-query
broadcast over heads and dimension 3, masks with -inf blocks and broadcast, ALiBi, soft-capping,
sinks, permuted and strided views (K/V as views of a larger cache, V as a view of K); the exact
half-precision rounding used for F16 V; and refusal of invalid nodes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from refimpl.graph import GraphInvalid, Op
from refimpl.kernels.cpu_tensors import round_to
from refimpl.kernels.flash_attn import (TILED_MIN_ROWS, reference, round_f16_finite,
                                       round_f16_inplace)
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder


def nmse(got, want):
    den = float((want.astype(np.float64) ** 2).sum())
    return float(((got.astype(np.float64) - want) ** 2).sum()) / max(den, 1e-30)


def _permuted(g, ty, ne, values, permute):
    """A tensor of logical shape ``ne`` stored with dims 1 and 2 swapped (ggml_permute 0,2,1,3)
    when ``permute``; ``values`` has numpy shape ne[::-1]."""
    if not permute:
        return g.input(ty, ne, values)
    stored = g.input(ty, (ne[0], ne[2], ne[1], ne[3]), np.swapaxes(values, 1, 2))
    nb = stored.nb
    return g.view(stored, ne, (nb[0], nb[2], nb[1], nb[3]), op=Op.PERMUTE)


@st.composite
def cases(draw):
    nk2 = draw(st.integers(1, 2))
    gqa = draw(st.integers(1, 3))
    nr3 = draw(st.integers(1, 2))
    kt = draw(st.sampled_from([T.F32, T.F16, T.BF16]))
    vt = draw(st.sampled_from([kt, kt, T.F32, T.F16, T.BF16]))
    mask = draw(st.booleans())
    return dict(dk=draw(st.integers(1, 40)), dv=draw(st.integers(1, 40)), nk2=nk2, nq2=nk2 * gqa,
                nr3=nr3, nkv=draw(st.integers(1, 40)),
                nq1=draw(st.sampled_from([1, 2, 3, 5, TILED_MIN_ROWS, TILED_MIN_ROWS + 3])),
                kt=kt, vt=vt, mask=mask, mask_b3=mask and nr3 > 1 and draw(st.booleans()),
                sinks=draw(st.booleans()), max_bias=draw(st.sampled_from([0.0, 8.0])) if mask else 0.0,
                softcap=draw(st.sampled_from([0.0, 0.0, 10.0])), prec=draw(st.sampled_from([0, 10])),
                permute=draw(st.booleans()), kv_view=draw(st.booleans()),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(c=cases())
def test_matches_oracle(c):
    rng = np.random.default_rng(c["seed"])
    dk, dv, nkv, nq1, nq2, nk2, nr3 = (c[k] for k in ("dk", "dv", "nkv", "nq1", "nq2", "nk2", "nr3"))
    g = GraphBuilder(4 << 20)
    qv = rng.uniform(-1, 1, (nr3, nq2, nq1, dk)).astype(np.float32)
    q = _permuted(g, T.F32, (dk, nq1, nq2, nr3), qv, c["permute"])
    rows = 2 * nkv if c["kv_view"] else nkv
    kbig = g.input(c["kt"], (dk, rows, nk2, nr3), rng.uniform(-1, 1, (nr3, nk2, rows, dk)))
    vbig = g.input(c["vt"], (dv, rows, nk2, nr3), rng.uniform(-1, 1, (nr3, nk2, rows, dv)))
    k = g.view(kbig, (dk, nkv, nk2, nr3), kbig.nb) if c["kv_view"] else kbig
    v = g.view(vbig, (dv, nkv, nk2, nr3), vbig.nb) if c["kv_view"] else vbig
    kvals, vvals = g.read(kbig)[:, :, :nkv], g.read(vbig)[:, :, :nkv]
    srcs = [q, k, v, None, None]
    mvals = svals = None
    if c["mask"]:
        mne = (nkv + 3, nq1 + 1, 1, nr3 if c["mask_b3"] else 1)
        mv = rng.uniform(-1, 1, mne[::-1]).astype(np.float32)
        mv[rng.random(mv.shape) < 0.3] = -np.inf
        mv[..., nq1 // 2, :] = -np.inf       # one fully masked query row: output 0
        srcs[3] = g.input(T.F16, mne, mv)
        mvals = g.read(srcs[3])
    if c["sinks"]:
        svals = rng.uniform(-3, 3, nq2).astype(np.float32)
        srcs[4] = g.input(T.F32, (nq2,), svals)
    while srcs[-1] is None:
        srcs.pop()
    scale = float(np.float32(1 / np.sqrt(dk)))
    out = g.node(Op.FLASH_ATTN_EXT, T.F32, (dv, nq2, nq1, nr3), srcs,
                 params=[scale, c["max_bias"], c["softcap"], c["prec"]])
    g.run()
    want = reference(qv, kvals, vvals, mvals, scale, c["max_bias"], c["softcap"], svals)
    got = g.read(out)
    assert np.all(np.isfinite(got))
    # an F16 V is accumulated in half precision, as ggml does: its resolution is relative to
    # the V values summed, so an output much smaller than them (weights that cancel) is
    # judged by that absolute resolution instead
    half_acc = c["vt"] == T.F16 and np.max(np.abs(got - want)) <= 2.0 ** -9 * np.abs(vvals).max()
    assert nmse(got, want) < 1e-5 or half_acc, nmse(got, want)


@njit(fastmath={"contract"})
def _round_finite_in_contracting_caller(a):
    # the kernel calls the rounding from a function compiled with FMA contraction: the split
    # must stay exact when inlined there
    round_f16_finite(a)


def _half_cases():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * s
                        for s in (1e-9, 1e-7, 3e-5, 1e-3, 1.0, 300.0, 3e4, 7e4)])
    special = [65504, 65519.99, 65520, -65520, 2**-14, 2**-24, 2**-25, 3 * 2**-25, 0.0, -0.0,
               1e-45, -1e-45, 1e-38]
    # ties at the 11-bit boundary, and at the 2^-24 boundary below 2^-14
    ties = (rng.integers(0x38800000, 0x47000000, 5000).astype(np.uint32) & ~np.uint32(0x1FFF)) | 0x1000
    sub_ties = (rng.integers(0, 1 << 14, 2000) + 0.5).astype(np.float32) * np.float32(2.0**-24)
    return np.concatenate([x, np.array(special, np.float32), ties.view(np.float32),
                           -ties.view(np.float32), sub_ties, -sub_ties])


def _half(x):
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("tail", [0, 1, 7])
def test_round_to_f16_is_the_ieee_rounding(tail):
    """round_to(·, F16) (the CPU's conversion eight at a time where it has F16C, arithmetic for
    the rest) equals numpy's float16 round trip, bit for bit, whatever the length and layout."""
    x = np.concatenate([_half_cases(), np.array([np.inf, -np.inf], np.float32)])
    x = x[:x.size - x.size % 8 + tail]
    got = round_to(x, T.F16)
    np.testing.assert_array_equal(got.view(np.uint32), _half(x).view(np.uint32))
    rows = np.concatenate([x, x])[:6 * 2001].reshape(6, 2001)[:, ::3]   # not contiguous
    got = round_to(rows, T.F16)
    np.testing.assert_array_equal(got.view(np.uint32), _half(rows).view(np.uint32))
    nan = round_to(np.full(9, np.nan, np.float32), T.F16)
    assert np.isnan(nan).all()


def test_half_rounding_is_exact():
    """Both accumulator roundings equal a float32 -> float16 -> float32 round trip."""
    x = _half_cases()
    y = x.copy()
    _round_finite_in_contracting_caller(y)
    np.testing.assert_array_equal(y.view(np.uint32), _half(x).view(np.uint32))
    x = np.concatenate([x, np.array([np.inf, -np.inf, np.nan], np.float32)])
    y, tmp = x.copy(), np.empty_like(x)
    round_f16_inplace(y, y.view(np.uint32), tmp, tmp.view(np.uint32))
    want = _half(x)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(y[ok].view(np.uint32), want[ok].view(np.uint32))


def test_overflowing_f16_accumulator_stays_infinite():
    """Huge F16 values overflow ggml's half-precision accumulator to infinity; the fast rounding
    path must hand over to the exact one instead of producing NaN."""
    g = GraphBuilder(1 << 20)
    q = g.input(T.F32, (4, 1, 1, 1), np.zeros((1, 1, 1, 4)))
    k = g.input(T.F16, (4, 4, 1, 1), np.zeros((1, 1, 4, 4)))
    v = g.input(T.F16, (4, 4, 1, 1), np.full((1, 1, 4, 4), 60000.0))
    out = g.node(Op.FLASH_ATTN_EXT, T.F32, (4, 1, 1, 1), [q, k, v], params=[1.0, 0.0, 0.0, 10])
    g.run()
    assert np.all(np.isposinf(g.read(out)))


def test_llama_shape_and_mla_view():
    """llama.cpp's node (q f32 permuted, k/v f16 views of a cache with nb [2,64,32,...], mask
    f16 [256,2,1,1], prec 10), and a V that is a sub-view of K as MLA models build it."""
    rng = np.random.default_rng(4)
    g = GraphBuilder(4 << 20)
    qv = rng.uniform(-1, 1, (1, 4, 2, 16)).astype(np.float32)        # stored [16, 4 heads, 2 tok]
    qs = g.input(T.F32, (16, 4, 2, 1), np.swapaxes(qv, 1, 2))
    q = g.view(qs, (16, 2, 4, 1), (4, qs.nb[2], qs.nb[1], qs.nb[3]), op=Op.PERMUTE)
    cache = g.input(T.F16, (32, 512, 1, 1), rng.uniform(-1, 1, (1, 1, 512, 32)))
    # k: [16, 256, 2, 1] with nb [2, 64, 32, 32768]: head h is columns 16h..16h+15 of the cache
    k = g.view(cache, (16, 256, 2, 1), (2, 64, 32, 32768), op=Op.VIEW)
    cvals = g.read(cache)[0, 0]
    kvals = np.stack([cvals[:256, 16 * h:16 * h + 16] for h in range(2)])[None]
    m = np.zeros((1, 1, 2, 256), np.float32)
    m[..., 0, 10:] = -np.inf
    m[..., 1, 11:] = -np.inf
    mask = g.input(T.F16, (256, 2, 1, 1), m)
    out = g.node(Op.FLASH_ATTN_EXT, T.F32, (16, 4, 2, 1), [q, k, k, mask], params=[0.25, 0.0, 0.0, 10])
    # MLA: v is the first 8 columns of each k row
    vmla = g.view(k, (8, 256, 2, 1), k.nb, op=Op.VIEW)
    out2 = g.node(Op.FLASH_ATTN_EXT, T.F32, (8, 4, 2, 1), [q, k, vmla, mask], params=[0.25, 0.0, 0.0, 10])
    g.run()
    want = reference(qv, kvals, kvals, m, 0.25)
    assert nmse(g.read(out), want) < 1e-5
    want2 = reference(qv, kvals, kvals[..., :8], m, 0.25)
    assert nmse(g.read(out2), want2) < 1e-5


def _node(case):
    g = GraphBuilder(1 << 20)
    kt = {"q4_k k": T.Q4_K, "i32 k": T.I32}.get(case, T.F16)    # (block K/V: the KV-cache types)
    dk = 256 if case in ("q4_k k", "q6_k v") else 32
    q = g.input(T.F16 if case == "f16 q" else T.F32, (dk, 3, 4, 1))
    k = g.input(kt, (dk if case != "head size" else 16, 10, 3 if case == "gqa" else 2, 1),
                nb=(4, 128, 1280, 2560) if case == "unpacked k" else None)
    v = g.input(T.Q6_K if case == "q6_k v" else T.F16, (dk, 9 if case == "v rows" else 10,
                                                         3 if case == "v heads" else 2,
                                                         2 if case == "ne3" else 1))
    srcs = [q, k, v]
    if case != "alibi without mask":
        mne = {"mask short": (9, 3, 1, 1), "mask rows": (10, 2, 1, 1),
               "mask heads": (10, 3, 3, 1)}.get(case, (10, 3, 1, 1))
        srcs.append(g.input(T.F32 if case == "f32 mask" else T.F16, mne,
                            nb=(2, 40, 120, 120) if case == "strided mask" else None))
    if case == "sinks length":
        srcs.append(g.input(T.F32, (3,)))
    params = [0.17, 8.0 if case == "alibi without mask" else 0.0, 0.0,
              3 if case == "prec" else 10, -1 if case == "n_kv_max" else 0]
    dne = (dk, 4, 3, 1) if case != "dst shape" else (dk, 3, 4, 1)
    g.node(Op.FLASH_ATTN_EXT, T.F16 if case == "f16 dst" else T.F32, dne, srcs, params=params,
           nb=(4, 4 * dk, 8 * dk * 4, 8 * dk * 12) if case == "strided dst" else None)
    return g


@pytest.mark.parametrize("case", ["q4_k k", "q6_k v", "i32 k", "f16 q", "f16 dst", "head size",
                                  "gqa", "v rows", "v heads", "ne3", "unpacked k", "mask short",
                                  "mask rows", "mask heads", "f32 mask", "strided mask",
                                  "alibi without mask", "sinks length", "prec", "n_kv_max",
                                  "dst shape", "strided dst"])
def test_invalid_nodes_are_refused(case):
    g = _node(case)
    with pytest.raises(GraphInvalid):
        g.compile()


def test_valid_node_compiles():
    _node("none").compile()


def _count_in_place_runs(monkeypatch):
    from refimpl.kernels import flash_attn
    calls = []
    real = flash_attn.flash_attn_f16_in_place

    def counting(*args):
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(flash_attn, "flash_attn_f16_in_place", counting)
    return calls


@pytest.mark.parametrize("nq1,sinks,softcap", [(1, False, 0.0), (3, True, 0.0), (2, False, 20.0)])
def test_f16_cache_read_in_place(monkeypatch, nq1, sinks, softcap):
    """The common decode (F16 K and V, head sizes of 16·n): K and V are read where they lie, a
    strided view of a cache, with grouped-query heads, a mask with -inf blocks, sinks and
    soft-capping; the result is the oracle's, and the in-place kernel is the one that ran."""
    calls = _count_in_place_runs(monkeypatch)
    rng = np.random.default_rng(nq1)
    dk, nkv, nq2, nk2 = 64, 70, 6, 2
    g = GraphBuilder(4 << 20)
    qv = rng.uniform(-1, 1, (1, nq2, nq1, dk)).astype(np.float32)
    q = g.input(T.F32, (dk, nq1, nq2, 1), qv)
    cache = g.input(T.F16, (dk * nk2, 96, 1, 1), rng.uniform(-1, 1, (1, 1, 96, dk * nk2)))
    cvals = g.read(cache)[0, 0]
    kv = g.view(cache, (dk, nkv, nk2, 1), (2, cache.nb[1], 2 * dk, cache.nb[3]))
    kvals = np.stack([cvals[:nkv, dk * h:dk * (h + 1)] for h in range(nk2)])[None]
    m = rng.uniform(-1, 1, (1, 1, nq1, nkv)).astype(np.float32)
    m[..., 40:] = -np.inf
    m[..., 0, 5:9] = -np.inf
    mask = g.input(T.F16, (nkv, nq1, 1, 1), m)
    srcs = [q, kv, kv, mask]
    svals = None
    if sinks:
        svals = rng.uniform(-2, 2, nq2).astype(np.float32)
        srcs.append(g.input(T.F32, (nq2,), svals))
    out = g.node(Op.FLASH_ATTN_EXT, T.F32, (dk, nq2, nq1, 1), srcs, params=[0.125, 0.0, softcap, 0])
    g.run()
    want = reference(qv, kvals, kvals, g.read(mask), 0.125, 0.0, softcap, svals)
    assert nmse(g.read(out), want) < 1e-5
    assert calls == [1]


def test_destination_over_its_cache_is_not_read_in_place(monkeypatch):
    """A destination that overlaps K (a graph no client builds, but the wire allows it) makes
    the kernel read copies: what it writes cannot change what it reads."""
    calls = _count_in_place_runs(monkeypatch)
    rng = np.random.default_rng(9)
    g = GraphBuilder(1 << 20)
    qv = rng.uniform(-1, 1, (1, 2, 4, 16)).astype(np.float32)
    q = g.input(T.F32, (16, 4, 2, 1), qv)
    # K and V are F16 (16, 32, 1, 1); dst (16, 2, 4, 1) of F32 takes the same 1024 bytes
    k = g.input(T.F16, (16, 32, 1, 1), rng.uniform(-1, 1, (1, 1, 32, 16)))
    kvals = g.read(k)
    out = g.node(Op.FLASH_ATTN_EXT, T.F32, (16, 2, 4, 1), [q, k, k], params=[0.25, 0.0, 0.0, 0],
                 inplace_of=k)
    g.run()
    assert nmse(g.read(out), reference(qv, kvals, kvals, None, 0.25)) < 1e-5
    assert calls == []


def test_overflowing_f16_accumulator_stays_infinite_in_place(monkeypatch):
    """The in-place kernel's half-precision accumulator overflows to infinity, as ggml's."""
    calls = _count_in_place_runs(monkeypatch)
    g = GraphBuilder(1 << 20)
    q = g.input(T.F32, (16, 1, 1, 1), np.zeros((1, 1, 1, 16)))
    k = g.input(T.F16, (16, 4, 1, 1), np.zeros((1, 1, 4, 16)))
    v = g.input(T.F16, (16, 4, 1, 1), np.full((1, 1, 4, 16), 60000.0))
    out = g.node(Op.FLASH_ATTN_EXT, T.F32, (16, 1, 1, 1), [q, k, v], params=[1.0, 0.0, 0.0, 0])
    g.run()
    assert np.all(np.isposinf(g.read(out)))
    assert calls == [1]
