"""Shared fixtures: the real llama.cpp peers, servers of both kinds, an in-process server."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from refimpl.devices import CpuDevice
from refimpl.server import RpcServer, ServerConfig
from refimpl.server.hash_cache import HashCache
from tools.peers import (PeerUnavailable, ensure_isa_libs, ensure_peers,
                         isa_host_problem, source_dir)
from tools.processes import ServerProcess

SERVER_KINDS = ("refimpl", "llama.cpp")


@pytest.fixture(scope="session")
def peer_bin(request) -> Path:
    """The bin directory of the llama.cpp peers; builds them on first use.

    A missing or unbuildable peer FAILS the tests that need it: it never skips them.
    """
    capman = request.config.pluginmanager.getplugin("capturemanager")
    log = io.StringIO()
    try:
        with capman.global_and_fixture_disabled():
            return ensure_peers()
    except PeerUnavailable as exc:
        pytest.fail(f"llama.cpp peers unavailable: {exc}\n{log.getvalue()}", pytrace=False)


def _isa_lib(request, level: str, what: str) -> Path:
    """The ggml libraries of llama.cpp's build at that ISA level (tools.peers
    ISA_LEVELS), built on first use; fails, never skips, when unavailable."""
    problem = isa_host_problem(level)
    if problem:
        pytest.fail(f"the numerics contract cannot be checked here: {problem}", pytrace=False)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    try:
        with capman.global_and_fixture_disabled():
            return ensure_isa_libs(level)
    except PeerUnavailable as exc:
        pytest.fail(f"llama.cpp's {what} build is unavailable: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def portable_lib(request, peer_bin) -> Path:
    """The ggml libraries of llama.cpp's portable build (GGML_NATIVE=OFF: SSE4.2 to AVX2),
    one of the numerics contract's alternatives (spec/numerics.md); built on first use.

    Fails, never skips, when they cannot be built or cannot run on this host (no AVX2).
    """
    return _isa_lib(request, "portable", "portable")


@pytest.fixture(scope="session")
def sse42_lib(request, peer_bin) -> Path:
    """The ggml libraries of llama.cpp's SSE4.2-only build (GGML_NATIVE=OFF, every SIMD
    option above SSE4.2 off: its release's "sse42" CPU variant), the numerics contract's
    alternative that sums in another order than the native build on every host
    (spec/numerics.md); built on first use.  Fails, never skips, when unavailable.
    """
    return _isa_lib(request, "sse42", "SSE4.2")


@pytest.fixture(scope="session")
def peer_source(peer_bin) -> Path:
    """The llama.cpp source tree the peers were built from."""
    return source_dir()


@pytest.fixture(params=SERVER_KINDS)
def any_server(request, tmp_path):
    """A fresh server process of each kind (with the hash cache on, in a private dir)."""
    kind = request.param
    bin_dir = request.getfixturevalue("peer_bin") if kind == "llama.cpp" else None
    with ServerProcess(kind, bin_dir=bin_dir, args=["-c"], cache_dir=tmp_path / "cache") as srv:
        yield srv


def make_config(**kw) -> ServerConfig:
    """A ServerConfig for in-process tests: one CPU device, port 0."""
    from refimpl.graph import make_executor
    devices = kw.pop("devices", None) or [CpuDevice(capacity=kw.pop("capacity", 256 << 20))]
    kw.setdefault("graph_executor_factory", make_executor)
    return ServerConfig(devices=devices, host="127.0.0.1", port=0, **kw)


@pytest.fixture
async def server(nursery):
    """An in-process refimpl server (256 MiB CPU device) serving on a free port."""
    return await nursery.start(RpcServer(make_config()).serve)


@pytest.fixture
async def cached_server(nursery, tmp_path):
    """An in-process refimpl server with the hash cache enabled."""
    cfg = make_config(cache=HashCache(tmp_path / "cache"))
    return await nursery.start(RpcServer(cfg).serve)
