"""CPU kernels, one op family per module; importing this package registers them all.

Every module pairs numba kernels (what the server runs) with a plain-numpy ``reference``
(what the tests compare against) and an ``OpImpl`` registered for its ops.  Modules are
discovered automatically: adding a file here is all it takes.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
