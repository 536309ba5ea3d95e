#!/usr/bin/env python3
"""Retrieve benchmark: C-MOVE and C-GET instances/s of the node and of Orthanc, side by side.

Two corpora of ``--instances`` N instances each (default 200), generated once with pydicom and
cached in ``--corpus``, each ONE study:

``small``  64x64 16-bit CT and MR images (two series, ~9 KB per file);
``large``  512x512 16-bit CT images (one series, ~525 KB per file).

Each target (``--targets``: ``orthanc`` = a private ``/usr/sbin/Orthanc`` with its own JSON
config, storage and free ports, ``TCP_NODELAY=1``; ``node`` = ``python -m node serve -c CONFIG``
from the repository root) is started on an empty store and loaded with both corpora through
C-STORE (one DCMTK ``storescu`` association per corpus).  The move destination is a DCMTK
``storescp`` on a free port (``TCP_NODELAY=1``); it is a ``peers:`` entry in the node's config
and a ``DicomModalities`` entry in Orthanc's.

Then, for every corpus and operation, ``--warmup`` untimed runs and ``--repeat`` R timed runs
against each target in turn (targets interleaved, so that a slow spell of the machine hits both):

``move``     C-MOVE of the study (Study Root, STUDY level) to the storescp, sent by a pynetdicom
             SCU; the time runs from sending the request to the final response;
``movescu``  the same C-MOVE sent by DCMTK ``movescu``;
``get``      C-GET of the study by a pynetdicom SCU on its own association, proposing CT and MR
             Image Storage with the SCP role (PS3.7 D.3.3.4); its C-STORE handler only records
             the Affected SOP Instance UID and answers Success;
``getscu``   the same C-GET by DCMTK ``getscu`` (files written to a fresh folder).

instances/s = N / (time from the C-MOVE/C-GET request to the final response).  For the DCMTK
tools that time is read from the tool's own log (millisecond timestamps from a log4cplus
pattern), so it leaves out the process start and association set-up, as for pynetdicom.

Every run is checked: the final status is Success, and the SOP Instance UIDs that arrived
(storescp's or getscu's files, read back with pydicom; the pynetdicom handler's list) are
exactly those of the study.  ``--ignore-data`` makes storescp and getscu discard what they
receive (``--ignore``): then only the sub-operation counts of the final response are checked
(where there are any: movescu does not log them).

The pynetdicom SCU is tuned as the node tunes its own associations (``node/latency.py``): Nagle
off on its socket, pynetdicom's trace handlers unbound, and the adaptive DUL poll (0.1 ms while
the peer is busy instead of pynetdicom's fixed 1 ms sleep between reads); it accepts PDUs of up
to ``--scu-pdu`` bytes (DCMTK's tools keep their default of 16 KB).

The CPU time of the target, of the SCU and of the storescp is recorded for every run, and so is
the CPU everything else used meanwhile (a ``# noise:`` line counts runs that others disturbed).
The node's working tree is recorded with its commit (``+changes`` when node/ differs from it).

``--profile DIR`` then runs py-spy (``pip install py-spy`` into the venv) on the node during
``--profile-runs`` more retrieves of each kind: raw stacks in DIR, and in the report the share
of the node's working samples by area (association set-up, pynetdicom's socket calls, pydicom,
pynetdicom, node, peewee/SQLite) and the top functions, self and inclusive.

Example::

    python benchmarks/retrieve.py --targets orthanc,node --repeat 5 --json /tmp/retrieve.json

Exit status: 0 when every run succeeded with every instance delivered, 1 otherwise, 2 for bad
arguments or a missing tool.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import linecache
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    CT_IMAGE_STORAGE,
    ECHOSCU,
    GETSCU,
    HOST,
    MOVESCU,
    MR_IMAGE_STORAGE,
    ORTHANC,
    REPO,
    STORESCP,
    STORESCU,
    BenchError,
    NodeServer,
    OrthancServer,
    Server,
    StorescpServer,
    busy_seconds,
    children_cpu_seconds,
    cpu_seconds,
    dcmtk_env,
    first_line,
    interrupts_stop_children,
    reap,
    render_table,
    send,
    spawn,
    write_instance,
)
from common import (
    machine_info as common_machine_info,
)

CORPUS_VERSION = 1  # bump when the generated files change, so stale caches are rebuilt
CORPORA = ("small", "large")
SIZES = {"small": 64, "large": 512}
ALL_TARGETS = ("orthanc", "node")
ALL_METHODS = ("move", "movescu", "get", "getscu")
METHOD_LABEL = {
    "move": ("C-MOVE", "pynetdicom"),
    "movescu": ("C-MOVE", "movescu"),
    "get": ("C-GET", "pynetdicom"),
    "getscu": ("C-GET", "getscu"),
}
DEST_AET = "MOVEDEST"  # the storescp move destination
SCU_AET = "RETRIEVEBENCH"
MOVESCU_AET = "MOVESCU"
GETSCU_AET = "GETSCU"
NOISE = 0.1  # other processes using more than this share of one CPU during a run: say so

STATUS_SUCCESS = 0x0000
STATUS_PENDING = (0xFF00, 0xFF01)

# log4cplus pattern for the DCMTK tools: epoch seconds, then milliseconds with microseconds
_DCMTK_LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.logToStderr = false
log4cplus.appender.console.ImmediateFlush = true
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%s %Q} %p %m%n
"""


# --------------------------------------------------------------------------------------------
# corpus


@dataclass(frozen=True)
class Study:
    """One cached corpus: a folder of Part 10 files that make up one study."""

    name: str
    folder: Path
    study_uid: str
    sop_uids: tuple[str, ...]
    bytes: int

    @property
    def count(self) -> int:
        return len(self.sop_uids)


