"""REPEAT, REPEAT_BACK, CONCAT, PAD, PAD_REFLECT_1D, ROLL, UPSCALE, WIN_PART, WIN_UNPART,
GET_REL_POS and ADD_REL_POS against numpy oracles written from ggml-cpu's definitions
(refimpl.kernels.layout), strided sources included, and refusal of nodes ggml would not
build (spec/ops/layout.md)."""

from __future__ import annotations

import numpy as np
import pytest

from refimpl.graph import GraphInvalid, Op
from refimpl.graph.validators.layout import (SCALE_ALIGN_CORNERS, SCALE_ANTIALIAS, SCALE_BICUBIC,
                                            SCALE_BILINEAR, SCALE_NEAREST)
from refimpl.kernels import layout as L
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder

RNG = np.random.default_rng(7)


def _vals(shape):
    return RNG.uniform(-1, 1, shape).astype(np.float32)


def _f16(x):
    return x.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("type_", [T.F32, T.F16, T.BF16, T.I32])
def test_repeat(type_):
    g = GraphBuilder(1 << 20)
    v = RNG.integers(-50, 50, (1, 2, 3, 5)).astype(np.float32)
    a = g.input(type_, (5, 3, 2, 1), v)
    out = g.node(Op.REPEAT, type_, (10, 3, 4, 2), [a])
    g.run()
    np.testing.assert_array_equal(g.read(out), L.reference_repeat(v, (2, 4, 3, 10)))


