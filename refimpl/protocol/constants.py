"""Numbers fixed by protocol 7.0.0 (spec/README.md, spec/commands.md)."""

from __future__ import annotations

import enum

__all__ = [
    "PROTOCOL_VERSION", "MAX_DIMS", "MAX_SRC", "MAX_OP_PARAMS", "MAX_NAME", "CONN_CAPS_SIZE",
    "REQUEST_HEADER_SIZE", "RESPONSE_HEADER_SIZE", "HASH_THRESHOLD", "Command", "COMMAND_LIMIT",
]

#: The protocol version this package speaks (spec/versions.md).
PROTOCOL_VERSION = (7, 0, 0)

#: ggml's compile-time limits that shape ``rpc_tensor`` (spec/tensor.md).
MAX_DIMS = 4
MAX_SRC = 10
MAX_OP_PARAMS = 64  # bytes, i.e. 16 int32 values
MAX_NAME = 64

#: Size of the opaque connection-capability block in HELLO (spec/handshake.md).
CONN_CAPS_SIZE = 24

#: Bytes before every request payload: command (u8) + payload length (u64).
REQUEST_HEADER_SIZE = 9
#: Bytes before every response payload: payload length (u64).
RESPONSE_HEADER_SIZE = 8

#: Clients switch a weight upload to SET_TENSOR_HASH above this size (spec/hash-cache.md).
HASH_THRESHOLD = 10 * 1024 * 1024


class Command(enum.IntEnum):
    """Command numbers: the first byte of every request (spec/commands.md)."""

    ALLOC_BUFFER = 0
    GET_ALIGNMENT = 1
    GET_MAX_SIZE = 2
    BUFFER_GET_BASE = 3
    FREE_BUFFER = 4
    BUFFER_CLEAR = 5
    SET_TENSOR = 6
    SET_TENSOR_HASH = 7
    GET_TENSOR = 8
    COPY_TENSOR = 9
    GRAPH_COMPUTE = 10
    GET_DEVICE_MEMORY = 11
    INIT_TENSOR = 12
    GET_ALLOC_SIZE = 13
    HELLO = 14
    DEVICE_COUNT = 15
    GRAPH_RECOMPUTE = 16
    MEMSET_TENSOR = 17


#: Number 18 is used inside llama.cpp's client as an in-process marker and never goes on the
#: wire; 18 and everything above it are unknown commands (spec/commands.md).
COMMAND_LIMIT = 18