def generate_study(name: str, folder: Path, count: int) -> Study:
    """``count`` instances of one study in ``folder``: CT and MR alternating for ``small``,
    CT only for ``large``."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    size = SIZES[name]
    study_uid = generate_uid()
    modalities = ("CT", "MR") if name == "small" else ("CT",)
    series = {m: generate_uid() for m in modalities}
    patient = 9000 + CORPORA.index(name)
    total = 0
    for i in range(count):
        modality = modalities[i % len(modalities)]
        total += write_instance(
            folder / f"IMG{i:06d}.dcm",
            sop_class=CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE,
            modality=modality,
            patient=patient,
            study_uid=study_uid,
            study_index=patient,
            series_uid=series[modality],
            series_number=1 + modalities.index(modality),
            instance_number=i // len(modalities) + 1,
            size=size,
        )
    uids = tuple(
        str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        for path in sorted(folder.iterdir())
    )
    return Study(name, folder, study_uid, uids, total)


def ensure_corpus(root: Path, count: int) -> dict[str, Study]:
    """Reuse the corpora cached in ``root`` if they hold ``count`` instances each, else build
    them.  Only ``root/small``, ``root/large`` and ``root/manifest.json`` are ever removed."""
    manifest_path = root / "manifest.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        manifest = json.loads(manifest_path.read_text())
        if manifest["version"] == CORPUS_VERSION and manifest["count"] == count:
            studies = {
                name: Study(name, root / name, entry["study_uid"], tuple(entry["sop_uids"]),
                            entry["bytes"])
                for name, entry in manifest["studies"].items()
            }
            if set(studies) == set(CORPORA) and all(
                sum(1 for _ in s.folder.iterdir()) == count for s in studies.values()
            ):
                print(f"corpus: reusing {root} ({count} small, {count} large)", file=sys.stderr)
                return studies
    try:
        import pydicom  # noqa: F401  (fail early with a clear message)
    except ImportError as exc:
        raise BenchError(f"generating the corpus needs pydicom: {exc}") from exc
    root.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    for name in CORPORA:
        shutil.rmtree(root / name, ignore_errors=True)
    print(f"corpus: generating {count} small + {count} large in {root} ...", file=sys.stderr)
    studies = {name: generate_study(name, root / name, count) for name in CORPORA}
    manifest_path.write_text(json.dumps({
        "version": CORPUS_VERSION,
        "count": count,
        "studies": {
            s.name: {"study_uid": s.study_uid, "sop_uids": list(s.sop_uids), "bytes": s.bytes}
            for s in studies.values()
        },
    }, indent=1) + "\n")
    return studies


def uids_in(folder: Path) -> list[str]:
    """The SOP Instance UIDs of the DICOM files in ``folder`` (read back, not guessed from
    file names)."""
    from pydicom import dcmread

    return [
        str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            .SOPInstanceUID)
        for path in folder.iterdir()
        if path.is_file()
    ]


def empty(folder: Path) -> None:
    """Leave ``folder`` empty: its files are moved aside, under ``set-aside/`` beside it, and
    deleted with the work root when the benchmark ends.

    Not deleted now: on ext4 without a journal (this machine's disk), creating a file within
    ~30 s of many deletions costs the kernel a scan past every recently deleted inode
    (find_inode_bit, recently_deleted), a per-file cost for storescp and getscu that grew
    with every run.
    """
    if not any(folder.iterdir()):
        return
    aside = folder.parent / "set-aside"
    aside.mkdir(exist_ok=True)
    folder.rename(aside / f"{folder.name}-{time.monotonic_ns()}")
    folder.mkdir()


# --------------------------------------------------------------------------------------------
# samples


@dataclass
class Sample:
    """One timed (or warm-up) retrieve of one study from one target."""

    target: str
    corpus: str
    method: str
    repeat: int  # 0 for warm-up runs
    expected: int
    seconds: float | None = None  # request to final response
    wall_s: float | None = None  # whole run, association set-up and tear-down included
    status: str | None = None
    completed: int | None = None  # as the final response says, when it says
    failed: int | None = None
    pending: int = 0  # pending responses seen
    received: int | None = None  # instances that arrived, counted at the receiving end
    checked_uids: bool = False
    target_cpu_s: float | None = None
    scu_cpu_s: float | None = None
    dest_cpu_s: float | None = None
    other_cpu_s: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.seconds is not None

    @property
    def inst_per_s(self) -> float | None:
        return self.expected / self.seconds if self.ok and self.seconds else None


class RunFailed(Exception):
    """A retrieve that did not deliver; the message says how."""


def check_arrivals(sample: Sample, expected: Sequence[str], arrived: Sequence[str]) -> None:
    """Every instance of the study, once, and nothing else."""
    sample.received = len(arrived)
    sample.checked_uids = True
    want, got = set(expected), set(arrived)
    if len(arrived) != len(got):
        raise RunFailed(f"{len(arrived) - len(got)} instances arrived twice")
    if got != want:
        raise RunFailed(
            f"{len(want - got)} of {len(want)} instances missing, {len(got - want)} unexpected"
        )


def check_delivery(sample: Sample, study: Study, folder: Path, ignore_data: bool) -> None:
    """What reached ``folder`` (a storescp's or getscu's), or the counts without the data."""
    if ignore_data:
        check_counts(sample)
    else:
        check_arrivals(sample, study.sop_uids, uids_in(folder))


def check_counts(sample: Sample) -> None:
    """Without the data (``--ignore-data``), the final response's counts are all we have."""
    if sample.completed is not None and sample.completed != sample.expected:
        raise RunFailed(f"{sample.completed} sub-operations completed of {sample.expected}")
    if sample.failed:
        raise RunFailed(f"{sample.failed} sub-operations failed")
    if sample.received is not None and sample.received != sample.expected:
        raise RunFailed(f"{sample.received} instances arrived of {sample.expected}")


# --------------------------------------------------------------------------------------------
# pynetdicom SCU


def _tune_connection(event: Any) -> None:
    """As the node does for its own associations: Nagle off, adaptive DUL poll (without it,
    pynetdicom's DUL sleeps 1 ms whenever one look at the socket finds nothing)."""
    from node.latency import make_responsive

    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    make_responsive(event.assoc.dul)


def _study_query(study: Study) -> Any:
    from pydicom.dataset import Dataset

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study.study_uid
    return query


def _connection_handlers(args: argparse.Namespace) -> list[Any]:
    from pynetdicom import evt

    return [] if args.scu_untuned else [(evt.EVT_CONN_OPEN, _tune_connection)]


def _scu_ae(args: argparse.Namespace, contexts: Sequence[str]) -> Any:
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, _config

    # pynetdicom's standard trace handlers format every message (the node unbinds them too)
    _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title=SCU_AET)
    for context in contexts:
        ae.add_requested_context(context, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = 30
    ae.connection_timeout = 10
    ae.dimse_timeout = args.timeout
    ae.network_timeout = args.timeout
    ae.maximum_pdu_size = args.scu_pdu
    return ae


def _final(sample: Sample, responses: Any, started: float) -> None:
    """Consume C-MOVE/C-GET responses to a request sent at ``started``; note the time and the
    final response in ``sample``, raise if it is not Success.

    The generator is run to its end (not left at the final response) so that pynetdicom
    releases its reactor.
    """
    final: Any = None
    for status, _identifier in responses:
        if not status or "Status" not in status:
            raise RunFailed("no response (association aborted or DIMSE timeout)")
        if int(status.Status) in STATUS_PENDING:
            sample.pending += 1
            continue
        sample.seconds = time.perf_counter() - started
        final = status
    if final is None:
        raise RunFailed("the responses ended without a final status")
    code = int(final.Status)
    sample.status = f"0x{code:04X}"
    sample.completed = final.get("NumberOfCompletedSuboperations")
    sample.failed = final.get("NumberOfFailedSuboperations")
    if code != STATUS_SUCCESS:
        comment = final.get("ErrorComment", "")
        raise RunFailed(f"final status 0x{code:04X}" + (f" ({comment})" if comment else ""))


def _pynetdicom_retrieve(
    target: Server, args: argparse.Namespace, sample: Sample, model: str,
    request: Callable[[Any], Any], *, storage: Sequence[str] = (), handlers: Sequence[Any] = (),
) -> None:
    """One association to ``target`` proposing ``model`` (and ``storage`` with the SCP role);
    ``request(assoc)`` sends the C-MOVE or C-GET and returns pynetdicom's response generator,
    which ``_final`` times and checks."""
    from pydicom.uid import UID
    from pynetdicom import build_role

    ae = _scu_ae(args, [model, *storage])
    wall = time.perf_counter()
    assoc = ae.associate(
        HOST, target.port, ae_title=target.aet,
        ext_neg=[build_role(uid, scp_role=True) for uid in storage] or None,
        evt_handlers=[*_connection_handlers(args), *handlers],
    )
    if not assoc.is_established:
        raise RunFailed(f"association with {target.aet} not established (rejected, or no "
                        "presentation context accepted)")
    try:
        if not any(cx.abstract_syntax == model for cx in assoc.accepted_contexts):
            raise RunFailed(f"{UID(model).name} not accepted")
        started = time.perf_counter()
        # pynetdicom sends the request on the call, before the first response is asked for
        _final(sample, request(assoc), started)
    finally:
        if assoc.is_established:
            assoc.release()
        sample.wall_s = time.perf_counter() - wall


def pynetdicom_move(
    target: Server, study: Study, dest: StorescpServer, args: argparse.Namespace, sample: Sample
) -> None:
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelMove as Move,
    )

    query = _study_query(study)
    _pynetdicom_retrieve(target, args, sample, Move,
                         lambda assoc: assoc.send_c_move(query, DEST_AET, Move))
    check_delivery(sample, study, dest.output, args.ignore_data)


