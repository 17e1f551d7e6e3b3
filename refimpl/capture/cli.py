"""``refimpl-capture``: record a conversation through a proxy, or show a recorded one.

    refimpl-capture --listen 127.0.0.1:50070 --upstream 127.0.0.1:50052 --out session.cap
    refimpl-capture show session.cap
"""

from __future__ import annotations

import argparse
import datetime
import logging
import signal
import sys

import trio

from .. import __version__
from .fileformat import CaptureFormatError, Writer, read
from .proxy import CaptureProxy
from .trace import render


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


async def record(listen, upstream, out, description: str = "") -> None:
    """Run the proxy until SIGINT or SIGTERM."""
    meta = {"tool": f"refimpl-capture {__version__}", "format": 1, "description": description,
            "listen": "{}:{}".format(*listen), "upstream": "{}:{}".format(*upstream),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hello_caps_zeroed": True}
    with Writer(out, meta) as writer:
        proxy = CaptureProxy(listen, upstream, writer)
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            print(f"recording {proxy.listen[0]}:{proxy.port} -> {upstream[0]}:{upstream[1]} "
                  f"into {out}", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break


def main(argv=None) -> int:
    """Entry point of ``refimpl-capture``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["show"]:
        p = argparse.ArgumentParser(prog="refimpl-capture show",
                                    description="Print a capture as an annotated trace.")
        p.add_argument("capture")
        p.add_argument("--graph-nodes", type=int, default=40, help="nodes listed per graph")
        p.add_argument("--no-notes", action="store_true", help="leave out the explanations")
        args = p.parse_args(argv[1:])
        try:
            cap = read(args.capture)
        except (OSError, CaptureFormatError) as exc:
            print(f"refimpl-capture: {exc}", file=sys.stderr)
            return 2
        try:
            print(render(cap, graph_nodes=args.graph_nodes, notes=not args.no_notes))
        except BrokenPipeError:
            pass
        return 0
    p = argparse.ArgumentParser(prog="refimpl-capture", description=__doc__.split("\n\n")[0],
                                epilog="refimpl-capture show FILE prints a capture.")
    p.add_argument("--listen", type=_address, default=("127.0.0.1", 50070))
    p.add_argument("--upstream", type=_address, required=True)
    p.add_argument("--out", required=True, help="capture file (.cap, or .cap.gz compressed)")
    p.add_argument("--description", default="", help="stored in the capture's metadata")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    trio.run(record, args.listen, args.upstream, args.out, args.description)
    return 0


if __name__ == "__main__":
    sys.exit(main())
