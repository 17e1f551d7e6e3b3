"""numba's on-disk cache, made to notice changes in any kernel module.

numba keys a cached kernel by the file that defines it (its modification time and size).  A
kernel also compiles in what it calls from other modules (refimpl.kernels.simd's
intrinsics, refimpl.kernels.numeric's inlined helpers), and numba does not track those: after
an edit of simd.py alone, or an upgrade that changes only it, every kernel that calls it
would load its stale machine code from the cache.  (numba documents this limitation of
``cache=True``.)

:class:`KernelSourcesLocator` adds one thing to numba's own locator for every file of this
package: a digest of the contents of all of them, so that any change to any kernel module
recompiles every kernel once.  :func:`install` puts it first in numba's list; the package's
``__init__`` calls it before any kernel is defined.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from numba.core import caching

_PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def sources_digest(root: Path = _PACKAGE) -> str:
    """SHA-256 of the names and contents of the Python files under ``root`` (this package
    by default, subpackages included), computed once per process."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


class KernelSourcesLocator(caching._CacheLocator):
    """numba's locator for a kernel of this package (whichever numba would pick), with
    :func:`sources_digest` added to the source stamp it compares with the cache index."""

    def __init__(self, inner: caching._CacheLocator):
        self._inner = inner

    def ensure_cache_path(self):
        """As the wrapped locator."""
        return self._inner.ensure_cache_path()

    def get_cache_path(self):
        """As the wrapped locator."""
        return self._inner.get_cache_path()

    def get_disambiguator(self):
        """As the wrapped locator."""
        return self._inner.get_disambiguator()

    def get_source_stamp(self):
        """The wrapped locator's stamp of the defining file, and the package's digest."""
        return (self._inner.get_source_stamp(), sources_digest())

    @classmethod
    def from_function(cls, py_func, py_file):
        """A locator for functions defined in this package; None for any other."""
        try:
            Path(py_file).resolve().relative_to(_PACKAGE)
        except ValueError:
            return None
        for other in caching.CacheImpl._locator_classes:
            if other is not cls:
                inner = other.from_function(py_func, py_file)
                if inner is not None:
                    return cls(inner)
        return None


def install() -> None:
    """Put :class:`KernelSourcesLocator` first among numba's cache locators (idempotent)."""
    classes = caching.CacheImpl._locator_classes
    if KernelSourcesLocator not in classes:
        classes.insert(0, KernelSourcesLocator)
