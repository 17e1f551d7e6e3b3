"""CPU kernels, one op family per module; importing this package registers them all.

Every module pairs numba kernels (what the server runs) with a plain-numpy ``reference``
(what the tests compare against).
"""

from . import binary, views  # noqa: F401
