"""A private Orthanc 1.10 for tests and benchmarks: own JSON config, free ports, own storage.

Never the packaged service: each ``OrthancProcess`` writes its configuration under ``workdir``,
starts ``/usr/sbin/Orthanc`` on free ports and polls REST ``/system`` and a C-ECHO until both
answer (with a deadline), so a caller can send to it, query it or retrieve from it at once.
Only the standard library and pynetdicom are used, so benchmarks can import this module too.

Orthanc speaks DICOM through Debian's libdcmtk, which leaves Nagle's algorithm on unless
``TCP_NODELAY=1`` is in the environment: every small DIMSE message would then wait ~40 ms for
the peer's delayed ACK.  The process always gets it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

ORTHANC = Path("/usr/sbin/Orthanc")
HOST = "127.0.0.1"
START_DEADLINE = 60.0  # seconds: Orthanc creates its SQLite index on first start
STOP_DEADLINE = 30.0
LOG_TAIL = 40  # lines of Orthanc's log quoted when it fails


def orthanc_available() -> bool:
    """True when the Orthanc binary is installed (Debian/Ubuntu package ``orthanc``)."""
    return ORTHANC.is_file() and os.access(ORTHANC, os.X_OK)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def echo(port: int, called: str, timeout: float = 2.0) -> bool:
    """True when one association with one C-ECHO to ``called`` at 127.0.0.1:``port`` succeeds."""
    ae = AE(ae_title="ORTHANCPOLL")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(HOST, port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0x0000
    finally:
        assoc.release()


@dataclass
class OrthancProcess:
    """One private Orthanc: ``start()`` it, talk DICOM to ``dicom_port`` or REST via ``rest``.

    ``modalities`` are the AEs Orthanc knows (AE title -> (host, port)): C-MOVE destinations,
    and peers it can query or retrieve from through REST ``/modalities/{AE}/...``.
    ``extra`` overrides or adds configuration options (e.g. ``{"CaseSensitivePN": True}``).
    """

    workdir: Path
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, int]] = field(default_factory=dict)
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    extra: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """Orthanc 1.10's JSON configuration (keys as in /etc/orthanc/orthanc.json)."""
        settings: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "StorageCompression": False,
            "Plugins": [],  # not the packaged plugins (DICOMweb, web viewer...)
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # loopback only
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            # Unknown calling AEs may use every service (Orthanc 1.10 option names; without
            # these an AE not in DicomModalities may only Echo and Store).
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomModalities": {
                title: [title, host, port] for title, (host, port) in self.modalities.items()
            },
            "SaveJobs": False,
        }
        settings.update(self.extra)
        return settings

    def start(self) -> OrthancProcess:
        """Write the configuration, start Orthanc and wait until REST and C-ECHO answer."""
        if not orthanc_available():
            raise RuntimeError(f"{ORTHANC} is not installed (apt-get install orthanc)")
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        env = {**os.environ, "TCP_NODELAY": "1"}  # see the module docstring
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(ORTHANC), str(self.config_path)], cwd=self.workdir, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_DEADLINE
        pause = threading.Event()  # never set: wait() is a bounded pause between two polls
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with status {self.process.returncode} at start-up\n"
                    f"{self.log_tail()}")
            if self._rest_ready() and echo(self.dicom_port, self.aet):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"Orthanc did not answer REST and C-ECHO within {START_DEADLINE:g} s\n"
                    f"{self.log_tail()}")
            pause.wait(0.05)

    def _rest_ready(self) -> bool:
        try:
            system = self.rest("GET", "/system")
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return isinstance(system, dict) and system.get("DicomAet") == self.aet

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, wait for a clean exit; SIGKILL if it does not come in time."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_DEADLINE)

    def rest(self, method: str, path: str, body: Any = None) -> Any:
        """One REST call; the decoded JSON answer (None when the body is empty).

        ``body`` is sent as JSON unless it is bytes (sent as is, e.g. a DICOM file for
        ``POST /instances``).  HTTP errors raise ``urllib.error.HTTPError`` with Orthanc's
        description in the message.
        """
        data: bytes | None
        headers: dict[str, str] = {}
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
            headers["Content-Type"] = "application/dicom"
        else:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, headers=headers,
                                         method=method.upper())
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise urllib.error.HTTPError(exc.url, exc.code, f"{exc.reason}: {detail}",
                                         exc.headers, None) from exc
        return json.loads(payload) if payload.strip() else None

    def instance_count(self) -> int:
        """Instances Orthanc holds now (``GET /statistics``)."""
        return int(self.rest("GET", "/statistics")["CountInstances"])

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL) -> str:
        tail = self.log().splitlines()[-lines:]
        if not tail:
            return f"(Orthanc log {self.log_path} is empty)"
        return f"last lines of {self.log_path}:\n" + "\n".join(f"  | {line}" for line in tail)

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
