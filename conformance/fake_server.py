"""A fake server that plays the recorded server side of a capture to any client.

    python conformance/fake_server.py conformance/captures/backend-ops.cap.gz --port 50052

It accepts connections one after the other and pairs each with the next recorded connection.
Every request the client sends must equal the recorded one once handles and addresses are
mapped back (spec/replay.md, "The reverse direction"); the reply it gets is the recorded
reply, with the fake server's own handles and base addresses in place of the recorded
server's.  A client that deviates is reported and its connection is closed, as a server
closes on a request it refuses.

:func:`drive_client` is the other half used by the tests: it takes refimpl's own client
(``refimpl/client.py``) through the recorded command sequence, one client method per
recorded request, and checks every value the client returns against the recorded reply.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import threading
from dataclasses import replace
from pathlib import Path

from refimpl.protocol import compat
from refimpl.protocol import messages as m
from refimpl.protocol.constants import Command
from refimpl.protocol.errors import ProtocolError

from replay import (AddressMap, Deviation, Exchange, RecordedConnection, RecordedSession, load,
                    section)

#: Where the fake server's handles and base addresses start (far from any recorded value).
FAKE_HANDLE0 = 0x5EED_0000_0000_1000
FAKE_BASE0 = 0x0000_6EED_0000_0000
FAKE_SPACING = 1 << 36   # one fake buffer per 64 GiB of fake address space


class FakeServer:
    """Plays ``session``'s server side on ``host:port`` (port 0: any free port).

    ``relocate`` (default) hands out fresh handles and bases instead of the recorded ones, so a
    client that does not use the values it was given is caught.  Deviations go to
    :attr:`deviations`; :attr:`served` counts the connections played.
    """

    def __init__(self, session: RecordedSession, host: str = "127.0.0.1", port: int = 0,
                 relocate: bool = True, timeout: float = 30.0, log=None):
        self.session = session
        self.relocate = relocate
        self.timeout = timeout
        self.log = log
        self.deviations: list[Deviation] = []
        self.served = 0
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(timeout)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._n = 0

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect."""
        return self._listener.getsockname()[:2]

    def start(self) -> "FakeServer":
        """Serve every recorded connection in a background thread."""
        self._thread = threading.Thread(target=self.serve, daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        """Wait until every recorded connection has been played (or the server gave up)."""
        if self._thread:
            self._thread.join(timeout)

    def stop(self) -> None:
        """Stop accepting and close the listener."""
        self._stop.set()
        try:
            self._listener.close()
        except OSError:
            pass
        self.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def deviation(self, e: Exchange | None, what: str, sect: str | None = None,
                  where: str = "") -> None:
        """Record a client deviation."""
        d = Deviation(where or (e.where() if e else "?"), what,
                      sect or (section(e.command) if e else "spec/replay.md"))
        self.deviations.append(d)
        if self.log:
            self.log(f"CLIENT DEVIATION {d}")

    # -- serving -------------------------------------------------------------------------------
    def serve(self) -> None:
        """Accept and play each recorded connection in turn (blocking)."""
        for rc in self.session.connections:
            if not rc.exchanges or self._stop.is_set():
                continue
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if not self._stop.is_set():
                    self.deviation(None, f"the client never opened the connection recorded as "
                                         f"c{rc.number}", "spec/replay.md#order",
                                   where=f"c{rc.number}")
                return
            with sock:
                sock.settimeout(self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._play(rc, sock)
            self.served += 1

    def _recv_exact(self, sock, n: int) -> bytes | None:
        out = bytearray()
        while len(out) < n:
            try:
                chunk = sock.recv(min(n - len(out), 1 << 20))
            except (socket.timeout, OSError):
                return None
            if not chunk:
                return None
            out += chunk
        return bytes(out)

    def _fresh(self):
        self._n += 1
        if not self.relocate:
            return None
        return FAKE_HANDLE0 + self._n, FAKE_BASE0 + self._n * FAKE_SPACING

    def _play(self, rc: RecordedConnection, sock) -> None:
        amap = AddressMap(strict_to_rec=True)
        fresh: dict[int, tuple[int, int]] = {}  # recorded handle -> (fake handle, fake base)
        for e in rc.exchanges:
            head = self._recv_exact(sock, 9)
            if head is None:
                self.deviation(e, f"the client closed the connection (or stopped sending) before "
                                  f"this request; it sent {e.index - 1} of "
                                  f"{len(rc.exchanges)}", "spec/replay.md#the-reverse-direction")
                return
            cmd, length = struct.unpack("<BQ", head)
            if cmd != e.command:
                self.deviation(e, f"the client sent {_name(cmd)} instead")
                return
            if length != len(e.raw) - 9:
                self.deviation(e, f"payload of {length} bytes, recorded {len(e.raw) - 9}",
                               "spec/transport.md#length-rules")
                return
            payload = self._recv_exact(sock, length)
            if payload is None:
                self.deviation(e, "the client closed the connection mid-request",
                               "spec/transport.md#connection-states")
                return
            raw = head + payload
            problem = self._judge(e, raw, amap)
            if problem:
                self.deviation(e, problem)
                return
            if rc.closed_by == "server" and e is rc.exchanges[-1] and e.reply_raw is None:
                return  # the recorded server closed here
            if e.reply_raw is not None:
                try:
                    sock.sendall(self._reply(e, amap, fresh))
                except OSError:
                    self.deviation(e, "the client closed before reading its reply",
                                   "spec/transport.md#replies")
                    return
            if isinstance(e.message, m.FreeBufferRequest):
                amap.free(e.message.handle)  # answered (empty) before 6.0.0, unanswered since
        if rc.closed_by == "server":
            return
        # the recorded client closed after its last request: so must this one
        sock.settimeout(min(self.timeout, 10))
        try:
            extra = sock.recv(1 << 16)
        except (socket.timeout, OSError):
            extra = b""
        if extra:
            self.deviation(rc.exchanges[-1], f"{len(extra)} more bytes after the last recorded "
                                             f"request", "spec/replay.md#the-reverse-direction")

    def _judge(self, e: Exchange, raw: bytes, amap: AddressMap) -> str | None:
        """None if the request equals the recorded one after mapping, else what differs."""
        if e.message is None:
            return None if raw == e.raw else "request differs from the recorded (undecodable) one"
        try:
            msg = compat.decode(m.REQUESTS[Command(e.command)], raw[9:], e.profile)
        except (ProtocolError, ValueError) as exc:
            return f"request does not decode: {exc}"
        mapped = amap.request(msg, raw, to_new=False, profile=e.profile)
        if mapped == e.raw:
            return None
        return _difference(e.message, amap.message(msg, to_new=False))

    def _reply(self, e: Exchange, amap: AddressMap, fresh: dict) -> bytes:
        """The recorded reply with this fake server's handles and bases."""
        rec = e.reply
        if isinstance(rec, m.AllocBufferResponse) and rec.handle:
            vals = self._fresh()
            new_handle = vals[0] if vals else rec.handle
            if vals:
                fresh[rec.handle] = vals
            amap.add(rec.handle, rec.size, new_handle, rec.size, e.message.device)
            return _frame(replace(rec, handle=new_handle))
        if isinstance(rec, m.BufferGetBaseResponse):
            vals = fresh.get(e.message.handle)
            new_base = vals[1] if vals else rec.base
            amap.set_base(e.message.handle, rec.base, new_base)
            return _frame(replace(rec, base=new_base))
        return e.reply_raw


def _frame(msg) -> bytes:
    payload = msg.encode_payload()
    return struct.pack("<Q", len(payload)) + payload


def _name(cmd: int) -> str:
    try:
        return Command(cmd).name
    except ValueError:
        return f"command {cmd}"


def _difference(recorded, got) -> str:
    """Which field of a request differs (for the report)."""
    if isinstance(recorded, m.GraphComputeRequest):
        if recorded.device != got.device:
            return f"device {got.device}, recorded {recorded.device}"
        if list(recorded.nodes) != list(got.nodes):
            return "graph nodes differ"
        if len(recorded.tensors) != len(got.tensors):
            return f"{len(got.tensors)} graph tensors, recorded {len(recorded.tensors)}"
        for i in range(len(recorded.tensors)):
            a, b = recorded.tensor(i), got.tensor(i)
            if a != b:
                return f"graph tensor {i} ('{a.label}'): " + _tensor_difference(a, b)
        return "graph differs"
    for name in recorded.__dataclass_fields__:
        a, b = getattr(recorded, name), getattr(got, name)
        if a != b:
            if hasattr(a, "label"):
                return f"{name} ('{a.label}'): " + _tensor_difference(a, b)
            if name == "handle" and b == AddressMap.UNMAPPED:
                return "handle is not a value this server gave the client"
            if isinstance(a, bytes):
                return f"{name} differs ({len(b)} bytes, recorded {len(a)})"
            return f"{name} {b!r}, recorded {a!r}"
    return "request bytes differ"


def _tensor_difference(a, b) -> str:
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if x != y:
            if name in ("buffer", "data") and y == AddressMap.UNMAPPED:
                return f"{name} is not a value this server gave the client"
            return f"{name} {y!r}, recorded {x!r}"
    return "differs"


# ----------------------------------------------------------------------------------------------
# refimpl's client, driven through a recorded session
# ----------------------------------------------------------------------------------------------

async def drive_client(session: RecordedSession, host: str, port: int) -> list[str]:
    """Run refimpl's :class:`~refimpl.client.RpcClient` through ``session``'s requests against
    a server (normally a :class:`FakeServer` of the same session), one method call per
    recorded request.  Returns the problems found in what the client returned."""
    from refimpl.client import RpcClient, ServerClosedConnection
    from refimpl.protocol.tensor import RpcTensor

    problems: list[str] = []
    for rc in session.connections:
        if not rc.exchanges:
            continue
        amap = AddressMap()
        try:
            client = await RpcClient.connect(host, port, protocol=session.profile.name)
        except ServerClosedConnection as exc:
            problems.append(f"c{rc.number}: connect failed: {exc}")
            return problems
        async with client:
            hello = rc.exchanges[0].reply
            if hello is not None and client.server_version != (hello.major, hello.minor, hello.patch):
                problems.append(f"c{rc.number}: version {client.server_version}")
            for e in rc.exchanges[1:]:
                try:
                    problem = await _call(client, e, amap, RpcTensor)
                except ServerClosedConnection as exc:
                    if rc.closed_by == "server" and e is rc.exchanges[-1]:
                        break
                    problems.append(f"{e.where()}: the server closed the connection: {exc}")
                    return problems
                if problem:
                    problems.append(f"{e.where()}: {problem}")
    return problems


async def _call(client, e: Exchange, amap: AddressMap, RpcTensor) -> str | None:
    """Make the client method call that sends ``e``'s request; check what it returns."""
    msg = amap.message(e.message, to_new=True)
    rec = e.reply
    c = Command(e.command)
    if c is Command.DEVICE_COUNT:
        got = await client.device_count()
        return None if got == rec.count else f"count {got}, recorded {rec.count}"
    if c is Command.GET_ALIGNMENT:
        got = await client.get_alignment(msg.device)
        return None if got == rec.alignment else f"alignment {got}"
    if c is Command.GET_MAX_SIZE:
        got = await client.get_max_size(msg.device)
        return None if got == rec.max_size else f"max_size {got}"
    if c is Command.GET_DEVICE_MEMORY:
        got = await client.get_device_memory(msg.device)
        return None if (got.free, got.total) == (rec.free, rec.total) else f"memory {got}"
    if c is Command.ALLOC_BUFFER:
        got = await client.alloc_buffer_raw(msg.size, msg.device)
        if rec.handle:
            amap.add(rec.handle, rec.size, got.handle, got.size, msg.device)
        return None if (got.handle == 0) == (rec.handle == 0) and got.size == rec.size \
            else f"reply {got}"
    if c is Command.BUFFER_GET_BASE:
        got = await client.buffer_get_base(msg.handle)
        amap.set_base(e.message.handle, rec.base, got)
        return None
    if c is Command.FREE_BUFFER:
        await client.free_buffer(msg.handle)
        amap.free(e.message.handle)
        return None
    if c is Command.BUFFER_CLEAR:
        await client.buffer_clear(msg.handle, msg.value)
        return None
    if c is Command.SET_TENSOR:
        await client.set_tensor(msg.tensor, msg.data, msg.offset, cache=bool(msg.cache_flag))
        return None
    if c is Command.SET_TENSOR_HASH:
        got = await client.set_tensor_hash(msg.tensor, msg.hash, msg.offset)
        return None if int(got) == rec.result else f"result {got}, recorded {rec.result}"
    if c is Command.GET_TENSOR:
        got = await client.get_tensor(msg.tensor, msg.offset, msg.size)
        return None if got == rec.data else "data differs from the recorded reply"
    if c is Command.COPY_TENSOR:
        got = await client.copy_tensor(msg.src, msg.dst)
        return None if int(got) == rec.result else f"result {got}"
    if c is Command.GRAPH_COMPUTE:
        tensors = [RpcTensor.from_record(r) for r in msg.tensors]
        status = await client.graph_compute(msg.device, [int(x) for x in msg.nodes], tensors)
        want = None if rec is None else rec.status  # 3.0.0 answers with ggml's status
        return None if status == want else f"status {status}, recorded {want}"
    if c is Command.GRAPH_RECOMPUTE:
        await client.graph_recompute(msg.device)
        return None
    if c is Command.INIT_TENSOR:
        await client.init_tensor(msg.tensor)
        return None
    if c is Command.GET_ALLOC_SIZE:
        got = await client.get_alloc_size(msg.tensor, msg.device, msg.srcs)
        return None if got == rec.size else f"size {got}, recorded {rec.size}"
    if c is Command.MEMSET_TENSOR:
        await client.memset_tensor(msg.tensor, msg.offset, msg.size, msg.value)
        return None
    return f"{c.name}: the client has no call for a second {c.name}"


def main(argv=None) -> int:
    """CLI: play a capture's server side to whatever client connects, and report."""
    p = argparse.ArgumentParser(prog="python conformance/fake_server.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("capture", type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50052)
    p.add_argument("--no-relocate", action="store_true",
                   help="hand out the recorded handles and bases instead of fresh ones")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the client")
    args = p.parse_args(argv)
    fake = FakeServer(load(args.capture), args.host, args.port, relocate=not args.no_relocate,
                      timeout=args.timeout, log=print)
    print(f"playing {args.capture.name} on {args.host}:{fake.address[1]}", flush=True)
    fake.serve()
    print(f"{fake.served} connection(s) played, {len(fake.deviations)} client deviation(s)")
    for d in fake.deviations:
        print(f"  {d}")
    return 1 if fake.deviations else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
