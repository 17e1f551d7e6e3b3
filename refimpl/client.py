"""A trio client for ggml RPC servers of every version refimpl serves (3.6.1 … 7.0.0; the
newest by default): one async method per command.

    async with await RpcClient.connect("127.0.0.1", 50052) as client:
        buf = await client.alloc_buffer(1 << 20)
        t = buf.tensor(GgmlType.F32, (256,))
        await client.set_tensor(t, numpy_array)
        data = await client.get_tensor(t, 0, 1024)

Commands without a reply (SET_TENSOR, FREE_BUFFER, ...) cannot report failure: a server
that rejects one closes the connection, and the next call raises :class:`ServerClosedConnection`.
Call :meth:`RpcClient.ping` to find out at once.

``connect(..., protocol="5.0.0")`` speaks that version.  ``protocol="auto"`` learns the
server's version from its HELLO reply and reconnects speaking it; that works between versions
whose HELLO has the same shape (4.0.0 on, spec/handshake.md).  A 3.x server closes on a 4.x
HELLO before answering, so its version must be given.
"""

from __future__ import annotations

import itertools
import socket as stdsocket
from dataclasses import dataclass

import trio

from .protocol import compat
from .protocol import messages as m
from .protocol.connection import (NEED_DATA, ClientConnection, ConnectionClosed,
                                  GetTensorStart, hello_request)
from .protocol.constants import MAX_SRC, PROTOCOL_VERSION
from .protocol.profiles import LATEST, PROFILES, SERVED, Profile, served_profile
from .protocol.errors import HandshakeError, PeerClosed, RemoteProtocolError
from .hashing import fnv1a_64
from .protocol.ggml_types import type_traits
from .protocol.tensor import RpcTensor, contiguous_strides, tensor_nbytes
from .streams import Receiver

_RECV_CHUNK = 256 * 1024
#: What sending or receiving raises when the connection is gone.
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_tensor_ids = itertools.count(1)  # client-side tensor identities (any unique non-zero u64)


class RpcError(Exception):
    """Base of every error this client raises."""


class ServerClosedConnection(RpcError):
    """The server closed the connection (how it rejects a request) or the network failed."""


class VersionMismatch(RpcError):
    """The server's protocol version is not compatible with this client's."""

    #: The version the server announced (None when it closed before answering).
    server_version: tuple[int, int, int] | None = None


class ProtocolViolation(RpcError):
    """The server sent bytes that break the protocol."""


class AllocationFailed(RpcError):
    """ALLOC_BUFFER was answered with a null handle: the device lacks the memory."""


@dataclass(frozen=True)
class DeviceMemory:
    """GET_DEVICE_MEMORY result, in bytes."""

    free: int
    total: int


@dataclass(frozen=True)
class RemoteBuffer:
    """A buffer allocated on the server: its handle, size and (once asked) base address."""

    handle: int
    size: int
    base: int
    device: int = 0

    def tensor(self, type_number: int, ne, offset: int = 0, name: str = "",
               id: int = 0, nb=None) -> RpcTensor:
        """A tensor placed ``offset`` bytes into this buffer (contiguous unless ``nb`` given)."""
        ne = tuple(ne) + (1,) * (4 - len(ne))
        return RpcTensor(
            id=id or next(_tensor_ids),
            type=type_number, buffer=self.handle, ne=ne,
            nb=tuple(nb) if nb is not None else contiguous_strides(type_number, ne),
            data=self.base + offset, name=name.encode()[:63])


