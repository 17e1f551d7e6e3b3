"""refimpl.kernels.cache: a change to any kernel module invalidates every cached kernel."""

from __future__ import annotations

from refimpl.kernels import cache, matmul_fast, numeric


def test_every_cached_kernel_uses_the_package_locator():
    """numba picked the package's locator for kernels in different modules, and its stamp
    carries the digest of all the package's sources."""
    kernels = [numeric.hsum8_f32] + [k.serial for k in matmul_fast._PACKED_KERNELS.values()]
    for kernel in kernels:
        locator = kernel._cache._impl.locator
        assert isinstance(locator, cache.KernelSourcesLocator), kernel
        assert locator.get_source_stamp()[1] == cache.sources_digest()


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
