"""``refimpl-server``: command line, banner, signals (flags compatible with llama.cpp's
``ggml-rpc-server`` and Ollama's ``rpc-server``)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys

import trio

from .. import __version__
from ..devices import DeviceUnavailable, open_device
from ..graph.engine import freeze_survivors_once
from ..graph.registry import load_kernels
from ..protocol.constants import PROTOCOL_VERSION
from ..protocol.profiles import LATEST, SERVED, served_profile
from .hash_cache import HashCache, default_cache_dir
from .net import (DEFAULT_MAX_BUFFERED, RpcServer, ServerConfig, default_poll_seconds,
                  usable_cores)

log = logging.getLogger("refimpl.server")

MIB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document the flags in README and docs)."""
    p = argparse.ArgumentParser(
        prog="refimpl-server",
        description="A ggml RPC server (protocol %d.%d.%d by default; --protocol selects one of "
                    "%s): llama.cpp clients offload model layers to it with --rpc HOST:PORT."
                    % (*PROTOCOL_VERSION, ", ".join(q.name for q in SERVED.values())))
    p.add_argument("-H", "--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s; anything else exposes the "
                        "server to the network, which the protocol does not protect)")
    p.add_argument("-p", "--port", type=int, default=50052,
                   help="TCP port (default: %(default)s; 0 picks a free one)")
    p.add_argument("-d", "--device", default="cpu",
                   help="comma-separated devices to expose, in index order: cpu, cudaN "
                        "(default: cpu; e.g. cpu,cuda0)")
    p.add_argument("-m", "--mem", type=int, default=None, metavar="MIB",
                   help="memory each device reports and enforces, in MiB "
                        "(default: the machine's physical memory)")
    p.add_argument("-c", "--cache", action="store_true",
                   help="enable the local tensor cache in $LLAMA_CACHE/rpc or "
                        "~/.cache/llama.cpp/rpc")
    p.add_argument("--cache-max-mib", type=int, default=None, metavar="MIB",
                   help="bound on the cache's size; least recently used entries are evicted "
                        "(default: half the disk space free at start)")
    p.add_argument("-t", "--threads", type=int, default=usable_cores(),
                   help="compute threads for the CPU device (default: the cores this process "
                        "may run on, %(default)s)")
    p.add_argument("--poll-us", type=float, default=default_poll_seconds() * 1e6,
                   metavar="MICROSECONDS",
                   help="after each reply, poll the socket this long for the client's next "
                        "request before sleeping until it comes: a sleeping thread's wake-up "
                        "costs tens of microseconds on every small command; only while one "
                        "client is connected (default: %(default)g, 0 on one core; 0: never)")
    p.add_argument("--max-connections", type=int, default=64, metavar="N",
                   help="clients served at once; more are refused (default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="close a connection idle between messages this long "
                        "(default: %(default)g; 0: never)")
    p.add_argument("--read-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="close a connection when a started message stalls this long "
                        "(default: %(default)g; 0: never)")
    p.add_argument("--max-message-mib", type=int, default=256, metavar="MIB",
                   help="largest GRAPH_COMPUTE payload accepted (default: %(default)s)")
    p.add_argument("--max-graph-nodes", type=int, default=1 << 18, metavar="N",
                   help="largest graph accepted, in nodes (default: %(default)s)")
    p.add_argument("--max-buffered-mib", type=int, default=DEFAULT_MAX_BUFFERED >> 20,
                   metavar="MIB",
                   help="memory that requests may hold while they arrive, are decoded and "
                        "run (graphs kept for recompute included), all clients together; a "
                        "connection that would go beyond it is closed (default: %(default)s)")
    p.add_argument("--max-buffers", type=int, default=4096, metavar="N",
                   help="buffers one connection may hold at once (default: %(default)s)")
    p.add_argument("--allow", action="append", default=[], metavar="CIDR",
                   help="only accept clients from this network (repeatable; default: anyone "
                        "who can reach the address)")
    p.add_argument("--protocol", default=LATEST.name, metavar="X.Y.Z",
                   help="protocol version to speak: %s (default: %%(default)s)"
                        % ", ".join(v.name for v in SERVED.values()))
    p.add_argument("--op-count", type=int, default=None, metavar="N",
                   help="GGML_OP_COUNT of the clients' ggml build, for the versions whose builds "
                        "numbered ops differently (3.0.0: 90, 94 or 95, default 90; 3.6.0: 95 or "
                        "96, default 95; spec/versions.md); other versions fix it")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default: %(default)s); GGML_RPC_DEBUG=1 also logs "
                        "every command")
    p.add_argument("--version", action="version",
                   version="refimpl-server %s (protocols %s)"
                   % (__version__, ", ".join(q.name for q in SERVED.values())))
    return p


