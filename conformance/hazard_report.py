"""Tables of hazard-probe results: plain text for the terminal, Markdown for docs/hazards.md."""

from __future__ import annotations

import json
import re
import sys


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def text_table(results: list[dict]) -> str:
    """One line per probe and target: id, title, outcome, expected, verdict."""
    rows = [("target", "probe", "title", "outcome", "expected", "verdict")]
    for r in results:
        rows.append((r["target"], r["id"], _short(r["title"], 58), r["outcome"], r["expected"],
                     r["verdict"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    details = [f"{r['target']} {r['id']}: {r['detail']}" for r in results
               if r["outcome"] != "safe"]
    return "\n".join(lines + ([""] + details if details else []))


def _cell(r: dict) -> str:
    if r["outcome"] == "safe":
        return "safe"
    m = re.search(r"killed by (SIG[A-Z]+)", r["detail"])
    return f"**{r['outcome']}**" + (f" ({m.group(1)})" if m else "")


def _link(source: str) -> str:
    # catalogue entries are written relative to the repository; tables live one level down
    return "../" + source if source.startswith("spec/") else source


def markdown_table(results: list[dict]) -> str:
    """Probes as rows, one outcome column per target, then the details of unsafe outcomes."""
    targets = list(dict.fromkeys(r["target"] for r in results))
    by_probe: dict[str, dict] = {}
    for r in results:
        by_probe.setdefault(r["id"], {"r": r})[r["target"]] = r
    head = "| Probe | Hazard | Source | " + " | ".join(targets) + " |"
    sep = "|---|---|---|" + "---|" * len(targets)
    lines = [head, sep]
    for pid, row in by_probe.items():
        r = row["r"]
        cells = []
        for t in targets:
            x = row.get(t)
            cells.append("—" if x is None else _cell(x))
        lines.append(f"| [{pid}](../spec/hazards.md#{pid.lower().rstrip('icdmrw') or pid.lower()}) "
                     f"| {r['title']} | [source]({_link(r['source'])}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Details of the unsafe outcomes:")
    lines.append("")
    for r in results:
        if r["outcome"] != "safe":
            lines.append(f"* {r['target']}, {r['id']}: {r['outcome']}: {r['detail']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # python conformance/hazard_report.py build/hazard-results.json  ->  the Markdown table
    with open(sys.argv[1]) as f:
        print(markdown_table(json.load(f)), end="")
