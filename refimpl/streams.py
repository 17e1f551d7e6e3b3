"""Receiving from any trio stream, straight into memory that is already allocated.

The server writes SET_TENSOR payloads, and the client GET_TENSOR replies, into their final
place: the tensor's own memory, never an intermediate buffer (docs/architecture.md, "Bulk
payloads without copies").  trio's stream interface has no such call, only
``receive_some``, which returns new bytes.  :class:`Receiver` adds ``receive_into(view)``:

* over a :class:`trio.SocketStream` it is the socket's ``recv_into``: the kernel copies the
  bytes into ``view``, nothing else touches them;
* over any other :class:`trio.abc.ReceiveStream` (a TLS stream, the memory streams of
  ``trio.testing``) it is ``receive_some`` plus one copy, which is what such a stream costs
  anyway.

Both the server (refimpl.server.net) and the client (refimpl.client) read through it, so
neither depends on the stream being a plain socket.

:meth:`Receiver.poll` is the one receive that does not go through trio: it asks the socket
again and again, for a bounded time, whether bytes have come.  The server uses it right after
a reply, when the client's next request is due within microseconds: a thread that sleeps in
trio's wait for the socket must be woken by the kernel once the bytes come, and on virtual
machines that wake-up alone has measured 50–90 µs, more than llama.cpp's whole round trip
(bench/README.md, "After the tenth session").
"""

from __future__ import annotations

import errno
import socket
import time

import trio

__all__ = ["Receiver", "socket_stream_of"]

#: Largest single receive on the fallback path, so that a large payload over a non-socket
#: stream never makes the stream allocate a temporary of the payload's size.
FALLBACK_CHUNK = 256 * 1024


class Receiver:
    """The receiving half of a trio stream, with a zero-copy :meth:`receive_into`."""

    def __init__(self, stream: trio.abc.ReceiveStream):
        self.stream = stream
        # Only a stream that *is* a socket may be read from the socket: under TLS the socket
        # carries ciphertext.
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._raw: socket.socket | None = None   # :meth:`poll`'s own descriptor, made on first use
        self._pollable = self._socket is not None
        self._poll_buffer: bytearray | None = None

    @property
    def zero_copy(self) -> bool:
        """True when :meth:`receive_into` reads from the socket into the view directly."""
        return self._socket is not None

    async def receive_some(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes, at least one; ``b""`` once the peer has closed."""
        return await self.stream.receive_some(max_bytes)

    async def receive_into(self, view: memoryview) -> int:
        """Receive into the start of the writable, non-empty ``view``; returns how many bytes
        arrived (0: the peer has closed).  Raises trio.BrokenResourceError or
        trio.ClosedResourceError as ``receive_some`` does."""
        if self._socket is None:
            data = await self.stream.receive_some(min(len(view), FALLBACK_CHUNK))
            view[:len(data)] = data
            return len(data)
        try:
            return await self._socket.recv_into(view)
        except OSError as exc:
            # The same translation trio applies to its own socket stream's errors.
            if exc.errno == errno.EBADF:
                raise trio.ClosedResourceError("this socket was already closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    def poll(self, max_bytes: int, seconds: float) -> bytes | None:
        """Up to ``max_bytes`` bytes if any arrive within ``seconds``, else None, asking the
        socket without waiting and without yielding to trio (module docstring).

        ``b""`` means the peer has closed.  Always None on a stream that is not a plain
        socket, and when ``seconds`` is not positive.  The caller must bound how often it
        polls: while it polls, no other trio task runs.
        """
        if not self._pollable or seconds <= 0:
            return None
        if self._raw is None:
            # A standard-library socket on a duplicate of the descriptor: trio's socket offers
            # no receive that neither waits nor yields.
            try:
                self._raw = socket.fromfd(self._socket.fileno(), self._socket.family,
                                          self._socket.type)
            except OSError:         # no descriptor to spare (EMFILE): receive as before
                self._pollable = False
                return None
            self._raw.setblocking(False)
        if self._poll_buffer is None or len(self._poll_buffer) < max_bytes:
            self._poll_buffer = bytearray(max_bytes)
        raw, view = self._raw, memoryview(self._poll_buffer)[:max_bytes]
        end = time.perf_counter() + seconds
        while True:
            try:
                n = raw.recv_into(view)
            except (BlockingIOError, InterruptedError):
                if time.perf_counter() >= end:
                    return None
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            return bytes(view[:n])

    def close(self) -> None:
        """Release :meth:`poll`'s duplicate descriptor (the stream is closed by its owner)."""
        if self._raw is not None:
            self._raw.close()
            self._raw = None


def socket_stream_of(stream: trio.abc.Stream) -> trio.SocketStream | None:
    """The socket stream under ``stream`` (itself, or under TLS layers through their
    ``transport_stream``), or None for a stream without a socket (memory streams)."""
    seen = 0
    while not isinstance(stream, trio.SocketStream):
        stream = getattr(stream, "transport_stream", None)
        seen += 1
        if stream is None or seen > 8:
            return None
    return stream
