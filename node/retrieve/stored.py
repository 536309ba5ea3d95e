"""A stored file as a sub-operation sends it: the dataset bytes as stored, or re-encoded.

The usual case reads nothing but the File Meta length: the dataset is sent byte for byte from
the file, in the transfer syntax it was received in.  Only when the receiver accepted none of
the stored syntax is the dataset decoded and re-encoded in Explicit or Implicit VR Little Endian,
which every DICOM AE understands (PS3.5 10.1): deflated and uncompressed little endian datasets
always can be; compressed pixel data only when pydicom has a decoder for it (which needs NumPy
and, for most syntaxes, pylibjpeg or GDCM).
"""

from __future__ import annotations

import importlib.util
import struct
import zlib
from functools import cache
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from node.errors import NodeError

_PREFIX = b"DICM"
_PREFIX_AT = 128
# (0002,0000) File Meta Information Group Length, UL, explicit VR little endian (PS3.10 7.1).
_GROUP_LENGTH_TAG = b"\x02\x00\x00\x00UL\x04\x00"
# The bytes of a Part 10 file that say where its dataset starts.
HEADER_SIZE = _PREFIX_AT + len(_PREFIX) + len(_GROUP_LENGTH_TAG) + 4


class CannotReencode(NodeError):
    """The stored dataset cannot be turned into the syntax the receiver accepted."""


class NotPart10(NodeError):
    """A stored file is not laid out as the store writes Part 10 files."""


def dataset_offset(head: bytes) -> int:
    """Where the dataset starts in a Part 10 file whose first HEADER_SIZE bytes are ``head``.

    The store writes the File Meta group with its group length first (node.dicom.part10), so
    the offset follows from that one element; raises NotPart10 otherwise.
    """
    start = _PREFIX_AT + len(_PREFIX)
    if len(head) < HEADER_SIZE or head[_PREFIX_AT:start] != _PREFIX or (
        head[start:start + len(_GROUP_LENGTH_TAG)] != _GROUP_LENGTH_TAG
    ):
        raise NotPart10("stored file is not a Part 10 file with a File Meta group length")
    (group_length,) = struct.unpack("<I", head[HEADER_SIZE - 4:HEADER_SIZE])
    return HEADER_SIZE + int(group_length)


@cache
def can_reencode(transfer_syntax: str) -> bool:
    """True when a dataset stored in ``transfer_syntax`` can be re-encoded uncompressed."""
    syntax = UID(transfer_syntax)
    if not syntax.is_little_endian:
        return False  # big endian pixel data would need byte swapping, which pydicom lacks
    if not syntax.is_encapsulated:
        return True  # implicit/explicit VR little endian, or deflated: no pixel decoding
    if importlib.util.find_spec("numpy") is None:  # pydicom's decompress() needs NumPy
        return False
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:  # no decoder for this syntax at all (e.g. MPEG video)
        return False


def reencoded(path: Path, transfer_syntax: str, target: str) -> bytes:
    """The dataset stored at ``path`` (in ``transfer_syntax``), encoded in ``target``.

    ``target`` is Explicit or Implicit VR Little Endian.  Raises CannotReencode (or OSError
    when the file cannot be read).
    """
    syntax, wanted = UID(transfer_syntax), UID(target)
    if not can_reencode(syntax):
        raise CannotReencode(
            f"cannot decode {syntax.name}: no pixel data decoder available "
            "(pydicom needs NumPy, and pylibjpeg or GDCM for most compressions)"
        )
    try:
        ds = dcmread(path)
        if syntax.is_encapsulated:
            ds.decompress()  # keeps the SOP Instance UID (generate_instance_uid=False)
        buffer = DicomBytesIO()
        buffer.is_implicit_VR = wanted.is_implicit_VR
        buffer.is_little_endian = True
        write_dataset(buffer, ds)
    except (InvalidDicomError, ValueError, TypeError, KeyError, AttributeError,
            NotImplementedError, RuntimeError, ImportError, struct.error, zlib.error) as exc:
        raise CannotReencode(f"cannot re-encode {syntax.name} as {wanted.name}: {exc}") from exc
    return bytes(buffer.getvalue())
