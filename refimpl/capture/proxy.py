"""``refimpl-capture``: a transparent recording proxy between any client and any server.

Bytes are forwarded as they arrive, in both directions, and every complete message is also
recorded (spec/captures.md).  One change is made to the traffic: the connection-capability
blocks of HELLO are zeroed, because a TCP proxy cannot follow a switch to RDMA; both peers then
stay on TCP, as they do whenever one side offers nothing (spec/handshake.md).
"""

from __future__ import annotations

import json
import logging
import struct
import time

import trio

from ..protocol.constants import CONN_CAPS_SIZE, Command
from ..protocol.messages import HelloResponse
from ..protocol.observer import CLIENT_TO_SERVER, SERVER_TO_CLIENT, Observer
from .fileformat import CLOSED, MESSAGE, NOTE, OPENED, Record, Writer

log = logging.getLogger("refimpl.capture")

_HELLO_REQ = 9 + CONN_CAPS_SIZE    # cmd, length, caps
_HELLO_REP = 8 + 4 + CONN_CAPS_SIZE  # length, version, padding, caps


class CaptureProxy:
    """Listens, connects each client to ``upstream``, forwards and records."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], writer: Writer):
        self.listen = listen
        self.upstream = upstream
        self.writer = writer
        self.t0 = time.monotonic_ns()
        self._next_conn = 0
        self.listeners: list = []
        self.active = 0

    @property
    def port(self) -> int:
        """The listening port (useful with port 0)."""
        return self.listeners[0].socket.getsockname()[1]

    def _record(self, direction: int, kind: int, conn: int, data: bytes = b"") -> None:
        self.writer.write(Record(direction, kind, conn, time.monotonic_ns() - self.t0, data))

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled."""
        self.listeners = await trio.open_tcp_listeners(self.listen[1], host=self.listen[0])
        task_status.started(self)
        await trio.serve_listeners(self._handle, self.listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        conn = self._next_conn
        self._next_conn += 1
        self.active += 1
        try:
            peer = "{}:{}".format(*client.socket.getpeername()[:2])
            try:
                server = await trio.open_tcp_stream(*self.upstream)
            except OSError as exc:
                log.warning("connection %d: upstream %s:%d unreachable: %s", conn, *self.upstream, exc)
                await client.aclose()
                return
            self._record(CLIENT_TO_SERVER, OPENED, conn, json.dumps(
                {"client": peer, "server": "{}:{}".format(*self.upstream)}).encode())
            log.info("connection %d: %s <-> %s:%d", conn, peer, *self.upstream)
            observer = Observer()
            async with server:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server, observer, conn, CLIENT_TO_SERVER,
                                       nursery.cancel_scope)
                    nursery.start_soon(self._pump, server, client, observer, conn, SERVER_TO_CLIENT,
                                       nursery.cancel_scope)
            await client.aclose()
        finally:
            self.active -= 1

    async def _pump(self, src, dst, observer: Observer, conn: int, direction: int, scope) -> None:
        first = bytearray()  # the bytes of HELLO, held back until its caps can be zeroed
        hello_len = _HELLO_REQ if direction == CLIENT_TO_SERVER else _HELLO_REP
        hello_pending = True
        try:
            while True:
                data = await src.receive_some(1 << 20)
                if not data:
                    if first:
                        await dst.send_all(bytes(first))
                    self._record(direction, CLOSED, conn)
                    break
                if hello_pending:
                    first += data
                    if not _hello_decidable(first, direction, hello_len):
                        continue
                    data = _zero_caps(bytes(first), direction) if len(first) >= hello_len else bytes(first)
                    first.clear()
                    hello_pending = False
                await dst.send_all(data)
                parsed = (observer.from_client(data) if direction == CLIENT_TO_SERVER
                          else observer.from_server(data))
                for msg in parsed:
                    self._record(direction, MESSAGE, conn, msg.raw)
                    if isinstance(msg.message, HelloResponse):
                        r = msg.message
                        self._record(direction, NOTE, conn, json.dumps(
                            {"protocol": f"{r.major}.{r.minor}.{r.patch}"}).encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._record(direction, CLOSED, conn)
        finally:
            scope.cancel()


def _hello_decidable(first: bytearray, direction: int, hello_len: int) -> bool:
    """Enough bytes to know whether this is a 7.0.0-style HELLO (and to hold all of it)."""
    if direction == CLIENT_TO_SERVER:
        if len(first) >= 1 and first[0] != Command.HELLO:
            return True
        if len(first) >= 9 and struct.unpack_from("<Q", first, 1)[0] != CONN_CAPS_SIZE:
            return True
    elif len(first) >= 8 and struct.unpack_from("<Q", first)[0] != 4 + CONN_CAPS_SIZE:
        return True
    return len(first) >= hello_len


def _zero_caps(data: bytes, direction: int) -> bytes:
    """Zero the capability block of a HELLO request or reply at the start of ``data``."""
    if direction == CLIENT_TO_SERVER:
        cmd, length = struct.unpack_from("<BQ", data)
        if cmd == Command.HELLO and length == CONN_CAPS_SIZE:
            return data[:9] + bytes(CONN_CAPS_SIZE) + data[_HELLO_REQ:]
        return data
    (length,) = struct.unpack_from("<Q", data)
    if length == 4 + CONN_CAPS_SIZE:
        return data[:12] + bytes(CONN_CAPS_SIZE) + data[_HELLO_REP:]
    return data
