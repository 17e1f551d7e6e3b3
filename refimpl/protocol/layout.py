"""Declarative little-endian byte layouts (spec/README.md, "Conventions").

Every fixed-size structure of the protocol is declared once as a :class:`Layout`: an ordered
list of fields, packed with no padding.  The same declaration gives the ``struct`` format used
to encode and decode, the numpy dtype used to decode arrays of tensors at once, and the
offset table that ``tests/test_spec_drift.py`` compares with the tables in ``spec/``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .errors import LocalProtocolError

__all__ = ["Field", "Layout"]

# field kind -> (struct code, size in bytes, numpy scalar type)
_KINDS: dict[str, tuple[str, int, str]] = {
    "u8": ("B", 1, "u1"),
    "u16": ("H", 2, "<u2"),
    "u32": ("I", 4, "<u4"),
    "i32": ("i", 4, "<i4"),
    "u64": ("Q", 8, "<u8"),
    "char": ("s", 1, "S1"),  # a run of raw bytes; count gives the length
}

# integer kind -> the values it holds
_RANGES: dict[str, tuple[int, int]] = {
    "u8": (0, 1 << 8), "u16": (0, 1 << 16), "u32": (0, 1 << 32),
    "i32": (-(1 << 31), 1 << 31), "u64": (0, 1 << 64),
}


@dataclass(frozen=True)
class Field:
    """One field of a layout: ``count`` consecutive values of ``kind`` at ``offset``."""

    name: str
    kind: str
    count: int = 1
    offset: int = 0

    @property
    def size(self) -> int:
        """Size of the whole field in bytes."""
        return _KINDS[self.kind][1] * self.count


class Layout:
    """A packed little-endian structure, declared as ``(name, kind[, count])`` tuples."""

    def __init__(self, name: str, fields: list[tuple]):
        self.name = name
        placed: list[Field] = []
        offset = 0
        for spec in fields:
            field = Field(spec[0], spec[1], spec[2] if len(spec) > 2 else 1, offset)
            placed.append(field)
            offset += field.size
        self.fields: tuple[Field, ...] = tuple(placed)
        self.size = offset
        codes = []
        for f in self.fields:
            code = _KINDS[f.kind][0]
            if f.kind == "char":
                codes.append(f"{f.count}s")
            elif f.count == 1:
                codes.append(code)
            else:
                codes.append(f"{f.count}{code}")
        self.struct = struct.Struct("<" + "".join(codes))
        if self.struct.size != self.size:  # a mistake in a declaration, never wire input
            raise RuntimeError(f"layout {name}: struct size {self.struct.size} != {self.size}")
        self.dtype = np.dtype(
            {
                "names": [f.name for f in self.fields],
                "formats": [
                    (f"S{f.count}" if f.kind == "char" else
                     (_KINDS[f.kind][2] if f.count == 1 else (_KINDS[f.kind][2], (f.count,))))
                    for f in self.fields
                ],
                "offsets": [f.offset for f in self.fields],
                "itemsize": self.size,
            }
        )

    def unpack(self, data, offset: int = 0) -> dict:
        """Decode one structure from ``data[offset:offset+size]`` into a field -> value dict.

        Array fields come back as tuples, ``char`` runs as ``bytes``.
        """
        flat = self.struct.unpack_from(data, offset)
        out = {}
        i = 0
        for f in self.fields:
            if f.count == 1 or f.kind == "char":
                out[f.name] = flat[i]
                i += 1
            else:
                out[f.name] = tuple(flat[i:i + f.count])
                i += f.count
        return out

    def check(self, values: dict) -> None:
        """Raise LocalProtocolError unless every integer in ``values`` (a field -> value dict,
        fields may be missing) fits its field; ``char`` runs are not checked."""
        for f in self.fields:
            if f.name not in values or f.kind == "char":
                continue
            v = values[f.name]
            lo, hi = _RANGES[f.kind]
            for x in ((v,) if f.count == 1 else v):
                try:
                    fits = lo <= x < hi and x == int(x)
                except (TypeError, ValueError):
                    fits = False
                if not fits:
                    raise LocalProtocolError(
                        f"{self.name}.{f.name} = {x!r} does not fit a {f.kind}")

    def pack(self, values: dict) -> bytes:
        """Encode a field -> value dict (array fields as sequences).

        Raises LocalProtocolError when a value does not fit its field.
        """
        flat = []
        for f in self.fields:
            v = values[f.name]
            if f.count == 1 or f.kind == "char":
                flat.append(v)
            else:
                if len(v) != f.count:
                    raise LocalProtocolError(
                        f"{self.name}.{f.name} needs {f.count} values, got {len(v)}")
                flat.extend(v)
        try:
            return self.struct.pack(*flat)
        except struct.error as exc:
            self.check(values)  # names the field when it is a range
            raise LocalProtocolError(f"{self.name}: {exc}") from None

    def offsets(self) -> list[tuple[str, int, int]]:
        """``(field, offset, size)`` rows, as the spec's layout tables list them."""
        return [(f.name, f.offset, f.size) for f in self.fields]
