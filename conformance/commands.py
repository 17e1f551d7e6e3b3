"""Direct tests of every command, the HELLO rules and framing (spec/commands.md, spec/errors.md).

Not replays: each :class:`Check` builds its own requests, sends them to the server under
test, and reports one *outcome*:

=============  ==================================================================================
``ok``         a success case: every reply was what the spec requires
``refused``    a failure case: the server closed the connection without a reply (the spec's rule
               for every invalid request, spec/errors.md)
``answered …`` a request the spec says must be refused got a reply (what it was follows)
``accepted``   a request without a reply that must be refused was not: the next request was
               answered
``wrong: …``   a success case got a reply that breaks the spec (what and why follow)
``hang``       neither an answer nor a close within the deadline
``crash …``    the server process died, or stopped serving new connections
=============  ==================================================================================

``expect`` is what the spec demands; ``upstream`` records what llama.cpp 0.3.36 does where it
deviates, with the issue or advisory that documents it.  ``destructive`` checks may take a
non-conforming server down: the suite gives them a fresh server process.

Every check speaks the protocol version of the server under test (``target.profile``,
spec/versions.md); ``versions`` limits a check to the versions where what it tests exists
(MEMSET_TENSOR from 5.0.0, the cache flag in 7.0.0, the HELLO capability block from 4.0.0).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable

from refimpl.protocol import compat
from refimpl.protocol import messages as m
from refimpl.protocol.connection import hello_request
from refimpl.protocol.constants import CONN_CAPS_SIZE, Command
from refimpl.protocol.profiles import LATEST, SERVED, Profile
from refimpl.protocol.tensor import RpcTensor, contiguous_strides, tensor_nbytes

from support import Closed, NoAnswer, Target, Wire, frame

F32, I8, OP_ADD = 0, 24, 2
#: ggml marks the nodes a backend must compute with this flag; llama.cpp skips nodes without it.
FLAG_COMPUTE = 16
GHSA = "https://github.com/ggml-org/llama.cpp/security/advisories/"
ISSUE = "https://github.com/ggml-org/llama.cpp/issues/"
ERRORS = "spec/errors.md#upstream-deviations-llamacpp-0336"


class Wrong(Exception):
    """A success case got a reply that breaks the spec."""


@dataclass(frozen=True)
class Upstream:
    """A known deviation of llama.cpp: the outcome it shows and where it is documented."""

    outcome: str
    link: str
    note: str = ""
    #: The llama-cpp-python releases whose llama.cpp shows it (None: every release the suite
    #: runs, 0.3.36 and the older ones of spec/versions.md).
    releases: tuple[str, ...] | None = None


#: The releases the suite runs for the versions before 7.0.0 (``Profile.peer_release``).
OLDER_RELEASES = tuple(p.peer_release for p in SERVED.values() if p.peer_release and p is not LATEST)


@dataclass(frozen=True)
class Check:
    """One direct test of a command."""

    id: str
    command: str          # the row of the report: a command name, "HELLO" or "framing"
    title: str
    section: str          # the spec section that says what must happen
    run: Callable
    expect: str = "ok"    # "ok" or "refused"
    #: llama.cpp's known deviations: one, or several for different releases.
    upstream: Upstream | tuple[Upstream, ...] | None = None
    destructive: bool = False
    needs: tuple = ()     # target features ("cache")
    #: The protocol versions the check applies to (None: all).
    versions: Callable[[Profile], bool] | None = None

    def applies(self, profile: Profile) -> bool:
        """Whether what the check tests exists in ``profile``'s version."""
        return self.versions is None or self.versions(profile)

    def upstream_of(self, release: str) -> Upstream | None:
        """The known deviation of llama.cpp of ``release`` (a llama-cpp-python release)."""
        found = self.upstream if isinstance(self.upstream, tuple) else (self.upstream,)
        return next((u for u in found if u is not None
                     and (u.releases is None or release in u.releases)), None)


CHECKS: list[Check] = []


def has_command(name: str) -> Callable[[Profile], bool]:
    """A ``versions`` predicate: the version has that command."""
    return lambda p: name in p.commands


def lacks_command(name: str) -> Callable[[Profile], bool]:
    """A ``versions`` predicate: the version does not have that command."""
    return lambda p: name not in p.commands


def caps_hello(p: Profile) -> bool:
    """HELLO carries the 24-byte capability block (4.0.0 on)."""
    return p.hello_request_size == CONN_CAPS_SIZE


def cache_flag(p: Profile) -> bool:
    """SET_TENSOR carries the cache flag (7.0.0)."""
    return p.set_tensor_header_size == 305


def check(id, command, title, section, expect="ok", **kw):
    """Register a check function ``fn(ctx) -> outcome``."""
    def deco(fn):
        """Add ``fn`` to CHECKS."""
        CHECKS.append(Check(id, command, title, section, fn, expect, **kw))
        return fn
    return deco


# ----------------------------------------------------------------------------------------------
# running a check
# ----------------------------------------------------------------------------------------------

