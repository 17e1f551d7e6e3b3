"""What the conformance suite needs to drive a server: targets and a blocking wire client.

A *target* is the server under test.  It is either **disposable** (a process the suite starts,
one per destructive probe, so it may crash without spoiling the next probe) or **external**
(``--server HOST:PORT``, started by you; destructive probes then run against it one after
the other and the report says which one took it down).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from refimpl.protocol import compat
from refimpl.protocol import messages as m
from refimpl.protocol.connection import NEED_DATA, ClientConnection, GetTensorStart, hello_request
from refimpl.protocol.constants import CONN_CAPS_SIZE, Command
from refimpl.protocol.profiles import LATEST, Profile
from refimpl.protocol.tensor import RpcTensor, contiguous_strides
from tools.processes import free_port, wait_for_port


class Closed(Exception):
    """The server closed the connection (or reset it)."""


class NoAnswer(Exception):
    """The server neither answered nor closed within the deadline."""


class Wire:
    """A blocking connection for probes: raw bytes when needed, typed calls otherwise, in the
    protocol version of ``profile`` (spec/versions.md)."""

    def __init__(self, address, timeout: float = 10.0, hello: bool = True,
                 profile: Profile = LATEST):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.profile = profile
        self.conn = ClientConnection(profile=profile)
        if hello:
            self.call(hello_request())

    def close(self, reset: bool = False):
        """Close the socket; ``reset`` sends a TCP RST instead of a FIN (the server then sees
        an error at once instead of a clean end of stream)."""
        try:
            if reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- raw --------------------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are; a reset peer raises Closed."""
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise Closed(str(exc)) from exc

    def recv_some(self) -> bytes:
        """One receive; b"" means closed; raises NoAnswer on timeout."""
        try:
            return self.sock.recv(1 << 16)
        except socket.timeout:
            raise NoAnswer(f"nothing within {self.timeout}s") from None
        except OSError:
            return b""

    def closed_by_server(self, timeout: float | None = None) -> bool:
        """Wait until the server closes; True if it did (False: it sent bytes instead)."""
        self.sock.settimeout(timeout or self.timeout)
        try:
            return self.recv_some() == b""
        finally:
            self.sock.settimeout(self.timeout)

    # -- typed ------------------------------------------------------------------------------
    def call(self, req: m.Message):
        """Send a request; return its reply (bytes for GET_TENSOR), or None if it has none."""
        self.send_raw(self.conn.send(req))
        if not compat.has_response(req.COMMAND, self.profile):
            return None
        return self._reply()

    def set_tensor(self, tensor: RpcTensor, data: bytes, offset: int = 0, cache_flag: int = 0):
        """SET_TENSOR (no reply)."""
        self.send_raw(self.conn.send_set_tensor_header(tensor, offset, len(data), cache_flag) + data)

    def _reply(self):
        while True:
            try:
                ev = self.conn.next_event()
            except Exception as exc:  # the server closed mid-reply or broke framing
                raise Closed(str(exc)) from exc
            if ev is not NEED_DATA:
                break
            data = self.recv_some()
            self.conn.receive_data(data)
        if isinstance(ev, GetTensorStart):
            out = bytearray(ev.size)
            got = self.conn.readinto(out)
            while got < ev.size:
                chunk = self.recv_some()
                if not chunk:
                    raise Closed("closed mid-reply")
                out[got:got + len(chunk)] = chunk[:ev.size - got]
                self.conn.payload_received(min(len(chunk), ev.size - got))
                got += len(chunk)
            return bytes(out)
        return ev

    def graph_compute(self, nodes, tensors, device: int = 0) -> int | None:
        """GRAPH_COMPUTE of node ids and RpcTensors, encoded as given.  No reply (None), except
        in protocol 3.0.0, where ggml's status byte is read and returned (Closed if the server
        closed instead)."""
        reply = self.call(m.GraphComputeRequest.from_tensors(device, nodes, tensors))
        return None if reply is None else reply.status

    def answers(self) -> bool:
        """A DEVICE_COUNT round trip on this connection: True if answered, False if the
        server closed it; raises NoAnswer when neither happens within the timeout."""
        try:
            return self.call(m.DeviceCountRequest()).count >= 0
        except Closed:
            return False

    def alloc(self, size: int) -> tuple[int, int]:
        """ALLOC_BUFFER + BUFFER_GET_BASE: (handle, base)."""
        reply = self.call(m.AllocBufferRequest(0, size))
        if not reply.handle:
            raise RuntimeError(f"allocation of {size} bytes failed")
        return reply.handle, self.call(m.BufferGetBaseRequest(reply.handle)).base


def tensor(handle: int, base: int, type_: int = 0, ne=(1, 1, 1, 1), offset: int = 0, nb=None,
           **kw) -> RpcTensor:
    """A tensor in a buffer, contiguous unless ``nb`` given; other fields as keywords."""
    ne = tuple(ne) + (1,) * (4 - len(ne))
    return RpcTensor(id=kw.pop("id", 1 + offset), type=type_, buffer=handle, ne=ne,
                     nb=tuple(nb) if nb else contiguous_strides(type_, ne), data=base + offset,
                     **kw)


def frame(cmd: int, payload: bytes = b"") -> bytes:
    """A raw request frame."""
    return struct.pack("<BQ", int(cmd), len(payload)) + payload


def _recv_exactly(sock, n: int) -> bytes | None:
    """Exactly ``n`` bytes from ``sock``, or None if it closes first."""
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            return None
        out += chunk
    return out


