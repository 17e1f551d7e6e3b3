"""Replay a capture against a server under test, under the rules of spec/replay.md.

    python conformance/replay.py conformance/captures/completion-f32-fa-off.cap.gz \\
        --server 127.0.0.1:50052 [--cache fresh|none|unknown] [-v]

The recorded client messages are sent in order, one connection after the other, and every
reply is compared with the recorded one.  Handles and base addresses are *remapped*: the
replay learns the server's own values from its ALLOC_BUFFER and BUFFER_GET_BASE replies and
rewrites every later request (handles, and the ``buffer`` and ``data`` fields of every tensor,
graphs included) to use them.  Memory figures are checked for sanity, tensor bytes exactly
where they were uploaded or copied and within a tolerance where a graph computed them.

The same parsing and mapping serve the reverse direction (``fake_server.py``).  Decoding is
done by the sans-IO package ``refimpl.protocol``; nothing here needs the model files.
"""

from __future__ import annotations

import argparse
import collections
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refimpl.capture import fileformat as ff
from refimpl.protocol import compat
from refimpl.protocol import messages as m
from refimpl.protocol.constants import Command
from refimpl.hashing import fnv1a_64
from refimpl.protocol.observer import Observer
from refimpl.protocol.profiles import LATEST, Profile
from refimpl.protocol.tensor import RpcTensor, tensor_nbytes

#: Tolerance for bytes a graph computed (spec/replay.md, "Tensor bytes"): normalised mean
#: squared error of the reply's values against the recorded ones.
COMPUTED_NMSE = 1e-5
F32, F16, BF16 = 0, 1, 30

REPLAY_SPEC = "spec/replay.md"


def section(command) -> str:
    """The spec section that says what a command must do (where a deviation is judged)."""
    try:
        cmd = Command(command)
    except ValueError:
        return "spec/commands.md"
    if cmd is Command.HELLO:
        return "spec/handshake.md#reply"
    if cmd in (Command.GRAPH_COMPUTE, Command.GRAPH_RECOMPUTE):
        return "spec/graph.md"
    return f"spec/commands.md#{cmd.name.lower()}-{int(cmd)}"


def command_name(command: int) -> str:
    """``ALLOC_BUFFER`` for 0, ``command 99`` for unknown numbers."""
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"


# ----------------------------------------------------------------------------------------------
# a capture, as exchanges per connection
# ----------------------------------------------------------------------------------------------

@dataclass
class Exchange:
    """One recorded request and, for commands that have one, its recorded reply."""

    connection: int
    index: int            # 1-based position of the request in its connection (as in traces)
    command: int
    raw: bytes            # the request exactly as recorded (framing included)
    message: object       # decoded request, or None when it could not be decoded
    reply_raw: bytes | None = None
    reply: object = None  # decoded reply
    #: The protocol version the connection spoke (learned from its HELLO reply).
    profile: Profile = LATEST

    @property
    def name(self) -> str:
        """The command's name."""
        return command_name(self.command)

    @property
    def expects_reply(self) -> bool:
        """Whether the server answers this request (spec/transport.md, "Replies")."""
        return self.message is not None and compat.has_response(self.message.COMMAND, self.profile)

    def where(self) -> str:
        """``c12 #46 GRAPH_COMPUTE``: where in the capture this is."""
        return f"c{self.connection} #{self.index} {self.name}"


@dataclass
class RecordedConnection:
    """One client connection of a capture."""

    number: int
    exchanges: list = field(default_factory=list)
    #: who closed the connection first: "client", "server" or None (capture ended first)
    closed_by: str | None = None
    #: the recorded replies whose request was never answered (the server closed instead)
    unanswered: int = 0


@dataclass
class RecordedSession:
    """A whole capture: metadata and its connections in the order they were opened."""

    path: Path
    meta: dict
    connections: list
    #: The protocol version the capture speaks (its HELLO replies; spec/versions.md).
    profile: Profile = LATEST

    @property
    def name(self) -> str:
        """The file name without ``.cap``/``.cap.gz``."""
        n = self.path.name
        for suffix in (".gz", ".cap"):
            n = n[:-len(suffix)] if n.endswith(suffix) else n
        return n

    def exchanges(self):
        """Every exchange, connection by connection."""
        for c in self.connections:
            yield from c.exchanges

    @property
    def uses_cache(self) -> bool:
        """Whether the session relies on the server's hash cache (spec/hash-cache.md)."""
        for e in self.exchanges():
            if isinstance(e.message, m.SetTensorHashRequest) and e.reply is not None \
                    and e.reply.result:
                return True
            if isinstance(e.message, m.SetTensorRequest) and e.message.cache_flag:
                return True
        return False

    def cached_bytes(self) -> dict:
        """{hash: bytes} of every SET_TENSOR the client asked the server to cache."""
        out = {}
        for e in self.exchanges():
            if isinstance(e.message, m.SetTensorRequest) and e.message.cache_flag:
                out[fnv1a_64(e.message.data)] = e.message.data
        return out