class Context:
    """What a check works with: connections to the target, closed with a reset at the end
    (a reset never makes llama.cpp's server write to a closed socket, spec/hazards.md H25)."""

    def __init__(self, target: Target, timeout: float = 10.0):
        self.target = target
        self.timeout = timeout
        self._wires: list[Wire] = []

    def connect(self, hello: bool = True) -> Wire:
        """A new connection, HELLO done unless ``hello=False``."""
        w = Wire(self.target.address, timeout=self.timeout, hello=False,
                 profile=self.target.profile)
        self._wires.append(w)
        if hello:
            w.call(hello_request())
        return w

    def done(self, w: Wire) -> None:
        """Close one connection now (llama.cpp serves the next one only after it)."""
        w.close(reset=True)
        if w in self._wires:
            self._wires.remove(w)

    def close_all(self) -> None:
        """Reset every connection still open."""
        for w in self._wires:
            w.close(reset=True)
        self._wires.clear()


@dataclass
class Result:
    """What a check observed."""

    check: Check
    outcome: str
    seconds: float = 0.0


def execute(c: Check, target: Target, timeout: float = 10.0) -> Result:
    """Run ``c`` against ``target``; the outcome includes a crash found afterwards."""
    ctx = Context(target, timeout)
    t0 = time.monotonic()
    try:
        outcome = c.run(ctx)
    except Wrong as exc:
        outcome = f"wrong: {exc}"
    except Closed as exc:
        outcome = "refused" if c.expect == "refused" else f"wrong: the server closed the connection ({exc})"
    except (NoAnswer, socket.timeout, TimeoutError):
        outcome = "hang"
    except OSError as exc:
        outcome = f"wrong: socket error {exc}"
    finally:
        ctx.close_all()
    proc = target.proc
    if not target.alive(timeout=timeout) or (proc is not None and proc.poll() is not None):
        for _ in range(40):   # a process that is aborting: let it finish, for its exit status
            if proc is None or proc.poll() is not None:
                break
            time.sleep(0.05)
        if proc is not None and proc.poll() is not None:
            outcome = f"crash ({target.exit_description()})"
        else:
            outcome = "crash (stopped serving new connections)"
    return Result(c, outcome, time.monotonic() - t0)


def same_outcome(observed: str, wanted: str) -> bool:
    """``crash`` matches any crash; everything else must be equal."""
    if wanted == "crash":
        return observed.startswith("crash")
    return observed == wanted


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def T(buffer=0, data=0, ne=(1,), type_=F32, id=1, nb=None, **kw) -> RpcTensor:
    """A tensor (contiguous unless ``nb``) in ``buffer`` at address ``data``."""
    ne = tuple(ne) + (1,) * (4 - len(ne))
    return RpcTensor(id=id, type=type_, buffer=buffer, ne=ne,
                     nb=tuple(nb) if nb else contiguous_strides(type_, ne), data=data, **kw)


def f32(*vals) -> bytes:
    """Little-endian floats."""
    return struct.pack(f"<{len(vals)}f", *vals)


def require(cond: bool, what: str) -> None:
    """Raise :class:`Wrong` unless ``cond``."""
    if not cond:
        raise Wrong(what)


def refusal(w: Wire, req) -> str:
    """Send a request that must be refused (a message, or raw framed bytes): ``refused`` if the
    server closes the connection, else what happened (``answered …``, ``accepted``, ``hang``)."""
    if isinstance(req, bytes):
        w.send_raw(req)
        return after_no_reply(w)
    try:
        reply = w.call(req)
    except Closed:
        return "refused"
    if compat.has_response(req.COMMAND, w.profile):
        return f"answered {_short(reply)}"
    return after_no_reply(w)


def closes_on(w: Wire, data: bytes) -> str:
    """Send raw bytes the server must refuse at once: ``refused`` if it then closes the
    connection, ``answered`` if it sends bytes instead (NoAnswer if neither)."""
    w.send_raw(data)
    return "refused" if w.closed_by_server() else "answered"


def after_no_reply(w: Wire) -> str:
    """After a request without a reply: ``refused`` if the server closed the connection,
    ``accepted`` if it still answers, ``hang`` if neither."""
    try:
        return "accepted" if w.answers() else "refused"
    except NoAnswer:
        return "hang"


def refused_set_tensor(w: Wire, t: RpcTensor, data: bytes, offset: int = 0) -> str:
    """SET_TENSOR that must be refused."""
    try:
        w.set_tensor(t, data, offset)
    except Closed:
        return "refused"
    return after_no_reply(w)


def _short(reply) -> str:
    if isinstance(reply, bytes):
        return f"{len(reply)} bytes"
    text = repr(reply)
    return text if len(text) < 120 else text[:117] + "..."


def buffer(ctx: Context, size: int = 256):
    """A connection and a buffer on it: (wire, handle, base)."""
    w = ctx.connect()
    h, base = w.alloc(size)
    return w, h, base


# ----------------------------------------------------------------------------------------------
# HELLO (spec/handshake.md)
# ----------------------------------------------------------------------------------------------

@check("hello-reply", "HELLO", "HELLO is answered with the server's version (and, from 4.0.0, "
       "zero capabilities)", "spec/handshake.md#reply")
