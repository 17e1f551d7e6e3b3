"""The trio network layer of refimpl-server: accept connections, move bytes, nothing else.

It reads through :class:`refimpl.streams.Receiver`, so a connection may be any trio stream;
TCP sockets get the zero-copy receive of bulk payloads.

Each connection gets a :class:`ServerConnection` (framing, sans-IO) and a :class:`Session`
(what the commands do).  A connection that breaks the protocol or asks for something the
server refuses is logged and closed; every other connection carries on (spec/errors.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket as stdsocket
import threading
from dataclasses import dataclass, field

import trio

from ..devices import Device
from ..devices.base import WriteRegion
from ..protocol import messages as m
from ..protocol.connection import (DEFAULT_MAX_MESSAGE_SIZE, NEED_DATA, ConnectionClosed,
                                   ServerConnection, SetTensorStart)
from ..protocol.errors import PeerClosed, RemoteProtocolError
from ..protocol.compat import set_tensor_header
from ..protocol.profiles import LATEST, Profile
from ..buffers import AddressSpace, Rejected
from ..streams import Receiver, socket_stream_of
from .hash_cache import HashCache
from .session import Session

log = logging.getLogger("refimpl.server")

#: Bytes asked of the socket per receive while parsing headers and small messages.
RECV_CHUNK = 256 * 1024

#: Requests whose work may block for long (disk reads, graph computations): they run in a
#: worker thread so that other connections keep being served meanwhile.
_BLOCKING = (m.SetTensorHashRequest, m.GraphComputeRequest, m.GraphRecomputeRequest)

#: Once the read timeout has passed, a started message must keep arriving at this average
#: rate at least (bytes per second), so that a client dripping a byte now and then cannot
#: hold a connection forever (docs/limits.md).
MIN_TRANSFER_RATE = 64 * 1024

#: Default of ServerConfig.max_buffered: request bytes held in memory, all connections.
DEFAULT_MAX_BUFFERED = 2048 * 1024 * 1024


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_poll_seconds() -> float:
    """Default of ServerConfig.poll_after_reply: 200 µs where this process may run on more
    than one core, none on one core (polling there only keeps the client off the CPU)."""
    return 200e-6 if usable_cores() > 1 else 0.0


class TimedOut(Exception):
    """A client sent nothing for longer than the configured timeout."""


class MemoryBudget:
    """Memory that requests hold while they arrive, are decoded, run and (graphs) are kept
    for GRAPH_RECOMPUTE, all connections together.

    Each connection has one charge that it sets as its holdings change.  A charge that would
    take the total over the capacity is refused with :class:`Rejected`, and that connection
    is closed: one client, or many together, cannot exhaust the server's memory by sending
    large messages.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._charges: dict[int, int] = {}
        self._lock = threading.Lock()

    def charge(self, key: int, amount: int) -> None:
        """Set connection ``key``'s charge to ``amount`` bytes (lowering never fails)."""
        with self._lock:
            old = self._charges.get(key, 0)
            if amount > old and self.used - old + amount > self.capacity:
                raise Rejected(
                    f"request memory limit reached: this connection would hold {amount} bytes, "
                    f"{self.used - old} are held by others, the limit is {self.capacity} "
                    f"(--max-buffered-mib)")
            self.used += amount - old
            if amount:
                self._charges[key] = amount
            else:
                self._charges.pop(key, None)

    def release(self, key: int) -> None:
        """Drop connection ``key``'s charge."""
        self.charge(key, 0)


@dataclass
class _Progress:
    """Per-connection bookkeeping of the network layer."""

    key: int
    message_started: float | None = None   # trio.current_time() of a started message's first byte
    message_size: int = 0                  # its announced size, once known


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
    #: Bytes of requests held in memory at once, all connections together (MemoryBudget).
    max_buffered: int = DEFAULT_MAX_BUFFERED
    #: Buffers one connection may hold at once; ALLOC_BUFFER beyond it fails softly.
    max_buffers: int = 4096
    #: The protocol version served (spec/versions.md); default: the newest.
    profile: Profile = LATEST
    #: Seconds to poll the socket for the next request after each reply, before sleeping in
    #: trio's wait (refimpl.streams.Receiver.poll); only while one client is connected.
    #: 0: never poll.
    poll_after_reply: float = field(default_factory=default_poll_seconds)


