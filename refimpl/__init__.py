"""refimpl: a reference implementation of the ggml RPC protocol.

Layers, from the wire up:

* :mod:`refimpl.protocol` -- sans-IO: byte layouts, messages and connection state machines.
* :mod:`refimpl.devices`  -- devices that own buffers (the CPU, and CUDA GPUs through numba).
* :mod:`refimpl.graph`    -- GRAPH_COMPUTE: validate a graph node by node, then run it.
* :mod:`refimpl.kernels`  -- the ops' kernels, one module per family (CPU; ``cuda/``: GPU).
* :mod:`refimpl.server`   -- the trio server (``refimpl-server``).
* :mod:`refimpl.client`   -- a trio client with one method per command.
* :mod:`refimpl.capture`  -- recording connections (``refimpl-capture``).

The normative description of the protocol lives in ``spec/`` at the repository root.
"""

__version__ = "0.1.0"
