"""Helpers for tests that talk raw bytes to a server."""

from __future__ import annotations

import struct

import trio

from refimpl.protocol.constants import Command


def frame(cmd: int, payload: bytes = b"") -> bytes:
    """A request: command byte, u64 length, payload."""
    return struct.pack("<BQ", int(cmd), len(payload)) + payload


HELLO = frame(Command.HELLO, bytes(24))
HELLO_REPLY_LEN = 8 + 28


async def open_raw(address, hello: bool = True) -> trio.SocketStream:
    """A raw TCP stream to the server, optionally after a completed HELLO."""
    stream = await trio.open_tcp_stream(*address)
    if hello:
        await stream.send_all(HELLO)
        await read_exactly(stream, HELLO_REPLY_LEN)
    return stream


async def read_exactly(stream, n: int) -> bytes:
    """Read n bytes or raise EOFError."""
    out = bytearray()
    while len(out) < n:
        chunk = await stream.receive_some(n - len(out))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


async def server_closes(stream, timeout: float = 10.0) -> bool:
    """True when the server closes the stream (without sending anything) within timeout."""
    with trio.move_on_after(timeout):
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return True
        return data == b""
    return False
