"""The index: character sets decoded, hierarchy linked, upper levels shared, schema portable."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.dicom.header import read_header
from node.dicom.part10 import file_meta_bytes
from tests.conftest import NodeProcess
from tests.dicomdata import PREFIX, dataset_bytes_of, make_instance, send_files, write_part10


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