def pynetdicom_get(
    target: Server, study: Study, dest: StorescpServer, args: argparse.Namespace, sample: Sample
) -> None:
    from pynetdicom import evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelGet as Get,
    )

    arrived: list[str] = []

    def on_store(event: Any) -> int:
        # the Affected SOP Instance UID of the command; the dataset is never decoded
        arrived.append(str(event.request.AffectedSOPInstanceUID))
        return STATUS_SUCCESS

    query = _study_query(study)
    _pynetdicom_retrieve(target, args, sample, Get, lambda assoc: assoc.send_c_get(query, Get),
                         storage=[CT_IMAGE_STORAGE, MR_IMAGE_STORAGE],
                         handlers=[(evt.EVT_C_STORE, on_store)])
    check_arrivals(sample, study.sop_uids, arrived)


# --------------------------------------------------------------------------------------------
# DCMTK SCUs


def run_dcmtk(command: list[str], log_config: Path, timeout: float) -> tuple[float, list[str]]:
    """Run a DCMTK tool with timestamped INFO logging; its wall seconds and log lines."""
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        proc = spawn([command[0], "-lc", str(log_config), *command[1:]], log=log,
                     env=dcmtk_env())
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RunFailed(f"{Path(command[0]).name} timed out after {timeout:g} s") from exc
        finally:
            reap([proc])
        wall = time.perf_counter() - started
        log.seek(0)
        lines = log.read().decode(errors="replace").splitlines()
    if proc.returncode != 0:
        shown = "; ".join(lines[-3:]) or "no output"
        raise RunFailed(f"{Path(command[0]).name} exited {proc.returncode}: {shown}")
    return wall, lines


