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


@pytest.mark.parametrize("profile", OLDER, ids=[p.name for p in OLDER])
def test_conformance_suite_passes_for_version(profile):
    report = ROOT / "build" / f"conformance-report-v{profile.name}.md"
    captures = sorted((ROOT / "conformance" / "captures").glob(f"*-v{profile.name}.cap*"))
    assert len(captures) >= 2, f"no captures of {profile.name} committed"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "conformance", "--protocol", profile.name, "-q",
         "-p", "no:cacheprovider", "--conformance-report", str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = int(re.search(r"(\d+) passed", out).group(1))
    assert passed > 100, out[-3000:]
    text = report.read_text()
    release = profile.releases[-1]
    # Both servers were judged, and every capture of the version was replayed against both.
    assert f"llama.cpp {release}" in text and f"refimpl --protocol {profile.name}" in text
    for cap in captures:
        name = cap.name.split(".cap")[0]
        rows = [line for line in text.splitlines() if f"| {name} |" in line]
        assert len(rows) == 2 and all(f"| {name} | pass |" in r for r in rows), (name, rows)
