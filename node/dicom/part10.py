"""Part 10 file framing: the zero preamble and File Meta Information put before a received dataset.

The meta header is built only from the command's SOP UIDs, the transfer syntax and the node's
implementation identity, so the same dataset always gives the same file and the same digest.
It is encoded here directly (explicit VR little endian, PS3.10 7.1) because this runs once per
received instance and pydicom's general writer costs about a millisecond.
"""

from __future__ import annotations

import struct

from node import __version__

# PS3.7 D.3.3.2: the node's own Implementation Class UID (a 2.25 UUID-derived root) and name.
IMPLEMENTATION_CLASS_UID = "2.25.97102546232934196359837453629372561493"
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__.replace('.', '')}"[:16]

# PS3.10 7.1: a 128-byte preamble, here all zeros (CVE-2019-11687), then the "DICM" prefix.
PREAMBLE = b"\x00" * 128 + b"DICM"


def _short(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    """An explicit VR little endian element of group 0002 with a 2-byte length."""
    if len(value) % 2:
        value += pad  # PS3.5 6.2: UI pads with NUL, SH with space, to an even length
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


# (0002,0001) File Meta Information Version, OB: 2-byte reserved field and 4-byte length.
_VERSION = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
_IMPLEMENTATION = _short(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode(), b"\x00") + _short(
    0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode(), b" "
)


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and encoded File Meta Information group (0002) for one instance."""
    body = b"".join(
        (
            _VERSION,
            _short(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\x00"),
            _short(0x0003, b"UI", sop_instance_uid.encode("ascii"), b"\x00"),
            _short(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\x00"),
            _IMPLEMENTATION,
        )
    )
    # (0002,0000) File Meta Information Group Length, UL: the bytes that follow it.
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return PREAMBLE + group_length + body
