"""The hazard catalogue (spec/hazards.md) run against a server, one probe per test.

Every probe gets a fresh connection, and a fresh server process whenever the suite starts
the server.  After it, the suite checks that the process is alive and serves a new
connection, and classifies the outcome (see ``hazards.py``):

* refimpl, and any server named with ``--server``/``--server-cmd``: every probe must be
  ``safe``;
* llama.cpp 0.3.36 (``--peer llama.cpp``, and by default next to refimpl): the outcome must
  equal the catalogued upstream outcome.  Unsafe ones pass as known upstream deviations and
  appear, with their links, in the table printed at the end of the run.

The catalogue is of protocol 7.0.0 (its probes are 7.0.0 byte sequences and its upstream
outcomes were verified against 0.3.36): when the suite judges an older version
(``--protocol``, or a ``--server`` that speaks one) no probe is collected.
"""

from __future__ import annotations

import pytest

from refimpl.protocol.profiles import LATEST
from servers import factory_for, hazard_target_kinds, suite_profile
from hazards import PROBES, Outcome, Unobservable, execute

pytestmark = pytest.mark.hazard


def pytest_generate_tests(metafunc):
    """Parametrise over (server, probe); the llama.cpp server's cases are marked ``peer``."""
    if "hazard_case" not in metafunc.fixturenames:
        return
    params = []
    judged = suite_profile(metafunc.config)
    if judged is not LATEST:
        reason = (f"the hazard catalogue is of protocol {LATEST.name} (spec/hazards.md); this run "
                  f"judges {judged.name}")
        metafunc.parametrize("hazard_case", [pytest.param(None, id="not-collected",
                                                          marks=pytest.mark.skip(reason=reason))])
        return
    for kind in hazard_target_kinds(metafunc.config):
        marks = [pytest.mark.peer] if kind == "llama.cpp" else []
        for p in PROBES:
            params.append(pytest.param((kind, p), id=f"{kind}-{p.id}", marks=marks))
    metafunc.parametrize("hazard_case", params)


_factories: dict = {}


def _factory(config, kind):
    if kind not in _factories:
        _factories[kind] = factory_for(config, kind)
    return _factories[kind]


def test_hazard(hazard_case, request):
    kind, probe = hazard_case
    factory = _factory(request.config, kind)
    features = tuple(f for f in probe.needs if factory.supports(f))
    target = factory.start(features)
    try:
        result = execute(probe, target,
                         knows_timeouts=bool(factory.feature_args.get("timeouts")))
    except Unobservable as exc:
        pytest.skip(str(exc))
    finally:
        target.stop()
        log = target.log_text()
    expected = probe.upstream if kind == "llama.cpp" else Outcome.SAFE
    if result.outcome == expected:
        verdict = "known upstream deviation" if expected is not Outcome.SAFE else "ok"
    elif kind == "llama.cpp":
        verdict = "DIFFERS from the catalogue"
    else:
        verdict = "UNSAFE"
    request.config._hazard_results = getattr(request.config, "_hazard_results", [])
    request.config._hazard_results.append({
        "target": factory.name, "id": probe.id, "title": probe.title, "source": probe.source,
        "outcome": result.outcome.value, "expected": expected.value, "verdict": verdict,
        "detail": result.detail, "seconds": result.seconds})
    if verdict == "known upstream deviation":
        request.node.user_properties.append(("upstream deviation", probe.source))
    assert result.outcome == expected, (
        f"{probe.id} ({probe.title}) against {factory.name}: {result.outcome} "
        f"({result.detail}); expected {expected}"
        + (f" as catalogued for llama.cpp 0.3.36 ({probe.upstream_detail})"
           if kind == "llama.cpp" else "")
        + f"\n--- server log (tail) ---\n{log[-3000:]}")
