"""The conformance suite: judge any ggml RPC server against spec/.

    pytest conformance/                              # refimpl-server, started by the suite
    pytest conformance/ --peer llama.cpp             # llama.cpp's ggml-rpc-server (0.3.36)
    pytest conformance/ --server-cmd "CMD -p {port}" # any server the suite can start
    pytest conformance/ --server HOST:PORT           # a server you started (non-destructive
                                                     # tests; add -m hazard for the probes)
    pytest conformance/ --protocol 4.0.2             # an older protocol version: refimpl-server
                                                     # --protocol 4.0.2 and llama.cpp 0.3.34

The suite judges one protocol version per run (spec/versions.md): the one ``--protocol``
names (default 7.0.0), or against ``--server`` the one the server names in its HELLO reply.
Checks that do not exist in that version are not collected, and only the captures recorded
in it are replayed.

Destructive probes (``hazard`` marker) get a fresh server process each when the suite starts
the server; against ``--server`` they only run when selected with ``-m hazard``.
"""

from __future__ import annotations

import os
import sys

import pytest

from servers import factory_for, hazard_target_kinds
from support import TargetFactory


def pytest_addoption(parser):
    """--server, --server-cmd, --peer, --hazard-report and --conformance-report."""
    g = parser.getgroup("conformance")
    g.addoption("--server", default=None, metavar="HOST:PORT",
                help="judge a running server (not restarted between probes)")
    g.addoption("--server-cmd", default=None, metavar="CMD",
                help="command that starts the server under test; {port} is replaced")
    g.addoption("--peer", default=None, choices=["llama.cpp"],
                help="judge llama.cpp's ggml-rpc-server built from the registry sdist")
    g.addoption("--protocol", default=None, metavar="X.Y.Z",
                help="protocol version to judge (default: 7.0.0, or what --server speaks)")
    g.addoption("--hazard-report", default="build/hazard-table.md", metavar="PATH",
                help="also write the hazard table as Markdown to PATH (default: %(default)s)")
    g.addoption("--conformance-report", default="build/conformance-report.md", metavar="PATH",
                help="also write the command and session results as Markdown to PATH "
                     "(default: %(default)s)")


def pytest_configure(config):
    """Register the hazard marker; make the suite's modules importable."""
    config.addinivalue_line("markers", "hazard: destructive probe of a known hazard")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    if config.getoption("--server") or config.getoption("--protocol"):
        from servers import suite_profile
        suite_profile(config)  # the version to judge, or a usage error before collection


@pytest.fixture(scope="session")
def target_factory(request) -> TargetFactory:
    """How to get the server under test."""
    kinds = hazard_target_kinds(request.config)
    return factory_for(request.config, kinds[0])


def pytest_collection_modifyitems(config, items):
    """Against an external server, run destructive probes only when asked with -m hazard."""
    external = config.getoption("--server") is not None
    markexpr = config.getoption("-m") or ""
    if external and "hazard" not in markexpr:
        skip = pytest.mark.skip(reason="destructive probe: select with -m hazard to run it "
                                       "against an external server")
        for item in items:
            if "hazard" in item.keywords:
                item.add_marker(skip)


# -- the report ---------------------------------------------------------------------------------

def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the conformance report: per command, per captured session (pass / deviation, with
    the spec sections broken), then the hazard table (probe, title, outcome, expected)."""
    results = getattr(config, "_conformance_results", None) or []
    hazards = getattr(config, "_hazard_results", None) or []
    if not results and not hazards:
        return
    from report import markdown_report, text_report
    terminalreporter.section("conformance report")
    for line in text_report(results, hazards).splitlines():
        terminalreporter.write_line(line)
    if hazards:
        path = config.getoption("--hazard-report")
        if path:
            from hazard_report import markdown_table
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(markdown_table(hazards))
            with open(os.path.splitext(path)[0] + ".json", "w") as f:
                import json
                json.dump(hazards, f, indent=1)
            terminalreporter.write_line(f"hazard table written to {path}")
    path = config.getoption("--conformance-report")
    if results and path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write("# Conformance report\n\n" + markdown_report(results))
        terminalreporter.write_line(f"conformance report written to {path}")