def load(path) -> RecordedSession:
    """Parse a capture file into connections of request/reply exchanges.

    Replies are paired with requests as a client pairs them (spec/transport.md): in order, for
    the commands that have one, and the length of a GET_TENSOR reply is taken from its request.
    """
    cap = ff.read(path)
    conns: dict[int, RecordedConnection] = {}
    observers: dict[int, Observer] = {}
    waiting: dict[int, collections.deque] = {}
    for r in cap.records:
        c = conns.setdefault(r.connection, RecordedConnection(r.connection))
        if r.kind == ff.CLOSED:
            if c.closed_by is None:
                c.closed_by = "client" if r.direction == ff.CLIENT_TO_SERVER else "server"
            continue
        if r.kind != ff.MESSAGE:
            continue
        obs = observers.setdefault(r.connection, Observer())
        queue = waiting.setdefault(r.connection, collections.deque())
        if r.direction == ff.CLIENT_TO_SERVER:
            for o in obs.from_client(r.data):
                e = Exchange(r.connection, len(c.exchanges) + 1, o.command, o.raw, o.message,
                             profile=obs.profile)
                c.exchanges.append(e)
                if e.expects_reply:
                    queue.append(e)
        else:
            for o in obs.from_server(r.data):
                if queue:
                    e = queue.popleft()
                    e.reply_raw, e.reply = o.raw, o.message
    for n, q in waiting.items():
        conns[n].unanswered = len(q)
    versions = {o.profile.version: o.profile for o in observers.values() if o.hello_done}
    if len(versions) > 1:
        raise ValueError(f"{path}: connections speak different protocol versions: "
                         + ", ".join(sorted(p.name for p in versions.values())))
    return RecordedSession(Path(path), cap.meta, [conns[n] for n in sorted(conns)],
                   next(iter(versions.values()), LATEST))


# ----------------------------------------------------------------------------------------------
# remapping handles and addresses
# ----------------------------------------------------------------------------------------------

@dataclass
class _Buf:
    rec_handle: int
    rec_size: int
    new_handle: int
    new_size: int
    rec_base: int | None = None
    new_base: int | None = None
    device: int = 0


