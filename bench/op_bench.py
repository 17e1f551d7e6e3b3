"""Per-op microbenchmark: refimpl's CPU kernels against ggml's own CPU backend, in process.

    python bench/op_bench.py [--shape 135m|1b] [--types q4_0,q8_0,...] [--threads 1]
                             [--ops mul_mat,rms_norm,...] [--json FILE]

For each op at the shapes of a real model (bench/models.py), one node is built twice: in a
refimpl graph (bound once, then only its kernels run, as GRAPH_RECOMPUTE does) and in a ggml
context of the peer build's libggml-cpu (tools.ggml_cpu, `ggml_graph_compute`).
Each is timed over repeated runs (median of several batches); the ratio is ggml's time over
refimpl's (higher is better for refimpl; 1.0 is parity).  The two results are also held to the
numerics contract (spec/numerics.md), so a fast wrong kernel cannot look good here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refimpl import thread_pools  # noqa: E402

thread_pools.configure()    # as the server does, before numpy and numba load

import numpy as np  # noqa: E402

from bench.models import SHAPES  # noqa: E402
from refimpl.graph import Op  # noqa: E402
from refimpl.kernels.parallel import set_compute_threads  # noqa: E402
from refimpl.protocol import GgmlType as T  # noqa: E402
from tools.contract import nmse_bound, op_error  # noqa: E402
from tools.ggml_cpu import GgmlCpu  # noqa: E402
from tools.graphs import GraphBuilder  # noqa: E402
from tools.peers import ensure_peers  # noqa: E402

TYPES = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1,
         "q4_k": T.Q4_K, "q5_k": T.Q5_K, "q6_k": T.Q6_K}


def _timed(fn, min_seconds: float = 0.3, batches: int = 5) -> float:
    """Median seconds per call of ``fn`` (each batch repeats it until ``min_seconds / batches``)."""
    fn()                                   # warm up (JIT, caches)
    per = []
    target = min_seconds / batches
    for _ in range(batches):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= target:
                break
        per.append(dt / n)
    return statistics.median(per)


def _weights(cpu, rng, wtype, k, n):
    """Random weights of ``wtype`` (k, n): float values, or raw blocks quantised by ggml."""
    vals = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    if wtype in (T.F32, T.F16, T.BF16):
        return vals
    return cpu.quantize(wtype, vals)


def bench_mul_mat(cpu, wtype, k, n, tokens, threads):
    """MUL_MAT of weights (k, n) and ``tokens`` activation rows on both sides."""
    rng = np.random.default_rng(0)
    w = _weights(cpu, rng, wtype, k, n)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    g = GraphBuilder(256 << 20)
    wi = g.input(wtype, (k, n), w)
    xi = g.input(T.F32, (k, tokens), x)
    out = g.node(Op.MUL_MAT, T.F32, (n, tokens), [wi, xi])
    plan = g.compile()
    ours_t = _timed(plan.run)
    ours = g.read(out)
    with cpu.context(512 << 20) as ctx:
        wt, xt = ctx.tensor(wtype, (k, n), w), ctx.tensor(T.F32, (k, tokens), x)
        y = ctx.call("ggml_mul_mat", wt, xt)
        run_theirs = ctx.runner(y, threads)
        theirs_t = _timed(run_theirs)
        theirs = ctx.read(y)
    return ours_t, theirs_t, ours, theirs


def bench_unary_like(cpu, op, n_embd, tokens, threads):
    """RMS_NORM, ADD or MUL over (n_embd, tokens) float32 rows."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((tokens, n_embd)).astype(np.float32)
    y = rng.standard_normal((tokens, n_embd)).astype(np.float32)
    g = GraphBuilder(64 << 20)
    xi, yi = g.input(T.F32, (n_embd, tokens), x), g.input(T.F32, (n_embd, tokens), y)
    if op == "rms_norm":
        out = g.node(Op.RMS_NORM, T.F32, (n_embd, tokens), [xi], params=[1e-5])
    else:
        out = g.node(Op.ADD if op == "add" else Op.MUL, T.F32, (n_embd, tokens), [xi, yi])
    plan = g.compile()
    ours_t = _timed(plan.run)
    ours = g.read(out)
    with cpu.context(64 << 20) as ctx:
        xt, yt = ctx.tensor(T.F32, (n_embd, tokens), x), ctx.tensor(T.F32, (n_embd, tokens), y)
        if op == "rms_norm":
            z = ctx.call("ggml_rms_norm", xt, 1e-5)
        else:
            z = ctx.call("ggml_add" if op == "add" else "ggml_mul", xt, yt)
        run_theirs = ctx.runner(z, threads)
        theirs_t = _timed(run_theirs)
        theirs = ctx.read(z)
    return ours_t, theirs_t, ours, theirs