def _stamp(line: str) -> float | None:
    """The time of a log line written with ``_DCMTK_LOG_CONFIG``'s pattern."""
    parts = line.split(" ", 2)
    try:
        return int(parts[0]) + float(parts[1]) / 1000
    except (ValueError, IndexError):
        return None


def _is_final_move(line: str) -> bool:
    return "Received Final Move Response" in line


def _is_final_get(line: str) -> bool:
    return "Received C-GET Response" in line and "(Pending)" not in line


def _timed(
    sample: Sample, lines: Sequence[str], request: str, is_final: Callable[[str], bool]
) -> None:
    """Time from the log line containing ``request`` to the final response line; the status
    and counts of that response (DCMTK logs them at INFO after it)."""
    first = next((i for i, line in enumerate(lines) if request in line), None)
    last = next((i for i in range(len(lines) - 1, -1, -1) if is_final(lines[i])), None)
    if first is None or last is None or last < first:
        raise RunFailed(f"no {request!r} or no final response in the log: "
                        + "; ".join(lines[-3:]))
    t0, t1 = _stamp(lines[first]), _stamp(lines[last])
    if t0 is None or t1 is None:
        raise RunFailed(f"no timestamps in the log: {lines[first]!r}")
    sample.seconds = t1 - t0
    sample.pending = sum(1 for line in lines[first:last]
                         if "Response" in line and "(Pending)" in line)
    final = lines[last].split(" ", 3)[-1]
    for line in lines[last:]:
        for key, attr in (("Completed Suboperations", "completed"),
                          ("Failed Suboperations", "failed")):
            if key in line:
                with contextlib.suppress(ValueError):
                    setattr(sample, attr, int(line.rsplit(":", 1)[1]))
    if "(Success)" not in final and "Success" not in final:
        raise RunFailed(f"final response: {final}")
    sample.status = "0x0000"


def dcmtk_move(
    target: Server, study: Study, dest: StorescpServer, args: argparse.Namespace, sample: Sample
) -> None:
    command = [MOVESCU, "-S", "-aet", MOVESCU_AET, "-aec", target.aet, "-aem", DEST_AET,
               "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
               HOST, str(target.port)]
    sample.wall_s, lines = run_dcmtk(command, args.log_config, args.timeout)
    _timed(sample, lines, "Sending Move Request", _is_final_move)
    check_delivery(sample, study, dest.output, args.ignore_data)


def dcmtk_get(
    target: Server, study: Study, dest: StorescpServer, args: argparse.Namespace, sample: Sample
) -> None:
    output = args.workroot / "getscu"
    output.mkdir(exist_ok=True)
    empty(output)
    command = [GETSCU, "-S", "-aet", GETSCU_AET, "-aec", target.aet,
               *(["--ignore"] if args.ignore_data else ["-od", str(output)]),
               "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
               HOST, str(target.port)]
    sample.wall_s, lines = run_dcmtk(command, args.log_config, args.timeout)
    _timed(sample, lines, "Sending C-GET Request", _is_final_get)
    check_delivery(sample, study, output, args.ignore_data)
    empty(output)


METHODS: dict[str, Callable[[Server, Study, StorescpServer, argparse.Namespace, Sample], None]] = {
    "move": pynetdicom_move,
    "movescu": dcmtk_move,
    "get": pynetdicom_get,
    "getscu": dcmtk_get,
}


def measure(
    target: Server, study: Study, method: str, repeat: int, dest: StorescpServer,
    args: argparse.Namespace,
) -> Sample:
    """One retrieve, with the CPU everyone used meanwhile; failures end up in ``error``."""
    sample = Sample(target.name, study.name, method, repeat, study.count)
    empty(dest.output)
    assert target.proc is not None and dest.proc is not None
    target0, dest0 = cpu_seconds(target.proc.pid), cpu_seconds(dest.proc.pid)
    own0, children0, busy0 = time.process_time(), children_cpu_seconds(), busy_seconds()
    try:
        METHODS[method](target, study, dest, args, sample)
    except RunFailed as exc:
        sample.error = str(exc)
    target1, dest1 = cpu_seconds(target.proc.pid), cpu_seconds(dest.proc.pid)
    own1, children1, busy1 = time.process_time(), children_cpu_seconds(), busy_seconds()
    if not target.alive():
        sample.error = f"{target.name} died\n{target.log_tail()}"
    elif not dest.alive():
        sample.error = f"the storescp destination died\n{dest.log_tail()}"
    if None not in (target0, target1, dest0, dest1, busy0, busy1):
        assert target0 is not None and target1 is not None and dest0 is not None
        assert dest1 is not None and busy0 is not None and busy1 is not None
        sample.target_cpu_s = round(target1 - target0, 3)
        sample.dest_cpu_s = round(dest1 - dest0, 3)
        sample.scu_cpu_s = round(own1 - own0 + children1 - children0, 3)
        known = sample.target_cpu_s + sample.dest_cpu_s + sample.scu_cpu_s
        sample.other_cpu_s = round(max(0.0, busy1 - busy0 - known), 3)
    if not args.ignore_data:
        empty(dest.output)
    return sample


# --------------------------------------------------------------------------------------------
# targets


