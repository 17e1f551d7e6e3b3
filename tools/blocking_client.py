"""A minimal blocking client over refimpl's sans-IO ClientConnection: one plain socket, no
trio, as llama.cpp's client is one blocking thread.  The loopback benchmark drives both
servers with it (bench/rpc_bench.py), and tests use it to be a client from another thread
than the server's event loop."""

from __future__ import annotations

import socket

from refimpl.protocol import messages as m
from refimpl.protocol.connection import (
    NEED_DATA,
    ClientConnection,
    GetTensorStart,
    hello_request,
)


class BlockingClient:
    """Minimal synchronous client over the sans-IO ClientConnection."""

    def __init__(self, address):
        self.sock = socket.create_connection(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = ClientConnection()
        self.call(hello_request())

    def _event(self):
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            self.conn.receive_data(self.sock.recv(1 << 16))

    def call(self, req):
        self.sock.sendall(self.conn.send(req))
        return self._event() if m.has_response(req.COMMAND) else None

    def set_tensor(self, tensor, data):
        view = memoryview(data).cast("B")
        self.sock.sendall(self.conn.send_set_tensor_header(tensor, 0, len(view)))
        self.sock.sendall(view)

    def get_tensor(self, tensor, out):
        view = memoryview(out).cast("B")
        self.sock.sendall(self.conn.send(m.GetTensorRequest(tensor, 0, len(view))))
        assert isinstance(self._event(), GetTensorStart)
        filled = self.conn.readinto(view)
        while filled < len(view):
            n = self.sock.recv_into(view[filled:])
            if n == 0:
                raise ConnectionError("server closed")
            self.conn.payload_received(n)
            filled += n

    def close(self):
        self.sock.close()
