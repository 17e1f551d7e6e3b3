"""Derive the per-version ggml op tables from the real llama.cpp sources.

Each protocol version numbers ggml's operations with the ``enum ggml_op`` of the llama.cpp
build it belongs to (spec/versions.md, "Op numbering").  This module reads that enum (and the
UNARY and GLU sub-enums carried in op parameters) from the ``llama-cpp-python`` sdists on PyPI
that vendor each version, and writes

* ``refimpl/protocol/op_tables.json``: ``{version: {"releases", "ops", "unary", "glu"}}``,
  each table a name → number mapping;
* ``spec/op-tables.md``: the same tables as markdown.

    python -m tools.op_tables            # regenerate both files
    python -m tools.op_tables --check    # exit 1 if either is stale
    python -m tools.op_tables --releases # print release → protocol from the sdists
    python -m tools.op_tables --ggml-history DIR   # also re-read the versions no
                                                   # release carries from a ggml git clone

Sdists are downloaded on demand into ``$REFIMPL_PEERS_CACHE/sdists`` (default
``~/.cache/refimpl-peers/sdists``) and only the few files read here are unpacked beside them.
Nothing of llama.cpp is copied into the repository: the generated files hold numbers and
names only.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from tools.peers import PeerUnavailable, cache_root

REPO = Path(__file__).resolve().parents[1]
JSON_PATH = REPO / "refimpl" / "protocol" / "op_tables.json"
SPEC_PATH = REPO / "spec" / "op-tables.md"

#: Every release mapped so far, with the protocol version its vendored ggml-rpc.h declares.
#: Neighbouring entries bracket each version change (spec/versions.md, "Releases").
RELEASES = {
    "0.3.8": None,  # no handshake, no version
    "0.3.9": (2, 0, 0),
    "0.3.16": (2, 0, 0),
    "0.3.17": (3, 6, 1),
    "0.3.19": (3, 6, 1),
    "0.3.20": (3, 6, 1),
    "0.3.21": (4, 0, 0),
    "0.3.24": (4, 0, 0),
    "0.3.28": (4, 0, 0),
    "0.3.29": (4, 0, 1),
    "0.3.31": (4, 0, 1),
    "0.3.33": (4, 0, 1),
    "0.3.34": (4, 0, 2),
    "0.3.35": (5, 0, 0),
    "0.3.36": (7, 0, 0),
}

#: Oldest version whose op table is pinned by its version number.
FIRST_PINNED = (3, 6, 1)

#: Versions no release carries, read from the history of the ggml repository (which mirrors
#: llama.cpp's ``ggml/``): table key -> (protocol version, ggml commit, its date).  The commit
#: is the last one before the table (or the version) changed, so a table holds every UNARY
#: op of its period (that sub-enum only grew at its end).  3.0.0 and 3.6.0 had more than one
#: ``enum ggml_op`` while they were current; their keys carry the op count
#: (spec/versions.md, "Before 3.6.1").  A clone is needed only to regenerate these entries;
#: without one they are kept as committed.
HISTORY = {
    "3.0.0-90": ((3, 0, 0), "aab0f89c0c0ef87b07c1a67a12106279bf153e7d", "2025-11-13"),
    "3.0.0-94": ((3, 0, 0), "d12293856ccf6894fb8ecc8f468fba38d515a9a5", "2025-11-25"),
    "3.0.0-95": ((3, 0, 0), "3e0c1113ef4ea0654303c9ba19365f3c568c082f", "2025-11-28"),
    "3.5.0": ((3, 5, 0), "13f7dd2d2169c5d56f6d9099111c944303704252", "2025-12-05"),
    "3.6.0-95": ((3, 6, 0), "280ae6ea76fd8b4679a445f3b18fdfb2b840a489", "2026-03-06"),
    "3.6.0-96": ((3, 6, 0), "779d380599dbc6b4833deaf7e15bfc828911de08", "2026-03-10"),
    "4.0.3": ((4, 0, 3), "dd628ca7746e734620a869c5459ce98c6431d20d", "2026-07-28"),
    "5.1.0": ((5, 1, 0), "d99724f2b141fed9e1a9f402213506c081433465", "2026-08-21"),
}


def read_history(git_dir: Path, key: str) -> dict:
    """One :data:`HISTORY` table, read from a ggml clone (checks the version there too)."""
    version, commit, _ = HISTORY[key]

    def show(path: str) -> str:
        proc = subprocess.run(["git", "-C", str(git_dir), "show", f"{commit}:{path}"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise PeerUnavailable(f"{git_dir} lacks {commit}:{path}: {proc.stderr.strip()}")
        return proc.stdout
    header, rpc_h = show("include/ggml.h"), show("include/ggml-rpc.h")
    if protocol_version(rpc_h) != version:
        raise ValueError(f"ggml {commit[:8]} declares {vkey(protocol_version(rpc_h))}, "
                         f"HISTORY says {vkey(version)} ({key})")
    return {"releases": [], "ggml_commit": commit,
            "ops": parse_enum(header, "ggml_op", "GGML_OP_"),
            "unary": parse_enum(header, "ggml_unary_op", "GGML_UNARY_OP_"),
            "glu": parse_enum(header, "ggml_glu_op", "GGML_GLU_OP_")}


def table_order(key: str) -> tuple:
    """Sort key of a table: by version, then by op count (``3.0.0-90`` before ``3.0.0-94``)."""
    version, _, count = key.partition("-")
    return tuple(int(x) for x in version.split(".")) + (int(count or 0),)

#: Files read from each sdist, relative to ``vendor/llama.cpp`` (first existing path wins).
VENDOR_FILES = {
    "ggml.h": ("ggml/include/ggml.h",),
    "ggml-rpc.h": ("ggml/include/ggml-rpc.h",),
    "ggml-rpc.cpp": ("ggml/src/ggml-rpc/ggml-rpc.cpp", "ggml/src/ggml-rpc.cpp"),
    "ggml-CMakeLists.txt": ("ggml/CMakeLists.txt",),
}


def sdist_root() -> Path:
    return cache_root() / "sdists"


def sdist_path(release: str, *, fetch: bool = True, log=sys.stderr) -> Path:
    """The release's sdist, downloaded from PyPI into the cache when missing."""
    name = f"llama_cpp_python-{release}.tar.gz"
    for candidate in (sdist_root() / name, cache_root() / "src" / name):
        if candidate.is_file():
            return candidate
    if not fetch:
        raise PeerUnavailable(f"{name} is not in {sdist_root()}")
    sdist_root().mkdir(parents=True, exist_ok=True)
    print(f"op_tables: downloading the llama-cpp-python=={release} sdist", file=log, flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
         f"llama-cpp-python=={release}", "-d", str(sdist_root())], stdout=log, stderr=log)
    path = sdist_root() / name
    if proc.returncode != 0 or not path.is_file():
        raise PeerUnavailable(f"could not download llama-cpp-python=={release} from PyPI")
    return path


