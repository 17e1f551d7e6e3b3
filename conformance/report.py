"""The conformance report printed at the end of a run: commands, captured sessions, hazards.

Tests record one entry each with :func:`record`; ``conftest.py`` prints :func:`text_report`
in the terminal summary (and writes :func:`markdown_report` next to the hazard table).  The
hazard part is the table of ``hazard_report.py``, not a copy of it.

Entry fields: ``part`` ("command" or "session"), ``target``, ``name`` (the command or the
capture), ``check`` (what was checked), ``verdict`` (``pass``, ``deviation``, ``known upstream
deviation``, ``inconclusive``), ``sections`` (spec sections a deviation breaks), ``detail``
and ``link`` (the upstream issue or advisory of a known deviation).
"""

from __future__ import annotations

import collections

PASS, DEVIATION, KNOWN, INCONCLUSIVE = "pass", "deviation", "known upstream deviation", "inconclusive"


LEGEND = """\
Verdicts: pass = what the spec demands; known upstream deviation = llama.cpp (of the release
named) does what spec/errors.md and spec/hazards.md record for it (the link says where);
deviation = the server broke the spec section named (the test failed); inconclusive = the
check could not be judged on this server (the reason is given). Details of everything that is
not a plain pass follow the tables."""


def record(config, part: str, target: str, name: str, check: str, verdict: str,
           sections=(), detail: str = "", link: str = "", summary: str = "") -> None:
    """Add one result to the run's report (``summary``: what the checks column shows when
    this is the only entry of its row)."""
    results = getattr(config, "_conformance_results", None)
    if results is None:
        results = config._conformance_results = []
    results.append({"part": part, "target": target, "name": name, "check": check,
                    "verdict": verdict, "sections": list(sections), "detail": detail,
                    "link": link, "summary": summary})


def _worst(verdicts) -> str:
    for v in (DEVIATION, INCONCLUSIVE, KNOWN):
        if v in verdicts:
            return v
    return PASS


def _grouped(results, part):
    """{(target, name): [entries]} in first-seen order."""
    out = collections.OrderedDict()
    for r in results:
        if r["part"] == part:
            out.setdefault((r["target"], r["name"]), []).append(r)
    return out


def _rows(results, part):
    rows = []
    for (target, name), entries in _grouped(results, part).items():
        verdicts = [e["verdict"] for e in entries]
        counts = collections.Counter(verdicts)
        worst = _worst(verdicts)
        sections = sorted({s for e in entries if e["verdict"] != PASS for s in e["sections"]})
        summary = (f"{counts[PASS]}/{len(entries)} pass" if len(entries) > 1
                   else entries[0].get("summary", ""))
        rows.append((target, name, worst, summary, ", ".join(sections)))
    return rows


def _table(header, rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def _details(results) -> list[str]:
    out = []
    for r in results:
        if r["verdict"] == PASS:
            continue
        where = f"{r['target']}, {r['name']}" + (f" ({r['check']})" if r["check"] else "")
        line = f"* {where}: {r['verdict']}"
        if r["sections"]:
            line += f" [{', '.join(r['sections'])}]"
        if r["link"]:
            line += f" {r['link']}"
        if r["detail"]:
            line += f"\n    {r['detail']}"
        out.append(line)
    return out


def text_report(results: list[dict], hazards: list[dict] | None = None) -> str:
    """The whole report as plain text: per command, per session, then the hazard table."""
    lines = [LEGEND, ""]
    head = ("target", "command", "verdict", "checks", "spec sections broken")
    cmd_rows = _rows(results, "command")
    if cmd_rows:
        lines += ["Commands (conformance/test_commands.py, spec/commands.md):", ""]
        lines += _table(head, cmd_rows) + [""]
    ses_rows = _rows(results, "session")
    if ses_rows:
        lines += ["Captured sessions replayed (conformance/test_replay.py, spec/replay.md):", ""]
        lines += _table(("target", "capture", "verdict", "compared", head[4]), ses_rows) + [""]
    if hazards:
        from hazard_report import text_table
        lines += ["Hazard probes (conformance/test_hazards.py, spec/hazards.md):", ""]
        lines += text_table(hazards).splitlines() + [""]
    details = _details(results)
    if details:
        lines += ["Everything that is not a plain pass:", ""] + details + [""]
    verdicts = collections.Counter(r["verdict"] for r in results)
    if results:
        lines.append("Commands and sessions: "
                     + ", ".join(f"{n} {v}" for v, n in verdicts.most_common()))
    if hazards:
        hv = collections.Counter(h["verdict"] for h in hazards)
        lines.append("Hazard probes: " + ", ".join(f"{n} {v}" for v, n in hv.most_common()))
    return "\n".join(lines).rstrip() + "\n"


def markdown_report(results: list[dict]) -> str:
    """Commands and sessions as Markdown tables (the hazard table has its own file)."""
    out = []
    for part, title, col, checks in (("command", "Commands", "Command", "Checks"),
                                     ("session", "Captured sessions", "Capture", "Compared")):
        rows = _rows(results, part)
        if not rows:
            continue
        out += [f"## {title}", "", f"| Target | {col} | Verdict | {checks} | Spec sections broken |",
                "|---|---|---|---|---|"]
        out += [f"| {t} | {n} | {v} | {c} | {s} |" for t, n, v, c, s in rows] + [""]
    details = _details(results)
    if details:
        out += ["## Not a plain pass", ""] + details + [""]
    return "\n".join(out)