def configure_logging(level: str) -> None:
    """Log to stderr; GGML_RPC_DEBUG=1 turns on one debug line per command, as upstream."""
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.get("GGML_RPC_DEBUG"):
        logging.getLogger("refimpl.server.commands").setLevel(logging.DEBUG)
        if logging.getLogger().level > logging.DEBUG:
            for h in logging.getLogger().handlers:
                h.setLevel(logging.DEBUG)
            logging.getLogger().setLevel(logging.DEBUG)
            for name in ("refimpl.server", "refimpl.server.session", "refimpl.server.cache"):
                logging.getLogger(name).setLevel(getattr(logging, level.upper()))


def banner(server: RpcServer, cache_dir) -> str:
    """The start-up text, shaped like llama.cpp's so existing scripts and eyes find things."""
    cfg = server.config
    lines = [
        "refimpl-server %s" % __version__,
        "Starting RPC server v%s" % cfg.profile.name,
        "  ggml ops       : %d (op table %s)" % (cfg.profile.op_count, cfg.profile.op_table),
        "  endpoint       : %s:%d" % (cfg.host, server.port),
        "  local cache    : %s" % (cache_dir if cache_dir else "n/a"),
        "Devices:",
    ]
    for dev in cfg.devices:
        free, total = dev.memory()
        lines.append("  %s: %s (%d MiB, %d MiB free)" % (dev.name, dev.description,
                                                      total // MIB, free // MIB))
    lines.append("  transport      : TCP")
    lines.append("  limits         : %d clients, idle %gs, read %gs, message %d MiB, requests "
                 "%d MiB, %d buffers per client" % (
                     cfg.max_connections, cfg.idle_timeout, cfg.read_timeout,
                     cfg.max_message_size // MIB, cfg.max_buffered // MIB, cfg.max_buffers))
    if cfg.cache is not None:
        lines.append("  cache bound    : %d MiB" % (cfg.cache.max_bytes // MIB))
    if cfg.allow:
        lines.append("  allowed        : %s" % ", ".join(str(n) for n in cfg.allow))
    return "\n".join(lines)


def _warn_exposed(host: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        bar = "!" * 72
        print(f"\n{bar}\nWARNING: binding {host}: the ggml RPC protocol has no authentication "
              f"and no\nencryption; anyone who can reach this port can use the server.\n{bar}\n",
              file=sys.stderr)


def load_device_kernels(devices) -> None:
    """Import the kernels of every kind of device served, before the first client comes:
    otherwise its first GRAPH_COMPUTE waits for the imports (some 300 ms for the CPU's).
    For the CPU, also load the compiled kernels earlier runs used (refimpl.kernels.warmup:
    some 500 ms of the first model load otherwise), then freeze what survives a collection
    (refimpl.graph.engine.freeze_survivors_once: 70 ms of the first graph otherwise)."""
    kinds = sorted({getattr(d, "kind", "cpu") for d in devices})
    for kind in kinds:
        load_kernels(kind)
    if "cpu" in kinds:
        from ..kernels import warmup
        warmup.warm()
        warmup.start_recording()
    freeze_survivors_once()


async def run_server(config: ServerConfig, cache_dir=None) -> None:
    """Serve until SIGINT or SIGTERM, then stop accepting and close every connection."""
    load_device_kernels(config.devices)
    server = RpcServer(config)
    # The signals are caught from before the port opens: a client (or a test) that stops the
    # server as soon as it can connect still gets the banner and an orderly stop.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        await server.bind()  # outside the nursery: an unusable address is a plain OSError
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            print(banner(server, cache_dir), flush=True)
            async for signum in signals:
                log.info("received %s; shutting down (%d connection(s) open)",
                         signal.Signals(signum).name, server.connections)
                nursery.cancel_scope.cancel()
                break
    print("refimpl-server stopped", flush=True)


def make_config(args) -> tuple[ServerConfig, object]:
    """Turn parsed arguments into a ServerConfig (opens devices; may raise DeviceUnavailable)."""
    try:
        profile = served_profile(getattr(args, "protocol", None) or LATEST.name)
    except (KeyError, ValueError):
        raise ValueError(f"unsupported protocol version {args.protocol!r}; supported: "
                         + ", ".join(p.name for p in SERVED.values())) from None
    op_count = getattr(args, "op_count", None)
    if op_count is not None:
        profile = profile.with_op_count(op_count)
    if args.threads <= 0:
        raise ValueError(f"invalid number of threads: {args.threads}")
    if args.mem is not None and args.mem <= 0:
        raise ValueError(f"invalid memory size: {args.mem} MiB")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"invalid port: {args.port}")
    capacity = args.mem * MIB if args.mem is not None else None
    names = [d for d in args.device.replace("/", ",").split(",") if d.strip()]
    if not names:
        raise ValueError("no device given")
    devices = [open_device(n, capacity=capacity, threads=args.threads) for n in names]
    cache = None
    cache_dir = None
    if args.cache_max_mib is not None and args.cache_max_mib < 0:
        raise ValueError("--cache-max-mib must not be negative")
    if args.cache:
        cache_dir = default_cache_dir()
        cache = HashCache(cache_dir, None if args.cache_max_mib is None
                          else args.cache_max_mib * MIB)
    for name in ("max_connections", "max_message_mib", "max_graph_nodes", "max_buffered_mib",
                 "max_buffers"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.idle_timeout < 0 or args.read_timeout < 0:
        raise ValueError("timeouts must not be negative")
    if not 0 <= args.poll_us <= 1e6:
        raise ValueError("--poll-us must be between 0 and 1000000")
    allow = []
    for cidr in args.allow:
        try:
            allow.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise ValueError(f"--allow {cidr!r} is not a network (e.g. 10.0.0.0/8)") from None
    from ..graph import GraphLimits, GraphExecutor
    limits = GraphLimits(max_nodes=args.max_graph_nodes)
    return ServerConfig(devices=devices, host=args.host, port=args.port, cache=cache,
                        graph_executor_factory=lambda devs: GraphExecutor(devs, limits),
                        max_connections=args.max_connections, idle_timeout=args.idle_timeout,
                        read_timeout=args.read_timeout,
                        max_message_size=args.max_message_mib << 20, allow=allow,
                        max_buffered=args.max_buffered_mib << 20,
                        max_buffers=args.max_buffers, profile=profile,
                        poll_after_reply=args.poll_us * 1e-6), cache_dir


def main(argv=None) -> int:
    """Entry point of ``refimpl-server``."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config, cache_dir = make_config(args)
    except (DeviceUnavailable, ValueError, OSError) as exc:
        print(f"refimpl-server: error: {exc}", file=sys.stderr)
        return 2
    _warn_exposed(args.host)
    try:
        trio.run(run_server, config, cache_dir)
    except OSError as exc:  # e.g. the port is taken
        print(f"refimpl-server: error: cannot serve on {args.host}:{args.port}: {exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
