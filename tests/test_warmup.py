"""The kernels a server's graphs compiled are recorded, and a new server loads them before
its first client (refimpl.kernels.warmup)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import numpy as np

from refimpl.graph import GraphExecutor, Op
from refimpl.kernels import warmup
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder


def _product_graph() -> GraphBuilder:
    """One Q8_0 product of a few tokens, as a model's graph has hundreds."""
    rng = np.random.default_rng(3)
    g = GraphBuilder(arena_bytes=1 << 20)
    w = g.input(T.Q8_0, (64, 8))    # zero blocks: what runs does not depend on the values
    x = g.input(T.F32, (64, 3), rng.standard_normal((3, 64)).astype(np.float32))
    g.node(Op.MUL_MAT, T.F32, (8, 3), [w, x])
    return g


def test_graph_compute_records_the_kernels_compiled(tmp_path, monkeypatch):
    record = tmp_path / "used.pkl"
    monkeypatch.setattr(warmup, "record_path", lambda: record)
    monkeypatch.setattr(warmup, "_known", -1)        # as if something new had compiled
    monkeypatch.setattr(warmup, "_recording", True)  # as refimpl-server does
    g = _product_graph()
    GraphExecutor([g.device]).compute(g.request(), g.table)
    names = pickle.loads(record.read_bytes())
    used = {n for n, d in warmup.dispatchers().items() if d.signatures}
    assert any("_mm_packed_8" in n for n in names)   # the Q8_0 product's kernel
    assert set(names) == used
    assert warmup.record_new() is False               # nothing new since: no rewrite


def test_a_new_process_loads_the_recorded_kernels(tmp_path, monkeypatch):
    record = tmp_path / "used.pkl"
    monkeypatch.setattr(warmup, "record_path", lambda: record)
    monkeypatch.setattr(warmup, "_known", -1)
    monkeypatch.setattr(warmup, "_recording", True)
    g = _product_graph()
    g.run()
    assert warmup.record_new() is True
    recorded = pickle.loads(record.read_bytes())
    script = textwrap.dedent(f"""
        from pathlib import Path
        from refimpl.kernels import warmup
        warmup.record_path = lambda: Path({str(record)!r})
        table = warmup.dispatchers()
        before = sorted(n for n, d in table.items() if d.signatures)
        loaded = warmup.warm()
        after = sorted(n for n, d in table.items() if d.signatures)
        print(repr((before, loaded, after)))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    before, loaded, after = eval(out.strip().splitlines()[-1])
    assert before == []                                 # a fresh process has compiled nothing
    assert loaded == sum(len(s) for s in recorded.values())
    assert after == sorted(recorded)


def test_a_damaged_record_is_ignored(tmp_path, monkeypatch):
    record = tmp_path / "used.pkl"
    record.write_bytes(b"not a pickle")
    monkeypatch.setattr(warmup, "record_path", lambda: record)
    assert warmup.warm() == 0


def test_only_a_recording_process_records(tmp_path, monkeypatch):
    record = tmp_path / "used.pkl"
    monkeypatch.setattr(warmup, "record_path", lambda: record)
    monkeypatch.setattr(warmup, "_known", -1)
    monkeypatch.setattr(warmup, "_recording", False)   # the tests' own graphs: not recorded
    g = _product_graph()
    GraphExecutor([g.device]).compute(g.request(), g.table)
    assert not record.exists()
