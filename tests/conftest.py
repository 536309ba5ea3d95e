"""Fixtures that start real nodes on free ports and talk to them over loopback.

A node runs as its own process (``python -m node serve``), exactly as an administrator runs it;
readiness is found by polling with C-ECHO, never by sleeping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

REPO = Path(__file__).resolve().parent.parent
START_DEADLINE = 30.0
DCMTK_BIN = Path("/usr/bin")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Check ``predicate`` every ``interval`` seconds until it holds (True) or time runs out."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: wait() is a bounded pause between checks
    while not predicate():
        if time.monotonic() > deadline:
            return False
        pause.wait(interval)
    return True


def echo(port: int, called: str = "DICOMNODE", timeout: float = 5.0) -> bool:
    """True when a C-ECHO to 127.0.0.1:port succeeds."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


@dataclass
class NodeProcess:
    """A ``dicom-node serve`` process with its own config, store and log."""

    workdir: Path
    settings: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "node.yaml"

    @property
    def port(self) -> int:
        return int(self.settings["port"])

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    @property
    def log_path(self) -> Path:
        return self.workdir / "node.log"

    @property
    def db_path(self) -> Path:
        return self.storage / "index.sqlite"

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.settings), encoding="utf-8")

    def start(self) -> NodeProcess:
        self.write_config()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "-c", str(self.config_path)],
            cwd=REPO, stdout=log, stderr=log,
        )
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited at start-up:\n{self.log()}")
            if echo(self.port, self.settings.get("ae_title", "DICOMNODE"), timeout=1.0):
                return self
        raise RuntimeError(f"node did not answer C-ECHO in {START_DEADLINE} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 10.0) -> str:
        """Poll the log until ``text`` appears ``count`` times (lines written after a response)."""
        if not poll_until(lambda: self.log().count(text) >= count, timeout):
            raise AssertionError(f"{text!r} not logged {count} times:\n{self.log()}")
        return self.log()

    @property
    def on_postgresql(self) -> bool:
        return str(self.settings.get("database", "")).startswith("postgres")

    def index_exists(self) -> bool:
        """Has the node made its index yet (a PostgreSQL database is there from the start)?"""
        return self.on_postgresql or self.db_path.exists()

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read the node's index directly (a second, independent reader); ``?`` placeholders."""
        if self.on_postgresql:
            import psycopg2

            with psycopg2.connect(self.settings["database"]) as conn, conn.cursor() as cursor:
                cursor.execute(sql.replace("?", "%s"), params)
                return list(cursor.fetchall()) if cursor.description is not None else []
        with sqlite3.connect(self.db_path) as conn:
            return list(conn.execute(sql, params))

    def stored_files(self) -> list[Path]:
        objects = self.storage / "objects"
        return sorted(p for p in objects.rglob("*") if p.is_file()) if objects.exists() else []

    def temporary_files(self) -> list[Path]:
        tmp = self.storage / "tmp"
        return sorted(tmp.iterdir()) if tmp.exists() else []


def make_node(workdir: Path, **settings: Any) -> NodeProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {
        "ae_title": "DICOMNODE",
        "bind": "127.0.0.1",
        "port": free_port(),
        "storage": "storage",
        "log_level": "info",
        # The suite's clients (pynetdicom, DCMTK, Orthanc, dcmqrscp) call with many AE titles;
        # the access rules, defaults included, have their own tests (test_access.py).
        "unknown_peers": "all",
    }
    if BACKEND == "postgresql" and "database" not in settings:
        base["database"] = new_test_database()
    base.update(settings)
    return NodeProcess(workdir, base)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    """Make nodes (not yet started); every one still running at the end is stopped."""
    made: list[NodeProcess] = []

    def factory(name: str = "node", **settings: Any) -> NodeProcess:
        node = make_node(tmp_path / name, **settings)
        made.append(node)
        return node

    yield factory
    for node in made:
        if node.process is not None and node.process.poll() is None:
            node.kill()


@pytest.fixture
def node(node_factory: Any) -> NodeProcess:
    """A running node with the default settings, fresh for the test."""
    started: NodeProcess = node_factory().start()
    return started


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One running node for a whole test module, where start-up cost matters."""
    running = make_node(tmp_path_factory.mktemp("shared")).start()
    yield running
    if running.process is not None and running.process.poll() is None:
        running.stop()


def dcmtk_tool(name: str) -> Path:
    """DCMTK's tool by full path (pynetdicom installs same-named scripts into the venv)."""
    path = DCMTK_BIN / name
    if not path.exists() or shutil.which(str(path)) is None:
        if os.environ.get("CI"):
            pytest.fail(f"DCMTK's {name} is missing; CI must install dcmtk")
        pytest.skip(f"DCMTK's {name} not installed (apt-get install dcmtk)")
    banner = subprocess.run([str(path), "--version"], capture_output=True, text=True).stdout
    assert "dcmtk" in banner.lower(), f"{path} is not DCMTK's {name}"
    return path


def dcmtk_env() -> dict[str, str]:
    """Debian's DCMTK leaves Nagle's algorithm on unless told otherwise."""
    return {**os.environ, "TCP_NODELAY": "1"}


# --- PostgreSQL ------------------------------------------------------------------------------

POSTGRES_SERVER = os.environ.get("DICOMNODE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


# DICOMNODE_TEST_BACKEND=postgresql runs every node the suite starts on its own new PostgreSQL
# database instead of SQLite (scripts/test.sh runs the suite once on each).
BACKEND = os.environ.get("DICOMNODE_TEST_BACKEND", "sqlite")
sqlite_only = pytest.mark.skipif(BACKEND != "sqlite",
                                 reason="about the SQLite file itself (this run: PostgreSQL)")
_CREATED: list[str] = []


def _admin() -> Any:
    import psycopg2

    admin = psycopg2.connect(f"{POSTGRES_SERVER}/postgres", connect_timeout=3)
    admin.autocommit = True
    return admin


def new_test_database() -> str:
    """A new, empty database on the test server, dropped at the end of the session."""
    name = f"dicomnode_test_{uuid.uuid4().hex[:12]}"
    admin = _admin()
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        admin.close()
    _CREATED.append(name)
    return f"{POSTGRES_SERVER}/{name}"


@pytest.fixture(scope="session", autouse=True)
def _drop_test_databases() -> Iterator[None]:
    yield
    if not _CREATED:
        return
    admin = _admin()
    try:
        with admin.cursor() as cursor:
            for name in _CREATED:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty database on the test PostgreSQL server (dropped afterwards); skipped when
    no server answers, except under CI, where it must."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = _admin()
    except psycopg2.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL not reachable at {POSTGRES_SERVER}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_SERVER}")
    name = f"dicomnode_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def index_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Config settings for an archive opened in the test process, once per index backend."""
    if request.param == "postgresql":
        return {"database": request.getfixturevalue("postgres_url")}
    return {}
