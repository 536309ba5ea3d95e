"""The index: character sets decoded, hierarchy linked, upper levels shared, schema portable."""

from __future__ import annotations

import glob
import sqlite3
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from node.config import DatabaseURL
from node.dicom.header import InstanceHeader, normalise_person_name, read_header
from node.dicom.part10 import file_meta_bytes
from node.errors import InvalidDataset, NodeError
from node.index.database import connect, ensure_schema
from node.index.writer import IndexWriter, Source
from tests.conftest import NodeProcess, poll_until
from tests.dicomdata import PREFIX, dataset_bytes_of, make_instance, send_files, write_part10

SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]


def test_names_are_decoded_through_specific_character_set(node: NodeProcess,
                                                          tmp_path: Path) -> None:
    latin1 = make_instance(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen",
                           PatientID="LAT-1", StudyDescription="Thorax ñ")
    utf8 = make_instance(SpecificCharacterSet="ISO_IR 192", PatientName="Иванов^Дмитрий",
                         PatientID="UTF-8", ReferringPhysicianName="Łukasz^Żółć")
    files = [write_part10(latin1, tmp_path / "l.dcm"), write_part10(utf8, tmp_path / "u.dcm")]
    assert b"M\xfcller" in files[0].read_bytes()  # really Latin-1 on the wire
    assert [s.status for s in send_files(node.port, files)] == [0, 0]

    patients = dict(
        (pid, (name, folded))
        for pid, name, folded in node.rows(
            "SELECT patient_id, patient_name, patient_name_folded FROM patient"
        )
    )
    assert patients["LAT-1"] == ("Müller^Jürgen", "müller^jürgen")
    assert patients["UTF-8"] == ("Иванов^Дмитрий", "иванов^дмитрий")
    studies = dict(node.rows("SELECT study_instance_uid, study_description FROM study"))
    assert studies[latin1.StudyInstanceUID] == "Thorax ñ"
    assert node.rows(
        "SELECT referring_physician_name FROM study WHERE study_instance_uid = ?",
        utf8.StudyInstanceUID,
    ) == [("Łukasz^Żółć",)]
    charsets = dict(node.rows("SELECT sop_instance_uid, specific_character_set FROM instance"))
    assert charsets[latin1.SOPInstanceUID] == "ISO_IR 100"


def test_upper_levels_are_shared_and_counted_once(node: NodeProcess, tmp_path: Path) -> None:
    study = generate_uid(PREFIX)
    series = [generate_uid(PREFIX) for _ in range(2)]
    files = [
        write_part10(make_instance(study=study, series=series[i % 2], InstanceNumber=i,
                                   Modality="CT" if i % 2 else "SR", SeriesNumber=i % 2),
                     tmp_path / f"{i}.dcm")
        for i in range(6)
    ]
    assert all(s.status == 0 for s in send_files(node.port, files))
    assert node.rows("SELECT count(*) FROM patient") == [(1,)]
    assert node.rows("SELECT count(*) FROM study") == [(1,)]
    rows = node.rows(
        "SELECT s.series_instance_uid, s.modality, count(i.id) FROM series s"
        " JOIN instance i ON i.series_id = s.id GROUP BY s.id ORDER BY s.series_number"
    )
    assert rows == [(series[0], "SR", 3), (series[1], "CT", 3)]
    numbers = sorted(n for (n,) in node.rows("SELECT instance_number FROM instance"))
    assert numbers == list(range(6))


def test_header_reader_matches_what_was_sent(tmp_path: Path) -> None:
    ds = make_instance(PatientName="Doe^Jane", SeriesNumber="12", InstanceNumber="7",
                       BodyPartExamined="CHEST", SeriesDescription="Axial 1mm",
                       IssuerOfPatientID="HOSP")
    data = dataset_bytes_of(write_part10(ds, tmp_path / "x.dcm", ExplicitVRLittleEndian))
    header = read_header(data, ExplicitVRLittleEndian)
    assert (header.patient_name, header.patient_id, header.issuer_of_patient_id) == (
        "Doe^Jane", "TEST-001", "HOSP")
    assert (header.series_number, header.instance_number) == (12, 7)
    assert (header.body_part_examined, header.series_description) == ("CHEST", "Axial 1mm")
    assert header.study_date == "20260102" and header.modality == "CT"


