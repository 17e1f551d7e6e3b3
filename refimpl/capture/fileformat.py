"""The capture file format, version 1 (spec/captures.md).

    file    = header record*
    header  = magic "GGMLRPCC" (8 bytes) | u32 version (1) | u32 meta_length | meta (JSON, UTF-8)
    record  = u8 direction | u8 kind | u16 reserved (0) | u32 connection | u64 time_ns
              | u64 length | length bytes

All integers little-endian.  ``direction``: 0 client to server, 1 server to client.
``kind``: 0 a whole message exactly as on the wire (framing included); 1 that side closed the
connection (no data); 2 connection opened (data: JSON with the peers' addresses); 3 note
(data: JSON, e.g. the protocol version once HELLO has been answered).  ``connection`` numbers the client's
connections in the order they were accepted; ``time_ns`` counts from the start of the capture.
A file may be gzip-compressed as a whole (``.cap.gz``).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from ..protocol.layout import Layout

#: Declared layouts (checked against spec/captures.md by tests/test_spec_drift.py).
HEADER_LAYOUT = Layout("capture_header", [("magic", "char", 8), ("version", "u32"),
                                          ("meta_length", "u32")])
RECORD_LAYOUT = Layout("capture_record", [("direction", "u8"), ("kind", "u8"),
                                          ("reserved", "u16"),
                                          ("connection", "u32"), ("time_ns", "u64"),
                                          ("length", "u64")])

MAGIC = b"GGMLRPCC"
VERSION = 1
_HEAD = HEADER_LAYOUT.struct
_REC = RECORD_LAYOUT.struct

CLIENT_TO_SERVER, SERVER_TO_CLIENT = 0, 1
MESSAGE, CLOSED, OPENED, NOTE = 0, 1, 2, 3


class CaptureFormatError(Exception):
    """The file is not a capture this code can read."""


@dataclass
class Record:
    """One record of a capture."""

    direction: int
    kind: int
    connection: int
    time_ns: int
    data: bytes = b""


@dataclass
class Capture:
    """A whole capture in memory: metadata and records."""

    meta: dict = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)

    def connections(self) -> list[int]:
        """Connection numbers present, in order."""
        seen = []
        for r in self.records:
            if r.connection not in seen:
                seen.append(r.connection)
        return seen

    def messages(self, connection: int | None = None) -> list[Record]:
        """Message records (optionally of one connection), in order."""
        return [r for r in self.records
                if r.kind == MESSAGE and (connection is None or r.connection == connection)]


class Writer:
    """Writes a capture incrementally (records are flushed as they come)."""

    def __init__(self, path: Path | str, meta: dict):
        path = Path(path)
        self._f: BinaryIO = gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")
        raw = json.dumps(meta, sort_keys=True).encode()
        self._f.write(_HEAD.pack(MAGIC, VERSION, len(raw)) + raw)

    def write(self, record: Record) -> None:
        """Append one record."""
        self._f.write(_REC.pack(record.direction, record.kind, 0, record.connection,
                                record.time_ns, len(record.data)))
        self._f.write(record.data)
        self._f.flush()

    def close(self) -> None:
        """Finish the file."""
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open(path: Path) -> BinaryIO:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def iter_records(path: Path | str) -> tuple[dict, Iterator[Record]]:
    """Metadata and a lazy iterator over the records of a capture file."""
    f = _open(Path(path))
    head = f.read(_HEAD.size)
    if len(head) < _HEAD.size:
        raise CaptureFormatError("file too short for a capture header")
    magic, version, meta_len = _HEAD.unpack(head)
    if magic != MAGIC:
        raise CaptureFormatError("not a ggml RPC capture (bad magic)")
    if version != VERSION:
        raise CaptureFormatError(f"capture format version {version}; this reader knows {VERSION}")
    meta = json.loads(f.read(meta_len).decode())

    def records() -> Iterator[Record]:
        with f:
            while True:
                head = f.read(_REC.size)
                if not head:
                    return
                if len(head) < _REC.size:
                    raise CaptureFormatError("truncated record header")
                direction, kind, _, conn, t, length = _REC.unpack(head)
                data = f.read(length)
                if len(data) < length:
                    raise CaptureFormatError("truncated record")
                yield Record(direction, kind, conn, t, data)
    return meta, records()


def read(path: Path | str) -> Capture:
    """Load a whole capture."""
    meta, recs = iter_records(path)
    return Capture(meta, list(recs))
