#!/usr/bin/env python3
"""Ingest benchmark: C-STORE throughput of DICOM servers on this machine, side by side.

Targets (``--targets``, comma separated, in the order given):

``node``
    this repository's node, ``python -m node serve -c CONFIG`` run from the repository root;
``orthanc``
    a private Orthanc instance (``/usr/sbin/Orthanc``) with its own JSON configuration, ports
    and storage; a packaged Orthanc service, if one runs, is left alone;
``storescp``
    DCMTK ``storescp`` writing plain files with no index: the floor of what ingest can cost.
    It serves one association at a time, so its 4-association figure is sequential.

Each target goes through three runs, each against a freshly started server with an empty
storage directory (so a run never meets the instances of the one before):

``1-assoc``  the small corpus sent by one ``storescu`` association;
``4-assoc``  the small corpus, pre-split in four folders, sent by four ``storescu`` at once;
``large``    the 512x512 corpus sent by one association (MB/s and instances/s).

Times are wall clock from starting the ``storescu`` processes until the last one exits, so
they include storescu's start-up and its scan of the input files (the same for every target).
After each run the stored instances are counted (files for node and storescp, plus the rows
of the node's SQLite index; ``GET /statistics`` for Orthanc) and the peak RSS (VmHWM) of the
server and its children is read from ``/proc`` before the server is stopped.  The CPU time of
the server, of storescu and of everything else during each run is recorded too: when other
processes used the CPUs meanwhile, a ``# noise:`` line names the runs concerned.
``--repeat K`` runs everything K times and the table shows medians (the JSON keeps each run).

The corpus is generated once with pydicom and cached in ``--corpus`` (regenerated when the
requested sizes change).  Every DCMTK tool is called by full path with ``TCP_NODELAY=1``:
Debian's DCMTK leaves Nagle's algorithm on otherwise.  Orthanc talks DICOM through the same
libdcmtk, so it gets ``TCP_NODELAY=1`` too (without it, every C-STORE waits ~40 ms for a
delayed ACK and Orthanc ingests ~22 instances/s); ``--orthanc-nagle`` turns that off.

Example::

    python benchmarks/ingest.py --targets node,orthanc,storescp --json /tmp/ingest.json

Exit status: 0 when every run succeeded and every instance sent was stored, 1 otherwise,
2 for bad arguments or a missing tool.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
CORPUS_VERSION = 1  # bump when the generated files change, so stale caches are rebuilt
SMALL_SPLIT = 4
SMALL_STUDIES = 50  # the small corpus is ~50 studies x 2 series (one CT, one MR)
LARGE_STUDIES = 5
ALL_TARGETS = ("node", "orthanc", "storescp")
NOISE = 0.1  # other processes using more than this share of one CPU during a run: say so
RUNS = ("1-assoc", "4-assoc", "large")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


class BenchError(Exception):
    """A run that could not be carried out; the message says why."""


def dcmtk_env() -> dict[str, str]:
    """The environment for DCMTK tools: Debian's DCMTK leaves Nagle on unless told."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def first_line(command: Sequence[str]) -> str:
    """The first non-empty output line of ``command``, or a note that it failed."""
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=30, check=False, env=dcmtk_env()
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    for line in (done.stdout + done.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


# --------------------------------------------------------------------------------------------
# corpus


@dataclass(frozen=True)
class Corpus:
    """The cached input files."""

    root: Path
    small: int
    large: int
    small_bytes: int
    large_bytes: int

    @property
    def small_dir(self) -> Path:
        return self.root / "small"

    @property
    def small_parts(self) -> list[Path]:
        return [self.small_dir / str(k) for k in range(SMALL_SPLIT)]

    @property
    def large_dir(self) -> Path:
        return self.root / "large"


_LOW_NIBBLE = bytes(b & 0x0F for b in range(256))


def pixel_bytes(rows: int, columns: int) -> bytes:
    """Random 16-bit little-endian pixels that respect BitsStored 12 (high nibble clear)."""
    data = bytearray(os.urandom(rows * columns * 2))
    data[1::2] = data[1::2].translate(_LOW_NIBBLE)
    return bytes(data)


def write_instance(
    path: Path,
    *,
    sop_class: str,
    modality: str,
    patient: int,
    study_uid: str,
    study_index: int,
    series_uid: str,
    series_number: int,
    instance_number: int,
    size: int,
) -> int:
    """Write one valid Part 10 file (explicit VR little endian); return its size in bytes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = f"BENCH^P{patient:04d}"
    ds.PatientID = f"BENCH{patient:04d}"
    ds.PatientBirthDate = f"19{50 + patient % 50:02d}0101"
    ds.PatientSex = "MF"[patient % 2]
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = f"2024{1 + study_index % 12:02d}{1 + study_index % 28:02d}"
    ds.StudyTime = "120000"
    ds.StudyID = str(study_index + 1)
    ds.AccessionNumber = f"ACC{study_index:06d}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "BENCHMARK"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.Modality = modality
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = size
    ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if modality == "CT":
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
    ds.PixelData = pixel_bytes(size, size)
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def generate_small(target: Path, count: int) -> int:
    """``count`` 64x64 CT/MR instances (alternating) in ``target/0..3``; return total bytes."""
    from pydicom.uid import generate_uid

    parts = [target / str(k) for k in range(SMALL_SPLIT)]
    for part in parts:
        part.mkdir(parents=True)
    studies = [generate_uid() for _ in range(SMALL_STUDIES)]
    series = {(s, m): generate_uid() for s in range(SMALL_STUDIES) for m in ("CT", "MR")}
    total = 0
    for i in range(count):
        modality = "CT" if i % 2 == 0 else "MR"
        study = (i // 2) % SMALL_STUDIES
        total += write_instance(
            parts[i % SMALL_SPLIT] / f"IMG{i:06d}.dcm",
            sop_class=CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE,
            modality=modality,
            patient=study // 2 + 1,  # two studies per patient
            study_uid=studies[study],
            study_index=study,
            series_uid=series[(study, modality)],
            series_number=1 if modality == "CT" else 2,
            instance_number=i // (2 * SMALL_STUDIES) + 1,
            size=64,
        )
    return total


def generate_large(target: Path, count: int) -> int:
    """``count`` 512x512 CT instances in ``target``; return total bytes."""
    from pydicom.uid import generate_uid

    target.mkdir(parents=True)
    studies = [(generate_uid(), generate_uid()) for _ in range(LARGE_STUDIES)]
    total = 0
    for i in range(count):
        study = i % LARGE_STUDIES
        study_uid, series_uid = studies[study]
        total += write_instance(
            target / f"CT{i:06d}.dcm",
            sop_class=CT_IMAGE_STORAGE,
            modality="CT",
            patient=1000 + study,
            study_uid=study_uid,
            study_index=SMALL_STUDIES + study,
            series_uid=series_uid,
            series_number=1,
            instance_number=i // LARGE_STUDIES + 1,
            size=512,
        )
    return total


def ensure_corpus(root: Path, small: int, large: int) -> Corpus:
    """Reuse the corpus cached in ``root`` if it has the requested sizes, else build it.

    Only ``root/small``, ``root/large`` and ``root/manifest.json`` are ever removed.
    """
    manifest_path = root / "manifest.json"
    wanted = {"version": CORPUS_VERSION, "small": small, "large": large}
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in wanted} == wanted:
            corpus = Corpus(root, small, large, manifest["small_bytes"], manifest["large_bytes"])
            if count_files(corpus.small_dir) == small and count_files(corpus.large_dir) == large:
                print(f"corpus: reusing {root} ({small} small, {large} large)", file=sys.stderr)
                return corpus
    try:
        import pydicom  # noqa: F401  (fail early with a clear message)
    except ImportError as exc:
        raise BenchError(f"generating the corpus needs pydicom: {exc}") from exc
    root.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    for sub in ("small", "large"):
        shutil.rmtree(root / sub, ignore_errors=True)
    print(f"corpus: generating {small} small + {large} large in {root} ...", file=sys.stderr)
    started = time.perf_counter()
    small_bytes = generate_small(root / "small", small)
    large_bytes = generate_large(root / "large", large)
    elapsed = time.perf_counter() - started
    print(f"corpus: done in {elapsed:.1f} s", file=sys.stderr)
    manifest_path.write_text(
        json.dumps({**wanted, "small_bytes": small_bytes, "large_bytes": large_bytes}, indent=2)
    )
    return Corpus(root, small, large, small_bytes, large_bytes)


def count_files(root: Path, skip: Callable[[Path], bool] = lambda p: False) -> int:
    """Regular files below ``root`` (0 if it does not exist), leaving out ``skip(path)``."""
    total = 0
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not skip(here / d)]
        total += sum(1 for f in files if not skip(here / f))
    return total


# --------------------------------------------------------------------------------------------
# processes


_LIVE: set[subprocess.Popen[bytes]] = set()  # everything still to be stopped on the way out


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``grace`` seconds.

    The process stays in ``_LIVE`` until it has been reaped, so an interrupted wait leaves it
    to ``stop_all``.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=grace)
    _LIVE.discard(proc)


def stop_all() -> None:
    """Stop every child still running; a second Ctrl-C while waiting kills the rest."""
    try:
        for proc in list(_LIVE):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                stop_process(proc, grace=10.0)
    except KeyboardInterrupt:
        for proc in list(_LIVE):
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
            _LIVE.discard(proc)


def spawn(
    command: Sequence[str],
    *,
    log: IO[bytes] | None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    own_session: bool = False,
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log if log is not None else subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=own_session,  # a Ctrl-C reaches us, and we stop the server
    )
    _LIVE.add(proc)
    return proc


def _status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of ``pid`` plus that of its live descendants, in MiB."""
    own = _status_kb(pid, "VmHWM")
    if own is None:
        return None
    extra = sum(_status_kb(child, "VmHWM") or 0 for child in descendants(pid))
    return (own + extra) / 1024


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, with reaped children) of ``pid`` and its live descendants."""
    total = 0
    for member in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{member}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
        except (OSError, IndexError, ValueError):
            if member == pid:
                return None
    return total / _TICK


def busy_seconds() -> float | None:
    """CPU time all processes used since boot (from the first line of /proc/stat)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[0] + fields[1] + fields[2]) / _TICK  # user, nice, system (not irq, steal)


