"""Regenerate the committed captures: real llama.cpp traffic, recorded with refimpl-capture.

    python -m conformance.captures.make_captures                 # all 7.0.0 ones, into this folder
    python -m conformance.captures.make_captures --only cache-miss-hit --out /tmp/caps
    python -m conformance.captures.make_captures --release 0.3.34  # the 4.0.2 ones
    python -m conformance.captures.make_captures --older          # those of every older release

Every capture is taken from llama.cpp's own programs talking to llama.cpp's own
``ggml-rpc-server``, both built from the ``llama-cpp-python`` 0.3.36 sdist
(``tools.peers``), with the ``refimpl-capture`` proxy (spec/captures.md) in between.
The models are tiny random llama models written on the spot (``tools.models``), so
each capture is small; nothing of the models is needed later, because a capture holds every
byte that went over the wire.  ``MANIFEST.json`` records what was run for each file; the
README in this folder explains it.

Older protocol versions (spec/versions.md) get two sessions each, Q8_0 with flash attention
off and on, from the release of :data:`OLDER_RELEASES` that carries the version; their names
end in ``-v<protocol>`` (``completion-q8_0-fa-on-v4.0.2``).  Only their RPC server and
``llama-completion`` are built; the Q8_0 model is quantised with 0.3.36's ``llama-quantize``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from refimpl.protocol.profiles import SERVED
from tools.models import LlamaSpec, quantize, write_llama_gguf
from tools.peers import DEFAULT_VERSION, ensure_peers, older_releases, peer_env
from tools.processes import ServerProcess, free_port

HERE = Path(__file__).resolve().parent

PROMPT = "the cat sat"
N_PREDICT = 3
CTX = 64

#: The model every llama-completion capture uses (F32, or quantised from it).
SPEC = LlamaSpec(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, seed=7)
#: For the cache capture: one weight above the 10 MiB hash threshold (spec/hash-cache.md).
#: Its rows repeat with a short period, so the gzip'd capture stays small.
CACHE_SPEC = LlamaSpec(n_embd=64, n_layer=1, n_head=4, n_head_kv=2, n_ff=41 * 1024, seed=8)
#: For the two-server split: four layers, so each server gets some.
SPLIT_SPEC = LlamaSpec(n_embd=64, n_layer=4, n_head=4, n_head_kv=2, n_ff=128, seed=9)

#: test-backend-ops cases recorded (full case strings, as ``-o`` takes them).
BACKEND_OPS_CASES = [
    "ADD(type=f32,ne=[10,5,4,3],nr=[1,1,1,1],nf=1,perm1=0,src_overlap=0)",
    "ADD(type=f32,ne=[10,5,4,3],nr=[2,2,2,2],nf=1,perm1=0,src_overlap=0)",
    "ADD(type=f16,ne=[10,5,4,3],nr=[1,2,1,1],nf=1,perm1=0,src_overlap=0)",
    "MUL_MAT(type_a=f32,type_b=f32,m=16,n=1,k=256,bs=[1,1],nr=[1,1],per=[0,1,2,3],k_v=0,o=1,"
    "src_overlap=0,m_v=0,pad=0)",
    "MUL_MAT(type_a=f16,type_b=f32,m=16,n=3,k=256,bs=[1,1],nr=[1,1],per=[0,1,2,3],k_v=0,o=1,"
    "src_overlap=0,m_v=0,pad=0)",
    "MUL_MAT(type_a=q8_0,type_b=f32,m=16,n=8,k=256,bs=[1,1],nr=[1,1],per=[0,1,2,3],k_v=0,o=1,"
    "src_overlap=0,m_v=0,pad=0)",
]


class Recorder:
    """A ``refimpl-capture`` process (the CLI, as a user runs it) in front of ``upstream``."""

    def __init__(self, upstream: str, out: Path, description: str):
        self.port = free_port()
        self.out = out
        self.cmd = [sys.executable, "-m", "refimpl.capture.cli", "--listen",
                    f"127.0.0.1:{self.port}", "--upstream", upstream, "--out", str(out),
                    "--description", description]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, start_new_session=True)
        line = self.proc.stdout.readline()  # "recording ..." once it listens
        if not line.startswith("recording"):
            self.proc.kill()
            raise RuntimeError(f"refimpl-capture did not start: {line!r}")

    @property
    def endpoint(self) -> str:
        """Where clients connect."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Let the last close be recorded, then stop the proxy (SIGTERM: it finishes the file)."""
        time.sleep(0.5)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def _run(cmd: list[str], env: dict, log: list) -> None:
    log.append(shlex.join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def completion_cmd(bin_dir: Path, model: Path, rpc: str, flash_attn: bool) -> list[str]:
    """The llama-completion command line every session capture runs."""
    return [str(bin_dir / "llama-completion"), "-m", str(model), "-p", PROMPT,
            "-n", str(N_PREDICT), "--temp", "0", "--ignore-eos", "-no-cnv", "-t", "1",
            "-c", str(CTX), "--seed", "1", "-fa", "on" if flash_attn else "off",
            "-ngl", "99", "--rpc", rpc]


def write_cache_model(path: Path) -> Path:
    """CACHE_SPEC with its three FFN weights (64 x 41984 F32, 10.25 MiB each, above the hash
    threshold) made of one 64 x 64 block repeated, so that a capture holding them compresses
    to almost nothing (gzip only sees repeats within 32 KiB)."""
    import gguf
    write_llama_gguf(path, CACHE_SPEC)
    reader = gguf.GGUFReader(str(path), "r+")
    e = CACHE_SPEC.n_embd
    for t in reader.tensors:
        if t.name.startswith("blk.0.ffn_") and t.name != "blk.0.ffn_norm.weight":
            data = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data
            rows, cols = data.shape
            block = np.array(data[:e, :e])
            data[:] = np.tile(block, (rows // e, cols // e))
    reader.data.flush()
    return path


#: The captures taken of each older version.
OLDER_JOBS = ("completion-q8_0-fa-off", "completion-q8_0-fa-on")


def protocol_of(release: str) -> str:
    """The protocol version a release's llama.cpp speaks (spec/versions.md)."""
    for p in SERVED.values():
        if release in p.releases:
            return p.name
    raise KeyError(f"llama-cpp-python {release} carries no served protocol version")


#: One release per older served protocol version (``Profile.peer_release``) -> that version.
OLDER_RELEASES = {r: protocol_of(r) for r in older_releases()}


class Maker:
    """Builds models once and makes each capture."""

    def __init__(self, out: Path, work: Path, release: str = DEFAULT_VERSION,
                 bin_dir: Path | None = None):
        self.out = out
        self.work = work
        self.release = release
        self.bin = bin_dir or ensure_peers(release)
        #: llama-quantize comes from the newest release (older builds have only server and client).
        self.tools_bin = None if bin_dir else ensure_peers()
        self.env = peer_env(self.bin)
        self._models: dict = {}

    def model(self, kind: str) -> Path:
        """The model of a kind: f32, q8_0, cache, split."""
        if kind not in self._models:
            if kind == "cache":
                path = write_cache_model(self.work / "cache.gguf")
            elif kind == "split":
                path = write_llama_gguf(self.work / "split.gguf", SPLIT_SPEC)
            else:
                path = write_llama_gguf(self.work / "f32.gguf", SPEC)
                if kind != "f32":
                    path = quantize(path, self.work / f"{kind}.gguf", kind, self.tools_bin)
            self._models[kind] = path
        return self._models[kind]

    def server(self, *args, cache_dir=None) -> ServerProcess:
        """llama.cpp's ggml-rpc-server on a free port."""
        return ServerProcess("llama.cpp", bin_dir=self.bin, args=list(args), cache_dir=cache_dir)

    # -- the captures --------------------------------------------------------------------------
    def completion(self, name: str, kind: str, flash_attn: bool) -> dict:
        """One llama-completion session through one server."""
        out = self.out / f"{name}.cap.gz"
        cmds: list = []
        desc = (f"llama-completion, {kind.upper()} model, flash attention "
                f"{'on' if flash_attn else 'off'}, all layers on one ggml-rpc-server")
        with self.server() as srv:
            rec = Recorder(srv.endpoint, out, desc)
            try:
                _run(completion_cmd(self.bin, self.model(kind), rec.endpoint, flash_attn),
                     self.env, cmds)
            finally:
                rec.stop()
        return {"files": [out.name], "description": desc, "commands": cmds,
                "server": "ggml-rpc-server -p PORT", "model": _model_info(kind)}

    def cache(self, name: str) -> dict:
        """Two runs against one server started with -c: the first misses, the second hits."""
        out = self.out / f"{name}.cap.gz"
        cmds: list = []
        desc = ("llama-completion run twice against one ggml-rpc-server -c with an empty cache: "
                "connections of the first run miss the cache (SET_TENSOR_HASH 0, then SET_TENSOR "
                "with cache_flag 1), those of the second run hit (SET_TENSOR_HASH 1)")
        with tempfile.TemporaryDirectory(prefix="capture-cache-") as cache_dir:
            with self.server("-c", cache_dir=Path(cache_dir)) as srv:
                rec = Recorder(srv.endpoint, out, desc)
                try:
                    for _ in range(2):
                        _run(completion_cmd(self.bin, self.model("cache"), rec.endpoint, False),
                             self.env, cmds)
                finally:
                    rec.stop()
        return {"files": [out.name], "description": desc, "commands": cmds,
                "server": "LLAMA_CACHE=<empty dir> ggml-rpc-server -p PORT -c",
                "model": _model_info("cache")}

    def split(self, name: str) -> dict:
        """One llama-completion session with --rpc a,b: two servers, one proxy each."""
        outs = [self.out / f"{name}.{side}.cap.gz" for side in ("a", "b")]
        cmds: list = []
        desc = ("llama-completion with --rpc A,B (two ggml-rpc-servers, layers split between "
                "them); this file is side {side}")
        with self.server() as a, self.server() as b:
            recs = [Recorder(s.endpoint, o, desc.format(side=side))
                    for s, o, side in ((a, outs[0], "A"), (b, outs[1], "B"))]
            try:
                _run(completion_cmd(self.bin, self.model("split"),
                                    ",".join(r.endpoint for r in recs), False), self.env, cmds)
            finally:
                for r in recs:
                    r.stop()
        return {"files": [o.name for o in outs], "description": desc.format(side="A or B"),
                "commands": cmds, "server": "ggml-rpc-server -p PORT (twice)",
                "model": _model_info("split")}

    def backend_ops(self, name: str) -> dict:
        """A few test-backend-ops cases, with the RPC backend registered by the preload shim."""
        return self._backend_ops(name, BACKEND_OPS_CASES,
                                 "test-backend-ops test -b RPC0 on a few ADD and MUL_MAT cases",
                                 "ggml-rpc-server -p PORT")

    def backend_ops_history(self, name: str) -> dict:
        """A version no release carries (ggml history peers): the first cases of the ops a
        llama model uses, as this ggml's own test-backend-ops lists them, through its own RPC
        server (tools/ggml_history_peers.py)."""
        from tools.backend_ops import list_cases
        cases = [c for op, pick in HISTORY_OPS.items() for c in _pick(list_cases(self.bin, op), pick)]
        return self._backend_ops(
            name, cases, f"ggml's test-backend-ops test -b RPC0 on {len(cases)} cases of "
                         f"{', '.join(HISTORY_OPS)}, against ggml's own RPC server",
            "ggml-rpc-server -p PORT (tools/ggml_rpc_launcher.c over the library's "
            "ggml_backend_rpc_start_server)")

    def _backend_ops(self, name: str, cases: list[str], desc: str, server: str) -> dict:
        """Record test-backend-ops running ``cases`` on RPC0 (the preload shim's device)."""
        from tools.backend_ops import build_shim
        out = self.out / f"{name}.cap.gz"
        cmds: list = []
        env = dict(self.env)
        with self.server() as srv:
            rec = Recorder(srv.endpoint, out, desc)
            env.update(LD_PRELOAD=str(build_shim(self.bin)), REFIMPL_RPC_ENDPOINT=rec.endpoint,
                       GGML_NO_BACKTRACE="1")
            try:
                _run([str(self.bin / "test-backend-ops"), "test", "-b", "RPC0", "-o",
                      ",".join(cases)], env, cmds)
            finally:
                rec.stop()
        return {"files": [out.name], "description": desc, "commands": cmds, "server": server,
                "environment": "LD_PRELOAD=rpc_preload.so REFIMPL_RPC_ENDPOINT=PROXY "
                               "(tools/rpc_preload.c)"}


#: For the versions no release carries: op -> which of test-backend-ops' cases to record,
#: each given by substrings it must all contain (the first case that does is taken).
HISTORY_OPS = {
    "MUL_MAT": [(f"type_a={t},type_b=f32,m=16,n=1,k=256,bs=[1,1]",) for t in ("f32", "f16", "q8_0")],
    "RMS_NORM": [("type=f32,ne=[64,5,4,3]",)],
    "SOFT_MAX": [("type=f32,ne=[16,16,1,1],mask=0",), ("type=f32,ne=[16,16,1,1],mask=1",)],
    "ROPE": [("type=f32,ne_a=[64,1,2,1],n_dims=64,mode=2",)],
    "GET_ROWS": [("type=f32,n=256,m=5,r=4,be1=1,be2=1",)],
    "CPY": [("type_src=f32,type_dst=f16,", "=[256,2,3,4],permute_src=[0,2,1,3]")],
    "CONT": [("type=f32",)],
    "SILU": [("type=f32",)],
    "SWIGLU": [("type=f32",)],
    "FLASH_ATTN_EXT": [("hsk=64,hsv=64,nh=4,", "kv=113,nb=1,", "=f16,permute=[0,1,2,3]")],
}


def _pick(cases: list[str], wanted: list[tuple]) -> list[str]:
    out = []
    for parts in wanted:
        hit = next((c for c in cases if all(x in c for x in parts) and c not in out), None)
        if hit is None:
            raise RuntimeError(f"no case contains {parts!r} (first cases: {cases[:3]})")
        out.append(hit)
    return out


def _model_info(kind: str) -> str:
    spec = {"cache": CACHE_SPEC, "split": SPLIT_SPEC}.get(kind, SPEC)
    what = {"cache": "F32, the three FFN weights made of one 64 x 64 block repeated",
            "split": "F32", "f32": "F32", "q8_0": "Q8_0 (llama-quantize of the F32 model)"}[kind]
    return f"{what}; {spec}"


def _cpu_model() -> str:
    # The peers are built with -march=native: results of compute depend on the CPU's SIMD.
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


#: name -> how to make it
JOBS = {
    "completion-f32-fa-off": lambda mk, n: mk.completion(n, "f32", False),
    "completion-f32-fa-on": lambda mk, n: mk.completion(n, "f32", True),
    "completion-q8_0-fa-off": lambda mk, n: mk.completion(n, "q8_0", False),
    "completion-q8_0-fa-on": lambda mk, n: mk.completion(n, "q8_0", True),
    "cache-miss-hit": lambda mk, n: mk.cache(n),
    "split-2srv": lambda mk, n: mk.split(n),
    "backend-ops": lambda mk, n: mk.backend_ops(n),
}


def main(argv=None) -> int:
    """CLI: make the captures named by --only (default: all) and update MANIFEST.json."""
    p = argparse.ArgumentParser(prog="python -m conformance.captures.make_captures",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE, help="folder to write (default: %(default)s)")
    p.add_argument("--only", action="append", choices=list(JOBS), help="make only these")
    p.add_argument("--release", action="append", default=None,
                   help=f"llama-cpp-python release of the peers (default {DEFAULT_VERSION}); "
                        f"older ones make {', '.join(OLDER_JOBS)} (or --only) named -v<protocol>")
    p.add_argument("--older", action="store_true",
                   help="every release of OLDER_RELEASES: " + ", ".join(OLDER_RELEASES))
    p.add_argument("--ggml-history", type=Path, metavar="DIR",
                   help="a clone of github.com/ggml-org/ggml: record backend-ops-v<protocol> of "
                        "every version no release carries (or of --protocol ones) instead")
    p.add_argument("--protocol", action="append", default=None,
                   help="with --ggml-history: only these versions")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if args.ggml_history:
        from tools.ggml_history_peers import PEER_TABLES
        for version in args.protocol or list(PEER_TABLES):
            _make_history(args, version, manifest)
            manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")
        return 0
    releases = (list(OLDER_RELEASES) if args.older else []) + (args.release or [])
    for release in releases or [DEFAULT_VERSION]:
        _make(args, release, manifest)
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")
    return 0


def _make_history(args, version: str, manifest: dict) -> None:
    from tools.ggml_history_peers import commit_of, ensure_ggml_peer
    bin_dir = ensure_ggml_peer(args.ggml_history, version)
    name = f"backend-ops-v{version}"
    with tempfile.TemporaryDirectory(prefix="make-captures-") as work:
        maker = Maker(args.out, Path(work), bin_dir=bin_dir)
        print(f"capturing {name} ...", flush=True)
        entry = maker.backend_ops_history(name)
    entry["commands"] = [c.replace(str(bin_dir) + "/", "") for c in entry["commands"]]
    _finish(args, name, entry, f"ggml {commit_of(version)} from github.com/ggml-org/ggml "
                               f"(protocol {version}; no llama-cpp-python release carries it)",
            version, manifest)


def _finish(args, name: str, entry: dict, peer: str, protocol: str, manifest: dict) -> None:
    entry.update(peer=peer, protocol=protocol, cpu=_cpu_model(),
                 date=datetime.date.today().isoformat(),
                 sizes={f: (args.out / f).stat().st_size for f in entry["files"]},
                 sha256={f: hashlib.sha256((args.out / f).read_bytes()).hexdigest()
                         for f in entry["files"]})
    manifest[name] = entry
    print(f"  {', '.join(f'{f} ({s} bytes)' for f, s in entry['sizes'].items())}", flush=True)


def _make(args, release: str, manifest: dict) -> None:
    protocol = protocol_of(release)
    newest = release == DEFAULT_VERSION
    jobs = args.only or (list(JOBS) if newest else list(OLDER_JOBS))
    with tempfile.TemporaryDirectory(prefix="make-captures-") as work:
        maker = Maker(args.out, Path(work), release)
        for job in jobs:
            name = job if newest else f"{job}-v{protocol}"
            print(f"capturing {name} ...", flush=True)
            entry = JOBS[job](maker, name)
            for cmd_i, cmd in enumerate(entry["commands"]):
                entry["commands"][cmd_i] = cmd.replace(str(maker.bin) + "/", "").replace(
                    work + "/", "")
            _finish(args, name, entry,
                    f"llama.cpp from llama-cpp-python {release} (protocol {protocol})", protocol,
                    manifest)


if __name__ == "__main__":
    sys.exit(main())
