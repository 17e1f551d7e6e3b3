"""What ggml accepts, op by op: one validator per op (spec/graph-ops.md), shared by every
device.  A validator raises GraphInvalid unless the node is one that ggml's constructor for
its op would build and a kernel can compute safely; it runs before any kernel of the graph.

Imported by :mod:`refimpl.graph`, so after ``import refimpl.graph`` every op the server
knows is registered (:func:`refimpl.graph.registry.validated_ops`).
"""

from . import (  # noqa: F401
               binary,
               conv,
               copy,
               elementwise,
               flash_attn,
               get_rows,
               layout,
               matmul,
               norm,
               recurrent,
               reduce,
               rope,
               set_rows,
               softmax,
               sort,
               training,
               unary,
               views,
)