def make_target(name: str, workdir: Path, dest_port: int, args: argparse.Namespace) -> Server:
    destination = {DEST_AET: (HOST, dest_port)}
    if name == "node":
        return NodeServer(workdir, args.ready_timeout, python=args.python, repo=args.repo,
                          peers=destination)
    return OrthancServer(workdir, args.ready_timeout, modalities=destination)


def load(target: Server, studies: Sequence[Study], timeout: float) -> dict[str, Any]:
    """C-STORE every corpus into ``target`` (one storescu each); check all were stored."""
    loaded: dict[str, Any] = {}
    for study in studies:
        seconds, problems = send(target.aet, target.port, [study.folder], timeout)
        if problems:
            raise BenchError(f"loading {study.name} into {target.name}: " + "; ".join(problems))
        loaded[study.name] = round(seconds, 3)
    stored, detail = target.count()
    expected = sum(s.count for s in studies)
    indexed = detail.get("indexed", stored)
    if stored != expected or indexed != expected:
        raise BenchError(f"{target.name} holds {stored} instances ({indexed} indexed) after "
                         f"loading {expected}")
    return {"store_seconds": loaded, "stored": stored}


# --------------------------------------------------------------------------------------------
# profile of the node (optional)


def _split_frame(frame: str) -> tuple[str, str, int]:
    """``fn (/full/path.py:123)`` -> (``fn``, ``/full/path.py``, 123)."""
    head, _, where = frame.rpartition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    return head, path, int(line) if line.isdigit() else 0


