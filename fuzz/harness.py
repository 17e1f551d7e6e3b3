"""What every fuzz example runs against, and the properties checked after each one.

* :class:`FuzzServer`: a refimpl-server process with a memory cap and small limits, restarted
  (and reported) if it ever dies;
* :class:`WellBehavedClient`: a thread that keeps running a known workload on its own
  connection (upload, ADD graph, download, compare) while the fuzzer attacks the server;
* :class:`RawConnection`: a blocking connection that sends frames and checks that every
  request is either answered with the right number of bytes or refused by a close;
* :func:`check_properties`: after every example, the server process is up, answers a fresh
  connection, stays under its memory and cache caps, and the well-behaved client saw correct
  results.  Any violation raises :class:`PropertyViolation`.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refimpl.protocol import messages as m
from refimpl.protocol.constants import Command
from refimpl.protocol.ggml_types import GgmlType
from refimpl.protocol.tensor import RpcTensor, contiguous_strides
from tools.hostile import Arena, Frame, frame_of
from tools.processes import die_with_parent, free_port, wait_for_port

MIB = 1 << 20
#: The fuzzed server's limits: small, so that the caps are reached and checked.
CAP_MIB = 256
BUFFERED_MIB = 128
CACHE_MIB = 16
SERVER_ARGS = ["-m", str(CAP_MIB), "--max-buffered-mib", str(BUFFERED_MIB), "--read-timeout", "3",
               "--idle-timeout", "300", "--max-connections", "32", "--max-buffers", "256",
               "--max-message-mib", "64", "-c", "--cache-max-mib", str(CACHE_MIB), "-t", "1",
               "--log-level", "error"]
#: Memory the server may use beyond its baseline: the cap, the request budget, and room for
#: the kernels numba loads on first use.
MEMORY_SLACK = (CAP_MIB + BUFFERED_MIB + 384) * MIB
#: No answer and no close within this many seconds is a hang.  Generous, because the first
#: use of a kernel with new types makes numba compile it (seconds, on a small machine), and a
#: graph holds the device for every connection meanwhile.
DEADLINE = 60.0

HELLO = struct.pack("<BQ", Command.HELLO, 24) + bytes(24)
DEVICE_COUNT = struct.pack("<BQ", Command.DEVICE_COUNT, 0)
DEVICE_COUNT_REPLY = struct.pack("<QI", 4, 1)


class PropertyViolation(AssertionError):
    """A property every example must keep was broken."""


class Hang(PropertyViolation):
    """The server neither answered nor closed within the deadline."""


@dataclass
class Stats:
    """Counters for progress lines and the summary."""

    started: float = field(default_factory=time.monotonic)
    examples: dict = field(default_factory=dict)      # target -> examples run
    messages: int = 0
    closes: int = 0                                   # requests refused by a close
    graphs_sent: int = 0                              # GRAPH_COMPUTE requests sent
    graphs_run: int = 0                               # ... that the server accepted and ran
    ops_run: dict = field(default_factory=dict)       # op label -> graphs accepted
    failures: dict = field(default_factory=dict)      # signature -> (target, count, first detail)
    restarts: int = 0

    def example(self, target: str) -> None:
        """Count one example of ``target``."""
        self.examples[target] = self.examples.get(target, 0) + 1

    @property
    def total_examples(self) -> int:
        """Examples of all targets."""
        return sum(self.examples.values())

    def rate(self) -> float:
        """Messages per second so far."""
        return self.messages / max(time.monotonic() - self.started, 1e-9)


STATS = Stats()


# ----------------------------------------------------------------------------------------------
# the server under fuzz
# ----------------------------------------------------------------------------------------------

class FuzzServer:
    """refimpl-server as a child process, with its hash cache in a private directory."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.cache_root = Path(tempfile.mkdtemp(prefix="fuzz-cache-"))
        self.log_path = Path(tempfile.mkstemp(prefix="fuzz-server-", suffix=".log")[1])
        self.baseline_rss = 0
        self.peak_rss = 0
        self.port = 0

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens."""
        return ("127.0.0.1", self.port)

    def start(self) -> None:
        """Start (or restart) the process and measure its memory once warmed up."""
        self.port = free_port()
        env = dict(os.environ, LLAMA_CACHE=str(self.cache_root))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "refimpl.server", "-p", str(self.port),
                                      *SERVER_ARGS], stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=die_with_parent)
        wait_for_port(self.port, self.proc, timeout=60)
        warm_up(self.address)
        self.baseline_rss = self.rss()

    def stop(self) -> None:
        """Stop the process and remove its cache."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.cache_root, ignore_errors=True)

    def rss(self) -> int:
        """Resident memory in bytes (0 when unknown)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                        self.peak_rss = max(self.peak_rss, rss)
                        return rss
        except (OSError, AttributeError):
            pass
        return 0

    def cache_bytes(self) -> int:
        """Bytes in the hash cache's directory."""
        d = self.cache_root / "rpc"
        return sum(f.stat().st_size for f in d.glob("*") if f.is_file()) if d.exists() else 0

    def log_tail(self, n: int = 4000) -> str:
        """The end of the server's log."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def exit_description(self) -> str:
        """How the process ended."""
        rc = self.proc.returncode
        return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"


def warm_up(address) -> None:
    """Run one graph of each common kernel so that numba has loaded them before the
    memory baseline is taken."""
    c = WellBehavedClient(address)
    try:
        c.connect()
        for _ in range(3):
            c.iteration()
    finally:
        c.close()


# ----------------------------------------------------------------------------------------------
# blocking connections
# ----------------------------------------------------------------------------------------------

class Closed(Exception):
    """The server closed the connection."""


class RawConnection:
    """A blocking socket that speaks frames and checks the server's answers."""

    def __init__(self, address, hello: bool = True, timeout: float = DEADLINE):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.trace: collections.deque[str] = collections.deque(maxlen=32)
        if hello:
            self.send(HELLO, "HELLO")
            self.read_exactly(36)

    def close(self) -> None:
        """Close with a reset (so that no half-closed socket lingers)."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes, label: str = "") -> None:
        """Send bytes; a reset by the server raises Closed."""
        self.trace.append(f"-> {label or '?'}: {data[:64].hex()}{'…' if len(data) > 64 else ''} "
                          f"({len(data)} bytes)")
        STATS.messages += 1
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise Closed(str(exc)) from None

    def read_exactly(self, n: int) -> bytes:
        """n bytes; Closed at EOF, Hang past the deadline."""
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.sock.recv(min(n - len(out), 1 << 20))
            except socket.timeout:
                raise Hang(f"no answer and no close within {DEADLINE:g}s after "
                           f"{len(out)} of {n} bytes\n" + "\n".join(list(self.trace)[-8:])) from None
            except OSError:
                chunk = b""
            if not chunk:
                raise Closed(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def request(self, frame: Frame) -> bytes | None:
        """Send a well-formed frame and a DEVICE_COUNT behind it; return the frame's reply
        (b"" for commands without one), or None when the server closed the connection.

        A server that answers with a different number of bytes than the command's reply
        breaks the protocol: PropertyViolation.
        """
        self.send(frame.encode() + DEVICE_COUNT, frame.label)
        size = frame.reply_size()
        try:
            reply = self.read_exactly(size) if size else b""
            tail = self.read_exactly(len(DEVICE_COUNT_REPLY))
        except Closed:
            STATS.closes += 1
            return None
        if size and struct.unpack_from("<Q", reply)[0] != size - 8:
            raise PropertyViolation(f"{frame.label}: reply announces "
                                    f"{struct.unpack_from('<Q', reply)[0]} bytes, expected "
                                    f"{size - 8}\n" + "\n".join(list(self.trace)[-8:]))
        if tail != DEVICE_COUNT_REPLY:
            raise PropertyViolation(f"{frame.label}: unexpected bytes after the reply: "
                                    f"{tail.hex()}\n" + "\n".join(list(self.trace)[-8:]))
        return reply[8:] if size else b""

    def finish(self) -> None:
        """Half-close and wait for the server to close too (it must, at our end of stream)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(1 << 16):
                    return
            except socket.timeout:
                break
            except OSError:
                return
        raise Hang(f"the server did not close within {DEADLINE:g}s of our end of stream\n"
                   + "\n".join(list(self.trace)[-8:]))

    def alloc(self, size: int) -> tuple[int, int, int]:
        """ALLOC_BUFFER and BUFFER_GET_BASE: (handle, base, size)."""
        r = self.request(frame_of(m.AllocBufferRequest(0, size)))
        if r is None:
            raise Closed("ALLOC_BUFFER refused")
        handle, got = struct.unpack("<QQ", r)
        if not handle:
            raise MemoryError(f"ALLOC_BUFFER of {size} failed")
        base = struct.unpack("<Q", self.request(frame_of(m.BufferGetBaseRequest(handle))))[0]
        return handle, base, got


