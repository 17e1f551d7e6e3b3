"""Fuzzing refimpl-server: profiles, the campaign loop, progress, summary and corpus.

    pytest fuzz/                                         # "ci" profile: short, every target once
    pytest fuzz/ --hypothesis-profile=campaign           # until Ctrl-C, all targets in turns
    pytest fuzz/ --hypothesis-profile=campaign --campaign-minutes 30

Every example runs against one refimpl-server process (memory cap 256 MiB, small limits) while
a well-behaved client works next to it; after every example the properties of
``harness.check_properties`` are checked.  Failing examples are saved to the corpus
(``fuzz/corpus/``, hypothesis' example database) and replayed first by every later run, and
a readable trace of each distinct failure goes to ``fuzz/results/``.  Each run ends with a
summary (``fuzz/results/summary-<profile>.md``).
"""

from __future__ import annotations

import re
import sys
import time
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

CORPUS = HERE / "corpus"
RESULTS = HERE / "results"

_common = dict(deadline=None, database=DirectoryBasedExampleDatabase(str(CORPUS)),
               suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("ci", max_examples=60, stateful_step_count=25, **_common)
settings.register_profile("campaign", max_examples=40, stateful_step_count=40, **_common)

#: Examples per target in the "ci" profile (the whole of fuzz/ stays near two minutes).
CI_EXAMPLES = {"messages": 1500, "graphs": 800, "framing": 1000, "stateful": 150}


def pytest_addoption(parser):
    """--campaign-minutes."""
    g = parser.getgroup("fuzz")
    g.addoption("--campaign-minutes", type=float, default=None, metavar="N",
                help="with --hypothesis-profile=campaign: stop after N minutes "
                     "(default: run until interrupted)")


def profile_name(config) -> str:
    """The hypothesis profile asked for; "ci" when none was."""
    return getattr(config.option, "hypothesis_profile", None) or "ci"


def pytest_collection_modifyitems(config, items):
    """The campaign test runs only under the campaign profile, the per-target tests only
    under the others."""
    campaign = profile_name(config) == "campaign"
    keep, drop = [], []
    for item in items:
        if Path(str(item.fspath)).parent != HERE:
            keep.append(item)
            continue
        is_campaign = item.name == "test_campaign"
        (keep if is_campaign == campaign else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def fuzz_context(request):
    """The server under fuzz and the well-behaved client, for the whole session."""
    from harness import FuzzServer, WellBehavedClient
    from targets import CTX
    server = FuzzServer()
    server.start()
    client = WellBehavedClient(server.address)
    client.start()
    CTX.server, CTX.client = server, client
    campaign = Campaign(request.config, server, client)
    request.config._fuzz_campaign = campaign
    yield campaign
    client.stop()
    campaign.finish()
    server.stop()


def signature(target: str, exc: BaseException) -> str:
    """What makes two failures the same: target, exception type, first line, digits masked."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{target}: {type(exc).__name__}: " + re.sub(r"0x[0-9a-f]+|\d+", "#", first)[:160]


class Campaign:
    """Runs targets, counts, prints progress and writes the summary."""

    def __init__(self, config, server, client):
        self.config = config
        self.profile = profile_name(config)
        self.server = server
        self.client = client
        self.began = time.monotonic()
        self.last_progress = 0.0
        self.failures: dict[str, dict] = {}
        self.interrupted = False
        self.rss_start = server.rss()

    def settings_for(self, target: str, examples: int | None = None) -> settings:
        """The profile's settings, with the example count for this target."""
        base = settings.get_profile(self.profile)
        if self.profile != "campaign":
            n = examples or CI_EXAMPLES[target]
            return settings(base, max_examples=n, stateful_step_count=base.stateful_step_count)
        return settings(base, max_examples=examples or base.max_examples)

    def run(self, target: str, fn, examples: int | None = None) -> BaseException | None:
        """One hypothesis run of ``target``; returns its failure (already recorded) or None."""
        s = self.settings_for(target, examples)
        try:
            if target == "stateful":
                fn(settings=s)
            else:
                # a @given test takes settings only once; each round wraps its body afresh
                s(given(st.data())(fn.hypothesis.inner_test))()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is a finding
            self.record(target, exc)
            return exc
        return None

    def record(self, target: str, exc: BaseException) -> None:
        """Count a failure, save its trace if it is new."""
        from harness import STATS
        sig = signature(target, exc)
        entry = self.failures.setdefault(sig, {"target": target, "count": 0, "file": None})
        entry["count"] += 1
        STATS.failures[sig] = entry
        if entry["file"] is None:
            RESULTS.mkdir(exist_ok=True)
            path = RESULTS / f"failure-{target}-{len(self.failures)}.txt"
            path.write_text("".join(traceback.format_exception(exc)) + "\n--- server log ---\n"
                            + self.server.log_tail(8000))
            entry["file"] = str(path.relative_to(HERE.parent))
        self.progress(force=True)

    def progress(self, force: bool = False) -> None:
        """A progress line every 30 s (or when forced)."""
        from harness import STATS
        now = time.monotonic()
        if not force and now - self.last_progress < 30:
            return
        self.last_progress = now
        mins = (now - self.began) / 60
        line = (f"[fuzz {self.profile} {mins:5.1f} min] examples {STATS.total_examples} "
                f"({', '.join(f'{k} {v}' for k, v in STATS.examples.items())}), "
                f"distinct failures {len(self.failures)}, {STATS.rate():.0f} msg/s, "
                f"server {self.server.rss() / 2**20:.0f} MiB, well-behaved client "
                f"{self.client.iterations} rounds")
        capman = self.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            with capman.global_and_fixture_disabled():
                print(line, flush=True)
        else:
            print(line, flush=True)

    def finish(self) -> None:
        """Write (and print) the summary."""
        from harness import STATS
        RESULTS.mkdir(exist_ok=True)
        elapsed = time.monotonic() - self.began
        corpus = sum(1 for p in CORPUS.glob("*/*") if p.is_file()) if CORPUS.exists() else 0
        lines = [
            f"# Fuzz summary ({self.profile} profile)",
            "",
            f"* duration: {elapsed / 60:.1f} min{' (interrupted)' if self.interrupted else ''}",
            f"* examples: {STATS.total_examples} "
            f"({', '.join(f'{k}: {v}' for k, v in STATS.examples.items())})",
            f"* messages sent: {STATS.messages} ({STATS.rate():.0f} per second); "
            f"refused by a close: {STATS.closes}",
            f"* graphs: {STATS.graphs_sent} sent, {STATS.graphs_run} accepted and run; most run: "
            + ", ".join(f"{k} ({v})" for k, v in sorted(STATS.ops_run.items(),
                                                          key=lambda kv: -kv[1])[:12]),
            f"* distinct failures: {len(self.failures)}",
            f"* server restarts after a crash: {STATS.restarts}",
            f"* server memory: {self.rss_start / 2**20:.0f} MiB at start, peak "
            f"{self.server.peak_rss / 2**20:.0f} MiB, cap {256} MiB of buffers",
            f"* well-behaved client: {self.client.iterations} correct rounds alongside",
            f"* corpus: {corpus} saved example(s) in fuzz/corpus/",
        ]
        for sig, e in self.failures.items():
            lines.append(f"  * {sig} (x{e['count']}, trace: {e['file']})")
        text = "\n".join(lines) + "\n"
        (RESULTS / f"summary-{self.profile}.md").write_text(text)
        capman = self.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            with capman.global_and_fixture_disabled():
                print("\n" + text, flush=True)

    def campaign(self) -> None:
        """All targets in turns until --campaign-minutes have passed or Ctrl-C."""
        from targets import all_targets
        minutes = self.config.getoption("--campaign-minutes")
        end = self.began + minutes * 60 if minutes else float("inf")
        targets = all_targets()
        self.progress(force=True)
        try:
            while time.monotonic() < end:
                for name, fn in targets.items():
                    if time.monotonic() >= end:
                        break
                    self.run(name, fn)
                    self.progress()
        except KeyboardInterrupt:
            self.interrupted = True
