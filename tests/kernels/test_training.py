"""The training and backward ops (spec/ops/training.md) against their float64 numpy oracles:
SILU_BACK, RMS_NORM_BACK, OUT_PROD (float, F16 and block-format src0, broadcast batches, a
transposed src1; every weight format runs through test-backend-ops in tests/e2e),
GET_ROWS_BACK (repeated rows, index checks), SOFT_MAX_BACK, ROPE_BACK, CROSS_ENTROPY_LOSS and
its gradient, OPT_STEP_ADAMW and OPT_STEP_SGD (in place); and the refusal of nodes ggml would
not build."""

from __future__ import annotations

import numpy as np
import pytest

from refimpl.graph import GraphInvalid, Op
from refimpl.graph.validators.training import FLAG_PARAM
from refimpl.kernels import training as tr
from refimpl.kernels.quants import dequantize_rows
from refimpl.kernels.rope import MODE_NEOX, MODE_NORMAL, reference as rope_reference
from refimpl.protocol import GgmlType as T
from tests.kernels.test_quants import random_rows
from tools.graphs import GraphBuilder

RNG = np.random.default_rng(7)


def _vals(*shape, lo=-1.0, hi=1.0):
    return RNG.uniform(lo, hi, shape).astype(np.float32)


@pytest.mark.parametrize("ty", [T.F32, T.F16])
def test_silu_back(ty):
    ne = (33, 3, 2, 1)
    g = GraphBuilder(1 << 20)
    dy = g.input(ty, ne, _vals(*ne[::-1], lo=-4, hi=4))
    x = g.input(ty, ne, _vals(*ne[::-1], lo=-4, hi=4))
    out = g.node(Op.SILU_BACK, ty, ne, [dy, x])
    g.run()
    want = tr.reference_silu_back(g.read(dy), g.read(x))
    np.testing.assert_allclose(g.read(out), want, rtol=2e-3 if ty == T.F16 else 1e-5, atol=1e-6)


@pytest.mark.parametrize("inplace", [False, True])
def test_rms_norm_back(inplace):
    ne = (40, 3, 2, 2)
    g = GraphBuilder(1 << 20)
    dz = g.input(T.F32, ne, _vals(*ne[::-1], lo=-10, hi=10))
    x = g.input(T.F32, ne, _vals(*ne[::-1], lo=-10, hi=10))
    dzv, xv = g.read(dz), g.read(x)
    out = g.node(Op.RMS_NORM_BACK, T.F32, ne, [dz, x], params=[1e-6],
                 inplace_of=dz if inplace else None)
    g.run()
    np.testing.assert_allclose(g.read(out), tr.reference_rms_norm_back(dzv, xv, 1e-6),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ty,bcast,trans", [(T.F32, True, False), (T.F32, False, True),
                                            (T.F16, False, False), (T.Q4_0, False, False),
                                            (T.Q4_K, False, False)])
