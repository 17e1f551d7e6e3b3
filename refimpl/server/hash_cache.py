"""The server's local tensor cache, keyed by FNV-1a hash (spec/hash-cache.md).

Files are named by the 16-digit lower-case hex hash and hold the raw bytes, the same layout
llama.cpp's ``rpc-server -c`` uses, so the two can share a directory.  Unlike llama.cpp, a
file is written under a temporary name and renamed into place (a crash never leaves a
truncated entry), and its contents are re-hashed when used (a damaged or planted entry is
discarded and reported as a miss instead of being written into a tensor).

The cache's size is bounded (``--cache-max-mib``): storing an entry first evicts the least
recently used ones, an entry larger than the whole bound is not stored, and nothing is ever
stored that would leave less than ``MIN_FREE_DISK`` bytes free on the disk.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from ..hashing import fnv1a_64

log = logging.getLogger("refimpl.server.cache")

#: Never store an entry that would leave less free space than this on the cache's disk.
MIN_FREE_DISK = 1 << 30
_ENTRY_NAME = re.compile(r"^[0-9a-f]{16}$")
_TMP_PREFIX = ".incoming-"


def default_cache_limit(directory: Path) -> int:
    """The default bound: half the space free on the cache's disk when the server starts."""
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free // 2


def default_cache_dir() -> Path:
    """``$LLAMA_CACHE/rpc``, else ``$XDG_CACHE_HOME/llama.cpp/rpc``, else ``~/.cache/llama.cpp/rpc``."""
    if os.environ.get("LLAMA_CACHE"):
        return Path(os.environ["LLAMA_CACHE"]) / "rpc"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llama.cpp" / "rpc"


class HashCache:
    """A directory of content-addressed tensor data of at most ``max_bytes`` (None: the
    default bound, :func:`default_cache_limit`)."""

    def __init__(self, directory: Path, max_bytes: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = default_cache_limit(self.directory) if max_bytes is None else max_bytes
        self._lock = threading.Lock()
        for stale in self.directory.glob(_TMP_PREFIX + "*"):  # left by a crash
            try:
                stale.unlink()
            except OSError:
                pass
        self.used = sum(size for _, size, _ in self._entries())

    def _entries(self):
        """(path, size, mtime) of every entry, by listing the directory."""
        out = []
        with os.scandir(self.directory) as it:
            for e in it:
                if _ENTRY_NAME.match(e.name):
                    try:
                        st = e.stat()
                    except OSError:
                        continue
                    out.append((Path(e.path), st.st_size, st.st_mtime))
        return out

    def path_for(self, digest: int) -> Path:
        """Where the entry for ``digest`` lives."""
        return self.directory / f"{digest:016x}"

    def size_of(self, digest: int) -> int | None:
        """Size of the cached entry, or None when there is none."""
        try:
            st = self.path_for(digest).stat()
        except OSError:
            return None
        return st.st_size

    def load_into(self, digest: int, view: memoryview) -> bool:
        """Read the entry into ``view`` (exactly its size) and verify its hash.

        Returns False, and removes the entry, when it is shorter than expected or its bytes do
        not hash to ``digest``.
        """
        path = self.path_for(digest)
        try:
            with open(path, "rb") as f:
                n = f.readinto(view)
        except OSError as exc:
            log.warning("cache entry %s unreadable: %s", path.name, exc)
            return False
        if n != len(view) or fnv1a_64(view) != digest:
            log.warning("cache entry %s is damaged (size or hash mismatch); removing it", path.name)
            try:
                path.unlink()
            except OSError:
                pass
            return False
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        return True

    def store(self, view: memoryview) -> Path | None:
        """Store bytes under their hash (atomically); returns the entry's path, or None when
        the bound or the free disk space does not allow it."""
        n = len(view)
        digest = fnv1a_64(view)
        path = self.path_for(digest)
        with self._lock:
            if path.exists():
                try:
                    if path.stat().st_size == n:
                        os.utime(path)
                        return path
                except OSError:
                    pass
            if n > self.max_bytes:
                log.warning("not caching %d bytes: more than the cache's bound of %d", n,
                            self.max_bytes)
                return None
            self._make_room(n)
            if shutil.disk_usage(self.directory).free - n < MIN_FREE_DISK:
                log.warning("not caching %d bytes: the disk would have less than %d MiB free",
                            n, MIN_FREE_DISK >> 20)
                return None
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=_TMP_PREFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(view)
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            self.used += n
        return path

    def _make_room(self, n: int) -> None:
        """Evict least recently used entries until ``n`` more bytes fit under the bound."""
        if self.used + n <= self.max_bytes:
            return
        entries = sorted(self._entries(), key=lambda e: e[2])  # the directory is the truth
        self.used = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if self.used + n <= self.max_bytes:
                break
            try:
                path.unlink()
                self.used -= size
                log.info("cache: evicted %s (%d bytes) to stay within %d bytes", path.name, size,
                         self.max_bytes)
            except OSError:
                pass
