"""Helpers for the C-MOVE and C-GET tests: a stored corpus, DCMTK's storescp/movescu/getscu, and a
pynetdicom SCU that records every response.

The corpus is written as Part 10 files and sent with ``send_files``, so the node holds each
dataset byte for byte as written and a retrieve can be compared with the files at dataset level.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.conftest import dcmtk_env, dcmtk_tool, echo, free_port, poll_until
from tests.dicomdata import (
    CT_IMAGE,
    MR_IMAGE,
    PREFIX,
    dataset_bytes_of,
    file_meta_of,
    make_instance,
    no_delay,
    send_files,
    write_part10,
)

DEST_AE = "DEST"
MOVE_MODELS = {"patient": PatientRootQueryRetrieveInformationModelMove,
               "study": StudyRootQueryRetrieveInformationModelMove}
GET_MODELS = {"patient": PatientRootQueryRetrieveInformationModelGet,
              "study": StudyRootQueryRetrieveInformationModelGet}
ROOT_FLAGS = {"patient": "-P", "study": "-S"}

# Two patients; P1 has two studies (the first with a CT and an MR series), P2 one.
LAYOUT = {  # (patient, study) -> [(series, SOP class, instances)]
    ("RET-P1", "A"): [("A1", CT_IMAGE, 3), ("A2", MR_IMAGE, 2)],
    ("RET-P1", "B"): [("B1", CT_IMAGE, 2)],
    ("RET-P2", "C"): [("C1", MR_IMAGE, 2)],
}


@dataclass
class Corpus:
    """The stored instances, their files and UIDs by short name ("A", "A1", "A1.2")."""

    files: dict[str, Path] = field(default_factory=dict)  # SOP Instance UID -> file
    uid: dict[str, str] = field(default_factory=dict)  # short name -> UID
    patient_of: dict[str, str] = field(default_factory=dict)  # study name -> Patient ID

    def instances(self, *names: str) -> set[str]:
        """SOP Instance UIDs under the studies, series or instances named."""
        wanted = set()
        for name in names:
            for short, uid in self.uid.items():
                if short.count(".") == 1 and (short == name or short.startswith(name)):
                    wanted.add(uid)
        return wanted

    def of_patient(self, patient_id: str) -> set[str]:
        return self.instances(*[s for s, p in self.patient_of.items() if p == patient_id])


def build_corpus(folder: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Corpus:
    corpus = Corpus()
    for (patient, study), series_list in LAYOUT.items():
        study_uid = f"{PREFIX}40.{len(corpus.patient_of) + 1}"
        corpus.uid[study] = study_uid
        corpus.patient_of[study] = patient
        for series, sop_class, count in series_list:
            series_uid = f"{study_uid}.{series[-1]}"
            corpus.uid[series] = series_uid
            for n in range(1, count + 1):
                ds = make_instance(sop_class, study=study_uid, series=series_uid,
                                   sop_instance=f"{series_uid}.{n}", PatientID=patient,
                                   PatientName=f"Retrieve^{patient}", InstanceNumber=n)
                path = write_part10(ds, folder / f"{series}.{n}.dcm", transfer_syntax)
                corpus.uid[f"{series}.{n}"] = ds.SOPInstanceUID
                corpus.files[ds.SOPInstanceUID] = path
    return corpus


def load(port: int, paths: Sequence[Path]) -> None:
    sent = send_files(port, list(paths))
    assert [s.status for s in sent] == [0] * len(paths), sent


def received_by_uid(folder: Path) -> dict[str, Path]:
    """Files written by storescp/getscu, by the SOP Instance UID of their File Meta."""
    return {str(file_meta_of(p).MediaStorageSOPInstanceUID): p
            for p in sorted(folder.iterdir()) if p.is_file()}


def assert_same_datasets(received: dict[str, Path], corpus: Corpus, wanted: set[str]) -> None:
    """Exactly ``wanted`` arrived, each dataset byte for byte as stored."""
    assert set(received) == wanted
    for uid, path in received.items():
        assert dataset_bytes_of(path) == dataset_bytes_of(corpus.files[uid]), uid


# --- DCMTK ----------------------------------------------------------------------------------

@dataclass
class StoreSCP:
    """DCMTK's storescp as a move destination, writing what it receives bit for bit."""

    port: int
    out: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def received(self) -> dict[str, Path]:
        return received_by_uid(self.out)