def _(ctx):
    w = ctx.connect(hello=False)
    r = w.call(hello_request())
    want = ctx.target.profile.version
    require((r.major, r.minor, r.patch) == want, f"version {r.major}.{r.minor}.{r.patch}, "
                                                 f"the suite judges %d.%d.%d" % want)
    require(r.padding == 0, f"padding {r.padding}")
    require(r.conn_caps == bytes(CONN_CAPS_SIZE), "non-zero capabilities answered to a TCP-only client")
    require(w.call(m.DeviceCountRequest()).count >= 1, "no device after HELLO")
    return "ok"


@check("hello-caps-declined", "HELLO", "a client offering capabilities is kept on TCP",
       "spec/handshake.md#request", versions=caps_hello)
def _(ctx):
    w = ctx.connect(hello=False)
    r = w.call(m.HelloRequest(b"\x01" * CONN_CAPS_SIZE))
    want = ctx.target.profile.version
    require((r.major, r.minor) == want[:2], f"version {r.major}.{r.minor}.{r.patch}")
    require(w.call(m.DeviceCountRequest()).count >= 1, "the connection left TCP")
    return "ok"


@check("hello-not-first", "HELLO", "a first command other than HELLO is refused",
       "spec/handshake.md#server-rules", "refused")
def _(ctx):
    w = ctx.connect(hello=False)
    return closes_on(w, frame(Command.DEVICE_COUNT))


@check("hello-old-length", "HELLO", "HELLO of length 0 (a client before 4.0.0) is refused",
       "spec/handshake.md#server-rules", "refused", versions=caps_hello)
def _(ctx):
    w = ctx.connect(hello=False)
    return closes_on(w, frame(Command.HELLO))


@check("hello-new-length", "HELLO", "HELLO of length 24 (a client of 4.0.0 on) is refused",
       "spec/versions.md#361", "refused", versions=lambda p: not caps_hello(p))
def _(ctx):
    w = ctx.connect(hello=False)
    return closes_on(w, frame(Command.HELLO, bytes(CONN_CAPS_SIZE)))


@check("hello-twice", "HELLO", "a second HELLO on a connection is refused",
       "spec/handshake.md#server-rules", "refused")
def _(ctx):
    w = ctx.connect()
    return closes_on(w, frame(Command.HELLO, bytes(ctx.target.profile.hello_request_size)))


# ----------------------------------------------------------------------------------------------
# framing (spec/transport.md)
# ----------------------------------------------------------------------------------------------

@check("unknown-command-18", "framing", "command 18 (llama.cpp's internal marker) is refused",
       "spec/commands.md#commands", "refused")
def _(ctx):
    w = ctx.connect()
    return closes_on(w, frame(18))


@check("unknown-command-17", "framing", "command 17 (MEMSET_TENSOR from 5.0.0 on) is refused",
       "spec/versions.md#403", "refused", versions=lacks_command("MEMSET_TENSOR"))
def _(ctx):
    w, h, base = buffer(ctx, 64)
    payload = m.MemsetTensorRequest(T(h, base, (64,), I8), 0, 16, 1).encode_payload()
    return refusal(w, frame(17, payload))


@check("unknown-command-16", "framing", "command 16 (GRAPH_RECOMPUTE from 3.5.0 on) is refused",
       "spec/versions.md#300", "refused", versions=lacks_command("GRAPH_RECOMPUTE"))
def _(ctx):
    w = ctx.connect()
    return refusal(w, frame(16, struct.pack("<I", 0)))


@check("unknown-command-255", "framing", "command 255 is refused", "spec/commands.md#commands",
       "refused")
def _(ctx):
    w = ctx.connect()
    return closes_on(w, frame(255, b"\0" * 8))


@check("wrong-fixed-length", "framing", "a fixed-size request with the wrong length is refused",
       "spec/transport.md#length-rules", "refused")
def _(ctx):
    w = ctx.connect()
    return closes_on(w, frame(Command.GET_ALIGNMENT, b"\0" * 5))


@check("device-count-payload", "DEVICE_COUNT", "DEVICE_COUNT with a payload is refused",
       "spec/transport.md#length-rules", "refused")
def _(ctx):
    w = ctx.connect()
    return closes_on(w, frame(Command.DEVICE_COUNT, b"\0" * 4))


@check("huge-fixed-length", "framing", "a fixed-size request announcing 2^63 bytes is refused at once",
       "spec/transport.md#length-rules", "refused")
def _(ctx):
    w = ctx.connect()
    return closes_on(w, struct.pack("<BQ", Command.GET_ALIGNMENT, 1 << 63))


@check("huge-set-tensor-length", "framing", "SET_TENSOR announcing 2^64-1 bytes is refused",
       "spec/transport.md#length-rules", "refused", destructive=True,
       upstream=Upstream("crash", ISSUE + "25287",
                         "length_error from vector::resize terminates the process (H19)"))
def _(ctx):
    w = ctx.connect()
    return closes_on(w, struct.pack("<BQ", Command.SET_TENSOR, (1 << 64) - 1))


