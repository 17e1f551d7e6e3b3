"""Run llama.cpp's own ``test-backend-ops`` against a ggml RPC server, case by case.

    python -m tools.backend_ops -o MUL_MAT,GET_ROWS [--server HOST:PORT] [--json F]

``test-backend-ops`` compares every op case computed by a backend with ggml's CPU backend.
Here the backend is a ggml RPC server, registered in the tool's process by a small preload
shim (``rpc_preload.c``) that calls ``ggml_backend_rpc_add_server``.  Without ``--server`` a
refimpl-server is started on a free port.

llama.cpp's RPC client claims to support every op, and aborts its process when the server
closes the connection, which is how a server refuses a graph it does not implement.  The
harness therefore lists the cases first, runs them, and whenever the tool dies on a case it
records that case as *refused* and starts again with the cases not run yet.  Results per
case: ``ok``, ``fail`` (a wrong result, the only real defect), ``refused`` (the server closed
the connection) and ``unsupported`` (skipped by the tool).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .peers import cache_root, ensure_peers, peer_env
from .processes import ServerProcess

_LINE = re.compile(r"^  ([A-Z0-9_]+)\((.*)\): (.*)$")
_MAX_ARG = 100_000  # stay below Linux's 128 KiB limit on one argument


def build_shim(bin_dir: Path) -> Path:
    """Compile the preload shim (cached by the hash of its source and the peer dir)."""
    src = Path(__file__).with_name("rpc_preload.c")
    key = hashlib.sha256(src.read_bytes() + str(bin_dir).encode()).hexdigest()[:12]
    out = cache_root() / f"rpc_preload-{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.so")
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(tmp), str(src),
                        f"-L{bin_dir}", "-lggml", "-lggml-rpc", "-lggml-base", f"-Wl,-rpath,{bin_dir}"],
                       check=True)
        tmp.replace(out)
    return out


def list_cases(bin_dir: Path, ops: str, supported_only: bool = False) -> list[str]:
    """Every case string ``OP(params)`` that test-backend-ops has for the op filter (with
    ``supported_only``, only those ggml's CPU backend can run)."""
    proc = subprocess.run([str(bin_dir / "test-backend-ops"), "support", "-b", "CPU", "-o", ops,
                           "--output", "csv"], capture_output=True, text=True, env=peer_env(bin_dir))
    cases = []
    for line in proc.stdout.splitlines():
        if line.startswith('"CPU",'):
            fields = next(iter(__import__("csv").reader([line])))
            if supported_only and fields[5] != "yes":
                continue
            cases.append(f"{fields[1]}({fields[2]})")
    if not cases:
        raise RuntimeError(f"test-backend-ops lists no cases for '{ops}':\n{proc.stderr[-2000:]}")
    return cases


@dataclass
class Report:
    """Outcome of every case."""

    results: dict = field(default_factory=dict)  # case -> ok | fail | refused | unsupported
    restarts: int = 0

    def by_op(self) -> dict:
        """{op: Counter of outcomes}."""
        out: dict = collections.defaultdict(collections.Counter)
        for case, outcome in self.results.items():
            out[case.split("(", 1)[0]][outcome] += 1
        return dict(out)

    def failures(self) -> list[str]:
        """Cases with a wrong result."""
        return [c for c, r in self.results.items() if r == "fail"]

    def table(self) -> str:
        """Markdown table: op, cases run, passed, failed, refused, unsupported."""
        rows = ["| Op | Cases | Passed | Failed | Refused | Not supported |",
                "|---|---:|---:|---:|---:|---:|"]
        for op, c in sorted(self.by_op().items()):
            rows.append(f"| {op} | {sum(c.values())} | {c['ok']} | {c['fail']} | {c['refused']} "
                        f"| {c['unsupported']} |")
        return "\n".join(rows)


def _chunks(cases: list[str]) -> list[str]:
    out, cur, size = [], [], 0
    for c in cases:
        if cur and size + len(c) + 1 > _MAX_ARG:
            out.append(",".join(cur))
            cur, size = [], 0
        cur.append(c)
        size += len(c) + 1
    if cur:
        out.append(",".join(cur))
    return out


def run_cases(bin_dir: Path, endpoint: str, cases: list[str], *, log=None,
              timeout: float = 3600) -> Report:
    """Run ``cases`` through test-backend-ops against the server at ``endpoint``."""
    shim = build_shim(bin_dir)
    env = peer_env(bin_dir)
    env.update(LD_PRELOAD=str(shim), REFIMPL_RPC_ENDPOINT=endpoint, GGML_NO_BACKTRACE="1")
    report = Report()
    pending = list(cases)
    wanted = set(cases)
    while pending:
        filters = _chunks(pending)
        for flt in filters:
            proc = subprocess.Popen([str(bin_dir / "test-backend-ops"), "test", "-b", "RPC0",
                                     "-o", flt], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=env, bufsize=1)
            for line in proc.stdout:
                if log:
                    log.write(line)
                m = _LINE.match(line.rstrip("\n"))
                if not m:
                    continue
                case = f"{m.group(1)}({m.group(2)})"
                if case not in wanted:
                    continue
                tail = m.group(3)
                if "not supported" in tail:
                    report.results[case] = "unsupported"
                elif tail.rstrip().endswith("OK") or "\033[1;32mOK" in tail:
                    report.results[case] = "ok"
                elif "FAIL" in tail:
                    report.results[case] = "fail"
            proc.wait(timeout=timeout)
            if proc.returncode != 0:
                # The tool died.  Cases run in list order and each prints its verdict when it
                # ends, so the first case without a verdict is the one the server refused.
                unfinished = [c for c in pending if c not in report.results]
                if not unfinished:
                    raise RuntimeError(f"test-backend-ops exited with {proc.returncode} after "
                                       f"reporting every case")
                report.results[unfinished[0]] = "refused"
                report.restarts += 1
                break
        pending = [c for c in pending if c not in report.results]
    return report


def main(argv=None) -> int:
    """CLI: run test-backend-ops cases against refimpl-server (or --server) and summarise."""
    p = argparse.ArgumentParser(prog="python -m tools.backend_ops",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--ops", required=True, help="op filter as test-backend-ops takes it")
    p.add_argument("--server", help="HOST:PORT of a running server (default: start refimpl)")
    p.add_argument("--json", type=Path, help="write per-case results here")
    p.add_argument("--log", type=Path, help="write the tool's output here")
    p.add_argument("--show-failures", action="store_true")
    args = p.parse_args(argv)
    bin_dir = ensure_peers()
    cases = list_cases(bin_dir, args.ops)
    log = open(args.log, "w") if args.log else None
    try:
        if args.server:
            report = run_cases(bin_dir, args.server, cases, log=log)
        else:
            with ServerProcess("refimpl", args=["--log-level", "warning"]) as srv:
                report = run_cases(bin_dir, srv.endpoint, cases, log=log)
    finally:
        if log:
            log.close()
    print(report.table())
    print(f"({report.restarts} restarts after refusals)")
    if args.show_failures:
        for c in report.failures():
            print("FAIL", c)
        for c, r in report.results.items():
            if r == "refused":
                print("REFUSED", c)
    if args.json:
        args.json.write_text(json.dumps(report.results, indent=1) + "\n")
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