def test_file_meta_is_what_pydicom_would_write() -> None:
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    from node.dicom.part10 import (
        IMPLEMENTATION_CLASS_UID,
        IMPLEMENTATION_VERSION_NAME,
        PREAMBLE,
    )

    for instance_uid in ("1.2.3", "1.2.34"):  # odd and even lengths (padding)
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = instance_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        expected = BytesIO()
        expected.write(PREAMBLE)
        write_file_meta_info(expected, meta, enforce_standard=True)  # type: ignore[arg-type]
        ours = file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", instance_uid, ExplicitVRLittleEndian)
        assert ours == expected.getvalue()


def encoded(ds: Dataset, transfer_syntax: str) -> bytes:
    """``ds`` encoded in ``transfer_syntax`` (uncompressed), without File Meta."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    fp.is_little_endian = transfer_syntax != ExplicitVRBigEndian
    write_dataset(fp, ds)
    return fp.getvalue()


def item(**attributes: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("transfer_syntax", SYNTAXES)
def test_header_reader_steps_over_sequences_of_undefined_length(transfer_syntax: str) -> None:
    """Sequences before the wanted elements, nested, with undefined-length items (PS3.5 7.5),
    hide nothing and lend nothing: values inside items are not the instance's own."""
    inner = item(ReferencedSOPClassUID="1.2.3", ReferencedSOPInstanceUID="9.9.9")
    nested = item(PatientID="NOT-THE-PATIENT", ReferencedImageSequence=Sequence([inner]))
    ds = make_instance(PatientID="THE-PATIENT", InstanceNumber="4")
    ds.ReferencedStudySequence = Sequence([nested, item(StudyInstanceUID="8.8.8")])
    ds.ReferencedPatientSequence = Sequence([item(PatientName="Other^Person")])
    for sequence in (ds.ReferencedStudySequence, ds.ReferencedPatientSequence,
                     nested.ReferencedImageSequence):
        sequence.is_undefined_length = True
        for member in sequence:
            member.is_undefined_length_sequence_item = True
    data = encoded(ds, transfer_syntax)
    assert b"\xff\xff\xff\xff" in data  # really undefined lengths on the wire

    header = read_header(data, transfer_syntax)
    assert (header.patient_id, header.patient_name) == ("THE-PATIENT", "Test^Patient")
    assert header.study_instance_uid == ds.StudyInstanceUID
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.instance_number == 4