def bench_flash_attn(cpu, shape, tokens, n_kv, n_valid, threads):
    """FLASH_ATTN_EXT of ``tokens`` query rows over an F16 K/V cache of ``n_kv`` rows, of which
    the first ``n_valid`` are unmasked (the rest -inf, as a partly filled cache is)."""
    rng = np.random.default_rng(2)
    hd, nh, nkv_h = shape.head_dim, shape.n_head, shape.n_head_kv
    q = rng.standard_normal((1, nh, tokens, hd)).astype(np.float32)
    k = rng.standard_normal((1, nkv_h, n_kv, hd)).astype(np.float16)
    v = rng.standard_normal((1, nkv_h, n_kv, hd)).astype(np.float16)
    m_rows = -(-tokens // 64) * 64                 # ggml pads the mask's rows
    mask = np.zeros((1, 1, m_rows, n_kv), np.float16)
    mask[..., n_valid:] = -np.inf
    scale = 1.0 / np.sqrt(hd)
    g = GraphBuilder(64 << 20)
    qi = g.input(T.F32, (hd, tokens, nh, 1), q)
    ki = g.input(T.F16, (hd, n_kv, nkv_h, 1), k)
    vi = g.input(T.F16, (hd, n_kv, nkv_h, 1), v)
    mi = g.input(T.F16, (n_kv, m_rows, 1, 1), mask)
    out = g.node(Op.FLASH_ATTN_EXT, T.F32, (hd, nh, tokens, 1), [qi, ki, vi, mi],
                 params=[float(scale), 0.0, 0.0, 0])
    plan = g.compile()
    ours_t = _timed(plan.run)
    ours = g.read(out)
    with cpu.context(64 << 20) as ctx:
        qt = ctx.tensor(T.F32, (hd, tokens, nh, 1), q)
        kt = ctx.tensor(T.F16, (hd, n_kv, nkv_h, 1), k)
        vt = ctx.tensor(T.F16, (hd, n_kv, nkv_h, 1), v)
        mt = ctx.tensor(T.F16, (n_kv, m_rows, 1, 1), mask)
        y = ctx.call("ggml_flash_attn_ext", qt, kt, vt, mt, float(scale), 0.0, 0.0)
        run_theirs = ctx.runner(y, threads)
        theirs_t = _timed(run_theirs)
        theirs = ctx.read(y)
    return ours_t, theirs_t, ours, theirs


def run(shape_name: str, types: list[str], ops: list[str], threads: int, tokens_list) -> list:
    """Every (op, type, tokens) case of the shape; returns result rows."""
    from refimpl.devices.cpu import set_blas_threads
    set_compute_threads(threads)
    set_blas_threads(threads)
    shape = SHAPES[shape_name]
    cpu = GgmlCpu.load(ensure_peers())
    rows = []
    e, f, kv = shape.n_embd, shape.n_ff, shape.n_head_kv * shape.head_dim
    for tokens in tokens_list:
        if "mul_mat" in ops:
            for tname in types:
                for what, (k, n) in {"attn_q": (e, e), "attn_kv": (e, kv), "ffn_up": (e, f),
                                     "ffn_down": (f, e), "output": (e, shape.n_vocab)}.items():
                    wtype = TYPES[tname]
                    if wtype in (T.Q4_K, T.Q5_K, T.Q6_K) and k % 256:
                        continue          # llama-quantize stores such rows in a fallback type
                    o, t, ours, theirs = bench_mul_mat(cpu, wtype, k, n, tokens, threads)
                    err, problem = op_error(theirs, ours)
                    rows.append(dict(op="MUL_MAT", case=f"{what} {tname} K={k} N={n}",
                                     tokens=tokens, refimpl_us=o * 1e6, ggml_us=t * 1e6,
                                     ratio=t / o, within=problem is None
                                     and err <= nmse_bound("MUL_MAT")))
        if "flash_attn_ext" in ops:
            for n_kv, n_valid in ((256, 48), (512, 300)):
                o, t, ours, theirs = bench_flash_attn(cpu, shape, tokens, n_kv, n_valid, threads)
                err, problem = op_error(theirs, ours)
                rows.append(dict(op="FLASH_ATTN_EXT", case=f"n_kv={n_kv} valid={n_valid} f16",
                                 tokens=tokens, refimpl_us=o * 1e6, ggml_us=t * 1e6,
                                 ratio=t / o, within=problem is None
                                 and err <= nmse_bound("FLASH_ATTN_EXT")))
        for op in ("rms_norm", "add", "mul"):
            if op in ops:
                o, t, ours, theirs = bench_unary_like(cpu, op, e, tokens, threads)
                err, problem = op_error(theirs, ours)
                rows.append(dict(op=op.upper(), case=f"n_embd={e}", tokens=tokens,
                                 refimpl_us=o * 1e6, ggml_us=t * 1e6, ratio=t / o,
                                 within=problem is None and err <= nmse_bound(op.upper())))
    return rows


def render(rows: list) -> str:
    """A plain-text table of the rows."""
    out = [f"{'op':9} {'case':38} {'tok':>4} {'refimpl µs':>11} {'ggml µs':>9} {'ggml/ref':>9}"]
    for r in rows:
        flag = "" if r["within"] else "  OUTSIDE CONTRACT"
        out.append(f"{r['op']:9} {r['case']:38} {r['tokens']:>4} {r['refimpl_us']:>11.1f} "
                   f"{r['ggml_us']:>9.1f} {r['ratio']:>9.3f}{flag}")
    return "\n".join(out)


def main(argv=None) -> int:
    """CLI: run the cases and print the table (optionally save JSON)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="135m", choices=sorted(SHAPES))
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--ops", default="mul_mat,rms_norm,add,mul", help="lower-case op names")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", default="1,128", help="activation rows per product")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    rows = run(a.shape, a.types.split(","), a.ops.split(","), a.threads,
               [int(t) for t in a.tokens.split(",")])
    print(render(rows))
    if a.json:
        a.json.write_text(json.dumps(dict(shape=a.shape, threads=a.threads, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