def open_arena(address, sizes) -> tuple[RawConnection, Arena]:
    """A connection with freshly allocated buffers of ``sizes``, and one freed (dead) one."""
    c = RawConnection(address)
    bufs = tuple(c.alloc(s) for s in sizes)
    dead = c.alloc(64)[0]
    c.request(frame_of(m.FreeBufferRequest(dead)))
    return c, Arena(bufs, (dead,))


# ----------------------------------------------------------------------------------------------
# the well-behaved client
# ----------------------------------------------------------------------------------------------

class WellBehavedClient:
    """Runs upload / ADD graph / download and compares, over and over, on one connection."""

    def __init__(self, address):
        self.address = address
        self.rng = random.Random(1234)
        self.conn: RawConnection | None = None
        self.iterations = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def connect(self) -> None:
        """Open the connection and its three buffers."""
        self.conn = RawConnection(self.address)
        self.bufs = [self.conn.alloc(4096) for _ in range(3)]

    def close(self) -> None:
        """Close the connection."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _t(self, i: int, id_: int, **kw) -> RpcTensor:
        h, base, _ = self.bufs[i]
        return RpcTensor(id=id_, type=GgmlType.F32, buffer=h, ne=(64, 4, 1, 1),
                         nb=contiguous_strides(GgmlType.F32, (64, 4, 1, 1)), data=base, **kw)

    def iteration(self) -> None:
        """One round: upload a and b, c = a + b on the server, download c and compare."""
        a = np.array([self.rng.uniform(-100, 100) for _ in range(256)], np.float32)
        b = np.array([self.rng.uniform(-100, 100) for _ in range(256)], np.float32)
        ta, tb = self._t(0, 1), self._t(1, 2)
        tc = self._t(2, 3, op=2, src=(1, 2) + (0,) * 8, flags=16)
        c = self.conn
        c.request(frame_of(m.SetTensorRequest(ta, 0, a.tobytes())))
        c.request(frame_of(m.SetTensorRequest(tb, 0, b.tobytes())))
        c.request(frame_of(m.GraphComputeRequest.from_tensors(0, [3], [ta, tb, tc])))
        got = c.request(frame_of(m.GetTensorRequest(self._t(2, 3), 0, 1024)))
        if got is None:
            raise Closed("the server closed the well-behaved client's connection")
        if np.frombuffer(got, np.float32).tobytes() != (a + b).tobytes():
            raise PropertyViolation("the well-behaved client got a wrong ADD result")
        self.iterations += 1

    def start(self) -> None:
        """Run in a background thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, name="well-behaved-client", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.conn is None:
                    self.connect()
                self.iteration()
            except Exception as exc:  # any failure is a finding; reconnect and go on
                with self._lock:
                    self.errors.append(f"well-behaved client: {type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0] if str(exc) else ''}")
                self.close()
                self._stop.wait(0.5)
            self._stop.wait(0.01)

    def take_errors(self) -> list[str]:
        """Errors seen since the last call."""
        with self._lock:
            out, self.errors = self.errors, []
        return out

    def stop(self) -> None:
        """Stop the thread and close."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self.close()


# ----------------------------------------------------------------------------------------------
# the properties
# ----------------------------------------------------------------------------------------------

def check_properties(server: FuzzServer, client: WellBehavedClient | None) -> None:
    """The checks made after every example; raises PropertyViolation."""
    problems = []
    if server.proc.poll() is not None:
        problems.append(f"the server process died ({server.exit_description()})\n"
                        f"{server.log_tail()}")
        STATS.restarts += 1
        server.start()
    else:
        try:
            c = RawConnection(server.address)
            c.send(DEVICE_COUNT, "DEVICE_COUNT")
            if c.read_exactly(12) != DEVICE_COUNT_REPLY:
                problems.append("a fresh connection got a wrong DEVICE_COUNT reply")
            c.close()
        except (Closed, OSError, Hang) as exc:
            problems.append(f"a fresh connection was not served: {exc}")
        rss = server.rss()
        if rss > server.baseline_rss + MEMORY_SLACK:
            problems.append(f"server memory {rss / MIB:.0f} MiB exceeds its baseline "
                            f"{server.baseline_rss / MIB:.0f} MiB + cap and budget "
                            f"{MEMORY_SLACK / MIB:.0f} MiB")
        cache = server.cache_bytes()
        if cache > CACHE_MIB * MIB:
            problems.append(f"the hash cache holds {cache / MIB:.1f} MiB, over its "
                            f"{CACHE_MIB} MiB bound")
    if client is not None:
        problems += client.take_errors()
    if problems:
        raise PropertyViolation("\n".join(problems))


def run_frames(server: FuzzServer, conn: RawConnection, frames) -> None:
    """Send frames in order, each checked; the first that is refused or not well-formed ends
    the sequence.  Then half-close and require the server to close."""
    try:
        for f in frames:
            if not f.well_formed:
                conn.send(f.encode(), f.label)
                break
            graph = f.command == Command.GRAPH_COMPUTE
            STATS.graphs_sent += graph
            if conn.request(f) is None:
                break
            if graph:
                STATS.graphs_run += 1
                key = f.label.split(" (")[0]
                STATS.ops_run[key] = STATS.ops_run.get(key, 0) + 1
        conn.finish()
    except Closed:
        STATS.closes += 1
    finally:
        conn.close()