@check("truncated-header", "framing", "a connection closed inside a request header ends only "
       "that connection", "spec/transport.md#connection-states", "refused")
def _(ctx):
    w = ctx.connect()
    w.send_raw(struct.pack("<BQ", Command.GET_ALIGNMENT, 4)[:5])
    ctx.done(w)
    return "refused"  # the server must survive it; execute() checks that


@check("truncated-payload", "framing", "a connection closed inside a payload ends only that "
       "connection", "spec/transport.md#connection-states", "refused")
def _(ctx):
    w = ctx.connect()
    w.send_raw(frame(Command.ALLOC_BUFFER, b"\0" * 12)[:14])
    ctx.done(w)
    return "refused"


@check("pipelined", "framing", "requests sent back to back are answered in order",
       "spec/transport.md#pipelining")
def _(ctx):
    w = ctx.connect()
    reqs = [m.DeviceCountRequest(), m.GetAlignmentRequest(0), m.GetMaxSizeRequest(0),
            m.GetDeviceMemoryRequest(0)]
    w.send_raw(b"".join(w.conn.send(r) for r in reqs))
    replies = [w._reply() for _ in reqs]
    kinds = [type(r).__name__ for r in replies]
    require(kinds == ["DeviceCountResponse", "GetAlignmentResponse", "GetMaxSizeResponse",
                      "GetDeviceMemoryResponse"], f"replies {kinds}")
    return "ok"


# ----------------------------------------------------------------------------------------------
# devices
# ----------------------------------------------------------------------------------------------

@check("device-count", "DEVICE_COUNT", "at least one device", "spec/commands.md#device_count-15")
def _(ctx):
    require(ctx.connect().call(m.DeviceCountRequest()).count >= 1, "no devices")
    return "ok"


def _bad_device(w: Wire) -> int:
    return w.call(m.DeviceCountRequest()).count + 7


@check("get-alignment", "GET_ALIGNMENT", "a power of two", "spec/commands.md#get_alignment-1")
def _(ctx):
    a = ctx.connect().call(m.GetAlignmentRequest(0)).alignment
    require(a > 0 and a & (a - 1) == 0, f"alignment {a}")
    return "ok"


@check("get-alignment-bad-device", "GET_ALIGNMENT", "a device index beyond DEVICE_COUNT is refused",
       "spec/handles.md#device-indices", "refused")
def _(ctx):
    w = ctx.connect()
    return refusal(w, m.GetAlignmentRequest(_bad_device(w)))


@check("get-max-size", "GET_MAX_SIZE", "greater than zero", "spec/commands.md#get_max_size-2")
def _(ctx):
    require(ctx.connect().call(m.GetMaxSizeRequest(0)).max_size > 0, "max_size 0")
    return "ok"


@check("get-max-size-bad-device", "GET_MAX_SIZE", "a device index beyond DEVICE_COUNT is refused",
       "spec/handles.md#device-indices", "refused")
def _(ctx):
    w = ctx.connect()
    return refusal(w, m.GetMaxSizeRequest(_bad_device(w)))


@check("get-device-memory", "GET_DEVICE_MEMORY", "0 < total and free <= total",
       "spec/commands.md#get_device_memory-11")
def _(ctx):
    r = ctx.connect().call(m.GetDeviceMemoryRequest(0))
    require(0 < r.total and r.free <= r.total, f"free {r.free}, total {r.total}")
    return "ok"


@check("get-device-memory-bad-device", "GET_DEVICE_MEMORY", "a device index beyond DEVICE_COUNT "
       "is refused", "spec/handles.md#device-indices", "refused")
def _(ctx):
    w = ctx.connect()
    return refusal(w, m.GetDeviceMemoryRequest(_bad_device(w)))


# ----------------------------------------------------------------------------------------------
# buffers
# ----------------------------------------------------------------------------------------------

@check("alloc-buffer", "ALLOC_BUFFER", "a non-zero handle and at least the size asked; distinct "
       "buffers get distinct handles and disjoint, aligned ranges", "spec/commands.md#alloc_buffer-0")
def _(ctx):
    w = ctx.connect()
    align = w.call(m.GetAlignmentRequest(0)).alignment
    bufs = []
    for size in (1000, 4096, 1):
        r = w.call(m.AllocBufferRequest(0, size))
        require(r.handle != 0 and r.size >= size, f"reply {r} for {size} bytes")
        base = w.call(m.BufferGetBaseRequest(r.handle)).base
        require(base % align == 0, f"base {base:#x} not a multiple of {align}")
        bufs.append((r.handle, base, r.size))
    require(len({b[0] for b in bufs}) == 3, "handles repeat")
    for i, (_, b1, s1) in enumerate(bufs):
        for _, b2, s2 in bufs[i + 1:]:
            require(b1 + s1 <= b2 or b2 + s2 <= b1, "buffer ranges overlap")
    return "ok"


@check("alloc-buffer-zero", "ALLOC_BUFFER", "a zero-size allocation succeeds with a handle",
       "spec/commands.md#alloc_buffer-0")