def vendor_files(release: str, *, fetch: bool = True, log=sys.stderr) -> dict[str, Path]:
    """{key of VENDOR_FILES (and "CHANGELOG.md"): path} of the release's sources, unpacked once."""
    out_dir = sdist_root() / f"llama_cpp_python-{release}"
    stamp = out_dir / ".files"
    if not stamp.is_file():
        sdist = sdist_path(release, fetch=fetch, log=log)
        prefix = f"llama_cpp_python-{release}/"
        wanted = {prefix + "CHANGELOG.md": ("CHANGELOG.md", 0)}
        for key, paths in VENDOR_FILES.items():
            for rank, p in enumerate(paths):
                wanted[prefix + "vendor/llama.cpp/" + p] = (key, rank)
        found: dict[str, tuple[int, str]] = {}
        out_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            for member in tar:
                key, rank = wanted.get(member.name, (None, 0))
                if key is None or not member.isfile() or found.get(key, (1 << 30,))[0] <= rank:
                    continue
                (out_dir / key).write_bytes(tar.extractfile(member).read())
                found[key] = (rank, member.name)
        missing = [k for k in (*VENDOR_FILES, "CHANGELOG.md") if k not in found]
        if missing:
            raise PeerUnavailable(f"{sdist.name} lacks {', '.join(missing)}")
        stamp.write_text("".join(f"{k}\t{v[1]}\n" for k, v in sorted(found.items())))
    return {k: out_dir / k for k in (*VENDOR_FILES, "CHANGELOG.md")}


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def parse_enum(header: str, enum_name: str, prefix: str) -> dict[str, int]:
    """name (prefix removed) → value of a C enum whose values count up from 0 without gaps.

    The terminating ``*_COUNT`` member is left out.  Explicit values other than the first
    member's 0 are refused, since then numbering would not follow declaration order.
    """
    m = re.search(rf"enum\s+{enum_name}\s*\{{(.*?)\}}", _strip_comments(header), re.S)
    if m is None:
        raise ValueError(f"enum {enum_name} not found")
    out: dict[str, int] = {}
    for i, item in enumerate(x.strip() for x in m.group(1).split(",")):
        if not item:
            continue
        name, _, value = (s.strip() for s in item.partition("="))
        if not name.startswith(prefix):
            raise ValueError(f"enum {enum_name}: unexpected member {name!r}")
        if value and not (value == "0" and not out):
            raise ValueError(f"enum {enum_name}: explicit value {item!r}")
        out[name[len(prefix):]] = len(out)
    if list(out)[-1] != "COUNT":
        raise ValueError(f"enum {enum_name} does not end in {prefix}COUNT")
    del out["COUNT"]
    return out


