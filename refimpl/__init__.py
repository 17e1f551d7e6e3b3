"""refimpl: a reference implementation of the ggml RPC protocol.

Layers, from the wire up:

* :mod:`refimpl.protocol` -- sans-IO: byte layouts, messages and connection state machines.
* :mod:`refimpl.devices`  -- devices that own buffers (CPU now; CUDA later).
* :mod:`refimpl.server`   -- the trio server (``refimpl-server``).
* :mod:`refimpl.client`   -- a trio client with one method per command.

The normative description of the protocol lives in ``spec/`` at the repository root.
"""

__version__ = "0.1.0"
