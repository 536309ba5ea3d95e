"""The node as a daemon: systemd notifications, the watchdog, stopping during a transfer, a
failed start, and the unit file.

Each test runs ``dicom-node serve`` as a process.  systemd is played by the test: it binds the
Unix datagram socket named in ``NOTIFY_SOCKET`` and reads what the node sends, as systemd does
for a ``Type=notify`` service.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.presentation import build_context

from node.systemd import Notifier, Watchdog, watchdog_interval
from tests.conftest import REPO, NodeProcess, echo
from tests.dicomdata import CT_IMAGE, encoded_as, make_instance, no_delay, sha256_file

WAIT = 20.0  # seconds: an upper bound on anything the node should do promptly
UNIT = REPO / "systemd" / "dicom-node.service"


# --- playing systemd ----------------------------------------------------------------------

class NotifySocket:
    """The receiving end of sd_notify: one datagram per notification, ``KEY=VALUE`` lines."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float | None = WAIT) -> dict[str, str]:
        """The next notification; None as timeout: only one already there."""
        if timeout is None:
            self.sock.setblocking(False)
        else:
            self.sock.settimeout(timeout)
        data = self.sock.recv(4096)
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.messages.append(message)
        return message

    def wait_for(self, key: str, value: str | None = None,
                 timeout: float = WAIT) -> list[dict[str, str]]:
        """Read until a message has ``key`` (with ``value``); return the messages read."""
        seen = []
        while True:
            message = self.receive(timeout)
            seen.append(message)
            if key in message and (value is None or message[key] == value):
                return seen

    def pending(self) -> list[dict[str, str]]:
        """Whatever has arrived and not been read, without waiting."""
        found = []
        try:
            while True:
                found.append(self.receive(timeout=None))
        except BlockingIOError:
            return found

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[Path]:
    """A path for the socket, in tmp_path unless that is too long for a Unix socket name."""
    if len(str(tmp_path / "notify.sock")) < 100:
        yield tmp_path / "notify.sock"
        return
    with tempfile.TemporaryDirectory(prefix="dn-") as short:
        yield Path(short) / "notify.sock"


def serve_with(node: NodeProcess, **env: str) -> NodeProcess:
    """Start ``node`` with extra environment variables; no C-ECHO polling (the test knows)."""
    node.write_config()
    log = node.log_path.open("ab")
    node.process = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "-c", str(node.config_path)],
        cwd=REPO, stdout=log, stderr=log, env={**os.environ, **env},
    )
    return node


# --- readiness, reload, stop --------------------------------------------------------------

def test_ready_after_the_listener_is_up_then_reloading_and_stopping(
        node_factory: Any, notify_path: Path) -> None:
    systemd = NotifySocket(str(notify_path))
    try:
        node = serve_with(node_factory(), NOTIFY_SOCKET=str(notify_path))
        ready = systemd.wait_for("READY", "1")[-1]
        # READY=1 comes once associations are accepted: no polling needed.
        assert echo(node.port, timeout=5.0)
        assert f"on 127.0.0.1:{node.port}" in ready["STATUS"]
        assert node.process is not None

        os.kill(node.process.pid, signal.SIGHUP)
        reloading = systemd.wait_for("RELOADING", "1")[-1]
        assert int(reloading["MONOTONIC_USEC"]) > 0
        done = systemd.wait_for("READY", "1")[-1]
        assert done["STATUS"] == "configuration reloaded: unchanged"

        node.process.send_signal(signal.SIGTERM)
        stopping = systemd.wait_for("STOPPING", "1")[-1]
        assert "stopping" in stopping["STATUS"]
        assert node.process.wait(WAIT) == 0
        assert "stopped" in node.log()
    finally:
        systemd.close()


def test_abstract_notify_socket(node_factory: Any) -> None:
    name = f"dicom-node-test-{uuid.uuid4().hex}"
    systemd = NotifySocket("\0" + name)  # '@name' in NOTIFY_SOCKET
    try:
        node = serve_with(node_factory(), NOTIFY_SOCKET="@" + name)
        systemd.wait_for("READY", "1")
        assert echo(node.port, timeout=5.0)
        assert node.stop() == 0
        assert "STOPPING" in systemd.wait_for("STOPPING")[-1]
    finally:
        systemd.close()


def test_refused_reload_is_reported_to_systemd(node_factory: Any, notify_path: Path) -> None:
    systemd = NotifySocket(str(notify_path))
    try:
        node = serve_with(node_factory(), NOTIFY_SOCKET=str(notify_path))
        systemd.wait_for("READY", "1")
        node.config_path.write_text("port: [unclosed\n", encoding="utf-8")
        assert node.process is not None
        os.kill(node.process.pid, signal.SIGHUP)
        systemd.wait_for("RELOADING", "1")
        status = systemd.wait_for("READY", "1")[-1]["STATUS"]
        assert status.startswith("reload refused, invalid configuration:")
        assert "not valid YAML" in status
        assert echo(node.port, timeout=5.0)
        assert node.stop() == 0
    finally:
        systemd.close()


