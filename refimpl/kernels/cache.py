"""numba's on-disk cache of refimpl's kernels: keyed by the contents of the package, kept
outside it.

numba keys a cached kernel by the file that defines it (its modification time and size).  A
kernel also compiles in what it calls from other modules (refimpl.kernels.simd's
intrinsics, refimpl.kernels.numeric's inlined helpers), and numba does not track those: after
an edit of simd.py alone, or an upgrade that changes only it, every kernel that calls it
would load its stale machine code from the cache.  (numba documents this limitation of
``cache=True``.)  And a modification time is not a content: a fresh clone or a reinstall of
the same sources recompiles everything, which takes minutes (about six for the kernel tests
alone on the development host).

:class:`KernelSourcesLocator` replaces numba's stamp with a digest of the names and
contents of every file of this package, so that any change to any kernel module recompiles
every kernel once, and nothing else does.  Compiled kernels are kept under
:func:`cache_root` (``$NUMBA_CACHE_DIR`` if set, else ``~/.cache/refimpl/kernels``), in a
directory per digest: two checkouts of different sources on one machine do not overwrite
each other's kernels, and a new checkout of known sources finds them compiled.  Only the
:data:`KEEP` most recently used directories are kept.  Where that place cannot be written,
kernels are cached beside their sources as numba does by default (still keyed by the digest).
numba itself keys each compiled kernel by its argument types, the CPU's name and features,
and its own version, so a cache shared by different hosts or numba releases only misses.
:func:`install` puts the locator first in numba's list; the package's ``__init__`` calls it
before any kernel is defined.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import time
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


#: Digest directories kept under :func:`cache_root` (the most recently used ones).
KEEP = 4

#: A digest directory used within this many seconds is never removed (another process may
#: be reading it).
IN_USE_SECONDS = 3600


def cache_root() -> Path:
    """Where compiled kernels are kept: ``$NUMBA_CACHE_DIR``, else ``$XDG_CACHE_HOME`` (or
    ``~/.cache``) ``/refimpl/kernels``."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "refimpl" / "kernels"


@functools.lru_cache(maxsize=None)
def digest_directory() -> Path | None:
    """This package's directory under :func:`cache_root`, created and marked as used now,
    with digest directories beyond the :data:`KEEP` newest removed (once per process); None
    when it cannot be written."""
    path = cache_root() / sources_digest()[:24]
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "last-used").touch()
    except OSError:
        return None
    _prune(path.parent)
    return path


def _prune(root: Path) -> None:
    now = time.time()
    used = []
    for d in root.iterdir():
        marker = d / "last-used"
        try:
            used.append((marker.stat().st_mtime, d))
        except OSError:
            continue              # not one of ours (NUMBA_CACHE_DIR may hold other caches)
    used.sort(reverse=True)
    for when, d in used[KEEP:]:
        if now - when > IN_USE_SECONDS:
            shutil.rmtree(d, ignore_errors=True)


class KernelSourcesLocator(caching._CacheLocator):
    """numba's locator for a kernel of this package: its cache directory is the one of
    :func:`digest_directory` (else the wrapped locator's), its stamp :func:`sources_digest`."""

    def __init__(self, inner: caching._CacheLocator, directory: Path | None):
        self._inner = inner
        self._directory = directory

    def get_cache_path(self):
        """Under the digest directory, a subdirectory per source directory of the package;
        the wrapped locator's path where there is no digest directory."""
        if self._directory is None:
            return self._inner.get_cache_path()
        return str(self._directory)

    def get_disambiguator(self):
        """As the wrapped locator."""
        return self._inner.get_disambiguator()

    def get_source_stamp(self):
        """The digest of the package's sources (numba's own stamp is the defining file's
        modification time and size)."""
        return sources_digest()

    @classmethod
    def from_function(cls, py_func, py_file):
        """A locator for functions defined in this package; None for any other."""
        try:
            relative = Path(py_file).resolve().parent.relative_to(_PACKAGE)
        except ValueError:
            return None
        for other in caching.CacheImpl._locator_classes:
            if other is not cls:
                inner = other.from_function(py_func, py_file)
                if inner is not None:
                    top = digest_directory()
                    return cls(inner, None if top is None else top / relative)
        return None


def install() -> None:
    """Put :class:`KernelSourcesLocator` first among numba's cache locators (idempotent)."""
    classes = caching.CacheImpl._locator_classes
    if KernelSourcesLocator not in classes:
        classes.insert(0, KernelSourcesLocator)
