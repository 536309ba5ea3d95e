"""What the benchmark scripts share: tools and ports, generated DICOM files, child processes,
the servers under test (the node, a private Orthanc, DCMTK storescp) and the machine record.

The scripts import it as ``common`` (Python puts a script's own folder first on ``sys.path``).
Every DCMTK tool is called by full path with ``TCP_NODELAY=1``: Debian's DCMTK leaves Nagle's
algorithm on otherwise, and every small DIMSE message then waits for a delayed ACK.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
MOVESCU = "/usr/bin/movescu"
GETSCU = "/usr/bin/getscu"
ORTHANC = "/usr/sbin/Orthanc"

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent

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
# generated DICOM files


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


LIVE: set[subprocess.Popen[bytes]] = set()  # everything still to be stopped on the way out


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``grace`` seconds.

    The process stays in ``LIVE`` until it has been reaped, so an interrupted wait leaves it
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
    LIVE.discard(proc)


def stop_all() -> None:
    """Stop every child still running; a second Ctrl-C while waiting kills the rest."""
    try:
        for proc in list(LIVE):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                stop_process(proc, grace=10.0)
    except KeyboardInterrupt:
        for proc in list(LIVE):
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
            LIVE.discard(proc)


@contextlib.contextmanager
def interrupts_stop_children() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, and stop every child on the way out."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        stop_all()
        signal.signal(signal.SIGTERM, previous)


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
    LIVE.add(proc)
    return proc


def reap(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Stop those of ``procs`` still running and forget them all."""
    for proc in procs:
        if proc.poll() is None:
            stop_process(proc, grace=5.0)
        LIVE.discard(proc)


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


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) of process ``pid`` alone so far."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime stime
    except (OSError, IndexError, ValueError):
        return None


def busy_seconds() -> float | None:
    """CPU time all processes used since boot (from the first line of /proc/stat)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[0] + fields[1] + fields[2]) / _TICK  # user, nice, system (not irq, steal)


def children_cpu_seconds() -> float:
    """CPU time of this process's reaped children (the DCMTK client processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def echo_ok(aet: str, port: int) -> bool:
    """One ``echoscu`` C-ECHO to ``aet`` on ``port``: True on success."""
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


def send(aet: str, port: int, folders: Sequence[Path], timeout: float) -> tuple[float, list[str]]:
    """One storescu per folder, all at once; return wall seconds and the problems seen."""
    command = [STORESCU, "-aec", aet, "-ta", "120", "+sd", "+r", HOST, str(port)]
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in folders]
        stack.callback(reap, procs)
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


# --------------------------------------------------------------------------------------------
# servers