def test_repeat_back_sums_tiles_in_order():
    g = GraphBuilder(1 << 20)
    v = _vals((2, 4, 3, 6))
    a = g.input(T.F32, (6, 3, 4, 2), v)
    out = g.node(Op.REPEAT_BACK, T.F32, (3, 3, 2, 1), [a])
    g.run()
    np.testing.assert_allclose(g.read(out), L.reference_repeat_back(v, (1, 2, 3, 3)), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
@pytest.mark.parametrize("type_", [T.F32, T.F16, T.I32])
def test_concat(dim, type_):
    g = GraphBuilder(1 << 20)
    ne_a = [4, 3, 2, 2]
    ne_b = list(ne_a)
    ne_b[dim] = 3
    va = RNG.integers(-9, 9, ne_a[::-1]).astype(np.float32)
    vb = RNG.integers(-9, 9, ne_b[::-1]).astype(np.float32)
    a, b = g.input(type_, ne_a, va), g.input(type_, ne_b, vb)
    ne = list(ne_a)
    ne[dim] += 3
    out = g.node(Op.CONCAT, type_, ne, [a, b], params=[dim])
    g.run()
    np.testing.assert_array_equal(g.read(out), L.reference_concat(va, vb, dim))


def test_concat_blocks_along_rows_and_dim0():
    g = GraphBuilder(1 << 20)
    qa = RNG.integers(0, 255, 2 * 34 * 3, dtype=np.uint8)   # q8_0: 34 bytes per 32 values
    qb = RNG.integers(0, 255, 1 * 34 * 3, dtype=np.uint8)
    a, b = g.input(T.Q8_0, (64, 3)), g.input(T.Q8_0, (32, 3))
    g.write(a, qa)
    g.write(b, qb)
    out = g.node(Op.CONCAT, T.Q8_0, (96, 3), [a, b], params=[0])
    g.run()
    got = g.read(out).reshape(3, 3 * 34)
    np.testing.assert_array_equal(got, np.concatenate([qa.reshape(3, 68), qb.reshape(3, 34)], 1))


@pytest.mark.parametrize("circular", [0, 1])
def test_pad_of_a_permuted_source(circular):
    g = GraphBuilder(1 << 20)
    v = _vals((1, 3, 4, 5))                   # (ne3, ne2, ne1, ne0) = (1, 3, 4, 5)
    base = g.input(T.F32, (5, 4, 3, 1), v)
    # the permuted view ne (3, 4, 5): element (i0, i1, i2) = v[0, i0, i1, i2]
    perm = g.view(base, (3, 4, 5, 1), (80, 20, 4, 240), op=Op.PERMUTE)
    pads = [1, 2, 0, 1, 2, 0, 1, 1]
    ne = [3 + 3, 4 + 1, 5 + 2, 1 + 2]
    out = g.node(Op.PAD, T.F32, ne, [perm], params=pads + [circular])
    g.run()
    src = v[0].transpose(2, 1, 0)[None]       # as (ne3, ne2, ne1, ne0) of the view
    np.testing.assert_array_equal(g.read(out), L.reference_pad(src, pads, bool(circular)))


def test_pad_reflect_1d():
    g = GraphBuilder(1 << 20)
    v = _vals((1, 2, 3, 9))
    a = g.input(T.F32, (9, 3, 2), v)
    out = g.node(Op.PAD_REFLECT_1D, T.F32, (9 + 4 + 8, 3, 2), [a], params=[4, 8])
    g.run()
    np.testing.assert_array_equal(g.read(out), L.reference_pad_reflect_1d(v, 4, 8))


def test_roll():
    g = GraphBuilder(1 << 20)
    v = _vals((2, 3, 4, 5))
    a = g.input(T.F32, (5, 4, 3, 2), v)
    shifts = [3, -2, 1, -1]
    out = g.node(Op.ROLL, T.F32, (5, 4, 3, 2), [a], params=shifts)
    g.run()
    np.testing.assert_array_equal(g.read(out), L.reference_roll(v, shifts))


@pytest.mark.parametrize("flags", [
    SCALE_NEAREST, SCALE_BILINEAR, SCALE_BICUBIC, SCALE_BILINEAR | SCALE_ANTIALIAS,
    SCALE_NEAREST | SCALE_ALIGN_CORNERS, SCALE_BILINEAR | SCALE_ALIGN_CORNERS,
    SCALE_BICUBIC | SCALE_ALIGN_CORNERS])
@pytest.mark.parametrize("ne_out", [(11, 7, 3, 2), (3, 2, 2, 1)])
def test_upscale(flags, ne_out):
    g = GraphBuilder(1 << 20)
    v = _vals((2, 3, 4, 5))
    a = g.input(T.F32, (5, 4, 3, 2), v)
    out = g.node(Op.UPSCALE, T.F32, ne_out, [a], params=[flags])
    g.run()
    np.testing.assert_allclose(g.read(out), L.reference_upscale(v, ne_out[::-1], flags),
                               rtol=1e-5, atol=1e-5)


def test_win_part_and_unpart_round_trip():
    g = GraphBuilder(1 << 20)
    c, w_img, h_img, w = 3, 7, 5, 3
    v = _vals((1, h_img, w_img, c))
    a = g.input(T.F32, (c, w_img, h_img), v)
    npx, npy = 3, 2
    parts = g.node(Op.WIN_PART, T.F32, (c, w, w, npx * npy), [a], params=[npx, npy, w])
    back = g.node(Op.WIN_UNPART, T.F32, (c, w_img, h_img), [parts], params=[w])
    g.run()
    got = g.read(parts)
    padded = np.zeros((npy * w, npx * w, c), np.float32)
    padded[:h_img, :w_img] = v[0]
    for py in range(npy):
        for px in range(npx):
            np.testing.assert_array_equal(got[py * npx + px],
                                          padded[py * w:(py + 1) * w, px * w:(px + 1) * w])
    np.testing.assert_array_equal(g.read(back), v)


def test_get_rel_pos():
    g = GraphBuilder(1 << 20)
    n, c = 4, 5
    table = _f16(_vals((1, 1, 2 * n - 1, c)))
    a = g.input(T.F16, (c, 2 * n - 1), table)
    out = g.node(Op.GET_REL_POS, T.F16, (c, n, n), [a])
    g.run()
    got = g.read(out)[0]
    for q in range(n):
        for k in range(n):
            np.testing.assert_array_equal(got[q, k], table[0, 0, q - k + n - 1])


@pytest.mark.parametrize("inplace", [0, 1])
def test_add_rel_pos(inplace):
    g = GraphBuilder(1 << 20)
    n, q1, q2, b = 3, 2, 2, 2
    va, vw, vh = _vals((1, b, q1 * q2, n * n)), _vals((b, q2, q1, n)), _vals((b, q2, q1, n))
    a = g.input(T.F32, (n * n, q1 * q2, b), va)
    pw, ph = g.input(T.F32, (n, q1, q2, b), vw), g.input(T.F32, (n, q1, q2, b), vh)
    out = g.node(Op.ADD_REL_POS, T.F32, (n * n, q1 * q2, b), [a, pw, ph], params=[inplace],
                 inplace_of=a if inplace else None)
    g.run()
    expect = L.reference_add_rel_pos(va[0], vw.reshape(b, q1 * q2, n), vh.reshape(b, q1 * q2, n))
    np.testing.assert_allclose(g.read(out)[0], expect, rtol=1e-6, atol=1e-6)


_REFUSALS = {
    "repeat not a tile": (Op.REPEAT, T.F32, [(4, 3)], (6, 3), []),
    "repeat i8": (Op.REPEAT, T.I8, [(4, 3)], (8, 3), []),
    "repeat_back f16": (Op.REPEAT_BACK, T.F16, [(8, 3)], (4, 3), []),
    "concat dim 4": (Op.CONCAT, T.F32, [(4, 3), (4, 3)], (8, 3), [4]),
    "concat shapes": (Op.CONCAT, T.F32, [(4, 3), (4, 2)], (8, 3), [0]),
    "pad negative": (Op.PAD, T.F32, [(4, 3)], (3, 3), [0, -1]),
    "pad wrong dst": (Op.PAD, T.F32, [(4, 3)], (6, 3), [1, 0]),
    "pad circular beyond": (Op.PAD, T.F32, [(4, 3)], (9, 3), [5, 0, 0, 0, 0, 0, 0, 0, 1]),
    "reflect too wide": (Op.PAD_REFLECT_1D, T.F32, [(4, 3)], (8, 3), [4, 0]),
    "roll too far": (Op.ROLL, T.F32, [(4, 3)], (4, 3), [4]),
    "upscale mode": (Op.UPSCALE, T.F32, [(4, 3)], (8, 6), [3]),
    "upscale antialias nearest": (Op.UPSCALE, T.F32, [(4, 3)], (8, 6), [SCALE_ANTIALIAS]),
    "upscale f16": (Op.UPSCALE, T.F16, [(4, 3)], (8, 6), [0]),
    "win_part counts": (Op.WIN_PART, T.F32, [(2, 5, 5)], (2, 3, 3, 4), [2, 1, 3]),
    "win_unpart shape": (Op.WIN_UNPART, T.F32, [(2, 3, 3, 3)], (2, 5, 5), [3]),
    "get_rel_pos table": (Op.GET_REL_POS, T.F16, [(4, 6)], (4, 3, 3), []),
    "get_rel_pos bf16": (Op.GET_REL_POS, T.BF16, [(4, 5)], (4, 3, 3), []),
    "add_rel_pos shape": (Op.ADD_REL_POS, T.F32, [(9, 4, 2), (3, 2, 2, 2), (3, 2, 2, 1)],
                          (9, 4, 2), [0]),
}


@pytest.mark.parametrize("case", list(_REFUSALS))
def test_invalid_nodes_are_refused(case):
    op, type_, srcs, ne, params = _REFUSALS[case]
    g = GraphBuilder(1 << 20)
    ins = [g.input(type_ if i == 0 or op == Op.CONCAT else T.F32, s) for i, s in enumerate(srcs)]
    g.node(op, type_, ne, ins, params=params)
    with pytest.raises(GraphInvalid):
        g.compile()
