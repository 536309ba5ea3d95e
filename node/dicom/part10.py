"""Part 10 file framing: the zero preamble and File Meta Information put before a received dataset.

The meta header is built only from the command's SOP UIDs, the transfer syntax and the node's
implementation identity, so the same dataset always gives the same file and the same digest.
"""

from __future__ import annotations

from io import BytesIO

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from node import __version__

# PS3.7 D.3.3.2: the node's own Implementation Class UID (a 2.25 UUID-derived root) and name.
IMPLEMENTATION_CLASS_UID = UID("2.25.97102546232934196359837453629372561493")
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__.replace('.', '')}"[:16]

# PS3.10 7.1: a 128-byte preamble, here all zeros (CVE-2019-11687), then the "DICM" prefix.
PREAMBLE = b"\x00" * 128 + b"DICM"


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and encoded File Meta Information group (0002) for one instance."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buffer = BytesIO()
    buffer.write(PREAMBLE)
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()