def test_sigint_stops_cleanly(node_factory: Any) -> None:
    node = node_factory().start()
    assert node.process is not None
    node.process.send_signal(signal.SIGINT)
    assert node.process.wait(WAIT) == 0
    log = node.log()
    assert "received SIGINT, stopping" in log and "stopped" in log
    assert "Traceback" not in log


# --- the watchdog -------------------------------------------------------------------------

def test_watchdog_pinged_while_serving(node_factory: Any, notify_path: Path) -> None:
    systemd = NotifySocket(str(notify_path))
    try:
        node = serve_with(node_factory(), NOTIFY_SOCKET=str(notify_path),
                          WATCHDOG_USEC="200000")  # 0.2 s: a ping every 0.1 s
        systemd.wait_for("READY", "1")
        for _ in range(3):
            systemd.wait_for("WATCHDOG", "1", timeout=2.0)
        assert node.stop() == 0
    finally:
        systemd.close()


def test_no_watchdog_pings_for_another_process(node_factory: Any, notify_path: Path) -> None:
    systemd = NotifySocket(str(notify_path))
    try:
        node = serve_with(node_factory(), NOTIFY_SOCKET=str(notify_path),
                          WATCHDOG_USEC="200000", WATCHDOG_PID="1")
        systemd.wait_for("READY", "1")
        assert node.process is not None
        os.kill(node.process.pid, signal.SIGHUP)  # a round trip through the main loop
        seen = systemd.wait_for("READY", "1")
        assert [m for m in seen if "WATCHDOG" in m] == []
        assert node.stop() == 0
    finally:
        systemd.close()


def test_watchdog_interval_from_the_environment() -> None:
    assert watchdog_interval({}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None


def test_watchdog_asks_for_a_restart_when_the_listener_is_gone(notify_path: Path) -> None:
    systemd = NotifySocket(str(notify_path))
    listener_alive = threading.Event()
    listener_alive.set()
    dog = Watchdog(Notifier(str(notify_path)), 0.05, listener_alive.is_set)
    try:
        dog.start()
        systemd.wait_for("WATCHDOG", "1")
        listener_alive.clear()
        systemd.wait_for("WATCHDOG", "trigger")
    finally:
        dog.stop()
        systemd.close()


def test_notifier_without_socket_does_nothing() -> None:
    assert Notifier.from_environment({}).send(READY=1) is False
    assert Notifier(None).ready("x") is False


def test_notifier_reports_an_unreachable_socket(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert notifier.ready("serving") is False
    assert notifier.send(WATCHDOG=1) is False
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot notify systemd" in warnings[0].getMessage()


# --- SIGTERM during a transfer ------------------------------------------------------------

@dataclass
class HeldTransfer:
    """A pynetdicom SCU sending one large instance, held still after a few P-DATA PDUs.

    The hold is in the SCU's own sending thread (EVT_PDU_SENT), so the node sees a transfer
    that has started and not finished, for as long as the test wants.
    """

    port: int
    dataset: Dataset
    after_pdus: int = 4
    midway: threading.Event = field(default_factory=threading.Event)
    go_on: threading.Event = field(default_factory=threading.Event)
    status: int | None = None
    sent_pdus: int = 0
    thread: threading.Thread | None = None

    def _on_pdu_sent(self, event: Event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            self.sent_pdus += 1
            if self.sent_pdus == self.after_pdus:
                self.midway.set()
                self.go_on.wait(60)

    def _send(self) -> None:
        ae = AE(ae_title="BIGSCU")
        ae.requested_contexts = [build_context(CT_IMAGE)]
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOMNODE",
                             evt_handlers=[(evt.EVT_PDU_SENT, self._on_pdu_sent)])
        if not assoc.is_established:
            return
        no_delay(assoc)
        try:
            answer = assoc.send_c_store(encoded_as(self.dataset))
            if answer and "Status" in answer:
                self.status = int(answer.Status)
        finally:
            if assoc.is_established:
                assoc.release()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._send, name="held-transfer")
        self.thread.start()
        assert self.midway.wait(WAIT), "the transfer never got going"

    def finish(self) -> None:
        self.go_on.set()
        assert self.thread is not None
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


def _indexed(node: NodeProcess, uid: str) -> list[tuple[Any, ...]]:
    return node.rows("SELECT digest, size FROM instance WHERE sop_instance_uid = ?", uid)


def test_sigterm_during_a_transfer_lets_it_finish_within_the_grace(node_factory: Any) -> None:
    node = node_factory(stop_grace=30).start()
    ds = make_instance(rows=1024)  # 2 MiB of pixel data: several PDUs of 256 KiB
    transfer = HeldTransfer(node.port, ds)
    transfer.start()
    try:
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        node.wait_for_log("no longer accepting associations; 1 open")
        assert not echo(node.port, timeout=2.0)  # new associations are refused
    finally:
        transfer.finish()
    assert node.process.wait(WAIT) == 0
    assert transfer.status == 0x0000  # acknowledged ...
    rows = _indexed(node, str(ds.SOPInstanceUID))  # ... so indexed and stored, intact
    assert len(rows) == 1, node.log()
    digest = rows[0][0]
    path = node.storage / "objects" / digest[:2] / digest[2:4] / digest
    assert sha256_file(path) == digest
    assert "aborting" not in node.log()


def test_sigterm_during_a_transfer_past_the_grace_acknowledges_nothing(
        node_factory: Any) -> None:
    node = node_factory(stop_grace=0.5).start()
    ds = make_instance(rows=1024)
    transfer = HeldTransfer(node.port, ds)
    transfer.start()
    try:
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        assert node.process.wait(WAIT) == 0  # the held transfer is aborted after 0.5 s
    finally:
        transfer.finish()
    assert transfer.status is None  # never acknowledged ...
    assert "aborting an association still open after 0.5 s" in node.log()
    assert _indexed(node, str(ds.SOPInstanceUID)) == []  # ... and not kept
    node.start()  # whatever the abort left in the store goes at the next start
    assert node.temporary_files() == [] and node.stored_files() == []
    assert node.stop() == 0


# --- a failed start -----------------------------------------------------------------------

def test_failed_start_says_so_in_one_line_and_never_reports_ready(
        node_factory: Any, notify_path: Path) -> None:
    systemd = NotifySocket(str(notify_path))
    try:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            node = node_factory(port=busy.getsockname()[1], log_level="error")
            serve_with(node, NOTIFY_SOCKET=str(notify_path))
            assert node.process is not None
            assert node.process.wait(WAIT) == 1
        lines = node.log().strip().splitlines()
        assert len(lines) == 1 and "cannot listen on" in lines[0], lines
        assert systemd.pending() == []
    finally:
        systemd.close()


def test_store_not_writable_fails_with_one_line() -> None:
    """The service user cannot write the store: as root, run the node as 'nobody'."""
    with tempfile.TemporaryDirectory(prefix="dn-ro-") as folder:
        root = Path(folder)
        root.chmod(0o755)
        store = root / "store"
        store.mkdir()
        config = root / "node.yaml"
        config.write_text(f"bind: 127.0.0.1\nport: 0\nlog_level: error\nstorage: {store}\n")
        config.chmod(0o644)
        command = [sys.executable, "-m", "node", "serve", "-c", str(config)]
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv: cannot drop to another user")
            command = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                       *command]
        else:
            store.chmod(stat.S_IRUSR | stat.S_IXUSR)
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "store" in lines[0] and "ermission denied" in lines[0], lines