def _(ctx):
    w = ctx.connect()
    r = w.call(m.AllocBufferRequest(0, 0))
    require(r.handle != 0, f"reply {r}")
    w.call(m.BufferGetBaseRequest(r.handle))   # any base: it is unspecified
    w.call(m.FreeBufferRequest(r.handle))
    require(w.answers(), "freeing the empty buffer closed the connection")
    return "ok"


@check("alloc-buffer-too-big", "ALLOC_BUFFER", "an allocation beyond memory gets handle 0 and the "
       "connection stays open", "spec/commands.md#alloc_buffer-0")
def _(ctx):
    w = ctx.connect()
    r = w.call(m.AllocBufferRequest(0, 1 << 62))
    require(r.handle == 0 and r.size == 0, f"reply {r} for 2^62 bytes")
    require(w.answers(), "the connection was closed after a failed allocation")
    return "ok"


@check("alloc-buffer-bad-device", "ALLOC_BUFFER", "a device index beyond DEVICE_COUNT is refused",
       "spec/handles.md#device-indices", "refused")
def _(ctx):
    w = ctx.connect()
    return refusal(w, m.AllocBufferRequest(_bad_device(w), 64))


@check("buffer-get-base", "BUFFER_GET_BASE", "the base is a multiple of the alignment and the "
       "same every time", "spec/commands.md#buffer_get_base-3")
def _(ctx):
    w = ctx.connect()
    align = w.call(m.GetAlignmentRequest(0)).alignment
    h = w.call(m.AllocBufferRequest(0, 100)).handle
    bases = {w.call(m.BufferGetBaseRequest(h)).base for _ in range(3)}
    require(len(bases) == 1, f"bases {bases}")
    base = bases.pop()
    require(base % align == 0, f"base {base:#x} not a multiple of {align}")
    return "ok"


@check("buffer-get-base-unknown", "BUFFER_GET_BASE", "a handle never allocated is refused",
       "spec/handles.md#buffer-handles", "refused")
def _(ctx):
    w, h, base = buffer(ctx)
    return refusal(w, m.BufferGetBaseRequest(h ^ 0x5A5A0000))


@check("free-buffer", "FREE_BUFFER", "a live buffer is freed without a reply (an empty one "
       "before 6.0.0); the connection goes on", "spec/commands.md#free_buffer-4")
def _(ctx):
    w, h, base = buffer(ctx)
    h2, _ = w.alloc(64)
    w.call(m.FreeBufferRequest(h))
    w.call(m.BufferGetBaseRequest(h2))    # the other buffer is untouched
    require(w.answers(), "FREE_BUFFER closed the connection")
    return "ok"


@check("free-buffer-then-use", "FREE_BUFFER", "a freed handle is dead: using it is refused",
       "spec/commands.md#free_buffer-4", "refused")
def _(ctx):
    w, h, base = buffer(ctx)
    w.call(m.FreeBufferRequest(h))
    require(w.answers(), "FREE_BUFFER of a live buffer closed the connection")
    return refusal(w, m.BufferGetBaseRequest(h))


@check("free-buffer-unknown", "FREE_BUFFER", "freeing a handle never allocated is refused",
       "spec/handles.md#buffer-handles", "refused")
def _(ctx):
    w, h, base = buffer(ctx)
    return refusal(w, m.FreeBufferRequest(h ^ 0x5A5A0000))


@check("buffers-per-connection", "FREE_BUFFER", "buffers are freed when their connection ends, "
       "and another connection cannot use them", "spec/handles.md#lifetime", "refused")
def _(ctx):
    w, h, base = buffer(ctx)
    ctx.done(w)
    return refusal(ctx.connect(), m.BufferGetBaseRequest(h))


@check("buffer-clear", "BUFFER_CLEAR", "every byte of the buffer becomes the value",
       "spec/commands.md#buffer_clear-5")
def _(ctx):
    w, h, base = buffer(ctx, 96)
    w.call(m.BufferClearRequest(h, 0xA7))
    got = w.call(m.GetTensorRequest(T(h, base, (96,), I8), 0, 96))
    require(got == b"\xa7" * 96, "buffer not filled")
    return "ok"


@check("buffer-clear-unknown", "BUFFER_CLEAR", "clearing a handle never allocated is refused",
       "spec/handles.md#buffer-handles", "refused")
def _(ctx):
    w, h, base = buffer(ctx)
    return refusal(w, m.BufferClearRequest(h ^ 0x5A5A0000, 1))


# ----------------------------------------------------------------------------------------------
# tensor data
# ----------------------------------------------------------------------------------------------

@check("set-get-tensor", "SET_TENSOR", "bytes written at an offset read back exactly",
       "spec/commands.md#set_tensor-6")
def _(ctx):
    w, h, base = buffer(ctx)
    t = T(h, base + 32, (16,))
    data = f32(*range(16))
    w.set_tensor(t, data)
    w.set_tensor(t, f32(-1.5, 2.25), offset=8)
    got = w.call(m.GetTensorRequest(t, 0, 64))
    require(got == data[:8] + f32(-1.5, 2.25) + data[16:], "read-back differs")
    return "ok"


