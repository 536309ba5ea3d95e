"""Check that an encoded dataset is whole: every element, item and sequence ends inside the data.

pydicom's reader treats a short read as the end of the dataset, and the header parser stops
before pixel data anyway, so a dataset cut in transit would otherwise be kept as if complete.
This walk reads only element headers (PS3.5 7.1) and jumps over values, so its cost grows with
the number of elements, not with the size of the pixel data.
"""

from __future__ import annotations

import struct

from node.errors import UnreadableDataset

# PS3.5 7.1.2: explicit VRs with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
# Deeper nesting than this is no real instance; bounding it keeps a hostile one from
# costing unbounded work (and Python recursion).
MAX_DEPTH = 32


class _Walker:
    def __init__(self, data: bytes, implicit: bool, little: bool) -> None:
        self.data = data
        self.size = len(data)
        order = "<" if little else ">"
        self.tag_length = struct.Struct(f"{order}HHL")  # tag and 4-byte length
        self.explicit_short = struct.Struct(f"{order}HH2sH")
        self.long_length = struct.Struct(f"{order}L")
        self.implicit = implicit

    def fail(self, what: str) -> UnreadableDataset:
        return UnreadableDataset(f"dataset is truncated or malformed ({what})")

    def dataset(self, pos: int, end: int, depth: int, until_item_end: bool) -> int:
        """Walk elements from ``pos``; return the offset after the dataset."""
        if depth > MAX_DEPTH:
            raise self.fail("sequences nested too deeply")
        while pos < end:
            if pos + 8 > end:
                raise self.fail("element header cut short")
            group, element, length = self.tag_length.unpack_from(self.data, pos)
            tag = group << 16 | element
            if tag == _ITEM_END:
                if not until_item_end:
                    raise self.fail("item end outside an item")
                return pos + 8
            if self.implicit or group == 0xFFFE:
                pos += 8
            else:
                _, _, vr, short = self.explicit_short.unpack_from(self.data, pos)
                if vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise self.fail("element header cut short")
                    (length,) = self.long_length.unpack_from(self.data, pos + 8)
                    pos += 12
                else:
                    length = short
                    pos += 8
            if length == _UNDEFINED:
                pos = self.items(pos, end, depth + 1)
            else:
                pos += length
                if pos > end:
                    raise self.fail("value longer than the data")
        if until_item_end:
            raise self.fail("item without its end")
        return pos

    def items(self, pos: int, end: int, depth: int) -> int:
        """Walk the items of an undefined-length sequence or encapsulated pixel data."""
        while True:
            if pos + 8 > end:
                raise self.fail("sequence without its end")
            group, element, length = self.tag_length.unpack_from(self.data, pos)
            tag = group << 16 | element
            pos += 8
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise self.fail("element where an item belongs")
            if length == _UNDEFINED:
                pos = self.dataset(pos, end, depth, until_item_end=True)
            else:
                pos += length
                if pos > end:
                    raise self.fail("item longer than the data")


def _looks_implicit(data: bytes) -> bool:
    """Some writers encode implicit VR under an explicit transfer syntax; readers (pydicom,
    DCMTK) accept it by looking at the first element's VR bytes, and so does the node."""
    vr = data[4:6]
    return len(vr) == 2 and not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90)


def check_complete(data: bytes, implicit_vr: bool, little_endian: bool) -> None:
    """Raise UnreadableDataset unless ``data`` is a whole, well-nested dataset."""
    implicit_vr = implicit_vr or _looks_implicit(data)
    walker = _Walker(data, implicit_vr, little_endian)
    walker.dataset(0, walker.size, 0, until_item_end=False)