def _short(path: str) -> str:
    for marker in ("site-packages/", f"{REPO}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return Path(path).name if path.startswith("/") else path


# A stack is counted as waiting, not working, when its innermost line sleeps or waits (py-spy's
# own idle filter lets time.sleep and lock waits through) or when it is the listener's loop
# (socketserver's select with a timeout).  pynetdicom's select(..., 0) polls count as work.
# A queue's get() and a poll() block in C as well (no dict.get takes no argument).
_WAIT_CALLS = ("sleep(", ".wait(", ".acquire(", ".poll(", ".get()", ".get(block=True")
_IDLE_FUNCTIONS = ("serve_forever",)
# frames every stack of a thread has: left out of the inclusive ranking
_SCAFFOLD = ("threading.py", "socketserver.py", "<frozen runpy>", "node/__main__.py")


def _waiting(frames: Sequence[tuple[str, str, int]]) -> bool:
    if any(name.endswith(_IDLE_FUNCTIONS) for name, _, _ in frames):
        return True
    _, path, line = frames[-1]
    return any(call in linecache.getline(path, line) for call in _WAIT_CALLS)


# The node's own files, wherever --repo puts its tree (site-packages hold no node/ package).
_AREAS = (("pydicom/", "pydicom"), ("pynetdicom/", "pynetdicom"), ("peewee", "peewee/SQLite"),
          ("/node/", "node"))


def _area(frames: Sequence[tuple[str, str, int]]) -> str:
    """Which part of the program a working sample belongs to: association set-up, pynetdicom's
    socket calls, or the package of the innermost frame that is not the standard library."""
    names = [name for name, _, _ in frames]
    if any(n.endswith(("_create_association", "AE.associate")) for n in names):
        return "association set-up"
    name, path, _ = frames[-1]
    if path.endswith("pynetdicom/transport.py") and name.startswith("AssociationSocket."):
        return "socket calls (pynetdicom transport)"
    for _, path, _ in reversed(frames):
        for marker, area in _AREAS:
            if marker in path:
                return area
    return "other"


def top_frames(raw: Path, count: int = 12) -> dict[str, Any]:
    """From py-spy's raw (collapsed, full file names) stacks: the samples spent waiting, and of
    the others the functions most often innermost (self) and anywhere in the stack
    (inclusive), in per cent of the working samples."""
    own: dict[str, int] = {}
    anywhere: dict[str, int] = {}
    areas: dict[str, int] = {}
    total = waiting = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        samples = int(number)
        total += samples
        frames = [_split_frame(f) for f in stack.split(";")]
        if _waiting(frames):
            waiting += samples
            continue
        area = _area(frames)
        areas[area] = areas.get(area, 0) + samples
        names = [f"{name} ({_short(path)})" for name, path, _ in frames]
        own[names[-1]] = own.get(names[-1], 0) + samples
        for name in set(names):
            if not name.rstrip(")").endswith(_SCAFFOLD):
                anywhere[name] = anywhere.get(name, 0) + samples
    working = total - waiting

    def top(table: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:count]
        return [(name, round(100 * n / working, 1)) for name, n in ranked]

    return {"samples": total, "waiting": waiting, "areas": top(areas) if working else [],
            "self": top(own) if working else [], "inclusive": top(anywhere) if working else []}


def profile_node(
    node: Server, studies: dict[str, Study], dest: StorescpServer, args: argparse.Namespace
) -> dict[str, Any]:
    """Run py-spy on the node while it serves ``--profile-runs`` more retrieves of each kind;
    keep the raw stacks in ``--profile`` and return the top functions of each."""
    assert node.proc is not None
    args.profile.mkdir(parents=True, exist_ok=True)
    found: dict[str, Any] = {}
    for corpus in args.corpus_list:
        for method in args.method_list:
            name = f"node-{corpus}-{method}"
            raw = args.profile / f"{name}.txt"
            raw.unlink(missing_ok=True)
            log_path = args.profile / f"{name}.log"
            with open(log_path, "wb") as log:
                spy = spawn([args.py_spy, "record", "--pid", str(node.proc.pid), "--rate",
                             str(args.profile_rate), "--format", "raw", "--full-filenames",
                             "--output", str(raw)], log=log)
                deadline = time.monotonic() + 30
                while b"Sampling process" not in log_path.read_bytes():
                    if spy.poll() is not None or time.monotonic() > deadline:
                        reap([spy])
                        raise BenchError(f"py-spy did not start: {log_path.read_text()}")
                    time.sleep(0.05)  # poll interval while py-spy attaches
                runs = [measure(node, studies[corpus], method, -1, dest, args)
                        for _ in range(args.profile_runs)]
                spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
                try:
                    spy.wait(timeout=60)
                finally:
                    reap([spy])
            if not raw.is_file():
                raise BenchError(f"py-spy wrote no {raw}: {log_path.read_text()[-500:]}")
            found[name] = {**top_frames(raw), "raw": str(raw),
                           "runs_ok": sum(1 for r in runs if r.ok), "runs": len(runs)}
            print(f"profile: {name}: {found[name]['samples']} samples in {len(runs)} runs",
                  file=sys.stderr, flush=True)
    return found


# --------------------------------------------------------------------------------------------
# report


def node_commit(repo: Path) -> str:
    """The repository's commit, with ``+changes`` when node/ differs from it (the figures
    belong to the working tree that ran)."""
    commit = first_line(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    try:
        changed = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "node"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return commit
    return f"{commit}+changes" if changed else commit


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    with_node = "node" in args.target_list
    info = common_machine_info(args.python, orthanc="orthanc" in args.target_list, node=with_node)
    info["node_commit"] = node_commit(args.repo) if with_node else None
    with contextlib.suppress(ImportError):
        import pynetdicom

        info["pynetdicom"] = pynetdicom.__version__
    return info


@dataclass
class Summary:
    target: str
    corpus: str
    method: str
    runs: int
    ok_runs: int
    median_inst_per_s: float | None = None
    best_inst_per_s: float | None = None  # from the shortest time
    median_ms: float | None = None
    min_ms: float | None = None
    mb_per_s: float | None = None  # at the median
    target_cpu_ms_per_inst: float | None = None  # median over runs
    errors: list[str] = field(default_factory=list)


def summarise(samples: Sequence[Sample], studies: dict[str, Study]) -> list[Summary]:
    keys = list(dict.fromkeys((s.target, s.corpus, s.method) for s in samples if s.repeat))
    out = []
    for target, corpus, method in keys:
        runs = [s for s in samples
                if (s.target, s.corpus, s.method) == (target, corpus, method) and s.repeat]
        good = [s for s in runs if s.ok and s.seconds]
        summary = Summary(target, corpus, method, len(runs), len(good),
                          errors=list(dict.fromkeys(s.error for s in runs if s.error)))
        if good:
            times = [s.seconds for s in good if s.seconds]
            median = statistics.median(times)
            count = good[0].expected
            summary.median_ms = round(median * 1000, 1)
            summary.min_ms = round(min(times) * 1000, 1)
            summary.median_inst_per_s = round(count / median, 1)
            summary.best_inst_per_s = round(count / min(times), 1)
            summary.mb_per_s = round(studies[corpus].bytes / 1e6 / median, 1)
            cpu = [s.target_cpu_s for s in good if s.target_cpu_s is not None]
            if cpu:
                summary.target_cpu_ms_per_inst = round(statistics.median(cpu) * 1000 / count, 2)
        out.append(summary)
    return out


def _rate(summary: Summary | None) -> str:
    if summary is None:
        return "-"
    if summary.median_inst_per_s is None or summary.best_inst_per_s is None:
        return "FAIL"
    mark = "" if summary.ok_runs == summary.runs else f" ({summary.ok_runs}/{summary.runs} ok)"
    return f"{summary.median_inst_per_s:,.0f} ({summary.best_inst_per_s:,.0f}){mark}"


def table(
    summaries: Sequence[Summary], targets: Sequence[str], corpora: Sequence[str],
    methods: Sequence[str],
) -> str:
    by_key = {(s.target, s.corpus, s.method): s for s in summaries}
    header = ["corpus", "operation", "SCU"]
    header += [f"{t} inst/s" for t in targets]
    header += [f"{t} CPU ms/inst" for t in targets]
    ratio = "node/orthanc" if {"node", "orthanc"} <= set(targets) else None
    if ratio:
        header.append(ratio)
    rows = [header]
    for corpus in corpora:
        for method in methods:
            operation, scu = METHOD_LABEL[method]
            row = [corpus, operation, scu]
            found = [by_key.get((t, corpus, method)) for t in targets]
            row += [_rate(s) for s in found]
            row += ["-" if s is None or s.target_cpu_ms_per_inst is None
                    else f"{s.target_cpu_ms_per_inst:.2f}" for s in found]
            if ratio:
                node, orthanc = by_key.get(("node", corpus, method)), by_key.get(
                    ("orthanc", corpus, method))
                if node and orthanc and node.median_inst_per_s and orthanc.median_inst_per_s:
                    row.append(f"{node.median_inst_per_s / orthanc.median_inst_per_s:.2f}")
                else:
                    row.append("-")
            rows.append(row)
    return render_table(rows, left=3)


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure C-MOVE and C-GET of one study from the node and from Orthanc.",
        epilog="Both corpora are loaded into each target through C-STORE first; the timed "
        "runs alternate between the targets.",
    )
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help=f"comma-separated targets (default: {','.join(ALL_TARGETS)})")
    parser.add_argument("--methods", default=",".join(ALL_METHODS),
                        help=f"comma-separated operations (default: {','.join(ALL_METHODS)})")
    parser.add_argument("--corpora", default=",".join(CORPORA),
                        help=f"comma-separated corpora (default: {','.join(CORPORA)})")
    parser.add_argument("--instances", type=int, default=200, metavar="N",
                        help="instances per study (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=5, metavar="R",
                        help="timed runs per target, corpus and operation; the table shows "
                        "the median and the best (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, metavar="W",
                        help="untimed runs before the timed ones (default: %(default)s)")
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/dicomnode-retrieve-corpus"),
                        help="where the generated corpora are cached (default: %(default)s)")
    parser.add_argument("--ignore-data", action="store_true",
                        help="storescp and getscu discard what they receive (--ignore); only "
                        "sub-operation counts are checked then")
    parser.add_argument("--scu-pdu", type=int, default=262144, metavar="BYTES",
                        help="largest PDU the pynetdicom SCU accepts (default: %(default)s)")
    parser.add_argument("--scu-untuned", action="store_true",
                        help="leave the pynetdicom SCU as pynetdicom sets it up (Nagle on, "
                        "1 ms DUL poll), to see what the tuning is worth")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="afterwards, run py-spy on the node during --profile-runs more "
                        "retrieves of each kind; raw stacks go to DIR, the top functions to "
                        "the report")
    parser.add_argument("--profile-runs", type=int, default=5, metavar="K",
                        help="retrieves per kind under py-spy (default: %(default)s)")
    parser.add_argument("--profile-rate", type=int, default=1000, metavar="HZ",
                        help="py-spy samples per second (default: %(default)s)")
    parser.add_argument("--py-spy", default=str(Path(sys.executable).parent / "py-spy"),
                        help="the py-spy program (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="parent of the temporary directory holding the servers' storage "
                        "(default: %(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the servers' storage, configs and logs")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also save results as JSON")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs `-m node serve` (default: %(default)s)")
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="repository root the node is started from (default: %(default)s)")
    parser.add_argument("--ready-timeout", type=float, default=60.0, metavar="S",
                        help="seconds a server has to answer C-ECHO (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="S",
                        help="seconds one retrieve may take (default: %(default)s)")
    args = parser.parse_args(argv)

    def choose(option: str, value: str, allowed: Sequence[str]) -> list[str]:
        chosen = [v.strip() for v in value.split(",") if v.strip()]
        unknown = sorted(set(chosen) - set(allowed))
        if unknown or not chosen:
            parser.error(f"--{option}: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(allowed)}")
        return list(dict.fromkeys(chosen))

    args.target_list = choose("targets", args.targets, ALL_TARGETS)
    args.method_list = choose("methods", args.methods, ALL_METHODS)
    args.corpus_list = choose("corpora", args.corpora, CORPORA)
    if args.instances < 1 or args.repeat < 1 or args.warmup < 0:
        parser.error("--instances and --repeat must be at least 1, --warmup at least 0")
    needed = [STORESCU, STORESCP, ECHOSCU]
    needed += [MOVESCU] if "movescu" in args.method_list else []
    needed += [GETSCU] if "getscu" in args.method_list else []
    needed += [ORTHANC] if "orthanc" in args.target_list else []
    missing = [tool for tool in needed if not os.access(tool, os.X_OK)]
    if missing:
        parser.error(f"missing tool(s): {', '.join(missing)}")
    if "node" in args.target_list and not (args.repo / "node" / "__main__.py").is_file():
        parser.error(f"--repo {args.repo}: no node/__main__.py there")
    if args.profile is not None:
        if "node" not in args.target_list:
            parser.error("--profile profiles the node: add it to --targets")
        if not os.access(args.py_spy, os.X_OK):
            parser.error(f"--py-spy {args.py_spy}: not found (pip install py-spy)")
        args.profile = args.profile.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if str(args.repo) not in sys.path:
        sys.path.insert(0, str(args.repo))  # the SCU borrows node.latency
    samples: list[Sample] = []
    loads: dict[str, Any] = {}
    profiles: dict[str, Any] = {}
    workroot: Path | None = None
    with interrupts_stop_children():
        try:
            studies = ensure_corpus(args.corpus, args.instances)
            info = machine_info(args)
            args.workdir.mkdir(parents=True, exist_ok=True)
            workroot = Path(tempfile.mkdtemp(prefix="dicomnode-retrieve-", dir=args.workdir))
            args.workroot = workroot
            args.log_config = workroot / "dcmtk-log.cfg"
            args.log_config.write_text(_DCMTK_LOG_CONFIG)
            _run(args, studies, samples, loads, profiles)
        except KeyboardInterrupt:
            print("\ninterrupted; servers stopped", file=sys.stderr)
            return 130
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            if workroot is not None and not args.keep:
                shutil.rmtree(workroot, ignore_errors=True)
            elif workroot is not None:
                print(f"kept: {workroot}", file=sys.stderr)
    return report(args, info, studies, samples, loads, profiles)


