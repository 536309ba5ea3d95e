"""A private DCMTK dcmqrscp for tests: own configuration and storage area, a free port.

dcmqrscp is a query/retrieve archive that is not our code. ``Dcmqrscp.start()`` writes its
configuration (one storage area under its AE title, open to any peer, plus the AEs it may move
to in its HostTable), starts it in its own session and polls with DCMTK's echoscu until it
answers; ``load`` fills it through DCMTK's storescu, as a modality would.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import dcmtk_env, dcmtk_tool, free_port, poll_until

START_DEADLINE = 20.0
STOP_DEADLINE = 10.0


def config_text(ae_title: str, area: Path, port: int,
                destinations: dict[str, tuple[str, int]]) -> str:
    """dcmqrscp's configuration: one storage area, and the AEs it may send C-MOVE results to.

    No UserName/GroupName lines, so it does not try to switch to the "dcmtk" user. Quota:
    (max studies, max bytes per study). dcmqrscp looks a C-MOVE destination up in its HostTable
    by AE title (unknown: 0xA801); the peer list ANY lets every AE query and retrieve.
    """
    hosts = [
        f"dest{n} = ({title}, {host}, {dest_port})"
        for n, (title, (host, dest_port)) in enumerate(sorted(destinations.items()))
    ]
    return "\n".join([
        f"NetworkTCPPort  = {port}",
        "MaxPDUSize      = 65536",
        "MaxAssociations = 16",
        "HostTable BEGIN",
        *hosts,
        "HostTable END",
        "VendorTable BEGIN",
        "VendorTable END",
        "AETable BEGIN",
        f"{ae_title}  {area}  RW  (100, 1024mb)  ANY",
        "AETable END",
        "",
    ])


@dataclass
class Dcmqrscp:
    """One private dcmqrscp; ``destinations`` are the move destinations it knows."""

    workdir: Path
    ae_title: str = "DCMQR"
    destinations: dict[str, tuple[str, int]] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    options: tuple[str, ...] = ()  # extra command-line options, e.g. transfer syntaxes
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def area(self) -> Path:
        return self.workdir / "area"

    @property
    def config_path(self) -> Path:
        return self.workdir / "dcmqrscp.cfg"

    @property
    def log_path(self) -> Path:
        return self.workdir / "dcmqrscp.log"

    def start(self) -> Dcmqrscp:
        dcmqrscp = dcmtk_tool("dcmqrscp")
        self.area.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            config_text(self.ae_title, self.area, self.port, self.destinations), encoding="utf-8"
        )
        with self.log_path.open("ab") as log:
            # Its own session: dcmqrscp forks a child per association (its single-process
            # mode, -s, crashes after the first association in DCMTK 3.6.7), so the whole
            # group is stopped.
            self.process = subprocess.Popen(
                [str(dcmqrscp), *self.options, "-c", str(self.config_path), str(self.port)],
                stdout=log, stderr=log, start_new_session=True, env=dcmtk_env(),
            )
        process = self.process
        ready = poll_until(lambda: process.poll() is not None or self.echo(), START_DEADLINE,
                           interval=0.05)
        if not ready or process.poll() is not None:
            self.stop()
            raise RuntimeError(f"dcmqrscp did not start:\n{self.log()}")
        return self

    def echo(self) -> bool:
        """True when DCMTK's echoscu gets an answer from it."""
        done = subprocess.run(
            [str(dcmtk_tool("echoscu")), "-to", "2", "-aec", self.ae_title, "127.0.0.1",
             str(self.port)],
            capture_output=True, env=dcmtk_env(),
        )
        return done.returncode == 0

    def load(self, files: Sequence[Path]) -> None:
        """Store ``files`` into it with DCMTK's storescu (one association)."""
        stored = subprocess.run(
            [str(dcmtk_tool("storescu")), "-aec", self.ae_title, "127.0.0.1", str(self.port),
             *map(str, files)],
            capture_output=True, text=True, env=dcmtk_env(),
        )
        if stored.returncode != 0 or "E:" in stored.stderr:
            raise RuntimeError(f"storescu into dcmqrscp failed:\n{stored.stderr}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(STOP_DEADLINE)

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Dcmqrscp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