class RpcServer:
    """A ggml RPC server on TCP.  Serve with ``await server.serve()`` inside trio."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.connections = 0  # currently open
        self.space = AddressSpace()
        self.listeners: list[trio.SocketListener] = []
        self.budget = MemoryBudget(config.max_buffered)
        self._next_key = 0

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
        await trio.serve_listeners(self.serve_stream, self.listeners)

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

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one client connection over ``stream`` until it ends, then close it.

        :meth:`serve` calls it for every accepted TCP connection; any other trio stream (TLS,
        ``trio.testing``'s memory streams) is served the same way.  The peer's address, which
        ``--allow`` checks, is read from the socket under the stream: a stream without one
        counts as an unknown address.
        """
        sock = socket_stream_of(stream)
        address, peer = None, "?"
        if sock is not None:
            try:
                address = sock.socket.getpeername()[0]
                peer = "{}:{}".format(*sock.socket.getpeername()[:2])
            except OSError:
                pass
        refusal = self._refusal(address)
        if refusal:
            log.warning("refused connection from %s: %s", peer, refusal)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, True)
        self.connections += 1
        log.info("accepted client connection from %s", peer)
        executor = (self.config.graph_executor_factory(self.config.devices)
                    if self.config.graph_executor_factory else None)
        session = Session(self.config.devices, self.config.cache, executor, peer, self.space,
                          max_buffers=self.config.max_buffers, profile=self.config.profile)
        largest = max((d.max_buffer_size() for d in self.config.devices), default=0)
        conn = ServerConnection(max_message_size=self.config.max_message_size,
                                max_tensor_data=largest, profile=self.config.profile)
        self._next_key += 1
        progress = _Progress(self._next_key)
        try:
            await self._run(stream, conn, session, progress)
        except RemoteProtocolError as exc:
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
            self.budget.release(progress.key)
            session.close()
            with trio.CancelScope(shield=True):
                await stream.aclose()
            log.info("client connection from %s closed", peer)

    async def _run(self, stream: trio.abc.Stream, conn: ServerConnection,
                   session: Session, progress: _Progress) -> None:
        receiver = Receiver(stream)
        try:
            await self._serve_messages(stream, receiver, conn, session, progress)
        finally:
            receiver.close()

    async def _serve_messages(self, stream: trio.abc.Stream, receiver: Receiver,
                              conn: ServerConnection, session: Session,
                              progress: _Progress) -> None:
        replied = False  # the last thing done was sending a reply: the next request is due
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                poll = (self.config.poll_after_reply
                        if replied and self.connections == 1 else 0.0)
                data = await self._recv(receiver, conn, progress, poll)
                replied = False
                conn.receive_data(data)
                self._charge(conn, session, progress)
                continue
            if isinstance(event, ConnectionClosed):
                return
            if isinstance(event, SetTensorStart):
                place = session.set_tensor_destination(event)
                progress.message_size = set_tensor_header(conn.profile).size + event.size
                with place.buffer.memory.write_region(place.offset, place.nbytes) as region:
                    await self._receive_payload(receiver, conn, region, progress)
                progress.message_started, progress.message_size = None, 0
                if event.cache_flag and session.cache is not None:
                    await trio.to_thread.run_sync(session.set_tensor_landed, event, place)
                continue
            progress.message_started, progress.message_size = None, 0
            if isinstance(event, m.GetTensorRequest):
                view = session.get_tensor_source(event)
                await stream.send_all(conn.send_data_header(len(view)))
                if len(view):
                    await stream.send_all(view)
                replied = True
                continue
            if isinstance(event, _BLOCKING):
                extra = 0
                if isinstance(event, m.GraphComputeRequest) and session.graph_executor is not None:
                    extra = session.graph_executor.request_bytes(event)
                self._charge(conn, session, progress, extra)
                try:
                    reply = await trio.to_thread.run_sync(session.handle, event)
                finally:
                    del event
                    self._charge(conn, session, progress)
            else:
                reply = session.handle(event)
                self._charge(conn, session, progress)
            if reply is not None:
                await stream.send_all(conn.send(reply))
                replied = True

    def _charge(self, conn: ServerConnection, session: Session, progress: _Progress,
                extra: int = 0) -> None:
        """Charge what this connection holds: received bytes not yet consumed, stored
        graphs, and ``extra`` (a request being decoded and run)."""
        held = conn.buffered + extra
        if session.graph_executor is not None:
            held += session.graph_executor.stored_bytes()
        self.budget.charge(progress.key, held)

    def _next_deadline(self, conn: ServerConnection, progress: _Progress,
                       now: float) -> tuple[float, str]:
        """The deadline of the next receive and what passing it means: the idle timeout
        between messages; inside one, the read timeout per receive and a deadline for the
        whole message (read timeout plus its size at MIN_TRANSFER_RATE)."""
        if conn.at_boundary and progress.message_started is None:
            seconds = self.config.idle_timeout
            return (now + seconds if seconds else float("inf")), f"idle for {seconds:g}s"
        if progress.message_started is None:
            progress.message_started = now
        seconds = self.config.read_timeout
        if not seconds:
            return float("inf"), ""
        deadline = now + seconds
        reason = f"no byte of a started message for {seconds:g}s"
        size = progress.message_size or conn.message_length or 0
        whole = progress.message_started + seconds + size / MIN_TRANSFER_RATE
        if whole < deadline:
            deadline = whole
            reason = (f"a started message ({size or 'header'} bytes) took longer than "
                      f"{whole - progress.message_started:.1f}s to arrive")
        return deadline, reason

    @contextlib.contextmanager
    def _deadline(self, conn: ServerConnection, progress: _Progress):
        """Bound the next receive by :meth:`_next_deadline`.  Raises TimedOut."""
        deadline, reason = self._next_deadline(conn, progress, trio.current_time())
        with trio.move_on_at(deadline) as scope:
            yield
        if scope.cancelled_caught:
            raise TimedOut(reason)

    async def _recv(self, receiver: Receiver, conn: ServerConnection,
                    progress: _Progress, poll: float = 0.0) -> bytes:
        """The next bytes from the client: polled for up to ``poll`` seconds first when it
        is positive (ServerConfig.poll_after_reply), else, or when nothing came in that time,
        waited for under :meth:`_deadline`."""
        data = receiver.poll(RECV_CHUNK, poll) if poll > 0 else None
        if data is None:
            with self._deadline(conn, progress):
                data = await receiver.receive_some(RECV_CHUNK)
        if data and progress.message_started is None:
            progress.message_started = trio.current_time()
        return data

    async def _receive_payload(self, receiver: Receiver, conn: ServerConnection,
                               region: WriteRegion, progress: _Progress) -> None:
        """Move a bulk payload into ``region.view``: buffered bytes first, then straight from
        the stream (from a socket without any copy, refimpl.streams), telling the region how
        much has landed as it goes (a GPU buffer copies those bytes to the device while the
        rest arrives)."""
        view = region.view
        filled = conn.readinto(view)
        region.landed(filled)
        if filled == len(view):
            return
        # One cancel scope for the whole payload, its deadline moved on after every receive
        # (a scope per receive cost a fifth of the server's time on a model's upload).
        reason = ""
        with trio.CancelScope() as scope:
            while filled < len(view):
                scope.deadline, reason = self._next_deadline(conn, progress,
                                                             trio.current_time())
                n = await receiver.receive_into(view[filled:])
                if n == 0:
                    raise PeerClosed(
                        f"connection closed with {len(view) - filled} payload bytes still due")
                conn.payload_received(n)
                filled += n
                region.landed(filled)
        if scope.cancelled_caught:
            raise TimedOut(reason)
