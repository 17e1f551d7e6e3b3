"""The conformance suite judges every older served protocol version (issue 7): one run of
``pytest conformance/ --protocol X.Y.Z`` per version, against refimpl-server speaking X.Y.Z
and the real ggml-rpc-server of the llama.cpp release that carries it, each replaying the
captures recorded from that release (``conformance/captures/*-vX.Y.Z.cap.gz``).

The default ``pytest`` run already covers 7.0.0 (``conformance/`` is in ``testpaths``).  Each
run here writes its report to ``build/conformance-report-vX.Y.Z.md``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from refimpl.protocol.profiles import LATEST, SERVED

pytestmark = [pytest.mark.peer, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
OLDER = [p for p in SERVED.values() if p is not LATEST]


def _conformance(*args, timeout=600):
    """``pytest conformance/ ARGS`` in a subprocess (no report file unless ARGS name one)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pytest", "conformance", "-q",
                           "-p", "no:cacheprovider", "--conformance-report", "", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("profile", OLDER, ids=[p.name for p in OLDER])
def test_conformance_suite_passes_for_version(profile):
    report = ROOT / "build" / f"conformance-report-v{profile.name}.md"
    captures = sorted((ROOT / "conformance" / "captures").glob(f"*-v{profile.name}.cap*"))
    if profile.releases:
        assert len(captures) >= 2, f"no captures of {profile.name} committed"
    proc = _conformance("--protocol", profile.name, "--conformance-report", str(report),
                        timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = int(re.search(r"(\d+) passed", out).group(1))
    text = report.read_text()
    assert f"refimpl --protocol {profile.name}" in text
    servers = 1
    if profile.releases:
        # Both servers were judged, and every capture of the version was replayed against both.
        assert f"llama.cpp {profile.peer_release}" in text
        servers = 2
    else:
        # No release carries it: refimpl alone (spec/versions.md), with the captures recorded
        # from the ggml repository's own client and server of that version, if any.
        assert "llama.cpp" not in text
    assert passed > 50 * servers, out[-3000:]
    for cap in captures:
        name = cap.name.split(".cap")[0]
        rows = [line for line in text.splitlines() if f"| {name} |" in line]
        assert len(rows) == servers and all(f"| {name} | pass |" in r for r in rows), (name, rows)


@pytest.mark.parametrize("release", [p.peer_release for p in SERVED.values() if p.peer_release])
def test_version_detection_against_real_servers(release):
    """``--server`` learns the version from llama.cpp's own HELLO replies (a 3.x server closes
    on the 24-byte HELLO, a 4.x and later one on the empty HELLO)."""
    sys.path.insert(0, str(ROOT / "conformance"))
    from support import detect_version
    from tools.peers import ensure_peers
    from tools.processes import ServerProcess
    want = next(p for p in SERVED.values() if release in p.releases).version
    with ServerProcess("llama.cpp", bin_dir=ensure_peers(release)) as srv:
        assert detect_version(("127.0.0.1", srv.port)) == want
        assert srv.alive()


@pytest.mark.parametrize("version", ["3.6.1", "4.0.2"])
def test_suite_judges_a_running_server_in_its_version(version):
    from tools.processes import ServerProcess
    with ServerProcess("refimpl", args=["--protocol", version, "-m", "1024"]) as srv:
        proc = _conformance("--server", srv.endpoint)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        # only the captures of that version were replayed, and the commands judged
        assert f"-v{version}" in out and "completion-q8_0-fa-on " not in out, out[-4000:]
        assert f"external {srv.endpoint} ({version})" in out
        other = "4.0.2" if version == "3.6.1" else "3.6.1"
        wrong = _conformance("--server", srv.endpoint, "--protocol", other)
        assert wrong.returncode == 4, wrong.stdout + wrong.stderr   # pytest's usage error
        assert f"--protocol {other}, but the server speaks {version}" in wrong.stderr


def test_op_table_of_a_3_0_0_capture_matters():
    """The 3.0.0 capture was recorded from a ggml build of 90 ops (spec/versions.md, "Before
    3.6.1"): refimpl replays it exactly with that op table (its default for 3.0.0), and a server
    told the 95-op table of later 3.0.0 builds misreads its graphs."""
    sys.path.insert(0, str(ROOT / "conformance"))
    from replay import load, Replayer
    from tools.processes import ServerProcess
    session = load(ROOT / "conformance" / "captures" / "backend-ops-v3.0.0.cap.gz")
    results = {}
    for count in ("90", "95"):
        with ServerProcess("refimpl", args=["--protocol", "3.0.0", "--op-count", count,
                                            "-m", "1024"]) as srv:
            results[count] = Replayer(session, ("127.0.0.1", srv.port), cache="none").run()
    assert results["90"].ok and results["90"].computed_compared > 10, results["90"].summary()
    assert not results["95"].ok, results["95"].summary()
