"""Load the kernels a server will need from numba's disk cache before its first client.

numba compiles a kernel for each combination of argument types it is called with, the first
time it is, and keeps the machine code in its disk cache (refimpl.kernels.cache).  A new
process still pays, at the first call of each combination, for finding and loading that code:
on the development host the first model load after ``refimpl-server`` started took 0.9 s
against 0.35 s for the next ones (bench/README.md, "After the tenth session"), most of it
those loads, during the client's first GRAPH_COMPUTE.

So ``refimpl-server`` remembers which combinations its graphs used (:func:`record_new`, after
every GRAPH_COMPUTE that compiled something), in a file beside the compiled kernels, and loads
them all when it starts (:func:`warm`), before it opens its port.  Only servers record
(:func:`start_recording`): the test suite's in-process graphs, which try every op and type,
would otherwise make every later server load hundreds of kernels it may never use.  Only
numba's public ``Dispatcher.signatures`` and ``Dispatcher.compile`` are used.  The file is
per numba release and per CPU (numba's cache misses on any other, and a miss would compile
instead of load: seconds per kernel); :func:`warm` also stops after :data:`BUDGET_SECONDS`.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import pickle
import threading
import time
from pathlib import Path

import llvmlite.binding as llvm
import numba
from numba.core.registry import CPUDispatcher

from ..graph.registry import after_compute
from . import cache

log = logging.getLogger("refimpl.kernels")

#: :func:`warm` stops loading after this long (it only loads from the cache, unless the cache
#: lost kernels the record still names: then each costs a compilation).
BUDGET_SECONDS = 5.0

_lock = threading.Lock()
_dispatchers: dict[str, CPUDispatcher] | None = None
_known = 0   # signatures of all dispatchers when last recorded
_recording = False


def dispatchers() -> dict[str, CPUDispatcher]:
    """Every CPU kernel of this package by module and qualified name (unique: numba's cache
    tells kernels apart by it), found once among the live objects.  The first call must come
    before anything freezes the collector's objects (engine.freeze_survivors_once), which
    are not listed then: the package's ``__init__`` makes it once every kernel is defined."""
    global _dispatchers
    with _lock:
        if _dispatchers is None:
            found = {}
            for obj in gc.get_objects():
                if isinstance(obj, CPUDispatcher):
                    fn = obj.py_func
                    if fn.__module__.startswith(__package__):
                        found[f"{fn.__module__}.{fn.__qualname__}"] = obj
            _dispatchers = found
        return _dispatchers


def _compiled(table: dict[str, CPUDispatcher]) -> int:
    """How many compiled signatures the dispatchers of ``table`` hold, all together."""
    return sum(len(d.overloads) for d in table.values())


def record_path() -> Path | None:
    """The record of this numba release on this CPU, in the sources' digest directory
    (None where there is none)."""
    top = cache.digest_directory()
    if top is None:
        return None
    cpu = f"{llvm.get_host_cpu_name()}|{llvm.get_host_cpu_features().flatten()}"
    host = f"{numba.__version__}|{cpu}"
    return top / f"used-signatures-{hashlib.sha256(host.encode()).hexdigest()[:16]}.pkl"


def _read(path: Path) -> dict[str, list]:
    try:
        with open(path, "rb") as f:
            record = pickle.load(f)
        return record if isinstance(record, dict) else {}
    except Exception:  # noqa: BLE001 - missing, damaged, or of other sources: start afresh
        return {}


def start_recording() -> None:
    """Record, from now on, what this process's graphs compile (:func:`record_new`)."""
    global _recording
    _recording = True


@after_compute("cpu")
def record_new() -> bool:
    """Add the signatures compiled since the last call to the record, when this process
    records (:func:`start_recording`); returns whether any had been compiled.  Cheap when
    none had (a count over the dispatchers)."""
    global _known
    if not _recording:
        return False
    table = dispatchers()
    count = _compiled(table)
    if count == _known:
        return False
    path = record_path()
    with _lock:
        _known = count
        if path is None:
            return True
        record = _read(path)
        for name, d in table.items():
            if d.signatures:
                have = record.setdefault(name, [])
                have.extend(s for s in d.signatures if s not in have)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                pickle.dump(record, f)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot record the kernels used: %s", exc)
    return True


def warm(budget: float = BUDGET_SECONDS) -> int:
    """Load every recorded signature of this package's kernels (from numba's disk cache);
    returns how many were loaded."""
    path = record_path()
    record = _read(path) if path is not None else {}
    table = dispatchers()
    start, loaded = time.perf_counter(), 0
    wanted = [(name, table[name], sig) for name, signatures in record.items()
              if name in table for sig in signatures]
    for name, d, sig in wanted:
        if time.perf_counter() - start > budget:
            log.info("kernel warm-up stopped after %.1f s (%d loaded)", budget, loaded)
            break
        try:
            d.compile(sig)
            loaded += 1
        except Exception as exc:  # noqa: BLE001 - a signature these sources refuse
            log.debug("warm-up of %s%s failed: %s", name, sig, exc)
    global _known
    _known = _compiled(table)      # what is loaded now is no news to record_new
    if loaded:
        log.info("loaded %d compiled kernels in %.2f s", loaded, time.perf_counter() - start)
    return loaded