class AddressMap:
    """Handles and base addresses of one connection's buffers in two spaces: the recorded
    server's ("rec") and the other side's ("new": the server under test, or the values a fake
    server gave its client).  Maps tensors and graphs either way (spec/replay.md, "Remapping").
    """

    #: What a strict map gives a handle or address it does not know (never a real value).
    UNMAPPED = 0xDEAD_DEAD_DEAD_DEAD

    def __init__(self, strict_to_rec: bool = False):
        self.by_rec: dict[int, _Buf] = {}
        self.by_new: dict[int, _Buf] = {}
        #: Map unknown handles and addresses of the "new" space to UNMAPPED instead of leaving
        #: them as they are (the fake server: a client must use the values it was given).
        self.strict_to_rec = strict_to_rec

    def add(self, rec_handle: int, rec_size: int, new_handle: int, new_size: int,
            device: int = 0) -> None:
        """A buffer allocated on both sides."""
        b = _Buf(rec_handle, rec_size, new_handle, new_size, device=device)
        self.by_rec[rec_handle] = b
        self.by_new[new_handle] = b

    def set_base(self, rec_handle: int, rec_base: int, new_base: int) -> None:
        """BUFFER_GET_BASE answered on both sides."""
        b = self.by_rec.get(rec_handle)
        if b is not None:
            b.rec_base, b.new_base = rec_base, new_base

    def free(self, rec_handle: int) -> None:
        """FREE_BUFFER: forget a buffer."""
        b = self.by_rec.pop(rec_handle, None)
        if b is not None:
            self.by_new.pop(b.new_handle, None)

    def buffers(self):
        """Live buffers."""
        return list(self.by_rec.values())

    # -- one direction or the other ---------------------------------------------------------
    def handle(self, h: int, to_new: bool = True) -> int:
        """A handle in the other space (0 stays 0; unknown handles are left as they are)."""
        if h == 0:
            return 0
        b = (self.by_rec if to_new else self.by_new).get(h)
        if b is None:
            return self.UNMAPPED if (self.strict_to_rec and not to_new) else h
        return b.new_handle if to_new else b.rec_handle

    def _find(self, addr: int, handle: int, to_new: bool) -> _Buf | None:
        table = self.by_rec if to_new else self.by_new
        cands = [table[handle]] if handle in table else []
        cands += [b for b in table.values() if b not in cands]
        for b in cands:
            base, size = (b.rec_base, b.rec_size) if to_new else (b.new_base, b.new_size)
            if base is not None and base <= addr <= base + size:
                return b
        return None

    def address(self, addr: int, handle: int = 0, to_new: bool = True) -> int:
        """An address in the other space: the same offset into the corresponding buffer."""
        if addr == 0:
            return 0
        b = self._find(addr, handle, to_new)
        if b is None:
            return self.UNMAPPED if (self.strict_to_rec and not to_new) else addr
        return (addr - b.rec_base + b.new_base) if to_new else (addr - b.new_base + b.rec_base)

    def tensor(self, t: RpcTensor, to_new: bool = True) -> RpcTensor:
        """``t`` with ``buffer`` and ``data`` in the other space."""
        if t.buffer == 0 and t.data == 0:
            return t
        from dataclasses import replace
        return replace(t, buffer=self.handle(t.buffer, to_new),
                       data=self.address(t.data, t.buffer, to_new))

    def tensors(self, arr: np.ndarray, to_new: bool = True) -> np.ndarray:
        """A copy of a structured array of tensors (a graph) with ``buffer``/``data`` mapped."""
        out = arr.copy()
        buf = arr["buffer"].astype(np.uint64)
        data = arr["data"].astype(np.uint64)
        new_buf, new_data = buf.copy(), data.copy()
        if self.strict_to_rec and not to_new:
            new_buf[buf != 0] = np.uint64(self.UNMAPPED)
            new_data[data != 0] = np.uint64(self.UNMAPPED)
        for b in self.by_rec.values():
            src_h, dst_h = (b.rec_handle, b.new_handle) if to_new else (b.new_handle, b.rec_handle)
            src_base, dst_base = (b.rec_base, b.new_base) if to_new else (b.new_base, b.rec_base)
            size = b.rec_size if to_new else b.new_size
            new_buf[buf == np.uint64(src_h)] = np.uint64(dst_h)
            if src_base is None:
                continue
            inside = (data != 0) & (data >= np.uint64(src_base)) & \
                     (data <= np.uint64(src_base + size))
            new_data[inside] = data[inside] - np.uint64(src_base) + np.uint64(dst_base)
        out["buffer"] = new_buf
        out["data"] = new_data
        return out

    # -- requests ----------------------------------------------------------------------------
    def request(self, msg, raw: bytes, to_new: bool = True, profile: Profile = LATEST) -> bytes:
        """The framed request ``msg`` (recorded as ``raw`` in protocol ``profile``) with
        handles and addresses mapped."""
        if msg is None:
            return raw
        if isinstance(msg, m.SetTensorRequest):
            t = self.tensor(msg.tensor, to_new)
            if t == msg.tensor:
                return raw
            head = compat.encode_set_tensor_header(
                m.SetTensorRequest(t, msg.offset, b"", msg.cache_flag), profile)
            return raw[:9] + head + raw[9 + profile.set_tensor_header_size:]
        mapped = self.message(msg, to_new)
        if mapped is msg:
            return raw
        payload = compat.encode(mapped, profile)
        return struct.pack("<BQ", int(msg.COMMAND), len(payload)) + payload

    def message(self, msg, to_new: bool = True):
        """A decoded request with its handles and tensors mapped (the same object if nothing
        in it names a buffer)."""
        from dataclasses import replace
        if isinstance(msg, (m.BufferGetBaseRequest, m.FreeBufferRequest, m.BufferClearRequest)):
            return replace(msg, handle=self.handle(msg.handle, to_new))
        if isinstance(msg, (m.SetTensorHashRequest, m.GetTensorRequest, m.InitTensorRequest,
                            m.MemsetTensorRequest, m.SetTensorRequest)):
            return replace(msg, tensor=self.tensor(msg.tensor, to_new))
        if isinstance(msg, m.CopyTensorRequest):
            return replace(msg, src=self.tensor(msg.src, to_new), dst=self.tensor(msg.dst, to_new))
        if isinstance(msg, m.GetAllocSizeRequest):
            return replace(msg, tensor=self.tensor(msg.tensor, to_new),
                           srcs=tuple(self.tensor(s, to_new) for s in msg.srcs))
        if isinstance(msg, m.GraphComputeRequest):
            return m.GraphComputeRequest(msg.device, msg.nodes, self.tensors(msg.tensors, to_new))
        return msg