def protocol_version(rpc_h: str) -> tuple[int, int, int] | None:
    """RPC_PROTO_MAJOR/MINOR/PATCH_VERSION of a ggml-rpc.h (None before versions existed)."""
    found = [re.search(rf"RPC_PROTO_{p}_VERSION\s+(\d+)", rpc_h) for p in ("MAJOR", "MINOR", "PATCH")]
    if not any(found):
        return None
    return tuple(int(m.group(1)) for m in found)


def asserted_op_count(rpc_h: str) -> int | None:
    """The GGML_OP_COUNT that ggml-rpc.h pins with a static_assert (from 3.6.1 on), if any."""
    m = re.search(r"static_assert\s*\(\s*GGML_OP_COUNT\s*==\s*(\d+)", rpc_h)
    return int(m.group(1)) if m else None


def rpc_commands(rpc_cpp: str) -> dict[str, int]:
    """name → number of ``enum rpc_cmd`` (COUNT left out; the client-internal NONE kept)."""
    return parse_enum(rpc_cpp, "rpc_cmd", "RPC_CMD_")


def vendored_commit(changelog: str, release: str) -> str | None:
    """The llama.cpp commit a release vendors, per its CHANGELOG (latest update at or before it)."""
    at = changelog.find(f"## [{release}]")
    if at < 0:
        return None
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", changelog[at:])
    return m.group(1) if m else None


