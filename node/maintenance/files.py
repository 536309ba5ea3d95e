"""DICOM files on disk as the maintenance commands meet them: framing, digest, quarantine.

``read_dicom_file`` splits a file into its File Meta UIDs and the dataset bytes after the File
Meta, exactly as they are in the file (what a C-STORE would have carried).  Three layouts are
read:

- Part 10 (PS3.10 7.1): 128-byte preamble, ``DICM``, File Meta group 0002;
- File Meta group 0002 at the very start, without preamble (some older writers);
- a bare dataset without any File Meta, as ACR-NEMA-era tools and some archives wrote them,
  when it starts with a group 0008 element in little endian: its transfer syntax is Implicit
  or Explicit VR Little Endian, told apart by the first element's VR bytes (as DCMTK and
  pydicom do); the SOP UIDs then come from the dataset itself.  Big endian bare datasets are
  not guessed.

Anything else is ``NotDicom`` (skipped); a file that starts like DICOM but cannot be framed is
``UnreadableDataset`` (a failure).  Nothing here decodes the dataset: ``node.dicom.header`` does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.errors import NodeError, UnreadableDataset

# PS3.4 Annex F / PS3.10 8: a DICOMDIR is a Media Storage Directory, not an instance to archive.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

_PREAMBLE = 128
_PREFIX = b"DICM"
_HEAD = _PREAMBLE + len(_PREFIX)
# PS3.5 7.1.2: explicit VRs whose length is 4 bytes after 2 reserved ones.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_META_UIDS = {0x0002: "sop_class_uid", 0x0003: "sop_instance_uid", 0x0010: "transfer_syntax"}
_GROUP_0002 = b"\x02\x00"  # little endian, as File Meta always is (PS3.10 7.1)
_GROUP_0008 = b"\x08\x00"
_HASH_CHUNK = 1 << 20


class NotDicom(NodeError):
    """The file is not DICOM at all (no DICM prefix, no File Meta, no dataset start)."""


@dataclass(frozen=True)
class DicomFile:
    """A file split as a C-STORE would carry it."""

    sop_class_uid: str  # from the File Meta; '' when the file has none
    sop_instance_uid: str
    transfer_syntax: str
    dataset: bytes  # everything after the File Meta, byte for byte
    has_meta: bool

    @property
    def is_directory(self) -> bool:
        return self.sop_class_uid == MEDIA_STORAGE_DIRECTORY


def _is_vr(pair: bytes) -> bool:
    return len(pair) == 2 and all(65 <= c <= 90 for c in pair)


def _read_meta(data: bytes, pos: int) -> tuple[dict[str, str], int]:
    """The File Meta UIDs from ``pos`` on, and where the dataset starts.

    The group is read element by element until the first element of another group, not by
    (0002,0000) alone: writers that got the group length wrong exist, and pydicom and DCMTK
    read such files the same way.
    """
    values: dict[str, str] = {}
    size = len(data)
    while pos + 8 <= size and data[pos:pos + 2] == _GROUP_0002:
        (element,) = struct.unpack_from("<H", data, pos + 2)
        vr = data[pos + 4:pos + 6]
        if _is_vr(vr) and vr in _LONG_VRS:
            if pos + 12 > size:
                break
            (length,) = struct.unpack_from("<I", data, pos + 8)
            start = pos + 12
        elif _is_vr(vr):
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        else:  # implicit VR File Meta: not conformant (PS3.10 7.1), but pydicom reads it
            (length,) = struct.unpack_from("<I", data, pos + 4)
            start = pos + 8
        if length == _UNDEFINED or start + length > size:
            raise UnreadableDataset("File Meta Information is cut short or malformed")
        if element in _META_UIDS:
            raw = data[start:start + length]
            values[_META_UIDS[element]] = raw.decode("ascii", "replace").strip("\0 ")
        pos = start + length
    return values, pos


def frame(data: bytes) -> DicomFile:
    """Split the bytes of a whole file; raises NotDicom or UnreadableDataset."""
    if data[_PREAMBLE:_HEAD] == _PREFIX:
        meta_at = _HEAD
    elif data[:2] == _GROUP_0002 and _is_vr(data[4:6]):
        meta_at = 0
    elif data[:2] == _GROUP_0008 and len(data) >= 8:
        explicit = _is_vr(data[4:6])
        syntax = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
        return DicomFile("", "", str(syntax), data, has_meta=False)
    else:
        raise NotDicom("not a DICOM file")
    values, end = _read_meta(data, meta_at)
    if end == meta_at:
        raise UnreadableDataset("DICM prefix without File Meta Information")
    if not values.get("transfer_syntax"):
        raise UnreadableDataset("File Meta Information has no Transfer Syntax UID")
    return DicomFile(values.get("sop_class_uid", ""), values.get("sop_instance_uid", ""),
                     values["transfer_syntax"], data[end:], has_meta=True)


def looks_like_dicom(head: bytes) -> bool:
    """Whether a file whose first bytes are ``head`` (at least 132 of them, or the whole file)
    is worth reading whole: the test ``frame`` applies first, without reading a large
    non-DICOM file (a video, an archive) into memory."""
    return (
        head[_PREAMBLE:_HEAD] == _PREFIX
        or (head[:2] == _GROUP_0002 and _is_vr(head[4:6]))
        or (head[:2] == _GROUP_0008 and len(head) >= 8)
    )


def read_dicom_file(path: Path) -> DicomFile:
    """Read and split ``path``; raises NotDicom, UnreadableDataset or OSError."""
    with path.open("rb") as f:
        head = f.read(_HEAD)
        if not looks_like_dicom(head):
            raise NotDicom("not a DICOM file")
        data = head + f.read()
    return frame(data)
