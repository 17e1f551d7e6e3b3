"""CUDA kernels (numba.cuda), one op family per module, registered for device kind "cuda".

Nothing here imports numba.cuda until :func:`load` runs, which the CUDA device does when it
opens: a CPU-only server never loads CUDA, and tests get the chance to switch numba to its
simulator first.  Validation is not repeated here: every node has passed its op's
device-independent ``check`` (refimpl.kernels.<family>) before a CUDA kernel binds it.
"""

import importlib
import pkgutil

_loaded = False


def load() -> None:
    """Import every kernel module of this package (registers them); idempotent."""
    global _loaded
    if _loaded:
        return
    from ... import kernels  # noqa: F401  (the op implementations whose checks are shared)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True
