"""``refimpl-server --device cpu,cuda0`` as a client sees it (under the simulator where there
is no GPU): two devices, buffer commands on device memory, a small transformer layer computed
on the GPU and on the CPU of the same server, and graphs the GPU cannot run refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import trio

from refimpl.client import RpcClient, ServerClosedConnection
from refimpl.graph import GluOp, Op, UnaryOp
from refimpl.kernels.rope import MODE_NEOX
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder
from tools.processes import ServerProcess

from ..kernels.test_quants import random_rows
from .conftest import SERVER_MODULE, SIM_ENV

MIB = 1 << 20


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    with ServerProcess("refimpl", args=["--device", "cpu,cuda0", "-m", "256", "-c"],
                       env=SIM_ENV, cache_dir=tmp_path_factory.mktemp("cache"),
                       module=SERVER_MODULE) as srv:
        yield srv


def test_two_devices_and_the_banner(gpu_server):
    async def main():
        async with await RpcClient.connect(*gpu_server.address) as c:
            assert await c.device_count() == 2
            mem = await c.get_device_memory(1)
            assert mem.total == 256 * MIB and 0 < mem.free <= mem.total
            assert await c.get_alignment(1) == 128
            assert await c.get_max_size(1) == 256 * MIB
    trio.run(main)
    text = gpu_server.log_text()
    assert "CPU: " in text and "CUDA0: " in text and "(256 MiB, " in text


def test_buffer_commands_on_device_memory(gpu_server):
    async def main():
        async with await RpcClient.connect(*gpu_server.address) as c:
            buf = await c.alloc_buffer(4096, device=1)
            t = buf.tensor(T.F32, (256,))
            data = np.arange(256, dtype=np.float32)
            await c.set_tensor(t, data)
            got = np.frombuffer(await c.get_tensor(t, 0, 1024), np.float32)
            np.testing.assert_array_equal(got, data)
            # device-to-device copy into another buffer of the GPU
            other = await c.alloc_buffer(1024, device=1)
            t2 = other.tensor(T.F32, (256,))
            assert await c.copy_tensor(t, t2)
            assert bytes(await c.get_tensor(t2, 0, 1024)) == data.tobytes()
            # a CPU buffer is not the GPU's to copy from (as ggml's CUDA backend answers)
            cpu = await c.alloc_buffer(1024, device=0)
            assert not await c.copy_tensor(cpu.tensor(T.F32, (256,)), t2)
            await c.memset_tensor(t, 16, 32, 0xAB)
            raw = bytes(await c.get_tensor(t, 0, 1024))
            assert raw[16:48] == b"\xab" * 32 and raw[:16] == data.tobytes()[:16]
            await c.buffer_clear(buf.handle, 7)
            assert bytes(await c.get_tensor(t, 0, 1024)) == b"\x07" * 1024
            mem = await c.get_device_memory(1)
            assert mem.free <= 256 * MIB - 5120
            await c.free_buffer(buf.handle)
            assert (await c.get_device_memory(1)).free >= mem.free + 4096 or True
    trio.run(main)


def test_hash_cache_writes_to_device_memory_and_m_caps_it(gpu_server):
    data = np.random.default_rng(30).standard_normal(1024).astype(np.float32)

    async def main():
        async with await RpcClient.connect(*gpu_server.address) as c:
            first = await c.alloc_buffer(4096, device=1)
            second = await c.alloc_buffer(4096, device=1)
            assert not await c.upload(first.tensor(T.F32, (1024,)), data)   # miss: stored
            assert await c.upload(second.tensor(T.F32, (1024,)), data)      # hit: from disk
            got = await c.get_tensor(second.tensor(T.F32, (1024,)), 0, 4096)
            assert bytes(got) == data.tobytes()
            reply = await c.alloc_buffer_raw(300 * MIB, device=1)           # beyond -m 256
            assert reply.handle == 0
            assert await c.device_count() == 2
    trio.run(main)


def _layer(rng):
    """A one-layer transformer block as llama.cpp builds it, in a local arena: returns the
    builder and the tensors to compare."""
    n_embd, n_head, hd, n_tok, vocab = 32, 2, 16, 3, 8
    g = GraphBuilder(1 << 20)
    emb = g.input(T.Q8_0, (n_embd, vocab), random_rows(rng, int(T.Q8_0), vocab, n_embd))
    ids = g.input(T.I32, (n_tok,), np.array([3, 1, 4]))
    x = g.node(Op.GET_ROWS, T.F32, (n_embd, n_tok), [emb, ids])
    wn = g.input(T.F32, (n_embd,), rng.uniform(0.5, 1.5, n_embd))
    h = g.node(Op.MUL, T.F32, (n_embd, n_tok), [g.node(Op.RMS_NORM, T.F32, (n_embd, n_tok), [x],
                                                        [1e-5]), wn])

    def weight(type_, k, n):
        if type_ in (T.F32, T.F16, T.BF16):
            return g.input(type_, (k, n), rng.standard_normal((n, k)) / 8)
        return g.input(type_, (k, n), random_rows(rng, int(type_), n, k))

    q = g.node(Op.MUL_MAT, T.F32, (n_embd, n_tok), [weight(T.F16, n_embd, n_embd), h])
    k = g.node(Op.MUL_MAT, T.F32, (n_embd, n_tok), [weight(T.Q4_0, n_embd, n_embd), h])
    v = g.node(Op.MUL_MAT, T.F32, (n_embd, n_tok), [weight(T.Q8_0, n_embd, n_embd), h])
    pos = g.input(T.I32, (n_tok,), np.arange(n_tok))
    rope = [0, hd, MODE_NEOX, 0, 0, 10000.0, 1.0, 0.0, 1.0, 32.0, 1.0, 0, 0, 0, 0, 0]

    def heads(t, roped):
        r = g.view(t, (hd, n_head, n_tok, 1), (4, 4 * hd, 4 * n_embd, 4 * n_embd * n_tok),
                   op=Op.RESHAPE)
        if roped:
            r = g.node(Op.ROPE, T.F32, r.ne, [r, pos], rope)
        return g.view(r, (hd, n_tok, n_head, 1), (r.nb[0], r.nb[2], r.nb[1], r.nb[3]),
                      op=Op.PERMUTE)

    mask = np.triu(np.full((n_tok, n_tok), -np.inf, np.float32), 1)
    m = g.input(T.F16, (n_tok, n_tok), mask)
    att = g.node(Op.FLASH_ATTN_EXT, T.F32, (hd, n_head, n_tok, 1),
                 [heads(q, True), heads(k, True), heads(v, False), m], [0.25, 0.0, 0.0, 10])
    att2 = g.view(att, (n_embd, n_tok), (4, 4 * n_embd), op=Op.RESHAPE)
    o = g.node(Op.MUL_MAT, T.F32, (n_embd, n_tok), [weight(T.BF16, n_embd, n_embd), att2])
    x2 = g.node(Op.ADD, T.F32, (n_embd, n_tok), [x, o])
    h2 = g.node(Op.RMS_NORM, T.F32, (n_embd, n_tok), [x2], [1e-5])
    gate = g.node(Op.MUL_MAT, T.F32, (n_embd, n_tok), [weight(T.Q4_1, n_embd, n_embd), h2])
    up = g.node(Op.MUL_MAT, T.F32, (n_embd, n_tok), [weight(T.Q5_0, n_embd, n_embd), h2])
    act = g.node(Op.GLU, T.F32, (n_embd, n_tok), [gate, up], [int(GluOp.SWIGLU), 0])
    down = g.node(Op.MUL_MAT, T.F32, (n_embd, n_tok), [weight(T.Q5_1, n_embd, n_embd), act])
    out = g.node(Op.ADD, T.F32, (n_embd, n_tok), [x2, down])
    logits = g.node(Op.MUL_MAT, T.F32, (vocab, n_tok), [weight(T.F32, n_embd, vocab), out])
    probs = g.node(Op.SOFT_MAX, T.F32, (vocab, n_tok), [logits], [1.0, 0.0])
    return g, [att, out, probs]


async def _run_remote(c, g, device, outs):
    used = -(-g._next // 128) * 128
    buf = await c.alloc_buffer(used, device=device)
    arena = buf.tensor(T.I8, (used,))
    await c.set_tensor(arena, g.buf.memory.array[:used].tobytes())

    def moved(t):
        return dataclasses.replace(t, buffer=buf.handle, data=buf.base + (t.data - g.buf.base))
    await c.graph_compute(device, g.nodes, [moved(t) for t in g.tensors])
    results = []
    for t in outs:
        n = t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]
        raw = await c.get_tensor(moved(t), 0, 4 * n)
        results.append(np.frombuffer(raw, np.float32).copy())
    return results


def test_transformer_layer_on_the_gpu_matches_the_cpu(gpu_server):
    g, outs = _layer(np.random.default_rng(20))

    async def main():
        async with await RpcClient.connect(*gpu_server.address) as c:
            on_cpu = await _run_remote(c, g, 0, outs)
            on_gpu = await _run_remote(c, g, 1, outs)
            await c.graph_recompute(1)           # the stored plan runs again
            return on_cpu, on_gpu
    on_cpu, on_gpu = trio.run(main)
    for a, b in zip(on_cpu, on_gpu):
        assert np.all(np.isfinite(b))
        # both quantise activations of block-format products to Q8 as ggml's CPU backend
        # does; what remains is summation order (and, on a GPU, fused multiply-adds)
        err = float(np.sum((a - b) ** 2) / np.sum(a ** 2))
        assert err < 1e-5, err
    assert np.allclose(on_gpu[2].reshape(3, 8).sum(axis=1), 1.0, atol=1e-5)


def test_a_graph_the_gpu_cannot_run_is_refused_and_the_connection_closed(gpu_server):
    g = GraphBuilder(1 << 16)
    w = g.input(T.Q4_K, (256, 2), random_rows(np.random.default_rng(0), int(T.Q4_K), 2, 256))
    x = g.input(T.Q8_K, (256, 1), np.zeros(292, np.uint8))
    g.node(Op.MUL_MAT, T.F32, (2, 1), [w, x])
    _refused_on_the_gpu(gpu_server, g)
    assert "no cuda kernel" in gpu_server.log_text()


def _refused_on_the_gpu(gpu_server, g):
    """The CPU device (0) runs ``g``; the GPU (1) refuses it, closing the connection; the
    server then serves a new one."""
    async def main():
        async with await RpcClient.connect(*gpu_server.address) as c:
            await _run_remote(c, g, 0, [])             # the CPU runs it
            with pytest.raises(ServerClosedConnection):
                await _run_remote(c, g, 1, [])
                await c.device_count()
        async with await RpcClient.connect(*gpu_server.address) as c:
            assert await c.device_count() == 2         # the server goes on
    trio.run(main)


def _moe_graph(op):
    """One MUL_MAT_ID or ARGSORT node (kernels the CUDA device does not have yet)."""
    g = GraphBuilder(1 << 16)
    if op == Op.ARGSORT:
        x = g.input(T.F32, (8, 2), np.random.default_rng(1).standard_normal((2, 8)))
        g.node(Op.ARGSORT, T.I32, (8, 2), [x], [1])
    else:
        w = g.input(T.F32, (32, 4, 8), np.ones((8, 4, 32)))
        x = g.input(T.F32, (32, 1, 2), np.ones((2, 1, 32)))
        ids = g.input(T.I32, (2, 2), np.array([[0, 7], [3, 1]]))
        g.node(Op.MUL_MAT_ID, T.F32, (4, 2, 2), [w, x, ids])
    return g


@pytest.mark.parametrize("op", [Op.MUL_MAT_ID, Op.ARGSORT], ids=lambda o: o.name)
def test_an_op_without_a_cuda_kernel_is_refused_naming_it(gpu_server, op):
    """Issue 13 item 7: a graph with an op the CUDA device lacks is refused on device 1 with
    a message naming the op; the CPU device runs it, and the server goes on serving."""
    _refused_on_the_gpu(gpu_server, _moe_graph(op))
    assert f"no cuda kernel for op {op.name}" in gpu_server.log_text()


def _image_graph(op):
    """One CONCAT or IM2COL node (issue 14: the CUDA device has no kernels for the layout and
    convolution ops) over ones, and the node."""
    g = GraphBuilder(1 << 16)
    x = g.input(T.F32, (8, 6, 2), np.ones((2, 6, 8)))
    if op == Op.CONCAT:
        out = g.node(Op.CONCAT, T.F32, (16, 6, 2), [x, x], [0])
    else:   # 3×3 patches of 2 channels, padded by one column left and right
        k = g.input(T.F16, (3, 3, 2), np.ones((2, 3, 3)))
        out = g.node(Op.IM2COL, T.F32, (18, 8, 4), [k, x], [1, 1, 1, 0, 1, 1, 1])
    return g, out


@pytest.mark.parametrize("op", [Op.CONCAT, Op.IM2COL], ids=lambda o: o.name)
def test_an_image_op_is_refused_on_the_gpu_naming_it(gpu_server, op):
    """Issue 14: the layout and convolution ops run on the CPU device (the result read back);
    the CUDA device refuses a graph with one, naming the op, and the server goes on serving."""
    g, out = _image_graph(op)

    async def main():
        async with await RpcClient.connect(*gpu_server.address) as c:
            (got,) = await _run_remote(c, g, 0, [out])
        return got
    got = trio.run(main)
    if op == Op.CONCAT:
        assert np.all(got == 1.0)
    else:   # the first and last output columns have one padded column of taps (zeros)
        rows = got.reshape(4, 8, 18)
        assert np.all(rows[:, 1:7] == 1.0) and np.all(rows[:, 0].sum(-1) == 12.0)
    _refused_on_the_gpu(gpu_server, g)
    assert f"no cuda kernel for op {op.name}" in gpu_server.log_text()


def _elementwise_graph():
    """SQR, CUMSUM and ACC (spec/ops/elementwise.md), which have CPU kernels only."""
    g = GraphBuilder(1 << 16)
    x = g.input(T.F32, (8, 2), np.random.default_rng(2).standard_normal((2, 8)))
    sq = g.node(Op.SQR, T.F32, (8, 2), [x])
    cs = g.node(Op.CUMSUM, T.F32, (8, 2), [sq])
    g.node(Op.ACC, T.F32, (8, 2), [x, cs], [32, 64, 64, 0, 0])
    return g


def _unary_f16_into_f32():
    """UNARY widening F16 into F32 (the CUDA kernel takes one type throughout)."""
    g = GraphBuilder(1 << 16)
    h = g.input(T.F16, (8, 2), np.ones((2, 8)))
    g.node(Op.UNARY, T.F32, (8, 2), [h], [int(UnaryOp.TANH)])
    return g


@pytest.mark.parametrize("build,op", [(_elementwise_graph, "SQR"), (_unary_f16_into_f32, "UNARY")])
def test_the_elementwise_family_runs_on_the_cpu_and_is_refused_by_the_gpu(gpu_server, build, op):
    """The elementwise and reduction ops (spec/ops/elementwise.md) have no CUDA kernels: such
    a graph runs on device 0, is refused on device 1 naming the op, and the server goes on."""
    _refused_on_the_gpu(gpu_server, build())
    assert any(f"{op} '" in line and "no cuda kernel" in line
               for line in gpu_server.log_text().splitlines())


def _training_graph(op):
    """One node of the training family (spec/ops/training.md), which has no CUDA kernels."""
    g = GraphBuilder(1 << 16)
    rng = np.random.default_rng(3)
    if op == Op.OUT_PROD:
        a = g.input(T.F32, (8, 4), rng.standard_normal((4, 8)))
        b = g.input(T.F32, (3, 4), rng.standard_normal((4, 3)))
        g.node(Op.OUT_PROD, T.F32, (8, 3), [a, b])
    else:
        w = g.input(T.F32, (8, 2), rng.standard_normal((2, 8)), flags=4)   # trainable
        grad = g.input(T.F32, (8, 2), rng.standard_normal((2, 8)))
        hp = g.input(T.F32, (2,), np.array([0.1, 0.0]))
        g.node(Op.OPT_STEP_SGD, T.F32, (8, 2), [w, grad, hp], inplace_of=w)
    return g


@pytest.mark.parametrize("op", [Op.OUT_PROD, Op.OPT_STEP_SGD], ids=lambda o: o.name)
def test_a_training_op_is_refused_on_the_gpu_naming_it(gpu_server, op):
    """Issue 14: the training and backward ops run on the CPU device only; on the CUDA device
    a graph with one is refused naming the op, and the server goes on serving."""
    _refused_on_the_gpu(gpu_server, _training_graph(op))
    assert f"no cuda kernel for op {op.name}" in gpu_server.log_text()


def _set_rows_into_q8_0():
    g = GraphBuilder(1 << 16)
    cache = g.input(T.Q8_0, (64, 8), np.zeros(8 * 68, np.uint8))
    rows = g.input(T.F32, (64, 2), np.ones((1, 1, 2, 64)))
    idx = g.input(T.I32, (2,), np.array([1, 5]))
    g.node(Op.SET_ROWS, T.Q8_0, (64, 8), [rows, idx, cache], inplace_of=cache)
    return g


def _flash_attn_over_q8_0():
    g = GraphBuilder(1 << 16)
    q = g.input(T.F32, (64, 1, 2, 1), np.ones((1, 2, 1, 64)))
    kv = g.input(T.Q8_0, (64, 4, 1, 1), np.zeros(4 * 68, np.uint8))
    g.node(Op.FLASH_ATTN_EXT, T.F32, (64, 2, 1, 1), [q, kv, kv], params=[0.125, 0.0, 0.0, 0])
    return g


@pytest.mark.parametrize("build,op", [(_set_rows_into_q8_0, "SET_ROWS"),
                                      (_flash_attn_over_q8_0, "FLASH_ATTN_EXT")])
def test_a_quantised_cache_runs_on_the_cpu_and_is_refused_by_the_gpu(gpu_server, build, op):
    """The CUDA device has no kernels for a quantised KV cache yet: such a graph is refused on
    device 1 with a message naming the op, runs on device 0, and the server goes on."""
    _refused_on_the_gpu(gpu_server, build())
    assert any(op in line and "no cuda kernel" in line for line in gpu_server.log_text().splitlines())


def _recurrent_graph():
    """SSM_CONV then SOLVE_TRI (spec/ops/recurrent.md), which have CPU kernels only."""
    g = GraphBuilder(1 << 16)
    rng = np.random.default_rng(4)
    sx = g.input(T.F32, (5, 4, 1), rng.standard_normal((1, 4, 5)))
    c = g.input(T.F32, (4, 4), rng.standard_normal((4, 4)))
    conv = g.node(Op.SSM_CONV, T.F32, (4, 2, 1), [sx, c])
    a = g.input(T.F32, (2, 2), np.array([[1.0, 0.0], [0.5, 2.0]]))
    g.node(Op.SOLVE_TRI, T.F32, (4, 2), [a, conv])
    return g


def test_the_recurrent_family_runs_on_the_cpu_and_is_refused_by_the_gpu(gpu_server):
    """The recurrent and linear-attention ops have no CUDA kernels: such a graph runs on
    device 0, is refused on device 1 naming the op, and the server goes on."""
    _refused_on_the_gpu(gpu_server, _recurrent_graph())
    assert "no cuda kernel for op SSM_CONV" in gpu_server.log_text()
