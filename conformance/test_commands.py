"""Each command's success and failure behaviour, the HELLO rules and framing edge cases, tested
directly against the server under test (``commands.py``; spec/commands.md, spec/errors.md).

By default every check runs against refimpl and against llama.cpp 0.3.36 (with ``--protocol
X.Y.Z``: refimpl-server speaking X.Y.Z and the llama.cpp release that carries it; only the
checks that exist in that version are collected).  A check must give
the outcome the spec demands; against llama.cpp (also a server you started, named with
``--server HOST:PORT --peer llama.cpp``), a check with a catalogued upstream deviation
must give exactly that deviation instead: it then passes as a *known upstream deviation* and
the conformance report lists it with its issue or advisory link.  Nothing is skipped silently.

Non-destructive checks share one server process per target (restarted if one took it down);
destructive ones (a non-conforming server may die) get a fresh process each when the suite
starts the server, and run against ``--server`` only when selected with ``-m hazard``.
"""

from __future__ import annotations

import pytest

import report
from commands import CHECKS, execute, same_outcome
from servers import SharedTargets, hazard_target_kinds, suite_profile


def pytest_generate_tests(metafunc):
    """Parametrise over (server, check); llama.cpp's cases are marked ``peer``, destructive
    checks ``hazard``."""
    if "command_case" not in metafunc.fixturenames:
        return
    params = []
    profile = suite_profile(metafunc.config)
    for kind in hazard_target_kinds(metafunc.config):
        for c in CHECKS:
            if not c.applies(profile):
                continue
            marks = [pytest.mark.peer] if kind == "llama.cpp" else []
            if c.destructive:
                marks.append(pytest.mark.hazard)
            params.append(pytest.param((kind, c), id=f"{kind}-{c.id}", marks=marks))
    metafunc.parametrize("command_case", params)


@pytest.fixture(scope="session")
def command_targets(request):
    """The targets of the command checks, for the whole session."""
    targets = SharedTargets(request.config)
    yield targets
    targets.close()


def is_llama_cpp(config, kind: str) -> bool:
    """Whether the target is llama.cpp: the one the suite starts (``--peer llama.cpp``,
    or by default), or a server you started and named so (``--server H:P --peer llama.cpp``)."""
    return kind == "llama.cpp" or (kind == "external" and config.getoption("--peer") == "llama.cpp")


def test_command(command_case, command_targets, request):
    kind, c = command_case
    factory = command_targets.factory(kind)
    if c.needs and not all(factory.supports(f) for f in c.needs):
        reason = (f"needs a server started with: {', '.join(c.needs)}; "
                  f"{factory.name} " + ("cannot be" if factory.disposable else
                                        "was started by you, and the suite cannot tell"))
        report.record(request.config, "command", factory.name, c.command, c.id,
                      report.INCONCLUSIVE, [], f"{c.title}: {reason}")
        pytest.skip(reason)
    own = (c.destructive or bool(c.needs)) and factory.disposable
    target = factory.start(c.needs) if own else command_targets.get(kind)
    try:
        result = execute(c, target)
        log = target.log_text()
    finally:
        if own:
            target.stop()
    upstream = c.upstream_of(factory.release) if is_llama_cpp(request.config, kind) else None
    if same_outcome(result.outcome, c.expect):
        verdict, link = report.PASS, ""
    elif upstream and same_outcome(result.outcome, upstream.outcome):
        verdict, link = report.KNOWN, upstream.link
        request.node.user_properties.append(("upstream deviation", upstream.link))
    else:
        verdict, link = report.DEVIATION, ""
    report.record(request.config, "command", factory.name, c.command, c.id, verdict,
                  [c.section] if verdict != report.PASS else [],
                  f"{c.title}: expected {c.expect}, got {result.outcome}"
                  + (f" ({upstream.note})" if verdict == report.KNOWN and upstream.note else ""),
                  link)
    assert verdict != report.DEVIATION, (
        f"{c.id} ({c.title}) against {factory.name}: {result.outcome}; the spec ({c.section}) "
        f"demands {c.expect}"
        + (f"; catalogued for llama.cpp: {upstream.outcome}" if upstream else "")
        + (f"\n--- server log (tail) ---\n{log[-3000:]}" if log else ""))