# ----------------------------------------------------------------------------------------------
# what is known of each byte: written by an upload (exact) or computed by a graph
# ----------------------------------------------------------------------------------------------

UNSPECIFIED, EXACT, COMPUTED = 0, 1, 2


class Provenance:
    """Per recorded buffer, how each byte got its value (spec/replay.md, "Tensor bytes")."""

    def __init__(self):
        self.state: dict[int, np.ndarray] = {}
        self.last_graph: dict[int, list] = {}

    def alloc(self, handle: int, size: int) -> None:
        """A new buffer: its bytes are unspecified."""
        self.state[handle] = np.zeros(size, np.uint8)

    def free(self, handle: int) -> None:
        """A freed buffer."""
        self.state.pop(handle, None)

    def _span(self, amap: AddressMap, t: RpcTensor, offset: int, size: int):
        b = amap._find(t.data, t.buffer, True) if t.data else None
        if b is None or b.rec_handle not in self.state:
            return None
        start = t.data - b.rec_base + offset
        return self.state[b.rec_handle], max(start, 0), max(start + size, 0)

    def mark(self, amap: AddressMap, t: RpcTensor, offset: int, size: int, how: int) -> None:
        """Bytes ``[offset, offset+size)`` of ``t`` were written ``how``."""
        span = self._span(amap, t, offset, size)
        if span:
            arr, lo, hi = span
            arr[lo:hi] = how

    def clear(self, handle: int) -> None:
        """BUFFER_CLEAR: every byte known."""
        if handle in self.state:
            self.state[handle][:] = EXACT

    def copy(self, amap: AddressMap, src: RpcTensor, dst: RpcTensor) -> None:
        """COPY_TENSOR: the destination's bytes are what the source's were."""
        n = _nbytes(src)
        s, d = self._span(amap, src, 0, n), self._span(amap, dst, 0, n)
        if s and d:
            d[0][d[1]:d[2]] = s[0][s[1]:s[1] + (d[2] - d[1])]

    def graph(self, amap: AddressMap, msg: m.GraphComputeRequest) -> None:
        """GRAPH_COMPUTE: every node's bytes are computed."""
        ids = set(int(x) for x in msg.nodes)
        nodes = [t for t in (RpcTensor.from_record(r) for r in msg.tensors
                             if int(r["id"]) in ids) if _writes(t)]
        self.last_graph[msg.device] = nodes
        self.recompute(amap, msg.device)

    def recompute(self, amap: AddressMap, device: int) -> None:
        """GRAPH_RECOMPUTE: the stored graph's nodes are computed again."""
        for t in self.last_graph.get(device, []):
            self.mark(amap, t, 0, _nbytes(t), COMPUTED)

    def region(self, amap: AddressMap, t: RpcTensor, offset: int, size: int) -> np.ndarray | None:
        """The states of bytes ``[offset, offset+size)`` of ``t`` (None if unknown)."""
        span = self._span(amap, t, offset, size)
        if not span:
            return None
        arr, lo, hi = span
        out = np.zeros(size, np.uint8)
        got = arr[lo:hi]
        out[:len(got)] = got
        return out


def _writes(t: RpcTensor) -> bool:
    """Whether a graph node writes its bytes (NONE and the view ops write nothing)."""
    from refimpl.graph.ops import VIEW_OPS
    return t.op not in {int(op) for op in VIEW_OPS}


def _nbytes(t: RpcTensor) -> int:
    try:
        return tensor_nbytes(t.type, t.ne, t.nb)
    except (ValueError, TypeError):
        return 0


def compare_computed(recorded: bytes, got: bytes, type_: int, offset: int) -> str | None:
    """Compare bytes a graph computed: None if equivalent, else what differs.

    F32, F16 and BF16 values: the same NaN and infinity positions, and the normalised mean
    squared error of the finite values ``sum((got-rec)^2) / sum(rec^2)`` at most
    :data:`COMPUTED_NMSE`.  Every other type: bytes equal.
    """
    if recorded == got:
        return None
    width = {F32: 4, F16: 2, BF16: 2}.get(type_)
    if width is None or offset % width or len(recorded) % width:
        return f"computed bytes of a {type_}-type tensor differ (compared exactly)"
    if type_ == F32:
        a, b = np.frombuffer(recorded, "<f4"), np.frombuffer(got, "<f4")
    elif type_ == F16:
        a, b = (np.frombuffer(x, "<f2").astype(np.float32) for x in (recorded, got))
    else:
        a, b = ((np.frombuffer(x, "<u2").astype(np.uint32) << 16).view(np.float32)
                for x in (recorded, got))
    a, b = a.astype(np.float64), b.astype(np.float64)
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        return "NaN in different positions"
    fin_a, fin_b = np.isfinite(a), np.isfinite(b)
    if not np.array_equal(fin_a, fin_b) or not np.array_equal(a[np.isinf(a)], b[np.isinf(b)]):
        return "infinities differ"
    a, b = a[fin_a], b[fin_b]
    err = float(np.sum((a - b) ** 2))
    ref = float(np.sum(a ** 2))
    nmse = err / ref if ref > 0 else (0.0 if err == 0 else float("inf"))
    if nmse > COMPUTED_NMSE:
        worst = int(np.argmax(np.abs(a - b)))
        return (f"computed values differ beyond tolerance: NMSE {nmse:.3g} > {COMPUTED_NMSE:g} "
                f"(largest difference at element {worst}: recorded {a[worst]:.7g}, got "
                f"{b[worst]:.7g})")
    return None


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------