def _run(
    args: argparse.Namespace, studies: dict[str, Study], samples: list[Sample],
    loads: dict[str, Any], profiles: dict[str, Any],
) -> None:
    dest = StorescpServer(args.workroot / "storescp", args.ready_timeout,
                          ignore=args.ignore_data)
    dest.start()
    targets: list[Server] = []
    for name in args.target_list:
        target = make_target(name, args.workroot / name, dest.port, args)
        print(f"{name}: starting and loading ...", file=sys.stderr, end="", flush=True)
        try:
            target.start()
            loads[name] = load(target, list(studies.values()), args.timeout)
        except BenchError as exc:
            # the other targets can still be measured; the report names this one as failed
            loads[name] = {"error": str(exc)}
            print(f" FAILED: {exc}", file=sys.stderr, flush=True)
            target.stop()
            continue
        targets.append(target)
        print(f" {loads[name]['stored']} instances stored", file=sys.stderr, flush=True)
    if not targets:
        raise BenchError("no target could be started and loaded")
    for corpus in args.corpus_list:
        study = studies[corpus]
        for method in args.method_list:
            for repeat in range(1 - args.warmup, args.repeat + 1):
                for target in targets:
                    sample = measure(target, study, method, max(repeat, 0), dest, args)
                    samples.append(sample)
                    label = "warm-up" if repeat <= 0 else f"#{repeat}"
                    print(f"{target.name} {corpus} {method} {label}: {_progress(sample)}",
                          file=sys.stderr, flush=True)
    node = next((t for t in targets if t.name == "node"), None)
    if args.profile is not None and node is not None:
        profiles.update(profile_node(node, studies, dest, args))


