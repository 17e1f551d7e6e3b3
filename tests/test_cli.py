"""``refimpl-server`` as a user runs it: flags, banner, errors, signals, debug logging."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import trio

from refimpl.client import RpcClient
from tools.processes import ServerProcess


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "refimpl.server", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_banner_lists_version_endpoint_cache_and_devices(tmp_path):
    with ServerProcess("refimpl", args=["-m", "512", "-c"], cache_dir=tmp_path) as srv:
        trio.run(_ping, srv, 512 << 20)
        text = srv.log_text()
    assert "Starting RPC server v7.0.0" in text
    assert f"endpoint       : 127.0.0.1:{srv.port}" in text
    assert f"local cache    : {tmp_path / 'rpc'}" in text
    assert "CPU: " in text and "(512 MiB, " in text


async def _ping(srv, total=None):
    async with await RpcClient.connect(*srv.address) as c:
        assert await c.device_count() == 1
        mem = await c.get_device_memory()
        assert total is None or mem.total == total


def test_cache_dir_not_shown_without_c():
    with ServerProcess("refimpl") as srv:
        pass
    assert "local cache    : n/a" in srv.log_text()


def test_cuda_device_fails_cleanly_without_a_gpu():
    # (tests/cuda/test_cuda_server.py covers the GPU and simulator cases)
    import ctypes
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this machine has a CUDA driver")
    except OSError:
        pass
    import os
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-m", "refimpl.server", "--device", "cuda0"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    assert "CUDA" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,needle", [
    (["--device", "tpu7"], "unknown device"),
    (["-t", "0"], "invalid number of threads"),
    (["-m", "-5"], "invalid memory size"),
    (["-p", "70000"], "invalid port"),
    (["--poll-us", "-1"], "--poll-us"),
])
def test_bad_arguments_give_one_line(args, needle):
    proc = run_cli(*args)
    assert proc.returncode != 0 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_port_in_use_is_reported():
    with ServerProcess("refimpl") as srv:
        proc = run_cli("-p", str(srv.port))
    assert proc.returncode != 0 and "cannot serve" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_graceful_shutdown(sig):
    srv = ServerProcess("refimpl")
    with srv:
        trio.run(_hold_connection_while_stopping, srv, sig)
    assert srv.proc.returncode == 0
    assert "shutting down" in srv.log_text() and "refimpl-server stopped" in srv.log_text()


async def _hold_connection_while_stopping(srv, sig):
    async with await RpcClient.connect(*srv.address) as c:
        await c.alloc_buffer(1 << 20)
        srv.proc.send_signal(sig)
        with trio.fail_after(10):
            while srv.proc.poll() is None:
                await trio.sleep(0.05)


def test_debug_env_logs_every_command():
    with ServerProcess("refimpl", env={"GGML_RPC_DEBUG": "1"}) as srv:
        trio.run(_ping, srv)
    text = srv.log_text()
    assert "refimpl.server.commands: hello" in text
    assert "device_count -> 1" in text and "get_device_memory device=0" in text


def test_no_command_logs_without_debug_env():
    with ServerProcess("refimpl") as srv:
        trio.run(_ping, srv)
    assert "device_count -> 1" not in srv.log_text()


def test_warns_when_binding_beyond_loopback():
    proc = subprocess.Popen([sys.executable, "-m", "refimpl.server", "-H", "127.0.0.2", "-p", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert "WARNING" in err and "no authentication" in err


def test_kernels_are_loaded_before_serving(monkeypatch, capsys):
    """run_server imports every served device kind's kernels, then loads the compiled CPU
    kernels that earlier runs used (refimpl.kernels.warmup), before it serves (and before its
    banner says so), not at the first client's first graph."""
    from refimpl.devices import CpuDevice
    from refimpl.kernels import warmup
    from refimpl.server import cli
    from refimpl.server.net import ServerConfig

    loaded = []
    monkeypatch.setattr(cli, "load_kernels",
                        lambda kind: loaded.append((kind, capsys.readouterr().out)))
    monkeypatch.setattr(warmup, "warm", lambda: loaded.append(("warm", capsys.readouterr().out)))
    monkeypatch.setattr(warmup, "_recording", False)
    # (a real collection of this test process's heap can take longer than the serving below)
    monkeypatch.setattr(cli, "freeze_survivors_once",
                        lambda: loaded.append(("freeze", capsys.readouterr().out)))
    config = ServerConfig(devices=[CpuDevice(capacity=1 << 20), CpuDevice(capacity=1 << 20)],
                          port=0)

    async def serve_briefly():
        with trio.move_on_after(1.0):
            await cli.run_server(config)

    trio.run(serve_briefly)
    assert [kind for kind, _ in loaded] == ["cpu", "warm", "freeze"]
    assert warmup._recording       # a server records what its graphs compile
    assert not any("Starting RPC server" in out for _, out in loaded)
    assert "Starting RPC server" in capsys.readouterr().out


def test_poll_flag_and_its_default(monkeypatch):
    from refimpl.server import net
    from refimpl.server.cli import build_parser, make_config
    config, _ = make_config(build_parser().parse_args(["--poll-us", "50"]))
    assert config.poll_after_reply == pytest.approx(50e-6)
    config, _ = make_config(build_parser().parse_args(["--poll-us", "0"]))
    assert config.poll_after_reply == 0
    monkeypatch.setattr(net.os, "sched_getaffinity", lambda pid: {0, 1})
    assert net.default_poll_seconds() == pytest.approx(200e-6)
    assert build_parser().parse_args([]).poll_us == pytest.approx(200)
    monkeypatch.setattr(net.os, "sched_getaffinity", lambda pid: {3})
    assert net.default_poll_seconds() == 0   # one core: the client needs it
    assert build_parser().parse_args([]).poll_us == 0
