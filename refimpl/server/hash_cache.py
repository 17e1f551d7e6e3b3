"""The server's local tensor cache, keyed by FNV-1a hash (spec/hash-cache.md).

Files are named by the 16-digit lower-case hex hash and hold the raw bytes, the same layout
llama.cpp's ``rpc-server -c`` uses, so the two can share a directory.  Unlike llama.cpp, a
file is written under a temporary name and renamed into place (a crash never leaves a
truncated entry), and its contents are re-hashed when used (a damaged or planted entry is
discarded and reported as a miss instead of being written into a tensor).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from ..protocol.fnv import fnv1a_64

log = logging.getLogger("refimpl.server.cache")


def default_cache_dir() -> Path:
    """``$LLAMA_CACHE/rpc``, else ``$XDG_CACHE_HOME/llama.cpp/rpc``, else ``~/.cache/llama.cpp/rpc``."""
    if os.environ.get("LLAMA_CACHE"):
        return Path(os.environ["LLAMA_CACHE"]) / "rpc"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llama.cpp" / "rpc"


class HashCache:
    """A directory of content-addressed tensor data."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

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
        return True

    def store(self, view: memoryview) -> Path:
        """Store bytes under their hash (atomically); returns the entry's path."""
        digest = fnv1a_64(view)
        path = self.path_for(digest)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".incoming-")
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
        return path
