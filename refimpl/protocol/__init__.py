"""Sans-IO core of the ggml RPC protocol, version 7.0.0 (spec/).

Nothing here touches a socket: byte layouts (:mod:`.layout`, :mod:`.tensor`), messages
(:mod:`.messages`) and the connection state machines of both ends (:mod:`.connection`).
"""

from .connection import (NEED_DATA, ClientConnection, ConnectionClosed, GetTensorStart,
                         ServerConnection, SetTensorStart, State, hello_request, hello_response)
from .constants import (COMMAND_LIMIT, CONN_CAPS_SIZE, HASH_THRESHOLD, PROTOCOL_VERSION,
                        Command)
from .errors import (HandshakeError, LocalProtocolError, MalformedMessage, OversizeMessage,
                     ProtocolError, UnknownCommand)
from .fnv import fnv1a_64_reference
from .ggml_types import GgmlType, type_name, type_traits
from .messages import *  # noqa: F401,F403  (every message class)
from .messages import REQUESTS, RESPONSES, has_response
from .tensor import RPC_TENSOR, RPC_TENSOR_SIZE, RpcTensor, tensor_nbytes, tensor_problem
