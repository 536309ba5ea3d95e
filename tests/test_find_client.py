"""``dicom-node find``: the C-FIND SCU against a real archive that is not ours (DCMTK's dcmqrscp).

dcmqrscp is started once for the module on a free port, found ready by C-ECHO polling, loaded
with generated instances by DCMTK's storescu, and queried through the command line exactly as an
administrator would. One more test queries our own node when it offers C-FIND.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, NodeProcess, free_port
from tests.dcmqrscp import Dcmqrscp
from tests.dicomdata import MR_IMAGE, PREFIX, make_instance, send_datasets, write_part10

QR_AE = "DCMQR"
LONG_DESCRIPTION = "A study description far longer than any table cell may be"  # > 40 chars


@dataclass
class Archive:
    """A running dcmqrscp holding the generated studies, and a node.yaml that lists it."""

    port: int
    config: Path
    patients: dict[str, str]  # PatientID -> PatientName
    studies: dict[str, list[str]] = field(default_factory=dict)  # PatientID -> Study UIDs
    series: dict[str, list[str]] = field(default_factory=dict)  # Study UID -> Series UIDs
    instances: dict[str, list[str]] = field(default_factory=dict)  # Series UID -> SOP UIDs
    down_port: int = 0


def _generate(folder: Path, archive: Archive) -> list[Path]:
    """Two patients, three studies, two series each (CT and MR), two instances per series.

    UIDs are short on purpose: study and series UIDs fit a table cell uncut.
    """
    paths: list[Path] = []
    plan = {"FIND-P1": 2, "FIND-P2": 1}
    for p, (patient_id, study_count) in enumerate(plan.items(), start=1):
        for s in range(1, study_count + 1):
            study = f"{PREFIX}7.{p}.{s}"
            archive.studies.setdefault(patient_id, []).append(study)
            for n, sop_class in enumerate(["1.2.840.10008.5.1.4.1.1.2", MR_IMAGE], start=1):
                series = f"{study}.{n}"
                archive.series.setdefault(study, []).append(series)
                for i in range(1, 3):
                    ds = make_instance(
                        sop_class, study=study, series=series, sop_instance=f"{series}.{i}",
                        PatientID=patient_id, PatientName=archive.patients[patient_id],
                        SpecificCharacterSet="ISO_IR 192", AccessionNumber=f"A{p}{s}",
                        StudyDescription=LONG_DESCRIPTION if (p, s) == (1, 2) else f"S{p}{s}",
                        SeriesNumber=n, InstanceNumber=i,
                    )
                    archive.instances.setdefault(series, []).append(f"{series}.{i}")
                    paths.append(write_part10(ds, folder / f"{series}.{i}.dcm"))
    return paths


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    base = tmp_path_factory.mktemp("dcmqrscp")
    with Dcmqrscp(base, ae_title=QR_AE) as server:
        config = base / "node.yaml"
        archive = Archive(server.port, config, {"FIND-P1": "Müller^Jürgen", "FIND-P2": "Doe^Jane"})
        server.load(_generate(base / "files", archive))
        archive.down_port = free_port()  # nothing listens there
        config.write_text(yaml.safe_dump({
            "ae_title": "FINDSCU",
            "storage": "storage",
            "peers": {
                QR_AE: {"host": "127.0.0.1", "port": server.port},
                "DOWN": {"host": "127.0.0.1", "port": archive.down_port},
                "STRANGER": {"host": "127.0.0.1", "port": server.port},  # unknown to dcmqrscp
            },
        }), encoding="utf-8")
        yield archive


def find(where: Archive | Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m node find`` with the archive's node.yaml (or another config file)."""
    config = where.config if isinstance(where, Archive) else where
    return subprocess.run(
        [sys.executable, "-m", "node", "find", "-c", str(config), *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )


def ok_json(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert done.returncode == 0, done.stderr
    matches: list[dict[str, Any]] = json.loads(done.stdout)
    plural = "" if len(matches) == 1 else "es"
    assert done.stderr.strip().splitlines()[-1] == f"{len(matches)} match{plural}"
    return matches


def one_line_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_study_table_lists_the_patients_studies_aligned(archive: Archive) -> None:
    done = find(archive, QR_AE, "-k", "PatientID=FIND-P1")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:3] == ["PatientID", "PatientName", "StudyDate"]
    assert len(rows) == 2
    column = header.index("StudyInstanceUID")
    found = {row[column:].split()[0] for row in rows}
    assert found == set(archive.studies["FIND-P1"])
    assert all(row.startswith("FIND-P1") and "Müller^Jürgen" in row for row in rows)
    # Cells over 40 characters are cut with an ellipsis, and columns stay aligned.
    assert LONG_DESCRIPTION not in done.stdout
    assert LONG_DESCRIPTION[:39] + "…" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == "2 matches"


def test_json_lists_every_key_as_strings(archive: Archive) -> None:
    # Keys as tags, with and without separator; an empty value asks for the key.
    matches = ok_json(find(archive, QR_AE, "--json", "-k", "0010,0020=FIND-P2",
                           "-k", "00080050=", "-k", "ReferringPhysicianName="))
    assert [m["StudyInstanceUID"] for m in matches] == archive.studies["FIND-P2"]
    match = matches[0]
    assert match["PatientID"] == "FIND-P2"
    assert match["PatientName"] == "Doe^Jane"
    assert match["AccessionNumber"] == "A21"
    assert match["StudyDate"] == "20260102"
    assert "ReferringPhysicianName" in match
    assert all(isinstance(value, str) for value in match.values())


def test_utf8_names_match_and_come_back(archive: Archive) -> None:
    matches = ok_json(find(archive, QR_AE, "--json", "-k", "PatientName=Müller*"))
    assert sorted(m["StudyInstanceUID"] for m in matches) == sorted(archive.studies["FIND-P1"])
    assert {m["PatientName"] for m in matches} == {"Müller^Jürgen"}


def test_patient_level_lists_both_patients(archive: Archive) -> None:
    # -L is case-insensitive; the PATIENT level picks the Patient Root model by itself.
    matches = ok_json(find(archive, QR_AE, "-L", "patient", "--json", "-k", "PatientID=FIND-*"))
    assert {m["PatientID"]: m["PatientName"] for m in matches} == archive.patients
    assert {m["PatientSex"] for m in matches} == {"O"}


def test_series_level_lists_the_study_series(archive: Archive) -> None:
    study = archive.studies["FIND-P1"][1]
    done = find(archive, QR_AE, "-L", "SERIES", "-k", f"StudyInstanceUID={study}")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    series_at, modality_at = header.index("SeriesInstanceUID"), header.index("Modality")
    found = {row[series_at:].split()[0]: row[modality_at:].split()[0] for row in rows}
    assert found == dict(zip(archive.series[study], ["CT", "MR"], strict=True))
    assert done.stderr.strip().splitlines()[-1] == "2 matches"


def test_image_level_in_the_patient_root(archive: Archive) -> None:
    study = archive.studies["FIND-P2"][0]
    series = archive.series[study][1]
    matches = ok_json(find(
        archive, QR_AE, "-L", "IMAGE", "--root", "patient", "--json", "-k", "PatientID=FIND-P2",
        "-k", f"StudyInstanceUID={study}", "-k", f"SeriesInstanceUID={series}",
    ))
    assert sorted(m["SOPInstanceUID"] for m in matches) == archive.instances[series]
    assert {m["InstanceNumber"] for m in matches} == {"1", "2"}


def test_no_matches_is_success(archive: Archive) -> None:
    done = find(archive, QR_AE, "-k", "PatientID=NOBODY")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [done.stdout.splitlines()[0]]  # the header only
    assert done.stdout.startswith("PatientID")
    assert done.stderr.strip() == "0 matches"


def test_unknown_peer_exits_2_naming_the_known_ones(archive: Archive) -> None:
    line = one_line_error(find(archive, "NOSUCHAE"), 2, "NOSUCHAE", QR_AE, "DOWN", "FINDSCU")
    assert "unknown peer" in line


def test_peer_that_is_down_exits_1(archive: Archive) -> None:
    one_line_error(find(archive, "DOWN", "--timeout", "5"), 1,
                   "DOWN", f"127.0.0.1:{archive.down_port}")


def test_rejected_association_exits_1(archive: Archive) -> None:
    one_line_error(find(archive, "STRANGER"), 1, "STRANGER", f"127.0.0.1:{archive.port}",
                   "rejected", "Called AE title not recognised")


def test_failure_status_raises_with_the_code_in_hex(archive: Archive) -> None:
    # The command line refuses a bad level before sending, so the library sends one here.
    from node.config import Peer
    from node.remote.errors import QueryFailed
    from node.remote.query import build_query
    from node.scu.find import find_query

    query = build_query("STUDY", {"PatientID": "FIND-P1"})
    query.identifier.QueryRetrieveLevel = "FRAME"  # no such level (PS3.4 C.6.2.1)
    with pytest.raises(QueryFailed) as failed:
        list(find_query(Peer(QR_AE, "127.0.0.1", archive.port), "FINDSCU", query, timeout=10))
    assert failed.value.status is not None and failed.value.status >= 0xA000
    assert f"0x{failed.value.status:04X}" in str(failed.value)
    assert f"{QR_AE} at 127.0.0.1:{archive.port}" in str(failed.value)


def test_help_lists_the_find_options(capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli import main

    with pytest.raises(SystemExit) as done:
        main(["find", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for option in ("PEER", "-L", "--level", "-k KEY=VALUE", "--root", "--json", "--calling-ae",
                   "-c PATH, --config PATH"):
        assert option in out


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["-L", "FRAME"], ["FRAME"]),
        (["-L", "SERIES"], ["StudyInstanceUID", "C.4.1.2.1"]),  # unique key above the level
        (["-L", "SERIES", "-k", "StudyInstanceUID=1.2*"], ["StudyInstanceUID"]),
        (["-L", "PATIENT", "--root", "study"], ["PATIENT", "--root patient"]),
        (["-k", "NoSuchKeyword=1"], ["NoSuchKeyword"]),
        (["-k", "QueryRetrieveLevel=SERIES"], ["QueryRetrieveLevel"]),
        (["-k", "NumberOfFrames=many"], ["NumberOfFrames"]),
        (["-k", "1234,5678=x"], ["1234,5678"]),
        (["--calling-ae", "WAY-TOO-LONG-AE-TITLE"], ["WAY-TOO-LONG-AE-TITLE"]),
        (["--timeout", "0"], ["--timeout"]),
    ],
)
def test_bad_arguments_exit_2(
    archive: Archive, capsys: pytest.CaptureFixture[str], args: list[str], words: list[str]
) -> None:
    # In-process (no network happens before these checks): main() or argparse exits 2.
    from node.cli import main

    try:
        code = main(["find", "-c", str(archive.config), QR_AE, *args])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    last = err.strip().splitlines()[-1]
    assert all(word in last for word in words), err


def test_own_node_by_its_ae_title(node: NodeProcess) -> None:
    from node.config import load_config
    from node.remote.errors import ServiceNotSupported
    from node.remote.query import resolve_peer
    from node.scu.find import find as find_matches

    study = f"{PREFIX}8.1"
    sent = send_datasets(node.port, [make_instance(study=study, PatientID="FIND-SELF")])
    assert [s.status for s in sent] == [0]
    config = load_config(node.config_path)
    peer = resolve_peer(config, config.ae_title)
    assert (peer.host, peer.port) == ("127.0.0.1", node.port)
    try:
        list(find_matches(peer, "FINDSCU", "STUDY", {"PatientID": "FIND-SELF"}, timeout=10))
    except ServiceNotSupported:
        pytest.skip("node has no C-FIND SCP yet")
    matches = ok_json(find(node.config_path, "DICOMNODE", "--json", "-k", "PatientID=FIND-SELF"))
    assert [m["StudyInstanceUID"] for m in matches] == [study]

