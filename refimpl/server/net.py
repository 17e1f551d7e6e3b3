"""The trio network layer of refimpl-server: accept connections, move bytes, nothing else.

Each connection gets a :class:`ServerConnection` (framing, sans-IO) and a :class:`Session`
(what the commands do).  A connection that breaks the protocol or asks for something the
server refuses is logged and closed; every other connection carries on (spec/errors.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket as stdsocket
from dataclasses import dataclass, field

import trio

from ..devices import Device
from ..protocol import messages as m
from ..protocol.connection import (DEFAULT_MAX_MESSAGE_SIZE, NEED_DATA, ConnectionClosed,
                                   ServerConnection, SetTensorStart)
from ..protocol.errors import ProtocolError
from .buffers import AddressSpace, Rejected
from .hash_cache import HashCache
from .session import Session

log = logging.getLogger("refimpl.server")

#: Bytes asked of the socket per receive while parsing headers and small messages.
RECV_CHUNK = 256 * 1024

#: Requests whose work may block for long (disk reads, graph computations): they run in a
#: worker thread so that other connections keep being served meanwhile.
_BLOCKING = (m.SetTensorHashRequest, m.GraphComputeRequest, m.GraphRecomputeRequest)


class TimedOut(Exception):
    """A client sent nothing for longer than the configured timeout."""


@dataclass
class ServerConfig:
    """Everything the server needs to run."""

    devices: list[Device]
    host: str = "127.0.0.1"
    port: int = 50052
    cache: HashCache | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    graph_executor_factory: object = None  # callable(devices) -> executor, or None
    #: At most this many clients at once; further connections are closed at once.
    max_connections: int = 64
    #: Seconds a connection may sit between messages before it is closed (0: forever).
    idle_timeout: float = 3600.0
    #: Seconds a started message may go without receiving a byte before it is closed.
    read_timeout: float = 60.0
    #: Networks allowed to connect (``ipaddress`` networks); empty means everyone.
    allow: list = field(default_factory=list)


class RpcServer:
    """A ggml RPC server on TCP.  Serve with ``await server.serve()`` inside trio."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.connections = 0  # currently open
        self.space = AddressSpace()
        self.listeners: list[trio.SocketListener] = []

    @property
    def port(self) -> int:
        """The bound port (useful when configured with port 0)."""
        return self.listeners[0].socket.getsockname()[1]

    async def bind(self) -> None:
        """Open the listening socket(s); raises OSError when the address is unusable."""
        if not self.listeners:
            self.listeners = await trio.open_tcp_listeners(self.config.port,
                                                           host=self.config.host)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind (unless :meth:`bind` was called), report ready through ``task_status``, and
        serve until cancelled."""
        await self.bind()
        task_status.started(self)
        await trio.serve_listeners(self._serve_connection, self.listeners)

    def _refusal(self, address: str | None) -> str | None:
        """Why a new connection from ``address`` may not be served, or None."""
        if self.config.allow:
            try:
                ip = ipaddress.ip_address(address)
            except (TypeError, ValueError):
                return f"address {address!r} cannot be checked against --allow"
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if not any(ip in net for net in self.config.allow if net.version == ip.version):
                return "not in the --allow list"
        if self.connections >= self.config.max_connections:
            return f"{self.connections} clients already connected (--max-connections)"
        return None

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            address = stream.socket.getpeername()[0]
            peer = "{}:{}".format(*stream.socket.getpeername()[:2])
        except OSError:
            address, peer = None, "?"
        refusal = self._refusal(address)
        if refusal:
            log.warning("refused connection from %s: %s", peer, refusal)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        try:
            stream.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, True)
        except OSError:
            pass
        self.connections += 1
        log.info("accepted client connection from %s", peer)
        executor = (self.config.graph_executor_factory(self.config.devices)
                    if self.config.graph_executor_factory else None)
        session = Session(self.config.devices, self.config.cache, executor, peer, self.space)
        conn = ServerConnection(max_message_size=self.config.max_message_size)
        try:
            await self._run(stream, conn, session)
        except ProtocolError as exc:
            log.warning("%s: protocol error: %s; closing the connection", peer, exc)
        except Rejected as exc:
            log.warning("%s: request rejected: %s; closing the connection", peer, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as exc:
            log.info("%s: connection lost: %s", peer, exc)
        except TimedOut as exc:
            log.warning("%s: %s; closing the connection", peer, exc)
        except Exception:  # a bug of ours: this connection ends, the server goes on
            log.exception("%s: internal error while serving; closing the connection", peer)
        finally:
            self.connections -= 1
            session.close()
            with trio.CancelScope(shield=True):
                await stream.aclose()
            log.info("client connection from %s closed", peer)

    async def _run(self, stream: trio.SocketStream, conn: ServerConnection,
                   session: Session) -> None:
        sock = stream.socket
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(await self._recv(sock, conn))
                continue
            if isinstance(event, ConnectionClosed):
                return
            if isinstance(event, SetTensorStart):
                place = session.set_tensor_destination(event)
                with place.buffer.memory.write_region(place.offset, place.nbytes) as view:
                    await self._receive_payload(sock, conn, view)
                if event.cache_flag and session.cache is not None:
                    await trio.to_thread.run_sync(session.set_tensor_landed, event, place)
                continue
            if isinstance(event, m.GetTensorRequest):
                view = session.get_tensor_source(event)
                await stream.send_all(conn.send_data_header(len(view)))
                if len(view):
                    await stream.send_all(view)
                continue
            if isinstance(event, _BLOCKING):
                reply = await trio.to_thread.run_sync(session.handle, event)
            else:
                reply = session.handle(event)
            if reply is not None:
                await stream.send_all(conn.send(reply))


    @contextlib.contextmanager
    def _deadline(self, conn: ServerConnection):
        """Bound the next receive: the idle timeout between messages, the read timeout inside
        one.  Raises TimedOut."""
        if conn.at_boundary:
            seconds, reason = self.config.idle_timeout, "idle for {:g}s"
        else:
            seconds, reason = self.config.read_timeout, "no byte of a started message for {:g}s"
        try:
            with trio.fail_after(seconds or float("inf")):
                yield
        except trio.TooSlowError:
            raise TimedOut(reason.format(seconds)) from None

    async def _recv(self, sock, conn: ServerConnection) -> bytes:
        with self._deadline(conn):
            return await sock.recv(RECV_CHUNK)

    async def _receive_payload(self, sock, conn: ServerConnection, view: memoryview) -> None:
        """Move a bulk payload into ``view``: buffered bytes first, then straight from the
        socket."""
        filled = conn.readinto(view)
        while filled < len(view):
            with self._deadline(conn):
                n = await sock.recv_into(view[filled:])
            if n == 0:
                raise ProtocolError(
                    f"connection closed with {len(view) - filled} payload bytes still due")
            conn.payload_received(n)
            filled += n
