"""Every committed capture (conformance/captures/) replayed against the server under test.

The rules are spec/replay.md: requests sent in recorded order with handles and addresses
remapped, every reply judged (exact where bytes were uploaded, within a tolerance where a
graph computed them, memory figures for sanity).  By default the suite replays against
refimpl and against llama.cpp 0.3.36; ``--server``/``--server-cmd``/``--peer`` pick one.

Only the captures of the suite's protocol version are replayed (``--protocol``, or what
``--server`` speaks): a capture's version is in its name (``…-v4.0.2``; none: 7.0.0), and the
replay checks that its HELLO replies say the same.

Replays are not destructive: they share one server process per target, which the suite
restarts if a replay took it down.  A capture that relies on the hash cache gets a fresh
process with an empty cache when the suite starts the server, so that its misses and hits
must match the recording exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import report
from replay import load, Replayer
from refimpl.protocol.profiles import LATEST
from servers import SharedTargets, hazard_target_kinds, suite_profile

CAPTURES = sorted((Path(__file__).parent / "captures").glob("*.cap*"))


def capture_protocol(path: Path) -> str:
    """The protocol version a committed capture was recorded in, from its name."""
    _, sep, version = path.name.split(".cap")[0].rpartition("-v")
    return version if sep and re.fullmatch(r"\d+\.\d+\.\d+", version) else LATEST.name


def pytest_generate_tests(metafunc):
    """Parametrise over (server, capture); the llama.cpp server's cases are marked ``peer``."""
    if "replay_case" not in metafunc.fixturenames:
        return
    params = []
    version = suite_profile(metafunc.config).name
    for kind in hazard_target_kinds(metafunc.config):
        marks = [pytest.mark.peer] if kind == "llama.cpp" else []
        for path in CAPTURES:
            if capture_protocol(path) != version:
                continue
            name = path.name.split(".cap")[0]
            params.append(pytest.param((kind, path), id=f"{kind}-{name}", marks=marks))
    metafunc.parametrize("replay_case", params)


class _Pool(SharedTargets):
    """The replay targets: refimpl gets room in its hash cache for the cache capture."""

    def make_factory(self, kind):
        """The kind's factory; refimpl's can also be started with a larger cache bound."""
        f = super().make_factory(kind)
        if f.kind == "refimpl":
            # The suite's cache bound (4 MiB, for the hazard probes) is below the 10 MiB
            # weights of the cache capture; a later --cache-max-mib wins.
            f.feature_args = {**f.feature_args, "cache-room": "--cache-max-mib 64"}
        return f


@pytest.fixture(scope="session")
def replay_pool(request):
    """The servers replays run against, for the whole session."""
    pool = _Pool(request.config)
    yield pool
    pool.close()


def test_replay(replay_case, replay_pool, request):
    kind, path = replay_case
    session = load(path)
    assert session.profile.name == capture_protocol(path), (
        f"{path.name} is named for protocol {capture_protocol(path)} but its HELLO replies say "
        f"{session.profile.name}")
    factory = replay_pool.factory(kind)
    own = None
    if session.uses_cache and factory.supports("cache"):
        target = own = factory.start(("cache", "cache-room") if factory.supports("cache-room")
                                     else ("cache",))
        cache = "fresh"
    else:
        target = replay_pool.get(kind)
        cache = "none" if factory.kind in ("refimpl", "llama.cpp") else "unknown"
    try:
        result = Replayer(session, target.address, cache=cache, target_name=factory.name).run()
        alive = target.alive()
        log = target.log_text()
    finally:
        if own is not None:
            own.stop()
    deviations = list(result.deviations)
    if not alive:
        deviations.append(f"the server stopped serving after the replay "
                          f"({target.exit_description()}) [spec/errors.md#the-rule]")
    if result.inconclusive:
        verdict = report.INCONCLUSIVE
    else:
        verdict = report.DEVIATION if deviations else report.PASS
    sections = sorted({d.section for d in result.deviations}
                      | ({"spec/errors.md#the-rule"} if not alive else set()))
    compared = (f"{result.requests} requests, {result.replies} replies, "
                f"{result.exact_compared} uploaded + {result.computed_compared} computed reads "
                f"({result.computed_identical} bit-identical)")
    report.record(request.config, "session", factory.name, session.name, "replay", verdict,
                  sections, "; ".join(str(d) for d in deviations[:5]) or result.inconclusive
                  or "", summary=compared)
    if result.inconclusive:
        pytest.skip(f"inconclusive: {result.inconclusive} (listed in the conformance report)")
    assert not deviations, (
        f"replay of {session.name} against {factory.name}: {result.summary()}\n"
        + "\n".join(str(d) for d in deviations)
        + (f"\n--- server log (tail) ---\n{log[-3000:]}" if log else ""))