@check("set-tensor-short", "SET_TENSOR", "a payload shorter than the 305-byte header is refused",
       "spec/transport.md#length-rules", "refused")
def _(ctx):
    w, h, base = buffer(ctx)
    return refusal(w, frame(Command.SET_TENSOR, T(h, base).encode()))


@check("set-tensor-unknown-buffer", "SET_TENSOR", "a tensor naming a handle never allocated is "
       "refused", "spec/tensor.md#placement", "refused")
def _(ctx):
    w, h, base = buffer(ctx)
    return refused_set_tensor(w, T(h ^ 0x5A5A0000, base, (4,)), f32(1, 2, 3, 4))


@check("set-tensor-beyond-buffer", "SET_TENSOR", "a region past the end of the buffer is refused",
       "spec/tensor.md#placement", "refused")
def _(ctx):
    w, h, base = buffer(ctx, 64)
    return refused_set_tensor(w, T(h, base, (4,)), f32(1, 2, 3, 4), offset=1 << 20)


@check("set-tensor-outside-buffer", "SET_TENSOR", "a tensor whose data lies outside its buffer is "
       "refused", "spec/tensor.md#placement", "refused", destructive=True,
       upstream=Upstream("crash", GHSA + "GHSA-wcr5-566p-9cwj",
                         "GGML_ASSERT in deserialize_tensor aborts the server (H1)"))
def _(ctx):
    w, h, base = buffer(ctx, 64)
    return refused_set_tensor(w, T(h, base + 4096, (4,)), f32(1, 2, 3, 4))


@check("set-tensor-beyond-tensor", "SET_TENSOR", "a region inside the buffer but beyond the tensor "
       "is refused", "spec/tensor.md#placement", "refused", destructive=True,
       upstream=Upstream("crash", "spec/hazards.md#h26",
                         "ggml_backend_tensor_set asserts against the tensor: SIGABRT (H26)"))
def _(ctx):
    w, h, base = buffer(ctx, 256)
    return refused_set_tensor(w, T(h, base, (4,)), f32(*range(8)))


@check("get-tensor", "GET_TENSOR", "exactly the bytes [offset, offset + size) of the tensor",
       "spec/commands.md#get_tensor-8")
def _(ctx):
    w, h, base = buffer(ctx)
    t = T(h, base + 64, (32,), I8)
    data = os.urandom(32)
    w.set_tensor(t, data)
    require(w.call(m.GetTensorRequest(t, 5, 20)) == data[5:25], "wrong bytes")
    require(w.call(m.GetTensorRequest(t, 32, 0)) == b"", "a zero-size read at the end")
    return "ok"


@check("get-tensor-beyond-buffer", "GET_TENSOR", "a region past the end of the buffer is refused",
       "spec/tensor.md#placement", "refused")
def _(ctx):
    w, h, base = buffer(ctx, 64)
    return refusal(w, m.GetTensorRequest(T(h, base, (4,)), 1 << 20, 16))


@check("get-tensor-outside-buffer", "GET_TENSOR", "a tensor whose data lies outside its buffer is "
       "refused", "spec/tensor.md#placement", "refused", destructive=True,
       upstream=Upstream("crash", GHSA + "GHSA-5vm9-p64x-gqw9",
                         "GGML_ASSERT in deserialize_tensor aborts the server (H2)"))
def _(ctx):
    w, h, base = buffer(ctx, 64)
    return refusal(w, m.GetTensorRequest(T(h, base + 4096, (4,)), 0, 16))


@check("get-tensor-beyond-tensor", "GET_TENSOR", "a region inside the buffer but beyond the tensor "
       "is refused", "spec/tensor.md#placement", "refused", destructive=True,
       upstream=Upstream("crash", "spec/hazards.md#h26",
                         "ggml_backend_tensor_get asserts against the tensor: SIGABRT (H26)"))
def _(ctx):
    w, h, base = buffer(ctx, 256)
    return refusal(w, m.GetTensorRequest(T(h, base, (4,)), 0, 32))


@check("set-tensor-hash-miss", "SET_TENSOR_HASH", "a hash the server does not have is answered 0",
       "spec/commands.md#set_tensor_hash-7")
def _(ctx):
    w, h, base = buffer(ctx)
    r = w.call(m.SetTensorHashRequest(T(h, base, (4,)), 0, int.from_bytes(os.urandom(8), "little")))
    require(r.result == 0, f"result {r.result} for a random hash")
    return "ok"


@check("set-tensor-hash-hit", "SET_TENSOR_HASH", "bytes uploaded with cache_flag 1 are written "
       "again from the cache by their hash", "spec/hash-cache.md#server-behaviour",
       needs=("cache",), versions=cache_flag)
def _(ctx):
    from refimpl.hashing import fnv1a_64
    w, h, base = buffer(ctx, 256)
    data = os.urandom(64)
    w.set_tensor(T(h, base, (64,), I8), data, cache_flag=1)
    t2 = T(h, base + 128, (64,), I8)
    r = w.call(m.SetTensorHashRequest(t2, 0, fnv1a_64(data)))
    require(r.result == 1, "the uploaded bytes were not found in the cache")
    require(w.call(m.GetTensorRequest(t2, 0, 64)) == data, "the cached bytes were not written")
    return "ok"