def children_cpu_seconds() -> float:
    """CPU time of this process's reaped children (the storescu processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def echo_ok(aet: str, port: int) -> bool:
    try:
        done = subprocess.run(
            [ECHOSCU, "-to", "2", "-ta", "5", "-aec", aet, HOST, str(port)],
            capture_output=True,
            timeout=15,
            check=False,
            env=dcmtk_env(),
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


# --------------------------------------------------------------------------------------------
# servers


class Server:
    """One server under test: start, wait until it answers C-ECHO, count what it holds, stop."""

    name = "?"
    aet = "ANY-SCP"

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.args = args
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "server.log"
        self._log: IO[bytes] | None = None

    def command(self) -> tuple[list[str], Path | None, dict[str, str] | None]:
        raise NotImplementedError

    def count(self) -> tuple[int, dict[str, Any]]:
        """Instances stored now, and any extra detail worth keeping."""
        raise NotImplementedError

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command, cwd, env = self.command()
        self._log = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop())
        self.proc = spawn(command, log=self._log, cwd=cwd, env=env, own_session=True)
        deadline = time.monotonic() + self.args.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with status {self.proc.returncode} before answering "
                    f"C-ECHO\n{self.log_tail()}"
                )
            if echo_ok(self.aet, self.port):
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} did not answer C-ECHO on port {self.port} within "
                    f"{self.args.ready_timeout:g} s\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def peak_rss_mb(self) -> float | None:
        return peak_rss_mb(self.proc.pid) if self.alive() and self.proc else None

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.proc.pid) if self.alive() and self.proc else None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        tail = "\n".join(f"    | {line}" for line in text[-lines:])
        return f"  last lines of {self.log_path}:\n{tail}" if tail else "  (server log empty)"


class NodeServer(Server):
    name = "node"
    aet = "DICOMNODE"

    def command(self) -> tuple[list[str], Path | None, dict[str, str] | None]:
        self.storage = self.workdir / "storage"
        config = self.workdir / "node.yaml"
        config.write_text(
            f"ae_title: {self.aet}\n"
            f"bind: {HOST}\n"
            f"port: {self.port}\n"
            f"storage: {json.dumps(str(self.storage))}\n"
            "log_level: WARNING\n"
        )
        return [self.args.python, "-m", "node", "serve", "-c", str(config)], self.args.repo, None

    def _skip(self, path: Path) -> bool:
        return path == self.storage / "tmp" or ".sqlite" in path.name

    def count(self) -> tuple[int, dict[str, Any]]:
        files = count_files(self.storage, self._skip)
        extra: dict[str, Any] = {"files": files, "indexed": None}
        database = self.storage / "index.sqlite"
        if database.exists():
            try:
                with contextlib.closing(
                    sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
                ) as db:
                    extra["indexed"] = db.execute("SELECT COUNT(*) FROM instance").fetchone()[0]
            except sqlite3.Error as exc:
                extra["indexed"] = f"unreadable: {exc}"
        return files, extra


class OrthancServer(Server):
    name = "orthanc"
    aet = "ORTHANC"

    def command(self) -> tuple[list[str], Path | None, dict[str, str] | None]:
        self.http_port = free_port()
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        # Orthanc speaks DICOM through Debian's libdcmtk, which leaves Nagle on unless
        # TCP_NODELAY=1 is set: without it every C-STORE waits ~40 ms for a delayed ACK.
        env = None if self.args.orthanc_nagle else dcmtk_env()
        return [ORTHANC, str(path)], self.workdir, env

    def count(self) -> tuple[int, dict[str, Any]]:
        url = f"http://{HOST}:{self.http_port}/statistics"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                stats = json.load(response)
        except (OSError, ValueError, urllib.error.URLError) as exc:
            raise BenchError(f"orthanc: GET {url} failed: {exc}") from exc
        return int(stats["CountInstances"]), {"statistics": stats}


class StorescpServer(Server):
    name = "storescp"
    aet = "STORESCP"

    def command(self) -> tuple[list[str], Path | None, dict[str, str] | None]:
        self.output = self.workdir / "storage"
        self.output.mkdir(parents=True, exist_ok=True)
        command = [STORESCP, "-aet", self.aet, "-od", str(self.output), "+xa", str(self.port)]
        return command, self.workdir, dcmtk_env()

    def count(self) -> tuple[int, dict[str, Any]]:
        return count_files(self.output), {}


SERVERS: dict[str, type[Server]] = {
    "node": NodeServer,
    "orthanc": OrthancServer,
    "storescp": StorescpServer,
}


# --------------------------------------------------------------------------------------------
# runs


@dataclass
class RunResult:
    """One run: a fresh server, one corpus sent by one or more storescu."""

    run: str
    repeat: int
    associations: int
    sent: int
    bytes: int
    seconds: float | None = None
    stored: int | None = None
    peak_rss_mb: float | None = None
    server_cpu_s: float | None = None  # CPU the server used while the corpus was sent
    client_cpu_s: float | None = None  # CPU the storescu processes used
    other_cpu_s: float | None = None  # CPU used by everything else meanwhile: noise
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.stored == self.sent

    @property
    def inst_per_s(self) -> float | None:
        return self.sent / self.seconds if self.seconds and self.error is None else None

    @property
    def mb_per_s(self) -> float | None:
        if not self.seconds or self.error is not None:
            return None
        return self.bytes / 1_000_000 / self.seconds


@dataclass
class TargetResult:
    target: str
    repeats: int
    runs: list[RunResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return len(self.runs) == len(RUNS) * self.repeats and all(r.ok for r in self.runs)

    def median(self, name: str, value: Callable[[RunResult], float | None]) -> float | None:
        """Median of ``value`` over the successful repeats of run ``name``."""
        values = [v for r in self.runs if r.run == name and r.ok and (v := value(r)) is not None]
        return statistics.median(values) if values else None


def send(aet: str, port: int, folders: Sequence[Path], timeout: float) -> tuple[float, list[str]]:
    """One storescu per folder, all at once; return wall seconds and the problems seen."""
    command = [STORESCU, "-aec", aet, "-ta", "120", "+sd", "+r", HOST, str(port)]
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in folders]
        stack.callback(_reap, procs)
        started = time.perf_counter()
        for folder, log in zip(folders, logs, strict=True):
            procs.append(spawn([*command, str(folder)], log=log, env=dcmtk_env()))
        deadline = time.monotonic() + timeout
        problems: list[str] = []
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                problems.append(f"storescu timed out after {timeout:g} s")
                stop_process(proc, grace=5.0)
        elapsed = time.perf_counter() - started
        for folder, proc, log in zip(folders, procs, logs, strict=True):
            log.seek(0)
            output = log.read().decode(errors="replace").splitlines()
            errors = [line for line in output if line.startswith(("E:", "F:"))]
            if proc.returncode != 0 or errors:
                shown = "; ".join((errors or output)[-3:]) or "no output (a C-STORE was refused?)"
                problems.append(f"storescu {folder.name}: exit {proc.returncode}: {shown}")
        return elapsed, problems


def _reap(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            stop_process(proc, grace=5.0)
        _LIVE.discard(proc)


def measure(
    target: str, run: str, repeat: int, corpus: Corpus, workroot: Path, args: argparse.Namespace
) -> RunResult:
    if run == "large":
        folders, sent, size = [corpus.large_dir], corpus.large, corpus.large_bytes
    elif run == "4-assoc":
        folders, sent, size = corpus.small_parts, corpus.small, corpus.small_bytes
    else:
        folders, sent, size = [corpus.small_dir], corpus.small, corpus.small_bytes
    result = RunResult(run, repeat, associations=len(folders), sent=sent, bytes=size)
    workdir = workroot / target / f"{run}-{repeat}"
    server = SERVERS[target](workdir, args)
    try:
        server.start()
        server0, client0, busy0 = server.cpu_seconds(), children_cpu_seconds(), busy_seconds()
        result.seconds, problems = send(server.aet, server.port, folders, args.timeout)
        server1, client1, busy1 = server.cpu_seconds(), children_cpu_seconds(), busy_seconds()
        if not server.alive():
            problems.append(f"{target} died during the run\n{server.log_tail()}")
        else:
            result.peak_rss_mb = server.peak_rss_mb()
            if server0 is not None and server1 is not None and busy0 and busy1:
                server_cpu, client_cpu = server1 - server0, client1 - client0
                result.server_cpu_s = round(server_cpu, 2)
                result.client_cpu_s = round(client_cpu, 2)
                result.other_cpu_s = round(max(0.0, busy1 - busy0 - server_cpu - client_cpu), 2)
            result.stored, result.detail = server.count()
        if problems:
            result.error = "\n".join(problems)
        elif result.stored != sent:
            result.error = f"sent {sent} instances, {result.stored} stored"
        elif isinstance(result.detail.get("indexed"), int) and result.detail["indexed"] != sent:
            result.error = f"sent {sent} instances, {result.detail['indexed']} in the index"
    except BenchError as exc:
        result.error = str(exc)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------
# report


def machine_info(args: argparse.Namespace, targets: Sequence[str]) -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "nproc": affinity or os.cpu_count(),
        "cpu": cpu,
        "mem_total_mb": (_status_meminfo() or 0) // 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpu_busy_at_start": cpu_busy(),
        "dcmtk": first_line([STORESCU, "--version"]).strip("$ ").removeprefix("dcmtk: "),
        "orthanc": first_line([ORTHANC, "--version"]).removeprefix(ORTHANC).strip()
        if "orthanc" in targets
        else None,
        "node": None,
    }
    with contextlib.suppress(ImportError):
        import pydicom

        info["pydicom"] = pydicom.__version__
    if "node" in targets:
        info["node"] = first_line([args.python, "-m", "node", "--version"])
    return info


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs' time spent not idle over ``seconds`` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    return round(1 - (idle1 - idle0) / elapsed, 3) if elapsed > 0 else None


def _status_meminfo() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return None


def _fmt(value: float | None, digits: int = 0) -> str:
    return "FAIL" if value is None else f"{value:,.{digits}f}"


def table(results: Sequence[TargetResult]) -> str:
    header = (
        "target",
        "1-assoc inst/s",
        "4-assoc inst/s",
        "512x512 MB/s",
        "512x512 inst/s",
        "peak RSS MB",
        "stored/sent",
    )
    rows = [header]
    for result in results:
        rss = [r.peak_rss_mb for r in result.runs if r.peak_rss_mb is not None]
        stored = sum(r.stored or 0 for r in result.runs)
        sent = sum(r.sent for r in result.runs)
        mark = "" if result.ok else " !"
        rows.append(
            (
                result.target,
                _fmt(result.median("1-assoc", lambda r: r.inst_per_s)),
                _fmt(result.median("4-assoc", lambda r: r.inst_per_s)),
                _fmt(result.median("large", lambda r: r.mb_per_s), 1),
                _fmt(result.median("large", lambda r: r.inst_per_s), 1),
                _fmt(max(rss) if rss else None, 1),
                f"{stored}/{sent}{mark}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure C-STORE ingest of the node, Orthanc and DCMTK storescp.",
        epilog="Each target runs three times (1-assoc, 4-assoc, large), each time freshly "
        "started on an empty storage directory. Run from anywhere; the node is started from "
        "the repository root.",
    )
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated targets, in order (default: {','.join(ALL_TARGETS)})",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=Path("/tmp/dicomnode-bench-corpus"),
        help="where the generated corpus is cached (default: %(default)s)",
    )
    parser.add_argument(
        "--small",
        type=int,
        default=5000,
        metavar="N",
        help="small 64x64 CT/MR instances (default: %(default)s)",
    )
    parser.add_argument(
        "--large",
        type=int,
        default=500,
        metavar="M",
        help="512x512 CT instances (default: %(default)s)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="parent of the temporary directory holding the servers' storage "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the servers' storage, configs and logs instead of deleting them",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="K",
        help="run every measurement K times; the table shows medians (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also save results as JSON")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that runs `-m node serve` (default: %(default)s)",
    )
    parser.add_argument(
        "--repo",
        type=Path,
        default=REPO,
        help="repository root the node is started from (default: %(default)s)",
    )
    parser.add_argument(
        "--orthanc-nagle",
        action="store_true",
        help="start Orthanc without TCP_NODELAY=1 (as a packaged service runs; ~40 ms per "
        "C-STORE lost to delayed ACKs)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds a server has to answer C-ECHO after start (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        metavar="S",
        help="seconds one run's storescu may take (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown or not targets:
        parser.error(
            f"--targets: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(ALL_TARGETS)}"
        )
    if args.small < SMALL_SPLIT or args.large < 1 or args.repeat < 1:
        parser.error(f"--small must be at least {SMALL_SPLIT}, --large and --repeat at least 1")
    args.target_list = list(dict.fromkeys(targets))
    needed = [STORESCU, ECHOSCU]
    needed += [STORESCP] if "storescp" in targets else []
    needed += [ORTHANC] if "orthanc" in targets else []
    missing = [tool for tool in needed if not os.access(tool, os.X_OK)]
    if missing:
        parser.error(f"missing tool(s): {', '.join(missing)}")
    if "node" in targets and not (args.repo / "node" / "__main__.py").is_file():
        parser.error(f"--repo {args.repo}: no node/__main__.py there")
    return args


@contextlib.contextmanager
def interrupts_stop_servers() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, and stop every child on the way out."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        stop_all()
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    targets: list[str] = args.target_list
    results: list[TargetResult] = []
    workroot: Path | None = None
    with interrupts_stop_servers():
        try:
            corpus = ensure_corpus(args.corpus, args.small, args.large)
            info = machine_info(args, targets)
            args.workdir.mkdir(parents=True, exist_ok=True)
            workroot = Path(tempfile.mkdtemp(prefix="dicomnode-bench-", dir=args.workdir))
            for target in targets:
                result = TargetResult(target, args.repeat)
                results.append(result)
                for repeat in range(1, args.repeat + 1):
                    for run in RUNS:
                        label = f"{target}: {run}" + (f" #{repeat}" if args.repeat > 1 else "")
                        print(f"{label} ...", file=sys.stderr, end="", flush=True)
                        outcome = measure(target, run, repeat, corpus, workroot, args)
                        result.runs.append(outcome)
                        print(" " + _progress(outcome), file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            print("\ninterrupted; servers stopped", file=sys.stderr)
            return 130
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            if workroot is not None and not args.keep:
                shutil.rmtree(workroot, ignore_errors=True)

    print(
        f"# ingest benchmark  nproc={info['nproc']}  cpu={info['cpu']}  "
        f"mem={info['mem_total_mb']} MB  kernel={info['kernel']}  python={info['python']}"
    )
    busy = info["cpu_busy_at_start"]
    if busy is not None and busy > 0.15:
        print(f"# warning: CPUs were {busy:.0%} busy before the start; figures may be low")
    versions = [f"dcmtk={info['dcmtk']}"]
    versions += [f"orthanc={info['orthanc']}"] if info["orthanc"] else []
    versions += [f"node={info['node']}"] if info["node"] else []
    versions += [f"pydicom={info['pydicom']}"] if info.get("pydicom") else []
    print(f"# {'  '.join(versions)}")
    print(
        f"# corpus: {corpus.small} x 64x64 ({corpus.small_bytes / 1e6:.1f} MB), "
        f"{corpus.large} x 512x512 ({corpus.large_bytes / 1e6:.1f} MB); storescu over "
        f"{HOST}; fresh server + empty storage per run"
    )
    nodelay = ", ".join(
        ["storescu", "echoscu"]
        + (["storescp"] if "storescp" in targets else [])
        + (["Orthanc"] if "orthanc" in targets and not args.orthanc_nagle else [])
    )
    print(f"# TCP_NODELAY=1 for {nodelay} (Debian's libdcmtk leaves Nagle on otherwise)")
    print(table(results))
    failures = [(t.target, r) for t in results for r in t.runs if not r.ok]
    for failed_target, failed in failures:
        print(f"! {failed_target} {failed.run} #{failed.repeat}: {failed.error or 'failed'}")
    noisy = [
        f"{t.target} {r.run} #{r.repeat} ({r.other_cpu_s:.1f} CPU-s in {r.seconds:.1f} s)"
        for t in results
        for r in t.runs
        if r.other_cpu_s is not None and r.seconds and r.other_cpu_s > NOISE * r.seconds
    ]
    if noisy:
        print(f"# noise: other processes used CPU during {'; '.join(noisy)}")
    if "storescp" in targets:
        print("# storescp serves one association at a time: its 4-assoc figure is sequential")

    if args.json:
        payload = {
            "machine": info,
            "corpus": {
                "path": str(corpus.root),
                "small": corpus.small,
                "small_bytes": corpus.small_bytes,
                "large": corpus.large,
                "large_bytes": corpus.large_bytes,
            },
            "results": [
                {
                    "target": t.target,
                    "ok": t.ok,
                    "runs": [
                        {
                            **asdict(r),
                            "inst_per_s": r.inst_per_s,
                            "mb_per_s": r.mb_per_s,
                            "ok": r.ok,
                        }
                        for r in t.runs
                    ],
                }
                for t in results
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failures else 0


def _progress(run: RunResult) -> str:
    if run.error is not None:
        return "FAILED"
    rate = f"{run.inst_per_s:,.0f} inst/s" if run.inst_per_s else "?"
    if run.run == "large" and run.mb_per_s:
        rate += f", {run.mb_per_s:,.1f} MB/s"
    cpu = ""
    if run.server_cpu_s is not None:
        cpu = (
            f", CPU-s server {run.server_cpu_s:.1f} storescu {run.client_cpu_s:.1f} "
            f"other {run.other_cpu_s:.1f}"
        )
    return f"{run.seconds:.2f} s, {rate}, stored {run.stored}/{run.sent}{cpu}"


if __name__ == "__main__":
    sys.exit(main())