@contextmanager
def storescp(out: Path, port: int | None = None, options: Sequence[str] = ("+xa",),
             ae_title: str = DEST_AE) -> Iterator[StoreSCP]:
    """storescp on ``port`` (free by default), answering C-ECHO before it is handed out.

    ``options`` choose the accepted transfer syntaxes (+xa all, none: uncompressed only,
    +xi implicit only).
    """
    out.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    process = subprocess.Popen(
        [str(dcmtk_tool("storescp")), "-aet", ae_title, "-od", str(out), "+B", *options,
         str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    scp = StoreSCP(port, out, process)
    try:
        assert poll_until(lambda: process.poll() is None and echo(port, ae_title, 1.0), 20), \
            "storescp did not answer C-ECHO"
        yield scp
    finally:
        scp.stop()


@dataclass
class ToolResult:
    status: int
    completed: int
    failed: int
    warning: int
    comment: str
    log: str


def _final(log: str) -> ToolResult:
    final = log[log.rindex("INCOMING DIMSE MESSAGE"):]
    status = re.search(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", final)
    assert status, log

    def count(name: str) -> int:
        found = re.search(rf"{name} Suboperations\s*:\s*(\d+)", final)
        return int(found.group(1)) if found else -1

    comment = re.search(r"\(0000,0902\) LO \[([^\]]*)\]", final)
    return ToolResult(int(status.group(1), 16), count("Completed"), count("Failed"),
                      count("Warning"), comment.group(1) if comment else "", log)


def movescu(port: int, root: str, level: str, keys: Sequence[str], destination: str = DEST_AE,
            extra: Sequence[str] = ()) -> ToolResult:
    args = [str(dcmtk_tool("movescu")), "-d", ROOT_FLAGS[root], "-aec", "DICOMNODE",
            "-aem", destination, "-k", f"QueryRetrieveLevel={level}", *extra]
    for key in keys:
        args += ["-k", key]
    run = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, text=True,
                         env=dcmtk_env(), timeout=120)
    return _final(run.stdout + run.stderr)


def getscu(port: int, root: str, level: str, keys: Sequence[str], out: Path,
           extra: Sequence[str] = ()) -> ToolResult:
    out.mkdir(parents=True, exist_ok=True)
    args = [str(dcmtk_tool("getscu")), "-d", ROOT_FLAGS[root], "-aec", "DICOMNODE",
            "-od", str(out), "+B", "-k", f"QueryRetrieveLevel={level}", *extra]
    for key in keys:
        args += ["-k", key]
    run = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, text=True,
                         env=dcmtk_env(), timeout=120)
    return _final(run.stdout + run.stderr)


# --- pynetdicom SCU -------------------------------------------------------------------------

@dataclass
class Responses:
    """Every response to one C-MOVE/C-GET: (status dataset, identifier) pairs, in order."""

    items: list[tuple[Dataset, Dataset | None]]

    @property
    def final(self) -> Dataset:
        return self.items[-1][0]

    @property
    def status(self) -> int:
        return int(self.final.Status)

    @property
    def pending(self) -> list[Dataset]:
        return [s for s, _ in self.items[:-1]]

    @property
    def failed_list(self) -> list[str]:
        identifier = self.items[-1][1]
        if identifier is None or "FailedSOPInstanceUIDList" not in identifier:
            return []
        value = identifier.FailedSOPInstanceUIDList
        return [str(v) for v in value] if not isinstance(value, str) else [value]

    def counts(self) -> tuple[int, int, int]:
        final = self.final
        return (int(final.get("NumberOfCompletedSuboperations", -1)),
                int(final.get("NumberOfFailedSuboperations", -1)),
                int(final.get("NumberOfWarningSuboperations", -1)))


def assert_pending_consistent(responses: Responses, total: int) -> None:
    """The Pending responses of a retrieve of ``total`` instances (PS3.4 C.4.2.1.6-9,
    C.4.2.3.1): each has the four counts adding up to ``total`` and no data set, Remaining
    counts down, and the node sends the first after the first sub-operation."""
    assert responses.pending, "no Pending response after the first sub-operation"
    remaining = []
    for status, data_set in responses.items[:-1]:
        assert int(status.Status) == 0xFF00 and data_set is None
        counts = [int(status[f"NumberOf{kind}Suboperations"].value)
                  for kind in ("Remaining", "Completed", "Failed", "Warning")]
        assert sum(counts) == total, counts
        remaining.append(counts[0])
    assert remaining[0] == total - 1
    assert remaining == sorted(set(remaining), reverse=True) and remaining[-1] > 0


def identifier(level: str | None, **keys: Any) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def move(port: int, root: str, query: Dataset, destination: str = DEST_AE,
         during: Callable[[Association, int], None] | None = None,
         calling: str = "RETRIEVER") -> Responses:
    """One C-MOVE; ``during(assoc, context_id)`` runs once the request is sent."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(MOVE_MODELS[root])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    no_delay(assoc)
    try:
        responses = assoc.send_c_move(query, destination, MOVE_MODELS[root])
        if during is not None:
            during(assoc, int(assoc.accepted_contexts[0].context_id or 0))
        items = list(responses)
    finally:
        assoc.release()
    assert items and "Status" in items[-1][0], "no final response"
    return Responses(items)


def get(port: int, root: str, query: Dataset, storage: Sequence[tuple[str, Sequence[str]]],
        on_store: Callable[[Any], int | Dataset] | None = None,
        ) -> tuple[Responses, dict[str, Any]]:
    """One C-GET proposing ``storage`` [(SOP class, syntaxes)] with the SCP role.

    Returns the responses and the received instances by SOP Instance UID (the event's
    encoded dataset and transfer syntax).
    """
    received: dict[str, Any] = {}

    def handle_store(event: Any) -> int | Dataset:
        received[str(event.request.AffectedSOPInstanceUID)] = (
            event.encoded_dataset(include_meta=False), str(event.context.transfer_syntax))
        return on_store(event) if on_store is not None else 0

    ae = AE(ae_title="GETTER")
    ae.add_requested_context(GET_MODELS[root])
    roles: list[Any] = []
    for sop_class, syntaxes in storage:
        ae.add_requested_context(sop_class, list(syntaxes))
        roles.append(build_role(sop_class, scp_role=True))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    assert assoc.is_established
    no_delay(assoc)
    try:
        items = list(assoc.send_c_get(query, GET_MODELS[root]))
    finally:
        assoc.release()
    assert items and "Status" in items[-1][0], "no final response"
    return Responses(items), received


UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