@dataclass
class Deviation:
    """A reply (or a closing) that is not equivalent to the recorded one."""

    where: str      # "c12 #46 GET_TENSOR"
    what: str
    section: str    # the spec section the server's behaviour breaks

    def __str__(self):
        return f"{self.where}: {self.what} [{self.section}]"


class Inconclusive(Exception):
    """The capture cannot be replayed on this server for a reason that is not a deviation
    (not enough memory or devices, a layout that does not fit the device)."""


@dataclass
class ReplayResult:
    """What one replay found."""

    session: str
    target: str
    deviations: list = field(default_factory=list)
    inconclusive: str | None = None
    requests: int = 0
    replies: int = 0
    exact_compared: int = 0
    computed_compared: int = 0
    computed_identical: int = 0
    max_nmse: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No deviation (an inconclusive replay is not ok either)."""
        return not self.deviations and self.inconclusive is None

    def summary(self) -> str:
        """One line for reports."""
        if self.inconclusive:
            return f"inconclusive: {self.inconclusive}"
        stats = (f"{self.requests} requests, {self.replies} replies; tensor reads: "
                 f"{self.exact_compared} exact, {self.computed_compared} computed "
                 f"({self.computed_identical} bit-identical)")
        if not self.deviations:
            return "pass (" + stats + ")"
        return f"{len(self.deviations)} deviation(s) ({stats})"


# ----------------------------------------------------------------------------------------------
# the replay
# ----------------------------------------------------------------------------------------------

class _TargetClosed(Exception):
    pass


class _Conn:
    """A blocking socket to the server under test."""

    def __init__(self, address, timeout: float):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout

    def send(self, data: bytes) -> None:
        """Send everything; a closed or reset connection raises _TargetClosed."""
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise _TargetClosed(f"send failed: {exc}") from exc

    def recv_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes (TimeoutError when they do not come, _TargetClosed on close)."""
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.sock.recv(min(n - len(out), 1 << 20))
            except socket.timeout:
                raise TimeoutError(f"no reply within {self.timeout}s") from None
            except OSError as exc:
                raise _TargetClosed(str(exc)) from exc
            if not chunk:
                raise _TargetClosed("closed" if not out else f"closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def stray_bytes(self) -> bytes:
        """Bytes that arrived unasked (non-blocking look)."""
        self.sock.setblocking(False)
        try:
            return self.sock.recv(1 << 16)
        except OSError:
            return b""
        finally:
            self.sock.settimeout(self.timeout)

    def closes(self, timeout: float) -> str:
        """Wait for the server to close: "closed", "data" or "open"."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            return "open"
        except OSError:
            return "closed"
        return "closed" if not data else "data"

    def close(self) -> None:
        """Close the socket."""
        try:
            self.sock.close()
        except OSError:
            pass


class Replayer:
    """Replays a :class:`RecordedSession` against a server address.

    ``cache`` says what is known of the server's hash cache (spec/replay.md, SET_TENSOR_HASH):
    ``"fresh"`` (enabled and empty when the replay starts: results must equal the recorded
    ones), ``"none"`` (no cache: every result must be 0) or ``"unknown"`` (a server you run:
    either result is accepted).
    """

    MAX_DEVIATIONS = 40

    def __init__(self, session: RecordedSession, address, *, cache: str = "unknown",
                 timeout: float = 120.0, target_name: str = "server", log=None):
        self.s = session
        self.address = address
        self.cache = cache
        self.timeout = timeout
        self.log = log
        self.result = ReplayResult(session.name, target_name)
        self.cached = session.cached_bytes()
        self.alignment: dict[int, int] = {}
        self.max_size: dict[int, int] = {}

    def deviation(self, e: Exchange | None, what: str, sect: str | None = None,
                  where: str | None = None) -> None:
        """Record one deviation."""
        d = Deviation(where or (e.where() if e else "?"), what,
                      sect or (section(e.command) if e else REPLAY_SPEC))
        self.result.deviations.append(d)
        if self.log:
            self.log(f"DEVIATION {d}")

    def run(self) -> ReplayResult:
        """Replay every connection; returns the result (never raises for a deviation)."""
        t0 = time.monotonic()
        try:
            for rc in self.s.connections:
                if len(self.result.deviations) >= self.MAX_DEVIATIONS:
                    break
                self._connection(rc)
        except Inconclusive as exc:
            self.result.inconclusive = str(exc)
        self.result.seconds = time.monotonic() - t0
        return self.result

    # -- one connection ------------------------------------------------------------------------
    def _connection(self, rc: RecordedConnection) -> None:
        if not rc.exchanges:
            return
        amap, prov = AddressMap(), Provenance()
        try:
            conn = _Conn(self.address, self.timeout)
        except OSError as exc:
            self.deviation(None, f"cannot connect: {exc}", "spec/transport.md#connection",
                           where=f"c{rc.number}")
            return
        try:
            self._exchanges(rc, conn, amap, prov)
        finally:
            conn.close()

    def _exchanges(self, rc: RecordedConnection, conn: _Conn, amap: AddressMap,
                   prov: Provenance) -> None:
        pending: list[Exchange] = []   # sent since the last reply (for blame when it closes)
        for e in rc.exchanges:
            recorded_refused = (rc.closed_by == "server" and e is rc.exchanges[-1]
                                and (not e.expects_reply or e.reply_raw is None))
            raw = amap.request(e.message, e.raw, to_new=True, profile=e.profile)
            pending.append(e)
            try:
                conn.send(raw)
                self.result.requests += 1
                if recorded_refused:
                    break
                if not e.expects_reply or e.reply_raw is None:
                    self._track(e, amap, prov)
                    continue
                reply_raw = self._read_reply(conn, e)
            except _TargetClosed as exc:
                self._closed_early(e, pending, str(exc))
                return
            except TimeoutError as exc:
                self.deviation(e, f"{exc}; the recorded server answered", "spec/transport.md#replies")
                return
            if reply_raw is None:
                return
            pending.clear()
            self.result.replies += 1
            self._compare(e, reply_raw, amap, prov, conn)
            self._track(e, amap, prov)
            if len(self.result.deviations) >= self.MAX_DEVIATIONS:
                return
        last = rc.exchanges[-1]
        if rc.closed_by == "server":
            how = conn.closes(min(self.timeout, 10.0))
            if how != "closed":
                self.deviation(last, f"the recorded server closed the connection after this "
                                     f"request; the server under test "
                                     f"{'sent bytes' if how == 'data' else 'kept it open'}",
                               "spec/errors.md#the-rule")
        else:
            stray = conn.stray_bytes()
            if stray:
                self.deviation(last, f"{len(stray)} bytes arrived that no request asked for",
                               "spec/transport.md#replies")

    def _closed_early(self, e: Exchange, pending: list, detail: str) -> None:
        if len(pending) > 1:
            names = ", ".join(f"#{p.index} {p.name}" for p in pending)
            what = (f"the server closed the connection ({detail}) at one of {names}; the recorded "
                    f"server accepted them")
        else:
            what = f"the server closed the connection ({detail}); the recorded server answered"
        blame = pending[0] if len(pending) > 1 and not pending[0].expects_reply else e
        self.deviation(blame, what)

    def _read_reply(self, conn: _Conn, e: Exchange) -> bytes | None:
        head = conn.recv_exact(8)
        (length,) = struct.unpack("<Q", head)
        expected = len(e.reply_raw) - 8
        if length != expected:
            self.deviation(e, f"reply length {length}, expected {expected}",
                           "spec/transport.md#replies")
            return None
        return head + conn.recv_exact(length)

    # -- state kept while replaying ------------------------------------------------------------
    def _track(self, e: Exchange, amap: AddressMap, prov: Provenance) -> None:
        """What a request did to the server's buffers and stored graph, once it was sent (and
        answered, where the version answers it: FREE_BUFFER, BUFFER_CLEAR before 6.0.0,
        GRAPH_COMPUTE in 3.0.0)."""
        msg = e.message
        if isinstance(msg, m.SetTensorRequest):
            prov.mark(amap, msg.tensor, msg.offset, len(msg.data), EXACT)
        elif isinstance(msg, m.MemsetTensorRequest):
            prov.mark(amap, msg.tensor, msg.offset, msg.size, EXACT)
        elif isinstance(msg, m.BufferClearRequest):
            prov.clear(msg.handle)
        elif isinstance(msg, m.FreeBufferRequest):
            prov.free(msg.handle)
            amap.free(msg.handle)
            prov.last_graph.clear()
        elif isinstance(msg, m.GraphComputeRequest):
            prov.graph(amap, msg)
        elif isinstance(msg, m.GraphRecomputeRequest):
            prov.recompute(amap, msg.device)

    # -- replies -------------------------------------------------------------------------------
    def _compare(self, e: Exchange, reply_raw: bytes, amap: AddressMap, prov: Provenance,
                 conn: _Conn) -> None:
        msg, rec = e.message, e.reply
        if isinstance(rec, compat.EmptyReply):
            return  # before 6.0.0: its length (0) was all there was to compare
        try:
            got = compat.decode(compat.response_class(Command(e.command)), reply_raw[8:], e.profile)
        except Exception as exc:  # a fixed-size reply of the right length always decodes
            self.deviation(e, f"reply does not decode: {exc}", "spec/transport.md#replies")
            return
        if isinstance(msg, m.GraphComputeRequest):   # 3.0.0: ggml's status
            if got.status != rec.status:
                self.deviation(e, f"status {got.status}, recorded {rec.status}")
        elif isinstance(msg, m.HelloRequest):
            if (got.major, got.minor, got.patch) != (rec.major, rec.minor, rec.patch):
                self.deviation(e, f"version {got.major}.{got.minor}.{got.patch}, recorded "
                                  f"{rec.major}.{rec.minor}.{rec.patch}")
        elif isinstance(msg, m.DeviceCountRequest):
            if got.count < 1:
                self.deviation(e, f"count {got.count} (at least 1)")
            elif got.count < rec.count:
                raise Inconclusive(f"the server has {got.count} devices, the capture uses {rec.count}")
        elif isinstance(msg, m.GetAlignmentRequest):
            self.alignment[msg.device] = got.alignment
            if got.alignment != rec.alignment:
                self.deviation(e, f"alignment {got.alignment}, recorded {rec.alignment}")
        elif isinstance(msg, m.GetMaxSizeRequest):
            self.max_size[msg.device] = got.max_size
            if got.max_size == 0:
                self.deviation(e, "max_size 0")
        elif isinstance(msg, m.GetDeviceMemoryRequest):
            if got.total == 0 or got.free > got.total:
                self.deviation(e, f"free {got.free}, total {got.total} (need 0 < total, "
                                  f"free <= total)")
        elif isinstance(msg, m.AllocBufferRequest):
            self._alloc(e, got, amap, prov)
        elif isinstance(msg, m.BufferGetBaseRequest):
            self._base(e, got, amap)
        elif isinstance(msg, m.GetAllocSizeRequest):
            need = _nbytes(msg.tensor)
            if got.size < need:
                self.deviation(e, f"size {got.size} < nbytes {need}")
            elif got.size > rec.size:
                raise Inconclusive(f"{e.where()}: the device needs {got.size} bytes where the "
                                   f"recorded one needed {rec.size}; the capture's layout does "
                                   f"not fit it")
        elif isinstance(msg, m.SetTensorHashRequest):
            self._hash(e, got, amap, prov, conn)
        elif isinstance(msg, m.CopyTensorRequest):
            if got.result != rec.result:
                self.deviation(e, f"result {got.result}, recorded {rec.result}")
            if got.result:
                prov.copy(amap, msg.src, msg.dst)
        elif isinstance(msg, m.GetTensorRequest):
            self._get_tensor(e, got.data, amap, prov)

    def _alloc(self, e, got, amap: AddressMap, prov: Provenance) -> None:
        msg, rec = e.message, e.reply
        if rec.handle == 0:
            return  # the recorded client saw a failure and never used the buffer
        if got.handle == 0:
            if self.max_size.get(msg.device, 1 << 64) < msg.size:
                raise Inconclusive(f"{e.where()}: {msg.size} bytes exceed the device's max size")
            raise Inconclusive(f"{e.where()}: the server could not allocate {msg.size} bytes "
                               f"(out of memory is not a protocol error)")
        if got.size < msg.size:
            self.deviation(e, f"buffer of {got.size} bytes, {msg.size} asked")
        if got.handle in amap.by_new:
            self.deviation(e, f"handle {got.handle:#x} is already live on this connection",
                           "spec/handles.md#buffer-handles")
        amap.add(rec.handle, rec.size, got.handle, got.size, msg.device)
        prov.alloc(rec.handle, rec.size)

    def _base(self, e, got, amap: AddressMap) -> None:
        msg, rec = e.message, e.reply
        b = amap.by_rec.get(msg.handle)
        if b is None:
            return
        align = self.alignment.get(b.device)
        if b.new_size and align and got.base % align:
            self.deviation(e, f"base {got.base:#x} is not a multiple of the alignment {align}",
                           "spec/handles.md#data-addresses")
        for other in amap.buffers():
            if other is b or other.new_base is None or not other.new_size or not b.new_size:
                continue
            if got.base < other.new_base + other.new_size and other.new_base < got.base + b.new_size:
                self.deviation(e, "buffer range overlaps another live buffer's",
                               "spec/handles.md#data-addresses")
        amap.set_base(msg.handle, rec.base, got.base)

    def _hash(self, e, got, amap: AddressMap, prov: Provenance, conn: _Conn) -> None:
        msg, rec = e.message, e.reply
        if got.result == rec.result:
            if got.result:
                size = len(self.cached.get(msg.hash, b"")) or _nbytes(msg.tensor) - msg.offset
                prov.mark(amap, msg.tensor, msg.offset, size, EXACT)
            return
        if self.cache == "fresh" or (self.cache == "none" and got.result):
            self.deviation(e, f"result {got.result}, recorded {rec.result} (the server's cache was "
                              f"{'empty at the start' if self.cache == 'fresh' else 'off'})",
                           "spec/hash-cache.md#server-behaviour")
        if rec.result and not got.result:
            # A miss where the recorded server hit: send the bytes, as a client does.
            data = self.cached.get(msg.hash)
            if data is None:
                raise Inconclusive(f"{e.where()}: cache miss and the capture lacks the bytes")
            t = amap.tensor(msg.tensor)
            head = compat.encode_set_tensor_header(m.SetTensorRequest(t, msg.offset, b"", 1), e.profile)
            conn.send(struct.pack("<BQ", int(Command.SET_TENSOR), len(head) + len(data))
                      + head + data)
            prov.mark(amap, msg.tensor, msg.offset, len(data), EXACT)
        # a hit where the recorded server missed: the client sends the bytes anyway

    def _get_tensor(self, e, data: bytes, amap: AddressMap, prov: Provenance) -> None:
        msg = e.message
        recorded = e.reply.data
        states = prov.region(amap, msg.tensor, msg.offset, msg.size)
        if states is None:
            states = np.full(msg.size, EXACT, np.uint8)
        if (states == COMPUTED).any():
            self.result.computed_compared += 1
            if data == recorded:
                self.result.computed_identical += 1
                return
            problem = compare_computed(recorded, data, msg.tensor.type, msg.offset)
            if problem:
                self.deviation(e, f"'{msg.tensor.label}': {problem}", REPLAY_SPEC + "#tensor-bytes")
            else:
                self._note_nmse(recorded, data, msg.tensor.type)
            return
        self.result.exact_compared += 1
        known = states == EXACT
        a = np.frombuffer(recorded, np.uint8)
        b = np.frombuffer(data, np.uint8)
        diff = np.flatnonzero((a != b) & known)
        if diff.size:
            self.deviation(e, f"'{msg.tensor.label}': {diff.size} of {msg.size} uploaded bytes "
                              f"differ (first at byte {int(diff[0])})")

    def _note_nmse(self, recorded: bytes, data: bytes, type_: int) -> None:
        if type_ != F32 or len(recorded) % 4:
            return
        a = np.frombuffer(recorded, "<f4").astype(np.float64)
        b = np.frombuffer(data, "<f4").astype(np.float64)
        fin = np.isfinite(a) & np.isfinite(b)
        ref = float(np.sum(a[fin] ** 2))
        if ref > 0:
            self.result.max_nmse = max(self.result.max_nmse,
                                       float(np.sum((a[fin] - b[fin]) ** 2)) / ref)


def replay(path, address, **kw) -> ReplayResult:
    """Load a capture and replay it against ``address`` (see :class:`Replayer`)."""
    return Replayer(load(path), address, **kw).run()


def main(argv=None) -> int:
    """CLI: replay captures against a running server and print what differs."""
    p = argparse.ArgumentParser(prog="python conformance/replay.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("captures", nargs="+", type=Path)
    p.add_argument("--server", required=True, metavar="HOST:PORT")
    p.add_argument("--cache", choices=["fresh", "none", "unknown"], default="unknown",
                   help="what is known of the server's hash cache (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    host, _, port = args.server.rpartition(":")
    status = 0
    for path in args.captures:
        res = replay(path, (host or "127.0.0.1", int(port)), cache=args.cache,
                     target_name=args.server, log=print if args.verbose else None)
        print(f"{res.session}: {res.summary()} in {res.seconds:.1f}s")
        for d in res.deviations:
            print(f"  {d}")
        status |= 0 if res.ok else 1
    return status


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