# --- the unit file ------------------------------------------------------------------------

def _directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_file_has_what_the_node_relies_on() -> None:
    unit = _directives(UNIT)
    expected = {
        "Type": "notify", "ExecReload": "/bin/kill -HUP $MAINPID", "Restart": "on-failure",
        "User": "dicom-node", "StateDirectory": "dicom-node",
        "ConfigurationDirectory": "dicom-node", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "ReadWritePaths": "/var/lib/dicom-node", "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE", "RestartPreventExitStatus": "2",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert "serve -c /etc/dicom-node/node.yaml" in unit["ExecStart"][0]
    assert int(unit["LimitNOFILE"][0]) >= 4096
    assert "AF_UNIX" in unit["RestrictAddressFamilies"][0]  # the notification socket
    assert int(unit["WatchdogSec"][0]) > 0
    # No forking, no pidfile: systemd watches the process it started.
    assert "PIDFile" not in unit and "--daemon" not in unit["ExecStart"][0]
    # The stop must fit: the default stop_grace (10 s) and the abort wait under the timeout.
    assert int(unit["TimeoutStopSec"][0]) >= 10 + 2 + 5


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing; CI must install systemd")
        pytest.skip("systemd-analyze not installed")
    # verify checks that ExecStart exists: point it at this checkout's console script.
    script = Path(sys.executable).parent / "dicom-node"
    if not script.exists():
        pytest.skip(f"{script} missing: pip install -e . first")
    text = UNIT.read_text(encoding="utf-8")
    assert "/opt/dicom-node/.venv/bin/dicom-node" in text
    unit = tmp_path / "dicom-node.service"
    unit.write_text(text.replace("/opt/dicom-node/.venv/bin/dicom-node", str(script)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    # verify exits 0 even for an unknown key or a bad value: any message is a failure.
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    assert done.stdout.strip() == "", done.stdout
