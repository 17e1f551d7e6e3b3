"""End to end: a stock llama.cpp client runs a real-sized model on refimpl-server and on
llama.cpp's own ggml-rpc-server, in the same run, and the ratio is what counts.

    python bench/llama_bench.py [--shapes 135m,1b] [--types f32,q4_0,...] [--threads 1,2]
                                [--pp 128] [--tg 32] [--reps 1] [--loads 3]
                                [--json FILE]

For every shape (bench/models.py), weight type and thread count, each server is started with
``-t N`` on a free loopback port, and llama.cpp 0.3.36's own ``llama-bench`` (``-ngl 99
--rpc``, every layer on the server, client ``-t N``) measures prompt processing (``pp``: one
graph of ``--pp`` tokens) and generation (``tg``: ``--tg`` tokens, one graph each) in tokens
per second; ``llama-completion`` reports the model's load time (the upload of every weight
through SET_TENSOR, then the first graphs), the median of ``--loads`` loads after
llama-bench's; "first load" is the first client of the freshly started server.  The ratio is
refimpl's figure over llama.cpp's (tokens/s: higher is better; load time: lower is better).
Models are random-weight GGUFs of real models' shapes, written once and kept outside the
repository.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.models import SHAPES, TYPES, model  # noqa: E402
from tools.e2e_report import host_line  # noqa: E402
from tools.llama_runs import tool_env  # noqa: E402
from tools.peers import ensure_peers  # noqa: E402
from tools.processes import ServerProcess  # noqa: E402

_LOAD = re.compile(r"load time\s*=\s*([0-9.]+) ms")


def llama_bench(peer_bin: Path, gguf: Path, endpoint: str, threads: int, pp: int, tg: int,
                reps: int, timeout: float) -> dict:
    """``llama-bench`` through the server at ``endpoint``: {"pp": tok/s, "tg": tok/s}."""
    cmd = [str(peer_bin / "llama-bench"), "-m", str(gguf), "-ngl", "99", "--rpc", endpoint,
           "-p", str(pp), "-n", str(tg), "-t", str(threads), "-r", str(reps), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(peer_bin),
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = {}
    for r in json.loads(proc.stdout):
        out["pp" if r["n_prompt"] else "tg"] = float(r["avg_ts"])
    return out


def load_time(peer_bin: Path, gguf: Path, endpoint: str, threads: int, timeout: float) -> float:
    """Seconds llama-completion reports for loading the model onto the server."""
    cmd = [str(peer_bin / "llama-completion"), "-m", str(gguf), "-ngl", "99", "--rpc", endpoint,
           "-p", "the", "-n", "1", "-t", str(threads), "-no-cnv", "--temp", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(peer_bin),
                          timeout=timeout)
    m = _LOAD.search(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"llama-completion failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return float(m.group(1)) / 1e3


def measure(peer_bin: Path, shape: str, kind: str, threads: int, a) -> dict:
    """Both servers, one after the other, for one model and thread count."""
    gguf = model(shape, kind, peer_bin)
    row = dict(shape=shape, type=kind, threads=threads)
    for server in ("llama.cpp", "refimpl"):
        args = ["-t", str(threads)] + (["--log-level", "warning"] if server == "refimpl" else [])
        _read_through(gguf)    # the file in the page cache: neither server's load reads a disk
        with ServerProcess(server, bin_dir=peer_bin if server == "llama.cpp" else None,
                           args=args) as srv:
            # The first client of a fresh server, as a user who has just started it is.
            first = load_time(peer_bin, gguf, srv.endpoint, threads, a.timeout)
            t0 = time.perf_counter()
            row[server] = llama_bench(peer_bin, gguf, srv.endpoint, threads, a.pp, a.tg, a.reps,
                                      a.timeout)
            # A load moves by a third from one run to the next on a busy machine (bench/README):
            # the median of several, each a fresh connection to the same server.
            loads = [load_time(peer_bin, gguf, srv.endpoint, threads, a.timeout)
                     for _ in range(a.loads)]
            row[server]["load_all_s"] = loads
            row[server]["load_s"] = statistics.median(loads)
            row[server]["first_load_s"] = first
            row[server]["wall_s"] = time.perf_counter() - t0
    for k in ("pp", "tg"):
        row[f"{k}_ratio"] = row["refimpl"][k] / row["llama.cpp"][k]
    row["load_ratio"] = row["refimpl"]["load_s"] / row["llama.cpp"]["load_s"]
    row["first_load_ratio"] = row["refimpl"]["first_load_s"] / row["llama.cpp"]["first_load_s"]
    return row


def _read_through(path: Path) -> None:
    """Read a file once, so that it is in the page cache."""
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def render(rows: list, pp: int, tg: int) -> str:
    """The markdown table of bench/README.md."""
    out = [f"| shape | type | -t | pp{pp} llama.cpp | pp{pp} refimpl | ratio | "
           f"tg{tg} llama.cpp | tg{tg} refimpl | ratio | load llama.cpp | load refimpl | ratio | "
           f"first load ratio |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        L, R = r["llama.cpp"], r["refimpl"]
        out.append(f"| {r['shape']} | {r['type']} | {r['threads']} | {L['pp']:.1f} | {R['pp']:.1f}"
                   f" | {r['pp_ratio']:.2f} | {L['tg']:.1f} | {R['tg']:.1f} | {r['tg_ratio']:.2f}"
                   f" | {L['load_s']:.2f} s | {R['load_s']:.2f} s | {r['load_ratio']:.2f}"
                   f" | {r['first_load_ratio']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    """CLI: measure every combination asked for, print the table, optionally save JSON."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="135m", help=f"of {', '.join(SHAPES)}")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--pp", type=int, default=128)
    p.add_argument("--tg", type=int, default=32)
    p.add_argument("--reps", type=int, default=1, help="llama-bench -r (after its warm-up)")
    p.add_argument("--loads", type=int, default=3,
                   help="model loads per server; the table gives their median")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    peer_bin = ensure_peers()
    rows = []
    print(f"# {datetime.date.today()}  {host_line()}", flush=True)
    for shape in a.shapes.split(","):
        for kind in a.types.split(","):
            for threads in (int(t) for t in a.threads.split(",")):
                rows.append(measure(peer_bin, shape, kind, threads, a))
                print(render(rows[-1:], a.pp, a.tg).splitlines()[-1], flush=True)
                if a.json:
                    a.json.write_text(json.dumps(dict(date=str(datetime.date.today()),
                                                      host=host_line(), rows=rows), indent=1))
    print(render(rows, a.pp, a.tg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