class Server:
    """One server under test: start, wait until it answers C-ECHO, count what it holds, stop."""

    name = "?"
    aet = "ANY-SCP"
    poll_interval = 0.1  # seconds between readiness checks while starting
    log_mode = "ab"

    def __init__(self, workdir: Path, ready_timeout: float) -> None:
        self.workdir = workdir
        self.ready_timeout = ready_timeout
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "server.log"
        self._log: IO[bytes] | None = None

    def command(self) -> tuple[list[str], Path | None, dict[str, str] | None]:
        raise NotImplementedError

    def count(self) -> tuple[int, dict[str, Any]]:
        """Instances stored now, and any extra detail worth keeping."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Does the server answer now?"""
        return echo_ok(self.aet, self.port)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command, cwd, env = self.command()
        self._log = open(self.log_path, self.log_mode)  # noqa: SIM115  (closed in stop())
        self.proc = spawn(command, log=self._log, cwd=cwd, env=env, own_session=True)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with status {self.proc.returncode} before answering "
                    f"C-ECHO\n{self.log_tail()}"
                )
            if self.ready():
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} did not answer C-ECHO on port {self.port} within "
                    f"{self.ready_timeout:g} s\n{self.log_tail()}"
                )
            time.sleep(self.poll_interval)

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
    """``python -m node serve -c CONFIG`` run from the repository root.

    ``storage`` defaults to ``workdir/storage``; ``peers`` (AE title -> (host, port)) become
    the config's ``peers:`` block.
    """

    name = "node"
    aet = "DICOMNODE"

    def __init__(
        self,
        workdir: Path,
        ready_timeout: float,
        *,
        python: str,
        repo: Path = REPO,
        storage: Path | None = None,
        peers: Mapping[str, tuple[str, int]] | None = None,
        log_level: str = "WARNING",
    ) -> None:
        super().__init__(workdir, ready_timeout)
        self.python = python
        self.repo = repo
        self.storage = storage if storage is not None else workdir / "storage"
        self.peers = dict(peers or {})
        self.log_level = log_level
        self.config_path = workdir / "node.yaml"

    def command(self) -> tuple[list[str], Path | None, dict[str, str] | None]:
        text = (
            f"ae_title: {self.aet}\n"
            f"bind: {HOST}\n"
            f"port: {self.port}\n"
            f"storage: {json.dumps(str(self.storage))}\n"
            f"log_level: {self.log_level}\n"
            # A closed benchmark network: the clients query and retrieve with their own AE
            # titles, which are not configured peers.
            "unknown_peers: all\n"
        )
        if self.peers:
            text += "peers:\n" + "".join(
                f"  {json.dumps(title)}: {{host: {json.dumps(host)}, port: {port}}}\n"
                for title, (host, port) in self.peers.items()
            )
        self.config_path.write_text(text)
        return [self.python, "-m", "node", "serve", "-c", str(self.config_path)], self.repo, None

    def count(self) -> tuple[int, dict[str, Any]]:
        # stored instances live under objects/; the store's .lock, tmp/ and the SQLite files
        # beside it are not instances
        files = count_files(self.storage / "objects")
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
    """A private Orthanc (own JSON config, ports and storage); a packaged service is left alone.

    ``modalities`` (AE title -> (host, port)) become its ``DicomModalities``; when there are
    any, every caller may also C-MOVE and C-GET (``DicomAlwaysAllowMove``/``Get``).
    """

    name = "orthanc"
    aet = "ORTHANC"

    def __init__(
        self,
        workdir: Path,
        ready_timeout: float,
        *,
        nagle: bool = False,
        modalities: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        super().__init__(workdir, ready_timeout)
        self.nagle = nagle
        self.modalities = dict(modalities or {})
        self.http_port = free_port()

    def command(self) -> tuple[list[str], Path | None, dict[str, str] | None]:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
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
        if self.modalities:
            config["DicomModalities"] = {
                title.lower(): [title, host, port]
                for title, (host, port) in self.modalities.items()
            }
            config["DicomAlwaysAllowMove"] = True
            config["DicomAlwaysAllowGet"] = True
            config["SynchronousCMove"] = True  # the final C-MOVE response ends the transfer
            config["SaveJobs"] = False
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        # Orthanc speaks DICOM through Debian's libdcmtk, which leaves Nagle on unless
        # TCP_NODELAY=1 is set: without it every C-STORE waits ~40 ms for a delayed ACK.
        env = None if self.nagle else dcmtk_env()
        return [ORTHANC, str(path)], self.workdir, env

    def get_json(self, path: str) -> Any:
        """``GET path`` on Orthanc's REST API, decoded."""
        url = f"http://{HOST}:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return json.load(response)
        except (OSError, ValueError, urllib.error.URLError) as exc:
            raise BenchError(f"orthanc: GET {url} failed: {exc}") from exc

    def count(self) -> tuple[int, dict[str, Any]]:
        stats = self.get_json("/statistics")
        return int(stats["CountInstances"]), {"statistics": stats}


class StorescpServer(Server):
    """DCMTK ``storescp`` writing plain files into ``workdir/storage`` (or nowhere)."""

    name = "storescp"
    aet = "STORESCP"

    def __init__(self, workdir: Path, ready_timeout: float, *, ignore: bool = False) -> None:
        super().__init__(workdir, ready_timeout)
        self.output = self.workdir / "storage"
        self.ignore = ignore

    def command(self) -> tuple[list[str], Path | None, dict[str, str] | None]:
        self.output.mkdir(parents=True, exist_ok=True)
        command = [STORESCP, "-aet", self.aet, "-od", str(self.output), "+xa", str(self.port)]
        if self.ignore:
            command.insert(1, "--ignore")
        return command, self.workdir, dcmtk_env()

    def count(self) -> tuple[int, dict[str, Any]]:
        return count_files(self.output), {}


# --------------------------------------------------------------------------------------------
# the machine


def nproc() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 0


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def mem_total_mb() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def kernel() -> str:
    return platform.release()


def python_version() -> str:
    return platform.python_version()


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


def machine_info(python: str, *, orthanc: bool, node: bool) -> dict[str, Any]:
    """The machine and the versions of the programs measured (Orthanc and the node only when
    they are among the targets)."""
    info: dict[str, Any] = {
        "nproc": nproc(),
        "cpu": cpu_model(),
        "mem_total_mb": mem_total_mb(),
        "kernel": kernel(),
        "python": python_version(),
        "cpu_busy_at_start": cpu_busy(),
        "dcmtk": first_line([STORESCU, "--version"]).strip("$ ").removeprefix("dcmtk: "),
        "orthanc": first_line([ORTHANC, "--version"]).removeprefix(ORTHANC).strip()
        if orthanc
        else None,
        "node": None,
    }
    with contextlib.suppress(ImportError):
        import pydicom

        info["pydicom"] = pydicom.__version__
    if node:
        info["node"] = first_line([python, "-m", "node", "--version"])
    return info


# --------------------------------------------------------------------------------------------
# report


def render_table(rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Rows of cells (the first is the header) as aligned text: ``left`` columns flush left,
    the rest flush right, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(row[:left], widths[:left], strict=True)] + [
            c.rjust(w) for c, w in zip(row[left:], widths[left:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