def ggml_version(cmake: str) -> str:
    parts = [re.search(rf"set\(GGML_VERSION_{p}\s+(\d+)\)", cmake) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(p.group(1) for p in parts) if all(parts) else "?"


_CTYPE_SIZES = {"uint64_t": 8, "uint32_t": 4, "int32_t": 4, "uint8_t": 1, "char": 1}
_ARRAY_SIZES = {"GGML_MAX_DIMS": 4, "GGML_MAX_SRC": 10, "GGML_MAX_NAME": 64,
                "GGML_MAX_OP_PARAMS / sizeof(int32_t)": 16, "RPC_CONN_CAPS_SIZE": 24}


def struct_fields(rpc_cpp: str, name: str) -> list[tuple[str, int]] | None:
    """(field, size) of a packed struct of ggml-rpc.cpp, or None when it has no such struct.

    Enough for the structs of the protocol: scalar and array members of the fixed-width types,
    and ``rpc_tensor`` members.
    """
    m = re.search(rf"struct\s+{name}\s*\{{(.*?)\}};", _strip_comments(rpc_cpp), re.S)
    if m is None:
        return None
    out = []
    for decl in re.finditer(r"(\w+)\s+(\w+)(?:\[([^\]]+)\])?\s*;", m.group(1)):
        ctype, field, count = decl.groups()
        n = 1 if count is None else int(count) if count.strip().isdigit() else _ARRAY_SIZES[count.strip()]
        unit = struct_size(rpc_cpp, "rpc_tensor") if ctype == "rpc_tensor" else _CTYPE_SIZES[ctype]
        out.append((field, unit * n))
    return out


def struct_size(rpc_cpp: str, name: str) -> int:
    """Packed size of a struct of ggml-rpc.cpp; 0 when the struct does not exist."""
    fields = struct_fields(rpc_cpp, name)
    return 0 if fields is None else sum(size for _, size in fields)


def reply_kinds(rpc_cpp: str) -> dict[str, str]:
    """Command → "reply", "empty" (a zero-length reply) or "none", from the server's dispatch.

    HELLO is left out: it is answered before the dispatch loop.
    """
    parts = re.split(r"case\s+RPC_CMD_(\w+)\s*:", _strip_comments(rpc_cpp))
    kinds: dict[str, set[str]] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        sends = re.findall(r"send_msg\s*\(([^;]*)\)", body.split("default:")[0])
        kind = ("none" if not sends else
                "empty" if all(re.search(r"nullptr\s*,\s*0\s*\)?$", s.strip()) for s in sends) else "reply")
        kinds.setdefault(name, set()).add(kind)
    kinds.pop("HELLO", None)
    if any(len(k) != 1 for k in kinds.values()):
        raise ValueError(f"ambiguous reply behaviour: {kinds}")
    return {name: k.pop() for name, k in kinds.items()}


def set_tensor_header_size(rpc_cpp: str) -> int:
    """Bytes before the data in a SET_TENSOR payload, as the server parses it."""
    src = _strip_comments(rpc_cpp)
    body = re.search(r"rpc_server::set_tensor\s*\((.*?)size_t\s+size\s*=", src, re.S).group(1)
    return struct_size(rpc_cpp, "rpc_tensor") + 8 + (1 if "cache_flag" in body else 0)


def wire_facts(rpc_cpp: str) -> dict:
    """The facts a protocol profile states, as read from one ggml-rpc.cpp."""
    tensor = struct_fields(rpc_cpp, "rpc_tensor")
    return {
        "commands": {k: v for k, v in rpc_commands(rpc_cpp).items() if k != "NONE"},
        "replies": reply_kinds(rpc_cpp),
        "hello_request_size": struct_size(rpc_cpp, "rpc_msg_hello_req"),
        "hello_response_size": struct_size(rpc_cpp, "rpc_msg_hello_rsp"),
        "rpc_tensor_size": sum(size for _, size in tensor),
        "rpc_tensor_tail": tensor[-1][0],
        "set_tensor_header_size": set_tensor_header_size(rpc_cpp),
        "get_alloc_size_request_size": struct_size(rpc_cpp, "rpc_msg_get_alloc_size_req"),
    }


def read_release(release: str, *, fetch: bool = True, log=sys.stderr) -> dict:
    """Everything this module reads from one release's sources."""
    files = vendor_files(release, fetch=fetch, log=log)
    text = {k: p.read_text(errors="replace") for k, p in files.items()}
    version = protocol_version(text["ggml-rpc.h"])
    has_glu = re.search(r"enum\s+ggml_glu_op\b", text["ggml.h"]) is not None
    return {
        "release": release,
        "protocol": version,
        "asserted_op_count": asserted_op_count(text["ggml-rpc.h"]),
        "commands": rpc_commands(text["ggml-rpc.cpp"]),
        "ops": parse_enum(text["ggml.h"], "ggml_op", "GGML_OP_"),
        "unary": parse_enum(text["ggml.h"], "ggml_unary_op", "GGML_UNARY_OP_"),
        "glu": parse_enum(text["ggml.h"], "ggml_glu_op", "GGML_GLU_OP_") if has_glu else None,
        "commit": vendored_commit(text["CHANGELOG.md"], release),
        "ggml_version": ggml_version(text["ggml-CMakeLists.txt"]),
        "wire": wire_facts(text["ggml-rpc.cpp"]) if version and version >= (3, 0, 0) else None,
    }


def vkey(version: tuple[int, int, int] | None) -> str:
    return "none" if version is None else "%d.%d.%d" % version


def build_tables(*, fetch: bool = True, log=sys.stderr, ggml_history: Path | None = None) -> dict:
    """{version: {"releases": [...], "ops": {...}, "unary": {...}, "glu": {...}}} for every
    mapped version with a pinned op table; releases of one version must agree exactly.  The
    :data:`HISTORY` tables come from ``ggml_history`` (a ggml clone) or, without one, from the
    committed JSON."""
    tables: dict[str, dict] = {}
    committed = load_tables() if JSON_PATH.is_file() else {}
    for key in HISTORY:
        if ggml_history is not None:
            tables[key] = read_history(ggml_history, key)
        elif key in committed:
            tables[key] = committed[key]
    for release, expected in RELEASES.items():
        info = read_release(release, fetch=fetch, log=log)
        if info["protocol"] != expected:
            raise ValueError(f"{release} declares {vkey(info['protocol'])}, RELEASES says {vkey(expected)}")
        if expected is None or expected < FIRST_PINNED:
            continue
        entry = {"ops": info["ops"], "unary": info["unary"], "glu": info["glu"]}
        key = vkey(expected)
        if key in tables:
            for k, v in entry.items():
                if tables[key][k] != v:
                    raise ValueError(f"{k} of {release} differs from {tables[key]['releases']} ({key})")
            tables[key]["releases"].append(release)
        else:
            tables[key] = {"releases": [release], **entry}
    return {k: tables[k] for k in sorted(tables, key=table_order)}


def render_json(tables: dict) -> str:
    return json.dumps(tables, indent=1) + "\n"


def _table(tables: dict, kind: str) -> list[str]:
    versions = list(tables)
    names: list[str] = []
    for v in versions:  # rows: every name in order of first appearance, newest order wins ties
        for n in tables[v][kind]:
            if n not in names:
                names.append(n)
    newest = tables[versions[-1]][kind]
    names.sort(key=lambda n: (newest.get(n, min(tables[v][kind].get(n, 1 << 30) for v in versions)),
                              n not in newest))
    lines = ["| name | " + " | ".join(versions) + " |", "|---|" + "---:|" * len(versions)]
    for n in names:
        cells = []
        for i, v in enumerate(versions):
            num = tables[v][kind].get(n)
            prev = tables[versions[i - 1]][kind].get(n) if i else num
            cell = "–" if num is None else str(num)
            if i and num is not None and num != prev:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    counts = " | ".join(str(len(tables[v][kind])) for v in versions)
    lines.append(f"| *count* | {counts} |")
    return lines


def render_markdown(tables: dict) -> str:
    versions = list(tables)
    out = [
        "# Op tables per protocol version",
        "",
        "<!-- generated by `python -m tools.op_tables` from the llama-cpp-python sdists;",
        "     do not edit by hand (tests/test_op_tables.py checks it) -->",
        "",
        "`rpc_tensor.op` carries the number of an operation in ggml's `enum ggml_op` of the",
        "sending build, and the first op parameter of a UNARY or GLU node carries a number of",
        "`enum ggml_unary_op` or `enum ggml_glu_op`. These enums gain members in the middle, so",
        "the numbers depend on the protocol version ([versions.md](versions.md#op-numbering)).",
        "From 3.6.1 on every change of `enum ggml_op` bumps the protocol version, so each version",
        "below has exactly one table. The tables were read from the `ggml.h` vendored by the",
        "`llama-cpp-python` releases listed (releases of the same version agree exactly), and for",
        "the versions no release carries, from `include/ggml.h` in the history of the ggml",
        "repository (which mirrors llama.cpp's `ggml/`) at the commit listed, the last one before",
        "the table or the version changed. 3.0.0 and 3.6.0 had more than one `enum ggml_op` while",
        "they were current, so they have one table per op count (`3.0.0-90`, `3.0.0-94`,",
        "`3.0.0-95`; `3.6.0-95`, `3.6.0-96`); every change before 3.6.1 is listed in",
        "[versions.md](versions.md#before-361-every-change-of-the-enum-while-a-version-was-current).",
        "The UNARY and GLU sub-enums only ever grew at their ends, so a table serves every build of",
        "its period. 6.0.0, known only by inference, uses 7.0.0's table. The same data, for",
        "programs, is `refimpl/protocol/op_tables.json`.",
        "",
        "| Table | Releases read (or ggml commit) |",
        "|---|---|",
    ]
    out += [f"| {v} | {', '.join(tables[v]['releases']) or 'ggml ' + tables[v]['ggml_commit'][:8]} |"
            for v in versions]
    out += ["", "A number in **bold** differs from the column to its left; – means the op does not "
            "exist in that version.", "", "## `enum ggml_op`", ""]
    out += _table(tables, "ops")
    out += ["", "## `enum ggml_unary_op` (op_params[0] of UNARY)", ""]
    out += _table(tables, "unary")
    out += ["", "## `enum ggml_glu_op` (op_params[0] of GLU)", ""]
    out += _table(tables, "glu")
    return "\n".join(out) + "\n"


def load_tables() -> dict:
    """The committed op_tables.json."""
    return json.loads(JSON_PATH.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.op_tables", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="fail if the committed files are stale")
    p.add_argument("--releases", action="store_true",
                   help="print release, protocol, vendored commit, ggml version, op count")
    p.add_argument("release", nargs="*", help="with --releases: these releases instead of the mapped ones")
    p.add_argument("--ggml-history", type=Path, metavar="DIR",
                   help="a clone of github.com/ggml-org/ggml: re-read the HISTORY tables from it")
    args = p.parse_args(argv)
    try:
        if args.releases:
            for r in args.release or RELEASES:
                info = read_release(r)
                print(r, vkey(info["protocol"]), info["commit"], info["ggml_version"],
                      len(info["ops"]), info["asserted_op_count"], len(info["commands"]), sep="\t")
            return 0
        tables = build_tables(ggml_history=args.ggml_history)
    except PeerUnavailable as exc:
        print(f"op_tables: error: {exc}", file=sys.stderr)
        return 1
    files = {JSON_PATH: render_json(tables), SPEC_PATH: render_markdown(tables)}
    if args.check:
        stale = [str(p.relative_to(REPO)) for p, t in files.items()
                 if not p.is_file() or p.read_text() != t]
        if stale:
            print("op_tables: stale: " + ", ".join(stale), file=sys.stderr)
            return 1
        return 0
    for path, text in files.items():
        path.write_text(text)
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
