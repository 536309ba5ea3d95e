"""Bad input gets a standard C-STORE failure status and leaves nothing behind.

Every case sends the bad instance and then a good one on the same association: the bad one must
get its status and an Error Comment (0000,0902), leave no file in ``objects/`` or ``tmp/`` and
no instance, series, study or patient row; the good one must still be stored (the node keeps
serving).  One node serves the whole module; each test looks only at what it sent itself.
"""

from __future__ import annotations

import itertools
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from tests.conftest import NodeProcess
from tests.dicomdata import (
    CT_IMAGE,
    MR_IMAGE,
    PREFIX,
    Sent,
    dataset_bytes_of,
    file_meta_of,
    make_instance,
    store_association,
    write_part10,
    write_raw_part10,
)

CANNOT_UNDERSTAND = 0xC000
DOES_NOT_MATCH = 0xA900

# pydicom warns when it writes the malformed UIDs these tests send on purpose.
ignore_bad_uid_warnings = pytest.mark.filterwarnings(
    "ignore:Invalid value for VR UI", "ignore:The value length"
)

_patients = itertools.count(1)


def bad_patient_id() -> str:
    """A Patient ID no other test uses, so 'no patient row was created' can be checked."""
    return f"REJECTED-{next(_patients)}"


@dataclass(frozen=True)
class Leftovers:
    """What must not appear in the index for a rejected instance (None: nothing to check)."""

    sop_instance_uids: tuple[str, ...] = ()
    study_uid: str | None = None
    series_uid: str | None = None
    patient_id: str | None = None


def leftovers_of(ds_path: Path, *extra_sop_uids: str) -> Leftovers:
    """The UIDs and Patient ID that the dataset of ``ds_path`` (and its File Meta) names."""
    ds = dcmread(ds_path, force=True)
    meta = file_meta_of(ds_path)
    sop_uids = {str(meta.MediaStorageSOPInstanceUID), *extra_sop_uids}
    if "SOPInstanceUID" in ds:
        sop_uids.add(str(ds.SOPInstanceUID))
    return Leftovers(
        sop_instance_uids=tuple(sorted(sop_uids)),
        study_uid=str(ds.StudyInstanceUID) if "StudyInstanceUID" in ds else None,
        series_uid=str(ds.SeriesInstanceUID) if "SeriesInstanceUID" in ds else None,
        patient_id=str(ds.PatientID) if "PatientID" in ds else None,
    )


def assert_rejected(node: NodeProcess, bad: Path, status: int, folder: Path,
                    leftovers: Leftovers | None = None) -> Sent:
    """Send ``bad`` then a good instance on one association and check both outcomes."""
    leftovers = leftovers or leftovers_of(bad)
    good = write_part10(make_instance(), folder / "good-after-bad.dcm")
    files_before = set(node.stored_files())
    log_before = len(node.log())

    with store_association(node.port, [bad, good]) as send:
        rejected = send(bad)
        accepted = send(good)

    assert rejected.status == status, f"expected 0x{status:04X}, got {rejected}"
    assert rejected.comment.strip(), "a failure response must carry an Error Comment"
    assert accepted.status == 0, f"the node stopped serving after bad input: {accepted}"

    # Exactly one new file, and it is the good instance, byte-for-byte.
    new_files = sorted(set(node.stored_files()) - files_before)
    assert len(new_files) == 1, new_files
    assert dataset_bytes_of(new_files[0]) == dataset_bytes_of(good)
    assert node.temporary_files() == []

    if node.on_postgresql:  # PostgreSQL text cannot hold NUL: such a value cannot be a row
        leftovers = Leftovers(
            tuple(u for u in leftovers.sop_instance_uids if "\x00" not in u),
            *(None if v is not None and "\x00" in v else v
              for v in (leftovers.study_uid, leftovers.series_uid, leftovers.patient_id)))
    for uid in leftovers.sop_instance_uids:
        assert node.rows("SELECT id FROM instance WHERE sop_instance_uid = ?", uid) == []
    if leftovers.study_uid is not None:
        assert node.rows("SELECT id FROM study WHERE study_instance_uid = ?",
                         leftovers.study_uid) == []
    if leftovers.series_uid is not None:
        assert node.rows("SELECT id FROM series WHERE series_instance_uid = ?",
                         leftovers.series_uid) == []
    if leftovers.patient_id is not None:
        assert node.rows("SELECT id FROM patient WHERE patient_id = ?", leftovers.patient_id) == []
    good_uid = str(dcmread(good).SOPInstanceUID)
    assert node.rows("SELECT count(*) FROM instance WHERE sop_instance_uid = ?", good_uid) == [(1,)]

    # The log names the failure with its status (one WARNING line per C-STORE).
    new_log = node.log()[log_before:]
    failed = [line for line in new_log.splitlines()
              if "C-STORE" in line and f"status 0x{status:04X} failed" in line]
    assert len(failed) == 1, new_log
    return rejected


