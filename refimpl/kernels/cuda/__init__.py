"""CUDA kernels (numba.cuda), one op family per module, registered for device kind "cuda"
with :func:`refimpl.graph.registry.kernel`, as the CPU's are.

This package (and so numba.cuda) is imported only when a CUDA device opens
(:func:`refimpl.graph.registry.load_kernels`): a CPU-only server never loads CUDA, and
tests get the chance to switch numba to its simulator first.  Validation is not repeated
here: every node has passed its op's validator (:mod:`refimpl.graph.validators`) before a
CUDA kernel binds it.
"""

from . import (binary, copy, flash_attn, matmul, norm, rope, rows, softmax,  # noqa: F401
               unary)
