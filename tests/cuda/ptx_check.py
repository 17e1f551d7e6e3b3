"""Compile CUDA kernels for a real GPU without one: ``python ptx_check.py SIGNATURES.json``.

The simulator runs kernels as Python, so it cannot tell whether numba's CUDA target accepts
them.  This script, run without NUMBA_ENABLE_CUDASIM, compiles every recorded kernel
signature to PTX with numba's NVVM (from the ``nvidia-cuda-nvcc-cu12`` wheel or a CUDA
toolkit): type inference and lowering for the GPU, everything short of running it.
Exit status 0: all compiled; 1: some failed (listed); 3: no NVVM here.
"""

from __future__ import annotations

import importlib
import json
import sys


class _Device:
    """Stands in for the current GPU: numba asks it the compute capability when it compiles
    device functions called from a kernel."""
    compute_capability = (7, 5)


def main(path: str) -> int:
    from numba import cuda
    import numba.cuda.dispatcher as dispatcher
    dispatcher.get_current_device = lambda: _Device()

    def probe(a):
        a[0] = 1.0
    try:
        cuda.compile_ptx(probe, "void(float32[::1])", cc=(7, 5))
    except Exception as exc:
        print(f"no NVVM: {' '.join(str(exc).split())[:300]}")
        return 3
    failed = 0
    entries = json.load(open(path))
    for module, name, types in entries:
        fn = getattr(importlib.import_module(module), name)
        sig = f"void({', '.join(types)})"
        try:
            cuda.compile_ptx(fn.py_func, sig, cc=(7, 5))
        except Exception as exc:
            failed += 1
            print(f"FAILED {module}.{name}{sig[4:]}: {' '.join(str(exc).split())[:2000]}")
    print(f"{len(entries) - failed} of {len(entries)} kernel signatures compiled to PTX")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