def _hello_reply(address, payload_size: int, timeout: float) -> bytes | None:
    """Send a HELLO with ``payload_size`` zero bytes; the reply's payload, or None if the
    server closed instead."""
    with socket.create_connection(address, timeout=timeout) as sock:
        try:
            sock.sendall(frame(Command.HELLO, bytes(payload_size)))
            head = _recv_exactly(sock, 8)
            if head is None:
                return None
            (length,) = struct.unpack("<Q", head)
            if length > 64:
                raise ValueError(f"a HELLO reply of {length} bytes")
            return _recv_exactly(sock, length)
        except ConnectionResetError:
            return None
        finally:
            # a reset: llama.cpp's server never writes to a closed socket (spec/hazards.md H25)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def detect_version(address, timeout: float = 10.0) -> tuple[int, int, int]:
    """The protocol version a server speaks, from its HELLO reply (spec/versions.md,
    "Compatibility"): a 24-byte HELLO first (4.0.0 on), then an empty one (3.x), each on a
    fresh connection, since a server closes on the other family's HELLO length.  Raises
    ValueError when neither is answered."""
    for size, reply_size in ((CONN_CAPS_SIZE, 4 + CONN_CAPS_SIZE), (0, 3)):
        body = _hello_reply(address, size, timeout)
        if body is not None and len(body) == reply_size:
            return tuple(body[:3])
    raise ValueError(f"{address[0]}:{address[1]} answers neither a 24-byte nor an empty HELLO")


# ----------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------

@dataclass
class Target:
    """A server to probe.  ``proc`` is set when the suite started it."""

    name: str
    address: tuple
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    #: The server's hash-cache directory when the suite chose it (LLAMA_CACHE/rpc).
    cache_dir: Path | None = None
    #: What the suite knows of the server: "refimpl", "llama.cpp", "custom" or "external".
    kind: str = "external"
    #: The protocol version it speaks.
    profile: Profile = LATEST

    @property
    def disposable(self) -> bool:
        """Whether the suite owns the process (and may let it die)."""
        return self.proc is not None

    def alive(self, timeout: float = 5.0) -> bool:
        """The server still completes a HELLO on a fresh connection."""
        if self.proc is not None and self.proc.poll() is not None:
            return False
        try:
            with Wire(self.address, timeout=timeout, profile=self.profile) as w:
                return w.call(m.DeviceCountRequest()).count >= 1
        except (OSError, Closed, NoAnswer, Exception):
            return False

    def exit_description(self) -> str:
        """How the process ended, for reports ("killed by SIGSEGV", "exit status 134")."""
        if self.proc is None or self.proc.poll() is None:
            return "running"
        rc = self.proc.returncode
        if rc < 0:
            return f"killed by {signal.Signals(-rc).name}"
        return f"exit status {rc}"

    def rss_bytes(self) -> int | None:
        """Resident memory of the process, when the suite owns it."""
        return self._status_bytes("VmRSS")

    def peak_rss_bytes(self) -> int | None:
        """Peak resident memory (VmHWM) of the process, when the suite owns it."""
        return self._status_bytes("VmHWM")

    def _status_bytes(self, key: str) -> int | None:
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def is_mapped(self, address: int) -> bool | None:
        """Whether ``address`` lies in a mapping of the process (None: not observable)."""
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/maps") as f:
                for line in f:
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    if lo <= address < hi:
                        return True
        except OSError:
            return None
        return False

    def stop(self) -> None:
        """Stop an owned process and remove the cache directory the suite made for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.cache_dir is not None:
            shutil.rmtree(self.cache_dir.parent, ignore_errors=True)

    def log_text(self) -> str:
        """What an owned server printed."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""


class TargetFactory:
    """Makes targets: a fresh process per call for commands, the same server for --server.

    ``kind`` says which server it is ("refimpl", "llama.cpp", "custom", "external"), so that a
    probe needing a feature (``cache``: the hash cache on, in a directory the suite chose;
    ``timeouts``: short idle and read timeouts) gets the right flags from ``feature_args``.
    """

    def __init__(self, name: str, command: str | None = None, address=None, env=None,
                 kind: str | None = None, feature_args: dict | None = None,
                 profile: Profile = LATEST, release: str | None = None):
        self.name = name
        self.command = command
        self.address = address
        self.env = env
        self.kind = kind or ("external" if command is None else "custom")
        self.feature_args = feature_args or {}
        #: The protocol version the server speaks (spec/versions.md).
        self.profile = profile
        #: For llama.cpp: the llama-cpp-python release it comes from (known deviations differ
        #: between releases); by default the one the suite runs for ``profile``.
        self.release = release or profile.peer_release

    @property
    def disposable(self) -> bool:
        """Whether each target is a fresh process."""
        return self.command is not None

    def supports(self, feature: str) -> bool:
        """Whether a target can be started with ``feature`` (see the class docstring)."""
        return self.disposable and feature in self.feature_args

    def start(self, features=()) -> Target:
        """A target ready to be probed, started with the flags ``features`` need."""
        if self.command is None:
            return Target(self.name, self.address, kind=self.kind, profile=self.profile)
        port = free_port()
        log = tempfile.NamedTemporaryFile(prefix="conformance-", suffix=".log", delete=False)
        cmd = shlex.split(self.command.format(port=port))
        env = dict(os.environ)
        env.update(self.env or {})
        cache_dir = None
        for feature in features:
            cmd += shlex.split(self.feature_args.get(feature, ""))
            if feature == "cache":
                root = Path(tempfile.mkdtemp(prefix="conformance-cache-"))
                env["LLAMA_CACHE"] = str(root)
                cache_dir = root / "rpc"
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        target = Target(self.name, ("127.0.0.1", port), proc, Path(log.name), cache_dir,
                        self.kind, self.profile)
        try:
            wait_for_port(port, proc, timeout=60)
        except Exception:
            target.stop()
            raise
        time.sleep(0.05)
        return target