def test_out_prod(ty, bcast, trans):
    m, k, n = 256, 5, 3
    a2, a3 = (1, 2) if bcast else (2, 1)
    b2, b3 = (2, 2) if bcast else (2, 1)
    g = GraphBuilder(1 << 20)
    if ty in (T.F32, T.F16):
        a = g.input(ty, (m, k, a2, a3), _vals(a3, a2, k, m))
        av = g.read(a)
    else:
        raw = random_rows(RNG, int(ty), k * a2 * a3, m)
        a = g.input(ty, (m, k, a2, a3), raw)
        av = dequantize_rows(int(ty), raw.reshape(a3, a2, k, -1), m)
    bv = _vals(b3, b2, k, n)
    if trans:   # src1 as ggml_transpose of a (k, n) tensor: nb[0] > nb[1]
        base = g.input(T.F32, (k, n, b2, b3), np.swapaxes(bv, -1, -2))
        b = g.view(base, (n, k, b2, b3), (4 * k, 4, 4 * k * n, 4 * k * n * b2), op=Op.TRANSPOSE)
    else:
        b = g.input(T.F32, (n, k, b2, b3), bv)
    out = g.node(Op.OUT_PROD, T.F32, (m, n, b2, b3), [a, b])
    g.run()
    np.testing.assert_allclose(g.read(out), tr.reference_out_prod(av, bv), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ty", [T.F32, T.F16])
def test_get_rows_back_adds_repeated_rows(ty):
    g = GraphBuilder(1 << 20)
    grad = g.input(ty, (16, 6), _vals(6, 16))
    idx_all = np.array([3, 0, 3, 4, 1, 3], np.int32)
    rows = g.input(T.I32, (6,), idx_all)
    half = g.view(rows, (4,), (4, 16, 16, 16))    # only the first four indices are used
    out = g.node(Op.GET_ROWS_BACK, T.F32, (16, 5), [grad, half])
    g.run()
    want = tr.reference_get_rows_back(g.read(grad)[0, 0, :4], idx_all[:4], 5)
    np.testing.assert_allclose(g.read(out)[0, 0], want, rtol=1e-6, atol=1e-6)
    g.write(rows, np.array([0, 5, 0, 0, 0, 0], np.int32))   # row 5 of 5: stops the graph
    with pytest.raises(GraphInvalid, match="row index 5"):
        g.run()


@pytest.mark.parametrize("inplace", [False, True])
def test_soft_max_back(inplace):
    ne = (20, 4, 3, 1)
    g = GraphBuilder(1 << 20)
    dy = g.input(T.F32, ne, _vals(*ne[::-1]))
    y = g.input(T.F32, ne, _vals(*ne[::-1], lo=0, hi=1))
    dyv, yv = g.read(dy), g.read(y)
    out = g.node(Op.SOFT_MAX_BACK, T.F32, ne, [dy, y], params=[0.5, 0.0],
                 inplace_of=dy if inplace else None)
    g.run()
    np.testing.assert_allclose(g.read(out), tr.reference_soft_max_back(dyv, yv, 0.5),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", [MODE_NORMAL, MODE_NEOX])
def test_rope_back_undoes_rope(mode):
    ne = (16, 3, 4, 1)
    g = GraphBuilder(1 << 20)
    xv = _vals(*ne[::-1])
    x = g.input(T.F32, ne, xv)
    pos = g.input(T.I32, (4,), np.array([0, 5, 99, 400], np.int32))
    params = [0, 12, mode, 0, 512, 10000.0, 1.0, 0.0, 1.0, 32.0, 1.0, 0, 0, 0, 0, 2]
    fwd = g.node(Op.ROPE, T.F32, ne, [x, pos], params=params)
    back = g.node(Op.ROPE_BACK, T.F32, ne, [fwd, pos], params=params)
    g.run()
    want = rope_reference(g.read(fwd), [0, 5, 99, 400], 12, mode, n_ctx_orig=512, n_offs=2,
                          backward=True)
    np.testing.assert_allclose(g.read(back), want, atol=2e-4)
    np.testing.assert_allclose(g.read(back), xv, atol=1e-5)    # a rotation undone


def test_cross_entropy_loss_and_its_gradient():
    ne = (30, 4, 3, 1)
    g = GraphBuilder(1 << 20)
    logits = g.input(T.F32, ne, _vals(*ne[::-1], lo=-5, hi=5))
    labels = g.input(T.F32, ne, _vals(*ne[::-1], lo=0, hi=1))
    loss = g.node(Op.CROSS_ENTROPY_LOSS, T.F32, (1,), [logits, labels])
    grad = g.input(T.F32, (1,), np.array([0.75], np.float32))
    back = g.node(Op.CROSS_ENTROPY_LOSS_BACK, T.F32, ne, [grad, logits, labels])
    g.run()
    lv, tv = g.read(logits), g.read(labels)
    assert abs(float(g.read(loss).ravel()[0]) - tr.reference_cross_entropy_loss(lv, tv)) < 1e-4
    np.testing.assert_allclose(g.read(back), tr.reference_cross_entropy_loss_back(0.75, lv, tv),
                               rtol=1e-5, atol=1e-7)


def _opt_graph(op, ne=(10, 5, 4, 3), flags=FLAG_PARAM, dst_elsewhere=False,
               state_on_grad=False):
    """One optimiser step as ggml builds it: dst is a view of the parameters src0."""
    g = GraphBuilder(1 << 20)
    w = g.input(T.F32, ne, _vals(*ne[::-1], lo=0, hi=1), flags=flags)
    grad = g.input(T.F32, ne, _vals(*ne[::-1]))
    if op == Op.OPT_STEP_ADAMW:
        m = grad if state_on_grad else g.input(T.F32, ne, _vals(*ne[::-1]))
        v = g.input(T.F32, ne, _vals(*ne[::-1], lo=0, hi=1))
        hp = np.array([1e-2, 0.9, 0.999, 1e-8, 0.1, 1 / (1 - 0.9), 1 / (1 - 0.999)], np.float32)
        srcs = [w, grad, m, v, g.input(T.F32, (7,), hp)]
    else:
        hp = np.array([0.05, 0.01], np.float32)
        srcs = [w, grad, g.input(T.F32, (2,), hp)]
    before = [g.read(t) for t in srcs[:-1]]
    out = g.node(op, T.F32, ne, srcs, inplace_of=None if dst_elsewhere else w)
    return g, out, srcs, before, hp


@pytest.mark.parametrize("op", [Op.OPT_STEP_ADAMW, Op.OPT_STEP_SGD], ids=lambda o: o.name)
def test_optimiser_steps_update_in_place(op):
    g, out, srcs, before, hp = _opt_graph(op)
    g.run()
    if op == Op.OPT_STEP_ADAMW:
        w, m, v = tr.reference_adamw(*before, hp)
        np.testing.assert_allclose(g.read(srcs[2]), m, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(g.read(srcs[3]), v, rtol=1e-6, atol=1e-7)
    else:
        w = tr.reference_sgd(*before, hp)
    np.testing.assert_allclose(g.read(out), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g.read(srcs[0]), g.read(out))


@pytest.mark.parametrize("case,why", [("no param flag", "trainable"),
                                      ("dst elsewhere", "view of src0"),
                                      ("moment on gradient", "must not share bytes")])
def test_optimiser_step_refusals(case, why):
    g, *_ = _opt_graph(Op.OPT_STEP_ADAMW, flags=0 if case == "no param flag" else FLAG_PARAM,
                       dst_elsewhere=case == "dst elsewhere",
                       state_on_grad=case == "moment on gradient")
    with pytest.raises(GraphInvalid, match=why):
        g.compile()


#: each malformed node, and the rule its refusal names
REFUSALS = {"silu types": "share one type", "rms shape": "differ", "out_prod k": "ne[1]=3",
            "out_prod f16 bcast": "does not broadcast", "out_prod q8_k": "type q8_K",
            "out_prod dst": "dst must be contiguous", "out_prod b f16": "src1 has type f16",
            "grb rows": "names 4 rows", "grb dst": "dst must be contiguous",
            "grb bf16": "type bf16", "smb bias": "max_bias", "smb strided": "contiguous",
            "ce dst": "scalar", "ceb grad": "scalar", "rope_back mode": "rope mode 1"}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_invalid_nodes_are_refused(case):
    g = GraphBuilder(1 << 20)
    f = g.input(T.F32, (8, 4, 2, 1))
    if case == "silu types":
        g.node(Op.SILU_BACK, T.F32, (8, 4, 2, 1), [f, g.input(T.F16, (8, 4, 2, 1))])
    elif case == "rms shape":
        g.node(Op.RMS_NORM_BACK, T.F32, (8, 4, 2, 1), [f, g.input(T.F32, (8, 4, 1, 1))], [1e-6])
    elif case.startswith("out_prod"):
        a_ty = {"out_prod f16 bcast": T.F16, "out_prod q8_k": T.Q8_K}.get(case, T.F32)
        m = 256 if a_ty == T.Q8_K else 8
        a = g.input(a_ty, (m, 3 if case == "out_prod k" else 4, 1, 1))
        b = g.input(T.F16 if case == "out_prod b f16" else T.F32, (5, 4, 2, 1))
        nb = (4, 4 * m, 4 * m * 5 * 2, 4 * m * 5 * 2) if case == "out_prod dst" else None
        g.node(Op.OUT_PROD, T.F32, (m, 5, 2, 1), [a, b], nb=nb)
    elif case.startswith("grb"):
        grad = g.input(T.BF16 if case == "grb bf16" else T.F32, (8, 3))
        rows = g.input(T.I32, (4 if case == "grb rows" else 3,))
        g.node(Op.GET_ROWS_BACK, T.F32, (8, 5), [grad, rows],
               nb=(4, 64, 320, 320) if case == "grb dst" else None)
    elif case.startswith("smb"):
        y = g.input(T.F32, (8, 4, 2, 1), nb=(4, 64, 256, 512) if case == "smb strided" else None)
        g.node(Op.SOFT_MAX_BACK, T.F32, (8, 4, 2, 1), [f, y],
               [1.0, 8.0 if case == "smb bias" else 0.0])
    elif case == "ce dst":
        g.node(Op.CROSS_ENTROPY_LOSS, T.F32, (2,), [f, g.input(T.F32, (8, 4, 2, 1))])
    elif case == "ceb grad":
        g.node(Op.CROSS_ENTROPY_LOSS_BACK, T.F32, (8, 4, 2, 1),
               [g.input(T.F32, (2,)), f, g.input(T.F32, (8, 4, 2, 1))])
    else:
        g.node(Op.ROPE_BACK, T.F32, (8, 4, 2, 1), [f, g.input(T.I32, (2,))],
               [0, 8, 1, 0, 0, 10000.0, 1.0, 0.0, 1.0, 32.0, 1.0])
    with pytest.raises(GraphInvalid, match=REFUSALS[case].replace("[", r"\[")):
        g.compile()