def _progress(sample: Sample) -> str:
    if sample.error is not None:
        return f"FAILED: {sample.error.splitlines()[0]}"
    rate = f"{sample.inst_per_s:,.0f} inst/s" if sample.inst_per_s else "?"
    seconds = sample.seconds or 0.0
    cpu = ""
    if sample.target_cpu_s is not None:
        cpu = (f", CPU-s target {sample.target_cpu_s:.2f} scu {sample.scu_cpu_s:.2f} "
               f"storescp {sample.dest_cpu_s:.2f} other {sample.other_cpu_s:.2f}")
    return f"{seconds * 1000:,.0f} ms, {rate}, {sample.received} arrived{cpu}"


def report(
    args: argparse.Namespace, info: dict[str, Any], studies: dict[str, Study],
    samples: Sequence[Sample], loads: dict[str, Any], profiles: dict[str, Any],
) -> int:
    summaries = summarise(samples, studies)
    print(f"# retrieve benchmark  nproc={info['nproc']}  cpu={info['cpu']}  "
          f"mem={info['mem_total_mb']} MB  kernel={info['kernel']}  python={info['python']}")
    busy = info["cpu_busy_at_start"]
    if busy is not None and busy > 0.15:
        print(f"# warning: CPUs were {busy:.0%} busy before the start; figures may be low")
    versions = [f"dcmtk={info['dcmtk']}"]
    versions += [f"orthanc={info['orthanc']}"] if info["orthanc"] else []
    versions += [f"node={info['node']} ({info['node_commit']})"] if info["node"] else []
    versions += [f"pynetdicom={info.get('pynetdicom')}", f"pydicom={info.get('pydicom')}"]
    print(f"# {'  '.join(versions)}")
    corpus_text = ", ".join(
        f"{s.name}: {s.count} x {SIZES[s.name]}x{SIZES[s.name]} ({s.bytes / 1e6:.1f} MB)"
        for s in studies.values() if s.name in args.corpus_list
    )
    print(f"# one study per corpus; {corpus_text}; {HOST}; TCP_NODELAY=1 for every DCMTK "
          "program (Orthanc, storescp, movescu, getscu)")
    print(f"# {args.warmup} warm-up + {args.repeat} timed runs each, targets alternating; "
          "inst/s = N / (request -> final response): median (best); destination storescp "
          + ("discards data (--ignore)" if args.ignore_data else "writes files to a tmp dir")
          + "; pynetdicom SCU: " + ("untuned" if args.scu_untuned else
                                     "Nagle off, adaptive DUL poll")
          + f", max PDU {args.scu_pdu}")
    print(table(summaries, args.target_list, args.corpus_list, args.method_list))
    failures = [s for s in samples if s.error]
    for name, loaded in loads.items():
        if "error" in loaded:
            print(f"! {name}: not measured: {loaded['error']}")
    for failed in failures:
        label = "warm-up" if failed.repeat == 0 else f"#{failed.repeat}"
        print(f"! {failed.target} {failed.corpus} {failed.method} {label}: {failed.error}")
    noisy = [
        f"{s.target} {s.corpus} {s.method} #{s.repeat}"
        for s in samples
        if s.repeat and s.other_cpu_s is not None and s.seconds
        and s.other_cpu_s > NOISE * (s.wall_s or s.seconds)
    ]
    if noisy:
        print(f"# noise: other processes used more than {NOISE:.0%} of a CPU during "
              f"{len(noisy)} of {sum(1 for s in samples if s.repeat)} timed runs")
    for name, found in profiles.items():
        print(f"# py-spy {name}: {found['samples']} samples at {args.profile_rate} Hz over "
              f"{found['runs']} runs ({found['runs_ok']} ok), {found['waiting']} of them "
              f"waiting; % of the others; raw stacks {found['raw']}")
        for kind in ("areas", "self", "inclusive"):
            print(f"#   {kind}: " + "; ".join(f"{pct}% {frame}" for frame, pct in found[kind]))

    if args.json:
        payload = {
            "machine": info,
            "settings": {
                "targets": args.target_list, "methods": args.method_list,
                "corpora": args.corpus_list, "repeat": args.repeat, "warmup": args.warmup,
                "ignore_data": args.ignore_data, "scu_pdu": args.scu_pdu,
                "scu_untuned": args.scu_untuned,
            },
            "corpora": {
                s.name: {"path": str(s.folder), "instances": s.count, "bytes": s.bytes,
                         "size": SIZES[s.name], "study_uid": s.study_uid}
                for s in studies.values()
            },
            "loads": loads,
            "summary": [asdict(s) for s in summaries],
            "samples": [{**asdict(s), "inst_per_s": s.inst_per_s, "ok": s.ok} for s in samples],
            "profiles": profiles,
            "ok": not failures and all("error" not in v for v in loads.values()),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failures or any("error" in v for v in loads.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