# --- the SOP UIDs that name the instance ---------------------------------------------------


def write_with_meta(ds: Dataset, path: Path, meta_sop_class: str | None = None,
                    meta_sop_instance: str | None = None) -> Path:
    """``ds`` as a Part 10 file whose File Meta (hence the command) names other SOP UIDs.

    write_part10's meta_* arguments do not survive pydicom 3's save_as(enforce_file_format=
    True), which overwrites MediaStorageSOP*UID with the dataset's values; so the dataset is
    encoded first and framed with the wanted File Meta afterwards.
    """
    encoded = dataset_bytes_of(write_part10(ds, path.with_suffix(".plain")))
    framed = write_raw_part10(
        path, meta_sop_class or str(ds.get("SOPClassUID", CT_IMAGE)),
        meta_sop_instance or str(ds.get("SOPInstanceUID", generate_uid(PREFIX))), encoded,
    )
    meta = file_meta_of(framed)
    if meta_sop_class:
        assert meta.MediaStorageSOPClassUID == meta_sop_class
    if meta_sop_instance:
        assert meta.MediaStorageSOPInstanceUID == meta_sop_instance
    return framed


def test_missing_sop_class_uid_cannot_be_understood(shared_node: NodeProcess,
                                                    tmp_path: Path) -> None:
    ds = make_instance(SOPClassUID=None, PatientID=bad_patient_id())
    bad = write_with_meta(ds, tmp_path / "bad.dcm", meta_sop_class=CT_IMAGE)
    assert_rejected(shared_node, bad, CANNOT_UNDERSTAND, tmp_path)


def test_missing_sop_instance_uid_cannot_be_understood(shared_node: NodeProcess,
                                                       tmp_path: Path) -> None:
    ds = make_instance(SOPInstanceUID=None, PatientID=bad_patient_id())
    bad = write_with_meta(ds, tmp_path / "bad.dcm", meta_sop_instance=generate_uid(PREFIX))
    assert_rejected(shared_node, bad, CANNOT_UNDERSTAND, tmp_path)


def test_sop_class_differing_from_command_is_refused(shared_node: NodeProcess,
                                                     tmp_path: Path) -> None:
    ds = make_instance(sop_class=CT_IMAGE, PatientID=bad_patient_id())
    bad = write_with_meta(ds, tmp_path / "bad.dcm", meta_sop_class=MR_IMAGE)  # command: MR
    rejected = assert_rejected(shared_node, bad, DOES_NOT_MATCH, tmp_path)
    assert "SOP Class" in rejected.comment


def test_sop_instance_differing_from_command_is_refused(shared_node: NodeProcess,
                                                        tmp_path: Path) -> None:
    ds = make_instance(PatientID=bad_patient_id())
    command_uid = generate_uid(PREFIX)
    bad = write_with_meta(ds, tmp_path / "bad.dcm", meta_sop_instance=command_uid)
    rejected = assert_rejected(shared_node, bad, DOES_NOT_MATCH, tmp_path)
    assert "SOP Instance" in rejected.comment


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_study_or_series_uid_is_refused(shared_node: NodeProcess, tmp_path: Path,
                                                keyword: str) -> None:
    ds = make_instance(PatientID=bad_patient_id(), **{keyword: None})
    bad = write_part10(ds, tmp_path / "bad.dcm")
    rejected = assert_rejected(shared_node, bad, DOES_NOT_MATCH, tmp_path)
    assert keyword in rejected.comment


