"""refimpl.kernels.cache: a change to any kernel module invalidates every cached kernel, and
compiled kernels are kept outside the package, by the digest of its sources."""

from __future__ import annotations

import os
import time
from pathlib import Path

from refimpl.kernels import cache, matmul_fast, numeric


def test_every_cached_kernel_uses_the_package_locator():
    """numba picked the package's locator for kernels in different modules, and its stamp
    carries the digest of all the package's sources."""
    kernels = [numeric.hsum8_f32] + [k.serial for k in matmul_fast._PACKED_KERNELS.values()]
    for kernel in kernels:
        locator = kernel._cache._impl.locator
        assert isinstance(locator, cache.KernelSourcesLocator), kernel
        assert locator.get_source_stamp() == cache.sources_digest()
        # kept by the digest, outside the package (a fresh checkout of the same sources
        # finds them); this host's cache root is writable
        where = Path(locator.get_cache_path())
        assert where == cache.cache_root() / cache.sources_digest()[:24], where
    assert numeric.hsum8_f32(*[1.0] * 8) == 8.0          # compiled (or loaded) and saved
    assert list(where.glob("numeric.hsum8_f32-*.nbi")), "the kernel was not saved there"


def test_unwritable_root_falls_back_beside_the_sources(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(blocker / "cache"))
    cache.digest_directory.cache_clear()
    try:
        assert cache.digest_directory() is None
        locator = cache.KernelSourcesLocator.from_function(numeric.hsum8_f32.py_func,
                                                           numeric.__file__)
        assert locator.get_cache_path() == locator._inner.get_cache_path()
        assert locator.get_source_stamp() == cache.sources_digest()
    finally:
        cache.digest_directory.cache_clear()


def test_only_the_most_recently_used_digests_are_kept(tmp_path, monkeypatch):
    """Digest directories beyond the KEEP newest are removed, unless used within the last
    IN_USE_SECONDS; directories without a last-used marker are not refimpl's and stay."""
    now = time.time()
    ages = {"old1": 10 * 86400, "old2": 9 * 86400, "recent": 60, "a": 3 * 86400,
            "b": 2 * 86400, "c": 86400}
    for name, age in ages.items():
        (tmp_path / name).mkdir()
        marker = tmp_path / name / "last-used"
        marker.touch()
        os.utime(marker, (now - age, now - age))
    (tmp_path / "someone-else").mkdir()
    monkeypatch.setattr(cache, "KEEP", 2)
    cache._prune(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    # newest two: recent, c; b, a, old2, old1 are older than an hour: removed
    assert left == ["c", "recent", "someone-else"], left


def test_digest_follows_any_file(tmp_path):
    """Editing one file, even one that defines no kernel, changes the digest; so does a new
    file."""
    (tmp_path / "simd.py").write_text("A = 1\n")
    (tmp_path / "matmul.py").write_text("B = 2\n")
    first = cache.sources_digest.__wrapped__(tmp_path)
    assert cache.sources_digest.__wrapped__(tmp_path) == first
    (tmp_path / "simd.py").write_text("A = 3\n")
    second = cache.sources_digest.__wrapped__(tmp_path)
    assert second != first
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.py").write_text("")
    assert cache.sources_digest.__wrapped__(tmp_path) != second


def test_locator_ignores_other_packages():
    assert cache.KernelSourcesLocator.from_function(test_locator_ignores_other_packages,
                                                    __file__) is None
