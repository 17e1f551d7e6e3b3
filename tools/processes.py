"""Run an RPC server (refimpl's or llama.cpp's) as a child process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .peers import peer_env


def die_with_parent() -> None:
    """``preexec_fn`` for test servers: on Linux the child gets SIGTERM when the test process
    dies, so a killed pytest leaves no server behind (a no-op elsewhere)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Block until something accepts on 127.0.0.1:port; raise if the process dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


class ServerProcess:
    """A server child process.  ``kind`` is ``"refimpl"`` or ``"llama.cpp"``.

    Use as a context manager; ``port`` is where it listens; ``log_text()`` returns its
    combined output so far.  The probe connection made while waiting for the port is closed
    at once, which both servers accept silently.
    """

    def __init__(self, kind: str, *, bin_dir: Path | None = None, args=(), env=None,
                 cache_dir: Path | None = None, module: str = "refimpl.server"):
        self.kind = kind
        self.port = free_port()
        self._log = tempfile.NamedTemporaryFile(prefix=f"{kind}-server-", suffix=".log",
                                                delete=False)
        base_env = peer_env(bin_dir) if bin_dir else dict(os.environ)
        if cache_dir is not None:
            base_env["LLAMA_CACHE"] = str(cache_dir)
        base_env.update(env or {})
        if kind == "refimpl":
            cmd = [sys.executable, "-m", module, "-p", str(self.port), *args]
        elif kind == "llama.cpp":
            if bin_dir is None:
                raise ValueError("the llama.cpp server needs bin_dir")
            cmd = [str(Path(bin_dir) / "ggml-rpc-server"), "-p", str(self.port), *args]
        else:
            raise ValueError(f"unknown server kind {kind!r}")
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=base_env, start_new_session=True,
                                     preexec_fn=die_with_parent)

    def __enter__(self):
        try:
            wait_for_port(self.port, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """``("127.0.0.1", port)``."""
        return ("127.0.0.1", self.port)

    @property
    def endpoint(self) -> str:
        """``"127.0.0.1:port"``, as llama.cpp's --rpc takes it."""
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the process and wait for it; kill it if it lingers.  Returns its status."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        """Everything the server printed so far."""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")