# --- malformed UIDs ------------------------------------------------------------------------

BAD_UIDS = {
    "letters": "1.2.840.abc",
    "slash": "1.2/840.1",
    "double-dot": "1.2..840",
    "nul-inside": "1.2.840\x00.1",
    "trailing-dot": "1.2.840.",
    "leading-dot": ".1.2.840",
    "over-64": "1.2." + "3" * 63,
}


@ignore_bad_uid_warnings
@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID"])
@pytest.mark.parametrize("value", list(BAD_UIDS.values()), ids=list(BAD_UIDS))
def test_malformed_study_or_series_uid_is_refused(shared_node: NodeProcess, tmp_path: Path,
                                                  keyword: str, value: str) -> None:
    ds = make_instance(PatientID=bad_patient_id(), **{keyword: value})
    bad = write_part10(ds, tmp_path / "bad.dcm")
    rejected = assert_rejected(shared_node, bad, DOES_NOT_MATCH, tmp_path)
    assert keyword in rejected.comment


SENDABLE_BAD_SOP_UIDS = {k: v for k, v in BAD_UIDS.items() if len(v) <= 64}


@ignore_bad_uid_warnings
@pytest.mark.parametrize("value", list(SENDABLE_BAD_SOP_UIDS.values()),
                         ids=list(SENDABLE_BAD_SOP_UIDS))
def test_malformed_sop_instance_uid_is_refused(shared_node: NodeProcess, tmp_path: Path,
                                               value: str) -> None:
    # pynetdicom 3 (ENFORCE_UID_CONFORMANCE off) sends a command whose Affected SOP Instance
    # UID has letters, '/', empty components or a NUL: it only warns.  So here the command
    # and the dataset carry the same malformed UID, and the dataset's UID is what is refused.
    ds = make_instance(sop_instance=value, PatientID=bad_patient_id())
    bad = write_part10(ds, tmp_path / "bad.dcm")
    assert str(file_meta_of(bad).MediaStorageSOPInstanceUID) == value
    rejected = assert_rejected(shared_node, bad, DOES_NOT_MATCH, tmp_path)
    assert "SOPInstanceUID" in rejected.comment


@ignore_bad_uid_warnings
def test_over_long_sop_instance_uid_in_dataset_is_refused(shared_node: NodeProcess,
                                                          tmp_path: Path) -> None:
    # pynetdicom refuses to SEND a command whose Affected SOP Instance UID exceeds 64
    # characters (ValueError in set_uid), so the command carries a valid UID and only the
    # dataset carries the over-long one: refused either way with 0xA900.
    long_uid = BAD_UIDS["over-64"]
    ds = make_instance(sop_instance=long_uid, PatientID=bad_patient_id())
    command_uid = generate_uid(PREFIX)
    bad = write_with_meta(ds, tmp_path / "bad.dcm", meta_sop_instance=command_uid)
    assert_rejected(shared_node, bad, DOES_NOT_MATCH, tmp_path,
                    Leftovers((command_uid, long_uid), str(ds.StudyInstanceUID),
                              str(ds.SeriesInstanceUID), str(ds.PatientID)))


# --- datasets that do not decode -----------------------------------------------------------


def _raw(tmp_path: Path, data: bytes, transfer_syntax: str = ExplicitVRLittleEndian,
         sop_instance: str | None = None) -> tuple[Path, Leftovers]:
    uid = sop_instance or generate_uid(PREFIX)
    path = write_raw_part10(tmp_path / "bad.dcm", CT_IMAGE, uid, data, transfer_syntax)
    return path, Leftovers((uid,))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_bytes_cannot_be_understood(shared_node: NodeProcess, tmp_path: Path,
                                           seed: int) -> None:
    bad, leftovers = _raw(tmp_path, random.Random(seed).randbytes(2000))
    assert_rejected(shared_node, bad, CANNOT_UNDERSTAND, tmp_path, leftovers)


