"""A rule-based state machine: random session histories against refimpl-server, checked
against a model of what the server's state must be.

The model knows, for the machine's connection, every live buffer (handle, base, size) and
every byte the client wrote into it.  Each rule sends one request and checks the reply (or
the close) against the model: GET_TENSOR returns exactly the modelled bytes, COPY_TENSOR and
MEMSET_TENSOR and BUFFER_CLEAR change exactly what they should, an ADD graph computes
``a + b``, handles are never reused, live buffers never overlap, requests outside a tensor
close the connection, and a closed connection's buffers are freed.
"""

from __future__ import annotations

import struct
import time

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize,
                                 invariant, precondition, rule, run_state_machine_as_test)

from refimpl.protocol import messages as m
from refimpl.protocol.tensor import RpcTensor
from tools.hostile import Arena, hostile_requests

from harness import STATS, Closed, PropertyViolation, RawConnection, check_properties

I8, F32 = 24, 0


def _i8(handle: int, base: int, size: int, offset: int = 0) -> RpcTensor:
    return RpcTensor(id=1, type=I8, buffer=handle, ne=(size, 1, 1, 1), nb=(1, size, size, size),
                     data=base + offset)


class SessionMachine(RuleBasedStateMachine):
    """One client connection's history; the model is ``self.bufs``."""

    buffers = Bundle("buffers")

    def __init__(self):
        super().__init__()
        from targets import CTX
        self.ctx = CTX
        self.conn = RawConnection(CTX.server.address)
        self.bufs: dict[int, tuple[int, bytearray]] = {}   # handle -> (base, bytes)
        self.seen: set[int] = set()
        self.steps = 0
        STATS.example("stateful")

    # -- helpers ----------------------------------------------------------------------------
    def _req(self, req) -> bytes | None:
        from tools.hostile import frame_of
        return self.conn.request(frame_of(req))

    def _expect_answer(self, req) -> bytes:
        r = self._req(req)
        if r is None:
            raise PropertyViolation(f"the server closed the connection on a valid "
                                    f"{req.COMMAND.name}\n" + "\n".join(list(self.conn.trace)[-6:]))
        return r

    def _used(self) -> int:
        free, total = struct.unpack("<QQ", self._expect_answer(m.GetDeviceMemoryRequest(0)))
        return total - free

    def _reconnect(self) -> None:
        """The connection was closed (or is no longer modelled): its buffers must be freed."""
        ours = sum(len(b) for _, b in self.bufs.values())
        self.conn.close()
        self.bufs.clear()
        self.conn = RawConnection(self.ctx.server.address)
        if ours:
            deadline = time.monotonic() + 5
            before = None
            while time.monotonic() < deadline:
                used = self._used()
                before = used if before is None else before
                if used <= self._baseline_used + 0:
                    return
                time.sleep(0.05)
            raise PropertyViolation(f"{used - self._baseline_used} bytes still in use after a "
                                    f"closed connection's {ours} bytes should have been freed")

    # -- rules ------------------------------------------------------------------------------
    @initialize(target=buffers, size=st.sampled_from((64, 1000, 4096, 65536)))
    def first_buffer(self, size):
        """Every history starts with a buffer..."""
        return self.alloc(size)

    @initialize(target=buffers, size=st.sampled_from((0, 64, 4096)))
    def second_buffer(self, size):
        """...and a second one, possibly empty."""
        return self.alloc(size)

    @rule(target=buffers, size=st.sampled_from((0, 1, 31, 64, 1000, 4096, 65536)))
    def alloc(self, size):
        """ALLOC_BUFFER: a fresh handle, the size asked, an aligned base, no overlap."""
        if not hasattr(self, "_baseline_used"):
            self._baseline_used = self._used() - sum(len(b) for _, b in self.bufs.values())
        handle, got = struct.unpack("<QQ", self._expect_answer(m.AllocBufferRequest(0, size)))
        if not handle or got != size:
            raise PropertyViolation(f"ALLOC_BUFFER {size} -> handle {handle:#x} size {got}")
        if handle in self.seen:
            raise PropertyViolation(f"handle {handle:#x} was handed out twice")
        self.seen.add(handle)
        base = struct.unpack("<Q", self._expect_answer(m.BufferGetBaseRequest(handle)))[0]
        if base % 32:
            raise PropertyViolation(f"base {base:#x} is not aligned to 32")
        for b, data in self.bufs.values():
            if size and len(data) and base < b + len(data) and b < base + size:
                raise PropertyViolation(f"buffer [{base:#x}, +{size}) overlaps a live one")
        self.bufs[handle] = (base, bytearray(size))  # refimpl zero-fills new buffers
        return handle

    @precondition(lambda self: self.bufs)
    @rule(handle=consumes(buffers))
    def free(self, handle):
        """FREE_BUFFER."""
        if handle not in self.bufs:
            return
        self._req(m.FreeBufferRequest(handle))
        del self.bufs[handle]

    @precondition(lambda self: self.bufs)
    @rule(handle=buffers, data=st.data())
    def set_tensor(self, handle, data):
        """SET_TENSOR of some bytes somewhere inside a buffer (cache flag either way)."""
        if handle not in self.bufs:
            return
        base, model = self.bufs[handle]
        offset = data.draw(st.integers(0, len(model)))
        payload = data.draw(st.binary(max_size=min(256, len(model) - offset)))
        self._expect_answer(m.SetTensorRequest(_i8(handle, base, len(model)), offset, payload,
                                               data.draw(st.integers(0, 1))))
        model[offset:offset + len(payload)] = payload

    @precondition(lambda self: self.bufs)
    @rule(handle=buffers, data=st.data())
    def get_tensor(self, handle, data):
        """GET_TENSOR of a region (often the whole buffer) equals the model."""
        if handle not in self.bufs:
            return
        base, model = self.bufs[handle]
        if data.draw(st.booleans()):
            offset, size = 0, len(model)
        else:
            offset = data.draw(st.integers(0, len(model)))
            size = data.draw(st.integers(0, len(model) - offset))
        self._compare(handle, offset, size)

    def _compare(self, handle, offset, size):
        base, model = self.bufs[handle]
        got = self._expect_answer(m.GetTensorRequest(_i8(handle, base, len(model)), offset, size))
        if got != bytes(model[offset:offset + size]):
            first = next(i for i, (a, b) in enumerate(zip(got, model[offset:])) if a != b)
            raise PropertyViolation(f"GET_TENSOR ({offset}, {size}) of buffer {handle:#x} "
                                    f"returned other bytes than the model (first difference at "
                                    f"byte {offset + first}: {got[first]} != {model[offset + first]})")

    @precondition(lambda self: self.bufs)
    @rule(handle=buffers, value=st.integers(0, 255))
    def clear(self, handle, value):
        """BUFFER_CLEAR."""
        if handle not in self.bufs:
            return
        base, model = self.bufs[handle]
        self._expect_answer(m.BufferClearRequest(handle, value))
        model[:] = bytes([value]) * len(model)

    @precondition(lambda self: self.bufs)
    @rule(handle=buffers, value=st.integers(0, 255), data=st.data())
    def memset(self, handle, value, data):
        """MEMSET_TENSOR of a region."""
        if handle not in self.bufs:
            return
        base, model = self.bufs[handle]
        offset = data.draw(st.integers(0, len(model)))
        size = data.draw(st.integers(0, len(model) - offset))
        self._expect_answer(m.MemsetTensorRequest(_i8(handle, base, len(model)), offset, size, value))
        model[offset:offset + size] = bytes([value]) * size

    @precondition(lambda self: self.bufs)
    @rule(src=buffers, dst=buffers, data=st.data())
    def copy_tensor(self, src, dst, data):
        """COPY_TENSOR of a run that fits: answered 1, bytes moved as modelled."""
        if src not in self.bufs or dst not in self.bufs:
            return
        sbase, smodel = self.bufs[src]
        dbase, dmodel = self.bufs[dst]
        n = data.draw(st.integers(0, min(len(smodel), len(dmodel))))
        a = data.draw(st.integers(0, len(smodel) - n))
        b = data.draw(st.integers(0, len(dmodel) - n))
        r = self._expect_answer(m.CopyTensorRequest(_i8(src, sbase, n, a), _i8(dst, dbase, n, b)))
        if r != b"\x01":
            raise PropertyViolation(f"COPY_TENSOR within bounds answered {r.hex()}")
        chunk = bytes(smodel[a:a + n])
        dmodel[b:b + n] = chunk

    @precondition(lambda self: any(len(d) >= 48 for _, d in self.bufs.values()))
    @rule(data=st.data())
    def graph_add(self, data):
        """GRAPH_COMPUTE of c = a + b over three consecutive float vectors of a buffer."""
        handle = data.draw(st.sampled_from(sorted(h for h, (_, d) in self.bufs.items()
                                                  if len(d) >= 48)))
        base, model = self.bufs[handle]
        n = data.draw(st.integers(1, len(model) // 12))
        t = lambda i, **kw: RpcTensor(id=i + 1, type=F32, buffer=handle, ne=(n, 1, 1, 1),  # noqa
                                      nb=(4, 4 * n, 4 * n, 4 * n), data=base + 4 * n * i, **kw)
        req = m.GraphComputeRequest.from_tensors(
            0, [3], [t(0), t(1), t(2, op=2, src=(1, 2) + (0,) * 8, flags=16)])
        self._expect_answer(req)
        a = np.frombuffer(bytes(model[:4 * n]), np.float32)
        b = np.frombuffer(bytes(model[4 * n:8 * n]), np.float32)
        with np.errstate(all="ignore"):
            c = a + b
        got = np.frombuffer(self._expect_answer(m.GetTensorRequest(_i8(handle, base, 4 * n, 8 * n),
                                                                   0, 4 * n)), np.float32)
        if not np.array_equal(got, c, equal_nan=True):
            raise PropertyViolation(f"ADD of {n} floats computed something else than a + b")
        model[8 * n:12 * n] = got.tobytes()  # NaN payloads as the server made them

    @precondition(lambda self: self.bufs and self.steps >= 12)
    @rule(handle=buffers, data=st.data())
    def outside_the_tensor(self, handle, data):
        """A region past the tensor's end must close the connection."""
        if handle not in self.bufs:
            return
        base, model = self.bufs[handle]
        offset = data.draw(st.integers(0, len(model)))
        size = len(model) - offset + data.draw(st.integers(1, 64))
        r = self._req(m.GetTensorRequest(_i8(handle, base, len(model)), offset, size))
        if r is not None:
            raise PropertyViolation(f"GET_TENSOR past the end of a {len(model)}-byte tensor "
                                    f"was answered")
        self._reconnect()

    @precondition(lambda self: self.steps >= 12)
    @rule(data=st.data())
    def hostile(self, data):
        """Anything hostile; afterwards the connection is not modelled any more."""
        arena = Arena(tuple((h, b, len(d)) for h, (b, d) in self.bufs.items()) or
                      ((0x7777, 0x1000, 64),))
        f = data.draw(hostile_requests(arena))
        try:
            self.conn.send(f.encode(), f.label)
        except Closed:
            pass
        self._reconnect()

    @invariant()
    def count_steps(self):
        """Count steps: closing rules (hostile input, regions past the end) come late, so
        that most of a history runs on one connection."""
        self.steps += 1

    def teardown(self):
        """Compare every live buffer with the model, close, and check the server-wide
        properties."""
        try:
            for handle, (base, model) in list(self.bufs.items()):
                self._compare(handle, 0, len(model))
        finally:
            self.conn.close()
        check_properties(self.ctx.server, self.ctx.client)


def fuzz_stateful(settings=None):
    """Run the machine (the target the fuzz conftest calls with the profile's settings)."""
    run_state_machine_as_test(SessionMachine, settings=settings)


__all__ = ["SessionMachine", "fuzz_stateful"]
