"""The fuzz targets: hypothesis tests that attack the server and then check the properties.

They run against ``CTX.server`` (a :class:`harness.FuzzServer`) while ``CTX.client`` (a
:class:`harness.WellBehavedClient`) keeps working next to them.  ``conftest.py`` runs each
target once under the "ci" profile, or all of them in turns under the "campaign" profile.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from refimpl.protocol import messages as m
from refimpl.protocol.tensor import RpcTensor
from tools.hostile import Frame, frame_of, graphs, hostile_graphs, requests

from harness import (STATS, Closed, PropertyViolation, RawConnection, check_properties,
                     open_arena, run_frames)

CTX = SimpleNamespace(server=None, client=None)


def _checked(target: str, body) -> None:
    """Run one example's body, then the properties; a broken property wins over the body's
    own exception (it is the more telling one)."""
    STATS.example(target)
    error = None
    try:
        body()
    except (Closed, ConnectionError) as exc:
        error = exc
    except PropertyViolation:
        check_properties(CTX.server, None)  # restarts a dead server before re-raising
        raise
    check_properties(CTX.server, CTX.client)
    if error is not None and not isinstance(error, Closed):
        raise error


@given(st.data())
def fuzz_messages(data):
    """Sequences of valid, near-valid and hostile requests on buffers the example owns."""
    def body():
        """The example itself (properties are checked by _checked)."""
        sizes = data.draw(st.lists(st.sampled_from((64, 256, 4096, 65536)), min_size=1,
                                   max_size=3), label="buffer sizes")
        conn, arena = open_arena(CTX.server.address, sizes)
        frames = data.draw(st.lists(requests(arena), min_size=1, max_size=8), label="frames")
        run_frames(CTX.server, conn, frames)
    _checked("messages", body)


def _fill(arena, mode: str, seed: int):
    """SET_TENSOR frames that fill every buffer: floats, small integers, raw bytes or zeros."""
    rng = np.random.default_rng(seed)
    out = []
    for handle, base, size in arena.buffers:
        if mode == "floats":
            data = rng.normal(0, 2, size // 4).astype(np.float32).tobytes()
        elif mode == "small-ints":
            data = rng.integers(0, 4, size // 4, dtype=np.int32).tobytes()
        elif mode == "raw":
            data = rng.bytes(size)
        else:
            continue
        data = data.ljust(size, b"\0")
        t = RpcTensor(id=1, type=24, buffer=handle, ne=(size, 1, 1, 1), nb=(1, size, size, size),
                      data=base)
        out.append(frame_of(m.SetTensorRequest(t, 0, data), f"fill {mode}"))
    return out


@given(st.data())
def fuzz_graphs(data):
    """Graphs of every implemented op, shaped as ggml shapes them or one field off, over
    buffers filled with floats, small integers (valid indices) or raw bytes."""
    def body():
        """The example itself (properties are checked by _checked)."""
        conn, arena = open_arena(CTX.server.address, (65536, 65536))
        mode = data.draw(st.sampled_from(("floats", "small-ints", "raw", "zeros")), label="fill")
        seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
        frames = _fill(arena, mode, seed)
        frames += data.draw(st.lists(st.one_of(graphs(arena), graphs(arena, mutate=True),
                                               hostile_graphs(arena)),
                                     min_size=1, max_size=4), label="graphs")
        frames.append(frame_of(m.GraphRecomputeRequest(0), "GRAPH_RECOMPUTE"))
        for handle, base, size in arena.buffers:
            t = RpcTensor(id=1, type=24, buffer=handle, ne=(size, 1, 1, 1),
                          nb=(1, size, size, size), data=base)
            frames.append(frame_of(m.GetTensorRequest(t, 0, size), "read back"))
        run_frames(CTX.server, conn, frames)
    _checked("graphs", body)


_raw_frames = st.lists(st.tuples(st.integers(0, 255),
                                 st.one_of(st.integers(0, 400),
                                           st.sampled_from((2**31, 2**63, 2**64 - 1))),
                                 st.binary(max_size=64)), max_size=6)


@given(st.data())
def fuzz_framing(data):
    """Raw bytes: before or after HELLO, as random frames with random length prefixes or
    as plain noise; then the client closes and the server must close too."""
    def body():
        """The example itself (properties are checked by _checked)."""
        hello = data.draw(st.booleans(), label="hello first")
        conn = RawConnection(CTX.server.address, hello=hello)
        if data.draw(st.booleans(), label="noise"):
            blob = data.draw(st.binary(min_size=1, max_size=2048), label="noise")
        else:
            blob = b"".join(struct.pack("<BQ", c, n) + p
                            for c, n, p in data.draw(_raw_frames, label="frames"))
        try:
            conn.send(blob, "raw")
            conn.finish()
        except Closed:
            pass
        finally:
            conn.close()
    _checked("framing", body)


def all_targets():
    """name -> hypothesis test (the stateful one is added by stateful.py)."""
    from stateful import fuzz_stateful
    return {"messages": fuzz_messages, "graphs": fuzz_graphs, "framing": fuzz_framing,
            "stateful": fuzz_stateful}


__all__ = ["CTX", "fuzz_messages", "fuzz_graphs", "fuzz_framing", "all_targets", "Frame"]
