"""What one client connection may do, and the checks each command makes (spec/commands.md).

A :class:`Session` is sans-IO: it takes decoded requests and returns replies, and raises
:class:`Rejected` for anything it will not do.  The network layer logs the reason and closes
the connection; other connections are unaffected.  Bulk data (SET_TENSOR, GET_TENSOR) is
exposed as memory regions so the network layer can move it without extra copies.
"""

from __future__ import annotations

import logging

from ..devices import Device
from ..protocol import compat
from ..protocol import messages as m
from ..protocol.connection import SetTensorStart
from ..protocol.connection import hello_response
from ..protocol.constants import MAX_SRC, Command
from ..protocol.errors import LocalProtocolError
from ..protocol.profiles import LATEST, Profile
from ..protocol.tensor import tensor_nbytes_of
from ..buffers import AddressSpace, BufferTable, Placement, Rejected
from .hash_cache import HashCache

log = logging.getLogger("refimpl.server.session")
cmdlog = logging.getLogger("refimpl.server.commands")


class Session:
    """State of one connection: its buffers and what it may touch."""

    def __init__(self, devices: list[Device], cache: HashCache | None = None,
                 graph_executor=None, peer: str = "?", space: AddressSpace | None = None,
                 max_buffers: int | None = None, profile: Profile = LATEST):
        self.devices = devices
        #: The protocol version this connection is served in (spec/versions.md).
        self.profile = profile
        #: Buffers this connection may hold at once (None: no limit).
        self.max_buffers = max_buffers
        self.cache = cache
        self.buffers = BufferTable(devices, space)
        self.graph_executor = graph_executor
        self.peer = peer

    # -- dispatch ------------------------------------------------------------------------------
    def handle(self, request: m.Message) -> m.Message | None:
        """Carry out a request and return its reply, if any.

        SET_TENSOR and GET_TENSOR move bulk data, which the network layer does itself with
        :meth:`set_tensor_destination` and :meth:`get_tensor_source`; they have no handler.
        """
        handler = self.HANDLERS.get(request.COMMAND)
        if handler is None:
            raise LocalProtocolError(f"{request.COMMAND.name} is served by the network layer")
        reply = handler(self, request)
        if reply is None and request.COMMAND.name in self.profile.empty_reply:
            reply = compat.EmptyReply(request.COMMAND)
        return reply

    def close(self) -> None:
        """Free everything this connection allocated."""
        n = len(self.buffers)
        self.buffers.release_all()
        if self.graph_executor is not None:
            self.graph_executor.forget()
        if n:
            log.info("%s: freed %d buffer(s) left by the client", self.peer, n)

    def _device(self, index: int) -> Device:
        if index >= len(self.devices):
            raise Rejected(f"device {index} does not exist (this server has {len(self.devices)})")
        return self.devices[index]

    # -- handshake and devices -----------------------------------------------------------------
    def _on_hello(self, req: m.HelloRequest):
        cmdlog.debug("hello: caps %s -> version %s", req.conn_caps.hex(), self.profile.name)
        return hello_response(self.profile.version)

    def _on_device_count(self, req):
        cmdlog.debug("device_count -> %d", len(self.devices))
        return m.DeviceCountResponse(len(self.devices))

    def _on_get_alignment(self, req: m.GetAlignmentRequest):
        dev = self._device(req.device)
        cmdlog.debug("get_alignment device=%d -> %d", req.device, dev.alignment)
        return m.GetAlignmentResponse(dev.alignment)

    def _on_get_max_size(self, req: m.GetMaxSizeRequest):
        dev = self._device(req.device)
        size = dev.max_buffer_size()
        cmdlog.debug("get_max_size device=%d -> %d", req.device, size)
        return m.GetMaxSizeResponse(size)

    def _on_get_device_memory(self, req: m.GetDeviceMemoryRequest):
        free, total = self._device(req.device).memory()
        cmdlog.debug("get_device_memory device=%d -> free=%d total=%d", req.device, free, total)
        return m.GetDeviceMemoryResponse(free, total)

    # -- buffers -------------------------------------------------------------------------------
    def _on_alloc_buffer(self, req: m.AllocBufferRequest):
        dev = self._device(req.device)
        if self.max_buffers is not None and len(self.buffers) >= self.max_buffers:
            # Even empty buffers cost server memory: their number is bounded too, and the
            # refusal is the ordinary failed-allocation reply.
            log.warning("%s: refusing a buffer: the connection already holds %d (--max-buffers)",
                        self.peer, len(self.buffers))
            return m.AllocBufferResponse(0, 0)
        memory = dev.allocate(req.size)
        if memory is None:
            log.warning("%s: cannot allocate %d bytes on device %d (%s): %d bytes free",
                        self.peer, req.size, req.device, dev.name, dev.memory()[0])
            return m.AllocBufferResponse(0, 0)
        buf = self.buffers.add(req.device, memory)
        cmdlog.debug("alloc_buffer device=%d size=%d -> handle=0x%x base=0x%x",
                      req.device, req.size, buf.handle, buf.base)
        return m.AllocBufferResponse(buf.handle, buf.size)

    def _on_buffer_get_base(self, req: m.BufferGetBaseRequest):
        buf = self.buffers.get(req.handle)
        cmdlog.debug("buffer_get_base handle=0x%x -> 0x%x", req.handle, buf.base)
        return m.BufferGetBaseResponse(buf.base)

    def _on_free_buffer(self, req: m.FreeBufferRequest):
        cmdlog.debug("free_buffer handle=0x%x", req.handle)
        self.buffers.remove(req.handle)
        if self.graph_executor is not None:
            self.graph_executor.forget()  # a stored graph may point into the freed buffer
        return None

    def _on_buffer_clear(self, req: m.BufferClearRequest):
        buf = self.buffers.get(req.handle)
        cmdlog.debug("buffer_clear handle=0x%x value=%d", req.handle, req.value)
        buf.memory.fill(0, buf.size, req.value)
        return None

    # -- tensors -------------------------------------------------------------------------------
    def _on_init_tensor(self, req: m.InitTensorRequest):
        # Nothing to prepare on our devices, but the tensor must still be a valid one.
        self.buffers.check_tensor(req.tensor, "INIT_TENSOR tensor")
        cmdlog.debug("init_tensor '%s' buffer=0x%x", req.tensor.label, req.tensor.buffer)
        return None

    def _on_get_alloc_size(self, req: m.GetAllocSizeRequest):
        dev = self._device(req.device)
        if req.tensor.is_null:
            raise Rejected("GET_ALLOC_SIZE without a tensor")
        self.buffers.check_tensor(req.tensor, "GET_ALLOC_SIZE tensor")
        for i, src in enumerate(req.srcs[:MAX_SRC]):
            if not src.is_null:
                self.buffers.check_tensor(src, f"GET_ALLOC_SIZE src[{i}]")
        if req.tensor.buffer:
            dev = self.devices[self.buffers.get(req.tensor.buffer).device_index]
        size = dev.alloc_size(tensor_nbytes_of(req.tensor))
        cmdlog.debug("get_alloc_size device=%d '%s' -> %d", req.device, req.tensor.label, size)
        return m.GetAllocSizeResponse(size)

    def _on_memset_tensor(self, req: m.MemsetTensorRequest):
        p = self.buffers.place_region(req.tensor, req.offset, req.size, "MEMSET_TENSOR")
        cmdlog.debug("memset_tensor '%s' offset=%d size=%d value=%d",
                     req.tensor.label, req.offset, req.size, req.value)
        p.buffer.memory.fill(p.offset, p.nbytes, req.value)
        return None

    def set_tensor_destination(self, start: SetTensorStart) -> Placement:
        """Check a SET_TENSOR header; returns where its data bytes must land."""
        p = self.buffers.place_region(start.tensor, start.offset, start.size, "SET_TENSOR")
        cmdlog.debug("set_tensor '%s' offset=%d size=%d cache=%d",
                     start.tensor.label, start.offset, start.size, start.cache_flag)
        return p

    def set_tensor_landed(self, start: SetTensorStart, p: Placement) -> None:
        """After the data landed: keep a copy in the hash cache when the client asked for it.

        May block on disk I/O; the network layer runs it in a worker thread.
        """
        if start.cache_flag and self.cache is not None and p.nbytes:
            path = self.cache.store(p.buffer.memory.read_region(p.offset, p.nbytes))
            if path is not None:
                log.info("%s: saved %d bytes of '%s' to %s", self.peer, p.nbytes,
                         start.tensor.label, path)

    def _on_set_tensor_hash(self, req: m.SetTensorHashRequest):
        """May block on disk I/O; the network layer runs it in a worker thread."""
        self.buffers.place(req.tensor, "SET_TENSOR_HASH")
        size = self.cache.size_of(req.hash) if self.cache is not None else None
        if size is None:
            cmdlog.debug("set_tensor_hash '%s' hash=%016x -> miss", req.tensor.label, req.hash)
            return m.SetTensorHashResponse(0)
        p = self.buffers.place_region(req.tensor, req.offset, size, "SET_TENSOR_HASH")
        with p.buffer.memory.write_region(p.offset, p.nbytes) as region:
            ok = self.cache.load_into(req.hash, region.view)
        cmdlog.debug("set_tensor_hash '%s' hash=%016x size=%d -> %s",
                     req.tensor.label, req.hash, size, "hit" if ok else "damaged entry")
        return m.SetTensorHashResponse(1 if ok else 0)

    def get_tensor_source(self, req: m.GetTensorRequest) -> memoryview:
        """Check a GET_TENSOR request; returns the bytes to send (a view, not a copy)."""
        p = self.buffers.place_region(req.tensor, req.offset, req.size, "GET_TENSOR")
        cmdlog.debug("get_tensor '%s' offset=%d size=%d", req.tensor.label, req.offset, req.size)
        return p.buffer.memory.read_region(p.offset, p.nbytes)

    def _on_copy_tensor(self, req: m.CopyTensorRequest):
        src = self.buffers.place(req.src, "COPY_TENSOR src")
        dst_start = self.buffers.place(req.dst, "COPY_TENSOR dst")
        # ggml copies nbytes(src) bytes to dst.data: that run must fit inside dst's buffer.
        if dst_start.offset + src.nbytes > dst_start.buffer.size:
            raise Rejected(
                f"COPY_TENSOR would write {src.nbytes} bytes at offset {dst_start.offset} of a "
                f"{dst_start.buffer.size}-byte buffer")
        ok = dst_start.buffer.memory.copy_from(src.buffer.memory, src.offset, dst_start.offset,
                                               src.nbytes)
        cmdlog.debug("copy_tensor '%s' -> '%s' %d bytes -> %s",
                     req.src.label, req.dst.label, src.nbytes, ok)
        return m.CopyTensorResponse(1 if ok else 0)

    # -- graphs --------------------------------------------------------------------------------
    def _on_graph_compute(self, req: m.GraphComputeRequest):
        if self.graph_executor is None:
            raise Rejected("GRAPH_COMPUTE is not supported by this server build")
        self._device(req.device)
        self.graph_executor.compute(req, self.buffers, self.profile)
        if "GRAPH_COMPUTE" in self.profile.no_reply:
            return None
        # 3.0.0 answers with ggml's status; a graph that passed validation always computes.
        return compat.GraphComputeResponse(0)

    def _on_graph_recompute(self, req: m.GraphRecomputeRequest):
        if self.graph_executor is None:
            raise Rejected("GRAPH_RECOMPUTE is not supported by this server build")
        self._device(req.device)
        self.graph_executor.recompute(req.device)
        return None

    #: The handler of every command but the two bulk ones (see :meth:`handle`).
    HANDLERS = {
        Command.HELLO: _on_hello,
        Command.DEVICE_COUNT: _on_device_count,
        Command.GET_ALIGNMENT: _on_get_alignment,
        Command.GET_MAX_SIZE: _on_get_max_size,
        Command.GET_DEVICE_MEMORY: _on_get_device_memory,
        Command.ALLOC_BUFFER: _on_alloc_buffer,
        Command.BUFFER_GET_BASE: _on_buffer_get_base,
        Command.FREE_BUFFER: _on_free_buffer,
        Command.BUFFER_CLEAR: _on_buffer_clear,
        Command.INIT_TENSOR: _on_init_tensor,
        Command.GET_ALLOC_SIZE: _on_get_alloc_size,
        Command.MEMSET_TENSOR: _on_memset_tensor,
        Command.SET_TENSOR_HASH: _on_set_tensor_hash,
        Command.COPY_TENSOR: _on_copy_tensor,
        Command.GRAPH_COMPUTE: _on_graph_compute,
        Command.GRAPH_RECOMPUTE: _on_graph_recompute,
    }
