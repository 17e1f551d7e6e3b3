"""The conformance suite: judge any ggml RPC server against spec/.

    pytest conformance/                              # refimpl-server, started by the suite
    pytest conformance/ --peer llama.cpp             # llama.cpp's ggml-rpc-server (0.3.36)
    pytest conformance/ --server-cmd "CMD -p {port}" # any server the suite can start
    pytest conformance/ --server HOST:PORT           # a server you started (non-destructive
                                                     # tests; add -m hazard for the probes)

Destructive probes (``hazard`` marker) get a fresh server process each when the suite starts
the server; against ``--server`` they only run when selected with ``-m hazard``.
"""

from __future__ import annotations

import sys

import pytest

from support import TargetFactory


def pytest_addoption(parser):
    g = parser.getgroup("conformance")
    g.addoption("--server", default=None, metavar="HOST:PORT",
                help="judge a running server (not restarted between probes)")
    g.addoption("--server-cmd", default=None, metavar="CMD",
                help="command that starts the server under test; {port} is replaced")
    g.addoption("--peer", default=None, choices=["llama.cpp"],
                help="judge llama.cpp's ggml-rpc-server built from the registry sdist")


def pytest_configure(config):
    config.addinivalue_line("markers", "hazard: destructive probe of a known hazard")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))


@pytest.fixture(scope="session")
def target_factory(request) -> TargetFactory:
    """How to get the server under test."""
    opt = request.config.getoption
    if opt("--server"):
        host, _, port = opt("--server").rpartition(":")
        return TargetFactory(f"external {opt('--server')}", address=(host or "127.0.0.1", int(port)))
    if opt("--server-cmd"):
        return TargetFactory("custom", command=opt("--server-cmd"))
    if opt("--peer") == "llama.cpp":
        from refimpl.testing.peers import PeerUnavailable, ensure_peers, peer_env
        try:
            bin_dir = ensure_peers()
        except PeerUnavailable as exc:
            pytest.fail(f"llama.cpp peer unavailable: {exc}", pytrace=False)
        return TargetFactory("llama.cpp 0.3.36", command=f"{bin_dir}/ggml-rpc-server -p {{port}}",
                             env={"LD_LIBRARY_PATH": peer_env(bin_dir)["LD_LIBRARY_PATH"]})
    return TargetFactory("refimpl", command=f"{sys.executable} -m refimpl.server -p {{port}} "
                                            f"-m 1024 --log-level warning")


def pytest_collection_modifyitems(config, items):
    external = config.getoption("--server") is not None
    markexpr = config.getoption("-m") or ""
    if external and "hazard" not in markexpr:
        skip = pytest.mark.skip(reason="destructive probe: select with -m hazard to run it "
                                       "against an external server")
        for item in items:
            if "hazard" in item.keywords:
                item.add_marker(skip)
