#!/usr/bin/env python3
"""C-FIND speed of the node next to Orthanc 1.10, on the ingest benchmark's corpus (issue 3).

1. **Corpus**: ``--instances`` N (default 10,000) small CT/MR instances made by the ingest
   benchmark's own generator (``benchmarks/ingest.py`` ``generate_small``: 50 studies of two
   100-image series at N = 10,000, two studies per patient, ``BENCH^Pnnnn`` names, 2024 dates),
   cached in ``--corpus`` with a header summary used to compute the expected match counts.
2. **Servers**: a node (``python -m node serve``, default settings but ``log_level: warning``)
   and a private Orthanc (``tests/orthanc.py``: shipped defaults, own ports and storage,
   ``TCP_NODELAY=1``), both started empty; the corpus is sent to both at once by DCMTK
   ``storescu +sd +r`` (``TCP_NODELAY=1``), and each must then hold all N instances.
3. **Queries**: the six of ``benchmarks/find.py`` with values for this corpus: studies by
   PatientID, by a lower-case PatientName prefix (both servers match names case-insensitively
   by default), by a three-month StudyDate range, every patient, the series of a study and the
   images of a 100-image series.  One association per server, kept open (pynetdicom SCU, Nagle
   off); each query runs once on each to warm up, then ``--repeat`` R times, the two servers
   taking turns so that machine noise hits both alike.  Median and p95 in ms, and the median
   minus the median C-ECHO round trip measured on the same association, and the CPU time the
   server process used per run (from /proc; less sensitive than wall time to other load on
   the machine).  The match counts must
   agree between the servers and with the corpus; a ``! warning`` line says when they do not.

Example::

    .venv/bin/python benchmarks/find_orthanc.py --json /tmp/find-orthanc.json

Exit status: 0 when every query ran on both with the expected counts, 1 otherwise, 2 for bad
arguments or a missing tool.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(HERE), str(REPO)):  # ``import ingest`` and ``import tests.orthanc``
    if _path not in sys.path:
        sys.path.insert(0, _path)

from tests.orthanc import OrthancProcess, echo, free_port, orthanc_available  # noqa: E402

STORESCU = Path("/usr/bin/storescu")
HOST = "127.0.0.1"
NODE_AET = "DICOMNODE"
SCU_AET = "FINDBENCH"
CORPUS_VERSION = 1  # bump when the summary below changes
TARGET_PATIENT = "BENCH0007"
NAME_QUERY = "bench^p001*"  # lower case: both servers fold PN case by default
DATE_RANGE = ("20240101", "20240331")
SCU_POLL = 0.0001  # seconds: the SCU's DUL poll interval while measuring (pynetdicom: 0.001)
PENDING = (0xFF00, 0xFF01)
READY_DEADLINE = 60.0


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


# --------------------------------------------------------------------------------------------
# corpus


@dataclass(frozen=True)
class SeriesInfo:
    patient_id: str
    patient_name: str
    study_uid: str
    study_date: str
    series_uid: str
    instances: int


def ensure_corpus(root: Path, instances: int) -> tuple[Path, list[SeriesInfo]]:
    """The ingest generator's files in ``root/files`` and a summary of their headers."""
    manifest_path = root / "manifest.json"
    files = root / "files"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        manifest = json.loads(manifest_path.read_text())
        if manifest["version"] == CORPUS_VERSION and manifest["instances"] == instances:
            series = [SeriesInfo(**s) for s in manifest["series"]]
            if sum(s.instances for s in series) == instances:
                print(f"corpus: reusing {root}", file=sys.stderr)
                return files, series
    import ingest  # the ingest benchmark's generator, so both benchmarks use one corpus

    manifest_path.unlink(missing_ok=True)
    shutil.rmtree(files, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    print(f"corpus: generating {instances:,} instances in {files} ...", file=sys.stderr)
    started = time.perf_counter()
    ingest.generate_small(files, instances)
    series = summarise(files)
    if sum(s.instances for s in series) != instances:
        raise BenchError(f"the generator wrote {sum(s.instances for s in series)} instances")
    manifest_path.write_text(json.dumps({"version": CORPUS_VERSION, "instances": instances,
                                         "series": [asdict(s) for s in series]}, indent=1))
    print(f"corpus: done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return files, series


def summarise(files: Path) -> list[SeriesInfo]:
    from pydicom import dcmread

    tags = ["PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "SeriesInstanceUID"]
    counts: dict[tuple[str, str, str, str, str], int] = {}
    for path in sorted(files.rglob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True, specific_tags=tags)
        patient_id, name, study, day, series = (str(ds.get(t, "")) for t in tags)
        key = (patient_id, name, study, day, series)
        counts[key] = counts.get(key, 0) + 1
    return [SeriesInfo(p, n, st, d, se, count) for (p, n, st, d, se), count in
            sorted(counts.items())]


# --------------------------------------------------------------------------------------------
# queries


@dataclass
class Query:
    name: str
    model: str  # "patient" or "study"
    level: str
    keys: dict[str, str]  # matching keys with their values, return keys with ""
    expected: int  # matches, from the corpus summary


def build_queries(series: list[SeriesInfo]) -> list[Query]:
    """The six queries of benchmarks/find.py, with values taken from this corpus."""
    studies = {s.study_uid: s for s in series}
    mine = sorted(uid for uid, s in studies.items() if s.patient_id == TARGET_PATIENT)
    if not mine:
        raise BenchError(f"the corpus has no patient {TARGET_PATIENT} (too few instances?)")
    prefix = NAME_QUERY.rstrip("*").casefold()
    first, last = DATE_RANGE
    study_series = sorted((s for s in series if s.study_uid == mine[0]),
                          key=lambda s: s.series_uid)
    big = max(study_series, key=lambda s: s.instances)
    return [
        Query("study by PatientID", "study", "STUDY",
              {"PatientID": TARGET_PATIENT, "StudyInstanceUID": "", "StudyDate": "",
               "StudyDescription": "", "ModalitiesInStudy": "",
               "NumberOfStudyRelatedInstances": ""}, len(mine)),
        Query(f"study by PatientName {NAME_QUERY}", "study", "STUDY",
              {"SpecificCharacterSet": "ISO_IR 192", "PatientName": NAME_QUERY,
               "StudyInstanceUID": "", "PatientID": "", "StudyDate": ""},
              sum(1 for s in studies.values() if s.patient_name.casefold().startswith(prefix))),
        Query(f"study by StudyDate {first}-{last}", "study", "STUDY",
              {"StudyDate": f"{first}-{last}", "StudyInstanceUID": "", "PatientID": "",
               "StudyTime": ""},
              sum(1 for s in studies.values() if first <= s.study_date <= last)),
        Query("all patients (PatientID universal)", "patient", "PATIENT",
              {"PatientID": "", "PatientName": "", "PatientBirthDate": "", "PatientSex": ""},
              len({s.patient_id for s in series})),
        Query("series of a study", "study", "SERIES",
              {"StudyInstanceUID": mine[0], "SeriesInstanceUID": "", "Modality": "",
               "SeriesNumber": "", "NumberOfSeriesRelatedInstances": ""}, len(study_series)),
        Query(f"images of a {big.instances}-image series", "study", "IMAGE",
              {"StudyInstanceUID": mine[0], "SeriesInstanceUID": big.series_uid,
               "SOPInstanceUID": "", "InstanceNumber": ""}, big.instances),
    ]


# --------------------------------------------------------------------------------------------
# servers


@dataclass
class NodeRun:
    """A ``python -m node serve`` process on its own config and empty storage."""

    workdir: Path
    python: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "node.log"

    def start(self) -> NodeRun:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "node.yaml"
        config.write_text(f"ae_title: {NODE_AET}\nbind: {HOST}\nport: {self.port}\n"
                          f"storage: {json.dumps(str(self.workdir / 'storage'))}\n"
                          "log_level: warning\n"
                          "unknown_peers: all\n")  # the benchmark's SCU is no configured peer
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [self.python, "-m", "node", "serve", "-c", str(config)], cwd=REPO,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_DEADLINE
        pause = threading.Event()  # never set: a bounded pause between polls
        while not echo(self.port, NODE_AET):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the node did not answer C-ECHO\n{self.log_tail()}")
            pause.wait(0.05)
        return self

    def instance_count(self) -> int:
        database = self.workdir / "storage" / "index.sqlite"
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT COUNT(*) FROM instance").fetchone()[0])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


def store_everywhere(files: Path, targets: dict[str, tuple[str, int]]) -> dict[str, float]:
    """Send ``files`` to every target at once (one storescu each); seconds per target."""
    env = {**os.environ, "TCP_NODELAY": "1"}  # Debian's DCMTK leaves Nagle on otherwise
    started = time.perf_counter()
    procs = {
        name: subprocess.Popen([str(STORESCU), "-aec", aet, "-ta", "120", "+sd", "+r", HOST,
                                str(port), str(files)], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for name, (aet, port) in targets.items()
    }
    seconds: dict[str, float] = {}
    problems: list[str] = []
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=1800)
        seconds[name] = time.perf_counter() - started
        errors = [line for line in output.decode(errors="replace").splitlines()
                  if line.startswith(("E:", "F:"))]
        if proc.returncode != 0 or errors:
            problems.append(f"storescu to {name}: exit {proc.returncode}: {errors[-3:]}")
    if problems:
        raise BenchError("\n".join(problems))
    return seconds


# --------------------------------------------------------------------------------------------
# measuring


@dataclass
class Timing:
    server: str
    matches: int | None = None
    samples_ms: list[float] = field(default_factory=list)
    cpu_ms: float = 0.0  # CPU time the server process used over all timed runs
    error: str | None = None

    @property
    def cpu_per_run_ms(self) -> float | None:
        return self.cpu_ms / len(self.samples_ms) if self.samples_ms else None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.samples_ms) if self.samples_ms else None

    @property
    def p95_ms(self) -> float | None:
        return percentile(self.samples_ms, 0.95)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    """CPU time (user + system, all threads) process ``pid`` has used so far, in ms."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1000 / _TICK  # utime stime
    except (OSError, IndexError, ValueError) as exc:
        raise BenchError(f"cannot read the CPU time of process {pid}: {exc}") from exc


def open_association(port: int, called: str) -> Any:
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
        Verification,
    )

    ae = AE(ae_title=SCU_AET)
    for context in (Verification, PatientRootQueryRetrieveInformationModelFind,
                    StudyRootQueryRetrieveInformationModelFind):
        ae.add_requested_context(context)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300
    assoc = ae.associate(HOST, port, ae_title=called)
    if not assoc.is_established:
        raise BenchError(f"{called} on port {port} refused the association")
    transport = assoc.dul.socket
    assert transport is not None and transport.socket is not None
    transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # pynetdicom's DUL sleeps 1 ms whenever it finds nothing to do; a real SCU does not.
    assoc.dul._run_loop_delay = SCU_POLL
    return assoc


def run_find(assoc: Any, query: Query) -> int:
    """One C-FIND; the number of matches (BenchError on a failure status)."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
    )

    model = (PatientRootQueryRetrieveInformationModelFind if query.model == "patient"
             else StudyRootQueryRetrieveInformationModelFind)
    ds = Dataset()
    ds.QueryRetrieveLevel = query.level
    for keyword, value in query.keys.items():
        setattr(ds, keyword, value or None)
    matches = 0
    for status, _ in assoc.send_c_find(ds, model):
        if not status or "Status" not in status:
            raise BenchError("no response (association aborted or DIMSE timeout)")
        code = int(status.Status)
        if code in PENDING:
            matches += 1
        elif code == 0x0000:
            return matches
        else:
            raise BenchError(f"status 0x{code:04X} {status.get('ErrorComment', '')}")
    raise BenchError("the response stream ended without a final status")


def echo_times(assoc: Any, repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat + 1):  # the first one warms up
        started = time.perf_counter()
        status = assoc.send_c_echo()
        samples.append((time.perf_counter() - started) * 1000)
        if not status or int(status.Status) != 0x0000:
            raise BenchError(f"C-ECHO failed on the measuring association: {status}")
    return samples[1:]


def measure(servers: dict[str, tuple[str, int, int]], queries: Sequence[Query], repeat: int
            ) -> tuple[dict[str, list[float]], list[dict[str, Timing]]]:
    """Echo round trips, then each query on each server in turn, over one association each.

    ``servers``: name -> (AE title, port, process id); the server's CPU time is read from
    /proc around each timed run (clock ticks of 10 ms: meaningful summed over the runs).
    """
    pids = {name: pid for name, (_, _, pid) in servers.items()}
    assocs = {name: open_association(port, aet) for name, (aet, port, _) in servers.items()}
    try:
        echoes = {name: echo_times(assoc, repeat) for name, assoc in assocs.items()}
        results: list[dict[str, Timing]] = []
        for query in queries:
            print(f"query: {query.name} ...", file=sys.stderr, end="", flush=True)
            timings = {name: Timing(name) for name in assocs}
            results.append(timings)
            for name, assoc in assocs.items():
                try:
                    timings[name].matches = run_find(assoc, query)  # warm-up
                except BenchError as exc:
                    timings[name].error = str(exc)
            for _ in range(repeat):
                for name, assoc in assocs.items():
                    if timings[name].error is not None:
                        continue
                    try:
                        cpu0 = cpu_ms(pids[name])
                        started = time.perf_counter()
                        count = run_find(assoc, query)
                        timings[name].samples_ms.append((time.perf_counter() - started) * 1000)
                        timings[name].cpu_ms += cpu_ms(pids[name]) - cpu0
                    except BenchError as exc:
                        timings[name].error = str(exc)
                        continue
                    if count != timings[name].matches:
                        timings[name].error = (f"{count} matches on a repeat, "
                                               f"{timings[name].matches} at first")
            print(" " + ", ".join(f"{n} {_ms(t.median_ms)} ms" for n, t in timings.items()),
                  file=sys.stderr, flush=True)
        return echoes, results
    finally:
        for assoc in assocs.values():
            if assoc.is_established:
                assoc.release()


# --------------------------------------------------------------------------------------------
# report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def render(queries: Sequence[Query], results: Sequence[dict[str, Timing]],
           echo_ms: dict[str, float]) -> str:
    header = ["query", "expected", "node n", "orthanc n", "node med", "node p95", "node -echo",
              "node CPU", "orthanc med", "orthanc p95", "orthanc -echo", "orthanc CPU",
              "node/orthanc"]
    rows = [header]
    for query, timings in zip(queries, results, strict=True):
        node, orthanc = timings["node"], timings["orthanc"]
        beyond = {n: None if t.median_ms is None else t.median_ms - echo_ms[n]
                  for n, t in timings.items()}
        ratio = (f"{node.median_ms / orthanc.median_ms:.2f}"
                 if node.median_ms and orthanc.median_ms else "-")
        rows.append([query.name, str(query.expected),
                     "FAIL" if node.error else str(node.matches),
                     "FAIL" if orthanc.error else str(orthanc.matches),
                     _ms(node.median_ms), _ms(node.p95_ms), _ms(beyond["node"]),
                     _ms(node.cpu_per_run_ms), _ms(orthanc.median_ms), _ms(orthanc.p95_ms),
                     _ms(beyond["orthanc"]), _ms(orthanc.cpu_per_run_ms), ratio])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join([row[0].ljust(widths[0])]
                               + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def problems_of(queries: Sequence[Query], results: Sequence[dict[str, Timing]]) -> list[str]:
    found = []
    for query, timings in zip(queries, results, strict=True):
        for timing in timings.values():
            if timing.error:
                found.append(f"{query.name}: {timing.server}: {timing.error}")
        counts = {t.server: t.matches for t in timings.values() if t.error is None}
        if len(set(counts.values())) > 1:
            found.append(f"{query.name}: match counts differ: {counts}")
        wrong = {s: c for s, c in counts.items() if c != query.expected}
        if wrong:
            found.append(f"{query.name}: expected {query.expected} matches, got {wrong}")
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time C-FIND on the node and on Orthanc 1.10, "
                                     "side by side, on the ingest benchmark's corpus.")
    parser.add_argument("--instances", type=int, default=10_000, metavar="N",
                        help="instances in the corpus (default: %(default)s)")
    parser.add_argument("--corpus", type=Path, metavar="DIR",
                        help="where the generated corpus is cached "
                        "(default: /tmp/dicomnode-find-orthanc-corpus/N)")
    parser.add_argument("--repeat", type=int, default=30, metavar="R",
                        help="timed runs of each query on each server (default: %(default)s)")
    parser.add_argument("--orthanc-storage-access", default=None,
                        choices=["Always", "Answers", "Never"],
                        help="Orthanc's StorageAccessOnFind (default: as shipped, Always)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="parent of the servers' temporary folder (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the servers' folder")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also save results as JSON")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs `-m node serve` (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.instances < 400 or args.repeat < 1:
        parser.error("--instances must be at least 400 and --repeat at least 1")
    missing = [str(t) for t in (STORESCU,) if not os.access(t, os.X_OK)]
    missing += [] if orthanc_available() else ["/usr/sbin/Orthanc"]
    if missing:
        parser.error(f"missing: {', '.join(missing)} (apt-get install dcmtk orthanc)")
    if args.corpus is None:
        args.corpus = Path(f"/tmp/dicomnode-find-orthanc-corpus/{args.instances}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        files, series = ensure_corpus(args.corpus, args.instances)
        queries = build_queries(series)
        args.workdir.mkdir(parents=True, exist_ok=True)
        workroot = Path(tempfile.mkdtemp(prefix="find-orthanc-", dir=args.workdir))
        try:
            return run(args, files, queries, workroot)
        finally:
            if not args.keep:
                shutil.rmtree(workroot, ignore_errors=True)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, files: Path, queries: list[Query], workroot: Path) -> int:
    extra = ({} if args.orthanc_storage_access is None
             else {"StorageAccessOnFind": args.orthanc_storage_access})
    node = NodeRun(workroot / "node", args.python)
    orthanc = OrthancProcess(workroot / "orthanc", extra=extra)
    try:
        node.start()
        (workroot / "orthanc").mkdir(parents=True, exist_ok=True)
        try:
            orthanc.start()
        except RuntimeError as exc:
            raise BenchError(str(exc)) from exc
        assert node.process is not None and orthanc.process is not None
        servers = {"node": (NODE_AET, node.port, node.process.pid),
                   "orthanc": (orthanc.aet, orthanc.dicom_port, orthanc.process.pid)}
        print(f"store: sending {args.instances:,} instances to both ...", file=sys.stderr)
        store_s = store_everywhere(files, {n: (aet, port) for n, (aet, port, _) in
                                           servers.items()})
        held = {"node": node.instance_count(), "orthanc": orthanc.instance_count()}
        if any(n != args.instances for n in held.values()):
            raise BenchError(f"sent {args.instances} instances, held: {held}")
        echoes, results = measure(servers, queries, args.repeat)
        version = str(orthanc.rest("GET", "/system").get("Version"))
    finally:
        node.stop()
        orthanc.stop()
    echo_ms = {name: statistics.median(samples) for name, samples in echoes.items()}
    print(f"# C-FIND, node vs Orthanc {version}: {args.instances:,} instances "
          f"({len(queries)} queries), nproc={os.cpu_count()}, "
          f"python={platform.python_version()}, sqlite={sqlite3.sqlite_version}")
    print(f"# Orthanc StorageAccessOnFind: {args.orthanc_storage_access or 'Always (shipped)'}; "
          f"stored in {store_s['node']:.0f} s (node) / {store_s['orthanc']:.0f} s (Orthanc), "
          "sent to both at once")
    print(f"# one association per server, Nagle off, SCU poll {SCU_POLL * 1000:g} ms; "
          f"1 warm-up + {args.repeat} timed runs per query and server, servers in turn; "
          "times in ms; CPU: the server process's CPU ms per run")
    print("# C-ECHO round trip: " + ", ".join(
        f"{n} median {_ms(m)} ms, p95 {_ms(percentile(echoes[n], 0.95))} ms"
        for n, m in echo_ms.items()))
    print(render(queries, results, echo_ms))
    problems = problems_of(queries, results)
    for problem in problems:
        print(f"! warning: {problem}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "instances": args.instances, "orthanc_version": version, "repeat": args.repeat,
            "orthanc_storage_access": args.orthanc_storage_access or "Always",
            "store_seconds": store_s,
            "echo_ms": {n: {"median": m, "p95": percentile(echoes[n], 0.95),
                            "samples": echoes[n]} for n, m in echo_ms.items()},
            "queries": [{"name": q.name, "level": q.level, "keys": q.keys,
                         "expected": q.expected,
                         **{n: {**asdict(t), "median_ms": t.median_ms, "p95_ms": t.p95_ms,
                                "cpu_per_run_ms": t.cpu_per_run_ms,
                                "beyond_echo_ms": None if t.median_ms is None
                                else t.median_ms - echo_ms[n]} for n, t in r.items()}}
                        for q, r in zip(queries, results, strict=True)],
            "problems": problems,
        }, indent=2) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