class RpcClient:
    """One connection to a ggml RPC server.  Create with :meth:`connect` (TCP), or over any
    other trio stream with ``RpcClient(stream)`` followed by ``await client.hello()``."""

    def __init__(self, stream: trio.abc.Stream, version=PROTOCOL_VERSION, *,
                 profile: Profile | None = None):
        self._stream = stream
        self._receiver = Receiver(stream)
        self._conn = ClientConnection(version if profile is None else profile.version,
                                      profile=profile)
        #: The protocol version this client speaks.
        self.profile = self._conn.profile
        self._lock = trio.StrictFIFOLock()
        self.server_version: tuple[int, int, int] | None = None

    # -- connection ----------------------------------------------------------------------------
    @classmethod
    async def connect(cls, host: str, port: int,
                      protocol: str | Profile | None = None) -> "RpcClient":
        """Open a TCP connection and perform HELLO; raises VersionMismatch if incompatible.

        ``protocol``: the version to speak (``"X.Y.Z"`` or a Profile; default the newest),
        or ``"auto"``: learn the server's version from its HELLO reply and reconnect speaking
        it (spec/versions.md, "Compatibility"): a 24-byte HELLO first (4.0.0 on), then, if the
        server closes on it, an empty one (3.x).
        """
        if protocol == "auto":
            return await cls._connect_auto(host, port)
        if isinstance(protocol, str):
            try:
                protocol = served_profile(protocol)
            except (KeyError, ValueError) as exc:
                raise ValueError(str(exc.args[0] if exc.args else exc)) from None
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise ServerClosedConnection(f"cannot connect to {host}:{port}: {exc}") from exc
        stream.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, True)
        client = cls(stream, profile=protocol or LATEST)
        try:
            await client.hello()
        except BaseException:
            await stream.aclose()
            raise
        return client

    @classmethod
    async def _connect_auto(cls, host: str, port: int) -> "RpcClient":
        theirs, last_error = None, None
        for probe in (LATEST, PROFILES[(3, 6, 1)]):  # the two HELLO shapes
            try:
                client = await cls.connect(host, port, probe)
            except VersionMismatch as exc:
                if exc.server_version is None:
                    last_error = exc
                    continue
                theirs = exc.server_version
            except ServerClosedConnection as exc:
                last_error = exc
                continue
            else:
                if client.server_version == probe.version:
                    return client
                theirs = client.server_version  # accepted, but another version: reconnect
                await client.aclose()
            if theirs not in SERVED:
                err = VersionMismatch("the server speaks protocol %d.%d.%d, which this client "
                                      "does not" % theirs)
                err.server_version = theirs
                raise err
            return await cls.connect(host, port, SERVED[theirs])
        raise last_error

    async def aclose(self) -> None:
        """Close the connection (the server frees this connection's buffers)."""
        await self._stream.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    # -- plumbing ------------------------------------------------------------------------------
    async def _send(self, *pieces) -> None:
        try:
            for piece in pieces:
                if len(piece):
                    await self._stream.send_all(piece)
        except _STREAM_ERRORS as exc:
            raise ServerClosedConnection(f"send failed: {exc}") from exc

    async def _next_event(self):
        while True:
            try:
                event = self._conn.next_event()
            except HandshakeError as exc:
                err = VersionMismatch(str(exc))
                err.server_version = self._conn.server_version
                raise err from exc
            except PeerClosed as exc:
                if self._conn.buffered == 0:
                    raise ServerClosedConnection(str(exc)) from exc
                raise ProtocolViolation(str(exc)) from exc
            except RemoteProtocolError as exc:
                raise ProtocolViolation(str(exc)) from exc
            if event is not NEED_DATA:
                if isinstance(event, ConnectionClosed):
                    raise ServerClosedConnection("the server closed the connection")
                return event
            try:
                data = await self._receiver.receive_some(_RECV_CHUNK)
            except _STREAM_ERRORS as exc:
                raise ServerClosedConnection(f"receive failed: {exc}") from exc
            self._conn.receive_data(data)

    async def _call(self, request: m.Message):
        async with self._lock:
            await self._send(self._conn.send(request))
            if not compat.has_response(request.COMMAND, self.profile):
                return None
            return await self._next_event()

    # -- commands ------------------------------------------------------------------------------
    async def hello(self) -> tuple[int, int, int]:
        """HELLO (done by :meth:`connect`); returns the server's version."""
        reply = await self._call(hello_request())
        self.server_version = (reply.major, reply.minor, reply.patch)
        return self.server_version

    async def device_count(self) -> int:
        """DEVICE_COUNT."""
        return (await self._call(m.DeviceCountRequest())).count

    async def ping(self) -> None:
        """A cheap round trip (DEVICE_COUNT): raises if the server has closed the connection,
        for instance because it rejected an earlier command that has no reply."""
        await self.device_count()

    async def alloc_buffer(self, size: int, device: int = 0) -> RemoteBuffer:
        """ALLOC_BUFFER then BUFFER_GET_BASE; raises AllocationFailed on a null handle."""
        reply = await self._call(m.AllocBufferRequest(device, size))
        if reply.handle == 0:
            raise AllocationFailed(f"server could not allocate {size} bytes on device {device}")
        base = await self.buffer_get_base(reply.handle)
        return RemoteBuffer(reply.handle, reply.size, base, device)

    async def alloc_buffer_raw(self, size: int, device: int = 0) -> m.AllocBufferResponse:
        """ALLOC_BUFFER alone, returning the raw reply (handle 0 means failure)."""
        return await self._call(m.AllocBufferRequest(device, size))

    async def get_alignment(self, device: int = 0) -> int:
        """GET_ALIGNMENT."""
        return (await self._call(m.GetAlignmentRequest(device))).alignment

    async def get_max_size(self, device: int = 0) -> int:
        """GET_MAX_SIZE."""
        return (await self._call(m.GetMaxSizeRequest(device))).max_size

    async def buffer_get_base(self, handle: int) -> int:
        """BUFFER_GET_BASE."""
        return (await self._call(m.BufferGetBaseRequest(handle))).base

    async def free_buffer(self, handle: int) -> None:
        """FREE_BUFFER (no reply)."""
        await self._call(m.FreeBufferRequest(handle))

    async def buffer_clear(self, handle: int, value: int = 0) -> None:
        """BUFFER_CLEAR (no reply)."""
        await self._call(m.BufferClearRequest(handle, value))

    async def set_tensor(self, tensor: RpcTensor, data, offset: int = 0,
                         cache: bool = False) -> None:
        """SET_TENSOR (no reply).  ``data`` is any bytes-like object; it is sent without copying."""
        view = memoryview(data).cast("B")
        async with self._lock:
            header = self._conn.send_set_tensor_header(tensor, offset, len(view), int(cache))
            await self._send(header, view)

    async def set_tensor_hash(self, tensor: RpcTensor, digest: int, offset: int = 0) -> bool:
        """SET_TENSOR_HASH: True when the server had the bytes cached and wrote them."""
        return bool((await self._call(m.SetTensorHashRequest(tensor, offset, digest))).result)

    async def upload(self, tensor: RpcTensor, data, offset: int = 0) -> bool:
        """What llama.cpp does for a large weight: try the hash cache, send the data on a miss
        (asking the server to cache it).  Returns True on a cache hit."""
        view = memoryview(data).cast("B")
        if await self.set_tensor_hash(tensor, fnv1a_64(view), offset):
            return True
        await self.set_tensor(tensor, view, offset, cache=True)
        return False

    async def get_tensor(self, tensor: RpcTensor, offset: int, size: int, out=None):
        """GET_TENSOR: returns ``size`` bytes, or fills the writable buffer ``out`` and returns it."""
        target = memoryview(out).cast("B") if out is not None else memoryview(bytearray(size))
        if len(target) != size:
            raise ValueError(f"out has {len(target)} bytes, {size} requested")
        async with self._lock:
            await self._send(self._conn.send(m.GetTensorRequest(tensor, offset, size)))
            event = await self._next_event()
            if not isinstance(event, GetTensorStart):  # pragma: no cover - connection invariant
                raise ProtocolViolation(f"unexpected {event!r}")
            await self._receive_payload(target)
        return out if out is not None else bytes(target)

    async def _receive_payload(self, view: memoryview) -> None:
        filled = self._conn.readinto(view)
        while filled < len(view):
            try:
                n = await self._receiver.receive_into(view[filled:])
            except _STREAM_ERRORS as exc:
                raise ServerClosedConnection(f"receive failed: {exc}") from exc
            if n == 0:
                raise ServerClosedConnection("the server closed the connection mid-reply")
            self._conn.payload_received(n)
            filled += n

    async def copy_tensor(self, src: RpcTensor, dst: RpcTensor) -> bool:
        """COPY_TENSOR: True when the server made the copy."""
        return bool((await self._call(m.CopyTensorRequest(src, dst))).result)

    async def graph_compute(self, device: int, nodes, tensors) -> int | None:
        """GRAPH_COMPUTE: ``nodes`` are tensor ids, ``tensors`` RpcTensor objects.  No reply
        (None), except in protocol 3.0.0, which answers ggml's status (0: success)."""
        reply = await self._call(m.GraphComputeRequest.from_tensors(device, nodes, tensors))
        return None if reply is None else reply.status

    async def graph_recompute(self, device: int = 0) -> None:
        """GRAPH_RECOMPUTE (no reply)."""
        await self._call(m.GraphRecomputeRequest(device))

    async def get_device_memory(self, device: int = 0) -> DeviceMemory:
        """GET_DEVICE_MEMORY."""
        reply = await self._call(m.GetDeviceMemoryRequest(device))
        return DeviceMemory(reply.free, reply.total)

    async def init_tensor(self, tensor: RpcTensor) -> None:
        """INIT_TENSOR (no reply)."""
        await self._call(m.InitTensorRequest(tensor))

    async def get_alloc_size(self, tensor: RpcTensor, device: int = 0, srcs=()) -> int:
        """GET_ALLOC_SIZE."""
        srcs = tuple(srcs) + (RpcTensor(),) * (MAX_SRC - len(srcs))
        return (await self._call(m.GetAllocSizeRequest(device, tensor, srcs))).size

    async def memset_tensor(self, tensor: RpcTensor, offset: int, size: int, value: int) -> None:
        """MEMSET_TENSOR (no reply)."""
        await self._call(m.MemsetTensorRequest(tensor, offset, size, value))


def nbytes(tensor: RpcTensor) -> int:
    """Bytes a tensor spans (ggml_nbytes)."""
    return tensor_nbytes(tensor.type, tensor.ne, tensor.nb)


__all__ = ["RpcClient", "RemoteBuffer", "DeviceMemory", "RpcError", "ServerClosedConnection",
           "VersionMismatch", "ProtocolViolation", "AllocationFailed", "nbytes", "type_traits"]
