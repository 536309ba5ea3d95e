"""Test data and a pynetdicom SCU: build instances, write Part 10 files, send them to a node."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import build_context

from node.scu.send import pause_reactor

CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.4")
PREFIX = "1.2.826.0.1.3680043.10.1234."  # test UIDs


def make_instance(
    sop_class: str = CT_IMAGE,
    study: str | None = None,
    series: str | None = None,
    sop_instance: str | None = None,
    rows: int = 8,
    **attributes: Any,
) -> Dataset:
    """A small, valid image instance; keyword arguments set or override attributes."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance or generate_uid(PREFIX)
    ds.StudyInstanceUID = study or generate_uid(PREFIX)
    ds.SeriesInstanceUID = series or generate_uid(PREFIX)
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST-001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "S1"
    ds.Modality = "CT" if sop_class == CT_IMAGE else "MR"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256)) * (rows * rows * 2 // 256) + bytes(rows * rows * 2 % 256)
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def write_part10(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Save ``ds`` as a Part 10 file in ``transfer_syntax`` (File Meta UIDs from the dataset,
    or placeholders when the dataset lacks them on purpose)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CT_IMAGE)
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid(PREFIX))
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_raw_part10(path: Path, sop_class: str, sop_instance: str, dataset_bytes: bytes,
                     transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """A Part 10 file whose dataset is ``dataset_bytes`` verbatim (may be garbage on purpose)."""
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue() + dataset_bytes)
    return path


def dataset_bytes_of(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file: everything after the File Meta group."""
    data = path.read_bytes()
    return data[_meta_end(data) :]


def _meta_end(data: bytes) -> int:
    """Offset just past the File Meta Information group of a Part 10 file."""
    assert data[128:132] == b"DICM"
    # (0002,0000) UL group length, explicit VR little endian, starts right after DICM
    assert data[132:136] == b"\x02\x00\x00\x00"
    group_length = int.from_bytes(data[140:144], "little")
    return 144 + group_length


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Sent:
    """The outcome of one C-STORE: the SOP Instance UID and the status (None: no response)."""

    sop_instance_uid: str
    status: int | None
    comment: str = ""


def send_files(port: int, paths: Sequence[Path], called: str = "DICOMNODE",
               calling: str = "TESTSCU") -> list[Sent]:
    """Send Part 10 files on one association, each dataset byte-for-byte as in its file.

    pynetdicom's chunked sending takes the SOP UIDs from the File Meta and sends the encoded
    dataset without decoding it, so deliberately broken datasets go out exactly as written.
    """
    with store_association(port, paths, called, calling) as send:
        return [send(path) for path in paths]


def send_datasets(port: int, datasets: Iterable[Dataset], called: str = "DICOMNODE",
                  calling: str = "TESTSCU",
                  transfer_syntax: str = ImplicitVRLittleEndian) -> list[Sent]:
    """Send datasets (encoded by pynetdicom in ``transfer_syntax``) on one association."""
    items = [encoded_as(ds, transfer_syntax) for ds in datasets]
    ae = AE(ae_title=calling)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in items}):
        ae.requested_contexts = [*ae.requested_contexts, build_context(sop_class,
                                                                       [transfer_syntax])]
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association rejected"
    no_delay(assoc)
    try:
        return [_sent(str(ds.SOPInstanceUID), reactor_paused(assoc).send_c_store(ds))
                for ds in items]
    finally:
        assoc.release()


def reactor_paused(assoc: Association) -> Association:
    """Hold pynetdicom's requestor reactor before the caller sends its next request.

    pynetdicom 3.0 pauses its reactor thread for a send_c_*() with a flag that is set just
    before the thread blocks; a reactor that passed the checkpoint a moment earlier can still
    take the first response off the queue and drop it as "Received unexpected C-... service
    message" (pynetdicom issue #875).  Under load (dozens of associations in one test process)
    that lost a C-FIND match in a few percent of queries, or left a C-STORE waiting for the
    whole DIMSE timeout.  The node's own clients pause it the same way (node.scu.send);
    pynetdicom resumes it after the final response.
    """
    pause_reactor(assoc)
    return assoc


def no_delay(assoc: Association) -> None:
    """Nagle's algorithm would hold each small write for the peer's delayed ACK (~40 ms)."""
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def encoded_as(ds: Dataset, transfer_syntax: str = ImplicitVRLittleEndian) -> Dataset:
    """Tell pynetdicom which transfer syntax to send ``ds`` in (it reads the File Meta)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    return ds


def _sent(uid: str, status: Dataset) -> Sent:
    if not status or "Status" not in status:
        return Sent(uid, None)
    return Sent(uid, int(status.Status), str(status.get("ErrorComment", "")))


# --- Sending file by file on one open association (rejection, duplicate, resource tests) -----

_chunked_lock = threading.Lock()
_chunked_users = 0
_chunked_saved = False


@contextmanager
def _chunked_sending() -> Iterator[None]:
    """pynetdicom's chunked mode on while any thread needs it (the switch is process-global)."""
    global _chunked_users, _chunked_saved
    with _chunked_lock:
        if _chunked_users == 0:
            _chunked_saved = _config.STORE_SEND_CHUNKED_DATASET
            _config.STORE_SEND_CHUNKED_DATASET = True
        _chunked_users += 1
    try:
        yield
    finally:
        with _chunked_lock:
            _chunked_users -= 1
            if _chunked_users == 0:
                _config.STORE_SEND_CHUNKED_DATASET = _chunked_saved


def file_meta_of(path: Path) -> Dataset:
    """The File Meta of a Part 10 file, read without touching its dataset (may be garbage)."""
    meta, _ = split_dataset(path)
    return meta


@contextmanager
def store_association(port: int, paths: Sequence[Path], called: str = "DICOMNODE",
                      calling: str = "TESTSCU") -> Iterator[Callable[[Path], Sent]]:
    """An association able to send ``paths``; yields ``send(path) -> Sent``, one C-STORE each.

    Like send_files, each dataset goes out byte-for-byte and the command's SOP UIDs come from
    the File Meta; unlike it, the caller decides when each C-STORE goes (between sends it can
    change the world, or wait on a barrier).
    """
    metas = [file_meta_of(p) for p in paths]
    ae = AE(ae_title=calling)
    contexts = {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}
    for sop_class, ts in sorted(contexts):
        ae.add_requested_context(sop_class, [ts])
    with _chunked_sending():
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        assert assoc.is_established, "association rejected"
        no_delay(assoc)

        def send(path: Path) -> Sent:
            uid = str(file_meta_of(path).MediaStorageSOPInstanceUID)
            return _sent(uid, reactor_paused(assoc).send_c_store(path))

        try:
            yield send
        finally:
            assoc.release()