@check("set-tensor-hash-bad-tensor", "SET_TENSOR_HASH", "an invalid tensor is refused even when "
       "the hash is not cached", "spec/commands.md#set_tensor_hash-7", "refused",
       upstream=Upstream("answered SetTensorHashResponse(result=0)", ERRORS,
                         "answers 0 without looking at the tensor"))
def _(ctx):
    w, h, base = buffer(ctx)
    return refusal(w, m.SetTensorHashRequest(T(h ^ 0x5A5A0000, base, (4,)), 0,
                                             int.from_bytes(os.urandom(8), "little")))


@check("copy-tensor", "COPY_TENSOR", "nbytes(src) bytes are copied and the reply is 1",
       "spec/commands.md#copy_tensor-9")
def _(ctx):
    w = ctx.connect()
    h1, b1 = w.alloc(64)
    h2, b2 = w.alloc(64)
    data = os.urandom(32)
    src, dst = T(h1, b1, (32,), I8), T(h2, b2 + 16, (32,), I8, id=2)
    w.set_tensor(src, data)
    require(w.call(m.CopyTensorRequest(src, dst)).result == 1, "copy not made")
    require(w.call(m.GetTensorRequest(dst, 0, 32)) == data, "copied bytes differ")
    return "ok"


@check("copy-tensor-overflow", "COPY_TENSOR", "a copy running past the destination buffer is "
       "refused", "spec/commands.md#copy_tensor-9", "refused")
def _(ctx):
    w = ctx.connect()
    h1, b1 = w.alloc(256)
    h2, b2 = w.alloc(64)
    return refusal(w, m.CopyTensorRequest(T(h1, b1, (256,), I8), T(h2, b2 + 32, (32,), I8, id=2)))


@check("memset-tensor", "MEMSET_TENSOR", "the region becomes the value, nothing else changes",
       "spec/commands.md#memset_tensor-17",
       versions=has_command("MEMSET_TENSOR"))
def _(ctx):
    w, h, base = buffer(ctx, 64)
    t = T(h, base, (64,), I8)
    w.set_tensor(t, bytes(64))
    w.call(m.MemsetTensorRequest(t, 8, 16, 0x3C))
    require(w.call(m.GetTensorRequest(t, 0, 64)) == bytes(8) + b"\x3c" * 16 + bytes(40),
            "wrong bytes after MEMSET_TENSOR")
    return "ok"


@check("memset-tensor-beyond-tensor", "MEMSET_TENSOR", "a region beyond the tensor is refused",
       "spec/tensor.md#placement", "refused", versions=has_command("MEMSET_TENSOR"))
def _(ctx):
    w, h, base = buffer(ctx, 256)
    return refusal(w, m.MemsetTensorRequest(T(h, base, (16,), I8), 8, 64, 1))


@check("init-tensor", "INIT_TENSOR", "a placed tensor, and one with buffer 0, are accepted",
       "spec/commands.md#init_tensor-12")
def _(ctx):
    w, h, base = buffer(ctx)
    w.call(m.InitTensorRequest(T(h, base, (32,), 8)))          # Q8_0, one block
    w.call(m.InitTensorRequest(T(0, 0, (32,), 8, id=2)))
    require(w.answers(), "INIT_TENSOR closed the connection")
    return "ok"


@check("init-tensor-bad-type", "INIT_TENSOR", "an invalid type is refused", "spec/tensor.md#validity",
       "refused")
def _(ctx):
    w, h, base = buffer(ctx)
    return refusal(w, m.InitTensorRequest(RpcTensor(id=1, type=200, buffer=h, data=base,
                                                    ne=(4, 1, 1, 1), nb=(4, 16, 16, 16))))


@check("get-alloc-size", "GET_ALLOC_SIZE", "at least nbytes(tensor)", "spec/commands.md#get_alloc_size-13")
def _(ctx):
    w, h, base = buffer(ctx)
    for t in (T(0, 0, (64, 3), 8), T(h, base, (10, 3), F32)):
        need = tensor_nbytes(t.type, t.ne, t.nb)
        size = w.call(m.GetAllocSizeRequest(0, t, (RpcTensor(),) * 10)).size
        require(size >= need, f"size {size} < nbytes {need}")
    return "ok"


@check("get-alloc-size-bad-type", "GET_ALLOC_SIZE", "an invalid tensor type is refused",
       "spec/commands.md#get_alloc_size-13", "refused")
def _(ctx):
    w = ctx.connect()
    bad = RpcTensor(id=1, type=200, ne=(4, 1, 1, 1), nb=(4, 16, 16, 16))
    return refusal(w, m.GetAllocSizeRequest(0, bad, (RpcTensor(),) * 10))


@check("get-alloc-size-bad-source", "GET_ALLOC_SIZE", "an undecodable source tensor is refused",
       "spec/commands.md#get_alloc_size-13", "refused", versions=lambda p: p.get_alloc_size_request_size > 300,
       upstream=Upstream("answered GetAllocSizeResponse(size=16)", ERRORS,
                         "sources it cannot decode are ignored"))