def test_deflate_payload_that_is_not_deflate_cannot_be_understood(
    shared_node: NodeProcess, tmp_path: Path
) -> None:
    # 0xFF...: first block header says BTYPE=11, a reserved block type (RFC 1951 3.2.3).
    bad, leftovers = _raw(tmp_path, b"\xff" * 400, DeflatedExplicitVRLittleEndian)
    rejected = assert_rejected(shared_node, bad, CANNOT_UNDERSTAND, tmp_path, leftovers)
    assert "inflate" in rejected.comment


def _encoded(tmp_path: Path, name: str) -> tuple[str, bytes]:
    """A good instance's SOP Instance UID and encoded dataset (explicit VR little endian)."""
    ds = make_instance(PatientID=bad_patient_id())
    path = write_part10(ds, tmp_path / f"{name}.dcm")
    return str(ds.SOPInstanceUID), dataset_bytes_of(path)


def test_element_truncated_before_the_study_uid_cannot_be_understood(
    shared_node: NodeProcess, tmp_path: Path
) -> None:
    uid, data = _encoded(tmp_path, "whole")
    patient_name = data.index(b"\x10\x00\x10\x00PN")  # (0010,0010) PN, 2-byte length
    length = int.from_bytes(data[patient_name + 6 : patient_name + 8], "little")
    cut = patient_name + 8 + length // 2  # in the middle of the value
    bad, leftovers = _raw(tmp_path, data[:cut], sop_instance=uid)
    assert_rejected(shared_node, bad, CANNOT_UNDERSTAND, tmp_path, leftovers)


def test_pixel_data_truncated_cannot_be_understood(shared_node: NodeProcess,
                                                   tmp_path: Path) -> None:
    uid, data = _encoded(tmp_path, "whole")
    bad, leftovers = _raw(tmp_path, data[:-20], sop_instance=uid)  # PixelData is last
    assert_rejected(shared_node, bad, CANNOT_UNDERSTAND, tmp_path, leftovers)


def test_deflate_stream_cut_short_cannot_be_understood(shared_node: NodeProcess,
                                                       tmp_path: Path) -> None:
    uid, data = _encoded(tmp_path, "whole")
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(data) + packer.flush()
    bad, leftovers = _raw(tmp_path, deflated[: len(deflated) * 3 // 4],
                          DeflatedExplicitVRLittleEndian, sop_instance=uid)
    assert_rejected(shared_node, bad, CANNOT_UNDERSTAND, tmp_path, leftovers)


# --- the information model -----------------------------------------------------------------


def test_series_already_held_under_another_study_is_refused(shared_node: NodeProcess,
                                                            tmp_path: Path) -> None:
    series = generate_uid(PREFIX)
    first = make_instance(series=series)
    first_path = write_part10(first, tmp_path / "first.dcm")
    with store_association(shared_node.port, [first_path]) as send:
        assert send(first_path).status == 0

    intruder = make_instance(series=series, PatientID=bad_patient_id())  # another study
    assert intruder.StudyInstanceUID != first.StudyInstanceUID
    bad = write_part10(intruder, tmp_path / "bad.dcm")
    rejected = assert_rejected(
        shared_node, bad, DOES_NOT_MATCH, tmp_path,
        Leftovers((str(intruder.SOPInstanceUID),), str(intruder.StudyInstanceUID), None,
                  str(intruder.PatientID)),
    )
    assert "another study" in rejected.comment
    # The series still belongs to the first study, and holds only the first instance.
    assert shared_node.rows(
        "SELECT st.study_instance_uid, count(i.id) FROM series s JOIN study st"
        " ON s.study_id = st.id JOIN instance i ON i.series_id = s.id"
        " WHERE s.series_instance_uid = ? GROUP BY s.id, st.study_instance_uid", series
    ) == [(str(first.StudyInstanceUID), 1)]
