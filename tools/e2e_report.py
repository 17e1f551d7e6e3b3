"""Render the end-to-end measurements as the tables of docs/e2e.md.

    REFIMPL_E2E_REPORT=e2e.json pytest tests/e2e/test_llama_models.py
    python -m tools.e2e_report e2e.json > tables.md

The first table is the numerics contract's (spec/numerics.md, "End to end"): per model, step
mode and flash-attention setting, the mean KLD, same-top-token rate and perplexity ratio of
llama.cpp's alternatives (:data:`ALTERNATIVES`) and of refimpl-server against the host's native
CPU run, and the verdict (over the alternatives a report holds).  The second is greedy text
agreement.  A header names the host's CPU and its SIMD flags, since the alternatives' numbers
depend on them.
"""

from __future__ import annotations

import json
import sys

from .contract import KldResult, kld_verdict

_FLAGS = ("avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512dq", "avx512vl",
          "avx512_vnni", "avx512vbmi", "avx512_bf16", "avx_vnni", "amx_tile")


def host_line() -> str:
    """``CPU model; flags`` of this host (from /proc/cpuinfo)."""
    model, flags = "unknown CPU", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [f for f in _FLAGS if f in have]
                    break
    except OSError:
        pass
    avx512 = [f for f in flags if f.startswith("avx512")]
    return (f"{model}; SIMD: {' '.join(flags) or 'none listed'}"
            f" ({'AVX-512: ' + ', '.join(avx512) if avx512 else 'no AVX-512'})")


#: The alternatives' keys in a report and their columns, in the tables' order.
ALTERNATIVES = {"portable": "llama.cpp portable", "no-repack": "llama.cpp no-repack",
                "sse42": "llama.cpp sse42"}
AGREEMENT = ("llama.cpp rpc-server", "llama.cpp portable", "llama.cpp sse42")


def _fmt(r: dict | None) -> str:
    if r is None:
        return "–"
    kld = r["mean_kld"] if r["mean_kld"] > 0 else 0.0
    return f"{kld:.1e} / {r['same_top']:.1%} / {r['ppl_ratio']:.5f}"


def render(report: dict) -> str:
    """Markdown for one report written by tests/e2e/test_llama_models.py."""
    out = [f"Host: {host_line()}", "",
           "Each cell: mean KLD (nats) / same top token / PPL ratio, against the native CPU run.",
           "",
           "| Model | Step | FA | " + " | ".join(ALTERNATIVES.values()) + " | refimpl | within |",
           "|---|---|---|" + "---|" * len(ALTERNATIVES) + "---|---|"]
    for key, runs in report.get("kld", {}).items():
        model, *steps, fa = key.split("/")  # the KV-cache cases add a part: step/kK-vV
        step = ", ".join(steps)
        alts = {k: KldResult(**runs[k]) for k in ALTERNATIVES if k in runs}
        ok = not kld_verdict(KldResult(**runs["refimpl"]), alts)
        out.append(f"| {model} | {step} | {'on' if fa == 'fa' else 'off'} | "
                   + "".join(f"{_fmt(runs.get(k))} | " for k in ALTERNATIVES)
                   + f"{_fmt(runs['refimpl'])} | {'yes' if ok else '**no**'} |")
    if report.get("agreement"):
        out += ["", "| Model | FA | refimpl | " + " | ".join(AGREEMENT) + " |",
                "|---|---|---:|" + "---:|" * len(AGREEMENT)]
        for key, a in report["agreement"].items():
            model, fa = key.split("/")
            out.append(f"| {model} | {'on' if fa == 'fa' else 'off'} | {a['refimpl']:.1%} | "
                       + " | ".join(f"{a[k]:.1%}" if k in a else "–" for k in AGREEMENT) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    """CLI: print the tables of the report file named on the command line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tools.e2e_report REPORT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(render(json.load(f)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