def _(ctx):
    w = ctx.connect()
    bad = RpcTensor(id=2, type=200, ne=(4, 1, 1, 1), nb=(4, 16, 16, 16))
    return refusal(w, m.GetAllocSizeRequest(0, T(0, 0, (4,)), (bad,) + (RpcTensor(),) * 9))


# ----------------------------------------------------------------------------------------------
# graphs (spec/graph.md)
# ----------------------------------------------------------------------------------------------

def _add_graph(w: Wire):
    """a + b = out in one buffer; returns (tensors, handle, base)."""
    h, base = w.alloc(256)
    a = T(h, base, (4,), id=11, name=b"a")
    b = T(h, base + 32, (4,), id=12, name=b"b")
    out = T(h, base + 64, (4,), id=13, op=OP_ADD, src=(11, 12) + (0,) * 8, name=b"out",
            flags=FLAG_COMPUTE)
    w.set_tensor(a, f32(1, 2, 3, 4))
    w.set_tensor(b, f32(10, 20, 30, 40))
    return (a, b, out), h


@check("graph-compute", "GRAPH_COMPUTE", "an ADD graph computes; GET_TENSOR reads the result",
       "spec/graph.md")
def _(ctx):
    w = ctx.connect()
    (a, b, out), h = _add_graph(w)
    status = w.graph_compute([out.id], [a, b, out])
    require(status in (None, 0), f"status {status} (3.0.0 answers 0 for success)")
    require(w.call(m.GetTensorRequest(out, 0, 16)) == f32(11, 22, 33, 44), "wrong sum")
    return "ok"


@check("graph-compute-bad-device", "GRAPH_COMPUTE", "a device index beyond DEVICE_COUNT is refused",
       "spec/graph.md#checks", "refused")
def _(ctx):
    w = ctx.connect()
    (a, b, out), h = _add_graph(w)
    w.graph_compute([out.id], [a, b, out], device=_bad_device(w))
    return after_no_reply(w)


@check("graph-compute-short", "GRAPH_COMPUTE", "a payload shorter than its counts is refused",
       "spec/graph.md#payload", "refused")
def _(ctx):
    w = ctx.connect()
    payload = struct.pack("<II", 0, 5) + struct.pack("<Q", 1) + struct.pack("<I", 3)
    return refusal(w, frame(Command.GRAPH_COMPUTE, payload))


@check("graph-compute-trailing", "GRAPH_COMPUTE", "a payload longer than its counts is refused",
       "spec/graph.md#payload", "refused",
       upstream=Upstream("accepted", ERRORS, "trailing bytes are ignored"))
def _(ctx):
    w = ctx.connect()
    (a, b, out), h = _add_graph(w)
    g = m.GraphComputeRequest.from_tensors(0, [out.id], [a, b, out]).encode_payload()
    return refusal(w, frame(Command.GRAPH_COMPUTE, g + b"\0" * 8))


@check("graph-recompute", "GRAPH_RECOMPUTE", "the stored graph runs again on the current inputs",
       "spec/graph.md#storing-and-recomputing",
       versions=has_command("GRAPH_RECOMPUTE"))
def _(ctx):
    w = ctx.connect()
    (a, b, out), h = _add_graph(w)
    w.graph_compute([out.id], [a, b, out])
    w.set_tensor(a, f32(100, 200, 300, 400))
    w.call(m.GraphRecomputeRequest(0))
    require(w.call(m.GetTensorRequest(out, 0, 16)) == f32(110, 220, 330, 440), "not recomputed")
    return "ok"


@check("graph-recompute-none", "GRAPH_RECOMPUTE", "GRAPH_RECOMPUTE without a stored graph is refused",
       "spec/graph.md#storing-and-recomputing", "refused",
       versions=has_command("GRAPH_RECOMPUTE"))
def _(ctx):
    return refusal(ctx.connect(), m.GraphRecomputeRequest(0))


@check("graph-recompute-after-free", "GRAPH_RECOMPUTE", "FREE_BUFFER discards the stored graph",
       "spec/graph.md#storing-and-recomputing", "refused",
       upstream=Upstream("accepted", GHSA + "GHSA-2phh-px2f-2qmx",
                         "the stored graph outlives FREE_BUFFER and is recomputed on freed "
                         "memory (H16, fixed in 0.3.36)", releases=OLDER_RELEASES),
       versions=has_command("GRAPH_RECOMPUTE"))
def _(ctx):
    w = ctx.connect()
    (a, b, out), h = _add_graph(w)
    w.graph_compute([out.id], [a, b, out])
    w.call(m.FreeBufferRequest(h))
    return refusal(w, m.GraphRecomputeRequest(0))


@check("graph-recompute-bad-device", "GRAPH_RECOMPUTE", "a device index beyond DEVICE_COUNT is "
       "refused", "spec/handles.md#device-indices", "refused",
       versions=has_command("GRAPH_RECOMPUTE"))
def _(ctx):
    w = ctx.connect()
    return refusal(w, m.GraphRecomputeRequest(_bad_device(w)))