def _bundled_instances() -> Iterator[tuple[str, Dataset]]:
    """pydicom's own test files that carry the UIDs an instance needs, without File Meta."""
    import pydicom

    folder = Path(pydicom.__file__).parent / "data"
    for path in sorted(glob.glob(str(folder / "test_files" / "*.dcm"))
                       + glob.glob(str(folder / "charset_files" / "*.dcm"))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = dcmread(path, stop_before_pixels=True, force=True)
            except (OSError, ValueError, TypeError, KeyError, AttributeError, InvalidDicomError):
                continue
        needed = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if all(keyword in ds for keyword in needed):
            del ds[0x00020000:0x00030000]  # File Meta is no part of the data set
            yield Path(path).name, ds


def _expected(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or value == "":
        return ""
    text = str(value).strip(" \0")
    return normalise_person_name(text) if ds[keyword].VR == "PN" else text


@pytest.mark.parametrize("transfer_syntax", SYNTAXES)
def test_header_reader_agrees_with_pydicom_on_its_bundled_files(transfer_syntax: str) -> None:
    """The node's element walk reads what pydicom's general reader reads, in every character
    set pydicom ships a file for (ISO 2022 escapes included) and in every uncompressed
    encoding."""
    compared = 0
    for name, ds in _bundled_instances():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                data = encoded(ds, transfer_syntax)
            except (ValueError, TypeError, OverflowError, AttributeError):
                continue  # pydicom cannot write this file in this encoding
        try:
            header = read_header(data, transfer_syntax)
        except NodeError:
            continue  # refused (e.g. a UID that is not one): not what this test compares
        for keyword, field_name in [("PatientID", "patient_id"), ("PatientName", "patient_name"),
                                    ("StudyDescription", "study_description"),
                                    ("Modality", "modality"), ("StudyDate", "study_date"),
                                    ("AccessionNumber", "accession_number"),
                                    ("SeriesInstanceUID", "series_instance_uid")]:
            assert getattr(header, field_name) == _expected(ds, keyword), (name, keyword)
        compared += 1
    assert compared >= 20  # the comparison really ran over many files


# --- group commit: several instances' rows in one SQLite transaction ---------------------------


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[IndexWriter]:
    db = connect(DatabaseURL("sqlite", path=tmp_path / "index.sqlite"))
    db.connect()
    ensure_schema(db)
    yield IndexWriter(db, retries=1)
    db.close()


def header_of(ds: Dataset) -> InstanceHeader:
    return read_header(encoded(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)


def test_group_commit_holds_every_waiting_write_and_fails_only_the_bad_one(
    writer: IndexWriter, tmp_path: Path
) -> None:
    """Writes that queue while another commits go into one transaction; the one that breaks
    the model (a series already held under another study, PS3.4 C.6.1.1) fails alone and
    leaves nothing, the others are committed, and each caller returns only after that commit.
    """
    series = generate_uid(PREFIX)
    writer.add(header_of(make_instance(series=series, PatientID="FIRST")), "0" * 64, 1,
               ExplicitVRLittleEndian, Source("SCU", "127.0.0.1"))
    good = [make_instance(PatientID=f"GOOD-{n}") for n in range(3)]
    bad = make_instance(series=series, PatientID="BAD")  # same series, another study
    commits: list[int] = []
    commit = writer.db.commit
    writer.db.commit = lambda: (commits.append(1), commit())[1]  # type: ignore[method-assign]

    outcomes: dict[str, BaseException | None] = {}

    def add(ds: Dataset) -> Callable[[], None]:
        def run() -> None:
            try:
                writer.add(header_of(ds), str(ds.SOPInstanceUID).replace(".", "")[:64].ljust(
                    64, "0"), 1, ExplicitVRLittleEndian, Source("SCU", "127.0.0.1"))
                outcomes[ds.PatientID] = None
            except NodeError as exc:
                outcomes[ds.PatientID] = exc
        return run

    threads = [threading.Thread(target=add(ds)) for ds in [*good, bad]]
    with writer._write_lock:  # another writer is committing: these four queue behind it
        for thread in threads:
            thread.start()
        assert poll_until(lambda: len(writer._queue) == 4, 10)
        assert not outcomes  # nobody returned before the commit that holds its row
    for thread in threads:
        thread.join(10)

    assert commits == [1]  # the four writes, one transaction
    assert isinstance(outcomes.pop("BAD"), InvalidDataset)
    assert outcomes == {"GOOD-0": None, "GOOD-1": None, "GOOD-2": None}
    with sqlite3.connect(tmp_path / "index.sqlite") as check:
        patients = {p for (p,) in check.execute("SELECT patient_id FROM patient")}
        instances = {i for (i,) in check.execute("SELECT sop_instance_uid FROM instance")}
    assert patients == {"FIRST", "GOOD-0", "GOOD-1", "GOOD-2"}  # nothing of BAD's
    assert {str(ds.SOPInstanceUID) for ds in good} <= instances
    assert str(bad.SOPInstanceUID) not in instances


def test_writers_of_several_processes_take_turns_on_the_lock_beside_the_file(
    tmp_path: Path
) -> None:
    """Nodes sharing one SQLite file (``shared``): a writer waits on the flock of
    ``index.sqlite.writer`` while another process's writer holds it, and writes once it is
    let go.  Two writers, each with its own open lock file, stand for the two processes here
    (an flock belongs to the open file, not to the process); each thread has its own SQLite
    connection, as each process would."""
    db = connect(DatabaseURL("sqlite", path=tmp_path / "index.sqlite"))
    db.connect()
    ensure_schema(db)
    first, second = (IndexWriter(db, retries=1, shared=True) for _ in range(2))
    assert (tmp_path / "index.sqlite.writer").is_file()
    ds = make_instance(PatientID="WAITED")
    done = threading.Event()

    def write() -> None:
        second.add(header_of(ds), "1" * 64, 1, ExplicitVRLittleEndian, Source("SCU", "x"))
        done.set()

    thread = threading.Thread(target=write)
    try:
        with first._other_processes_out():  # the other process is committing
            thread.start()
            assert not done.wait(0.5)  # (a writer that ignored the lock would be done)
        assert done.wait(10)
    finally:
        thread.join(10)
        for writer in (first, second):
            writer.close()
        db.close()
    with sqlite3.connect(tmp_path / "index.sqlite") as check:
        assert [p for (p,) in check.execute("SELECT patient_id FROM patient")] == ["WAITED"]
