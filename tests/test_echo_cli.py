"""``dicom-node echo PEER``: one C-ECHO to a real node process, run as an administrator runs it.

Exit 0 and one line with the round trip when the peer answers; exit 1 and one line (no
traceback) when it is down or rejects the association; exit 2 for a peer the config does not
name.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, NodeProcess, free_port


def echo(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", "echo", "-c", str(config), *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )


def one_line_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def caller(node: NodeProcess, tmp_path: Path) -> Path:
    """A client config (its own AE title) naming the running node, a port where nothing
    listens, and the node's port under an AE title the node does not answer to."""
    config = tmp_path / "caller.yaml"
    peers: dict[str, Any] = {
        "DICOMNODE": {"host": "127.0.0.1", "port": node.port},
        "DOWN": {"host": "127.0.0.1", "port": free_port()},
        "WRONGAE": {"host": "127.0.0.1", "port": node.port},
    }
    config.write_text(yaml.safe_dump({"ae_title": "CALLER", "storage": "storage",
                                      "peers": peers}), encoding="utf-8")
    return config


def test_configured_peer_answers_with_the_round_trip(node: NodeProcess, caller: Path) -> None:
    done = echo(caller, "DICOMNODE")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    line, = done.stdout.splitlines()
    assert re.fullmatch(
        rf"DICOMNODE at 127\.0\.0\.1:{node.port}: C-ECHO answered in \d+\.\d ms "
        r"\(association established in \d+\.\d ms\)", line), line
    # The node saw an association from our calling AE title.
    node.wait_for_log("association from CALLER")


def test_the_node_itself_by_its_own_ae_title(node: NodeProcess) -> None:
    done = echo(node.config_path, "DICOMNODE", "--calling-ae", "ADMIN")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"DICOMNODE at 127.0.0.1:{node.port}: C-ECHO answered in")
    node.wait_for_log("association from ADMIN")


def test_peer_that_is_down_exits_1(caller: Path) -> None:
    peers = yaml.safe_load(caller.read_text())["peers"]
    one_line_error(echo(caller, "DOWN", "--timeout", "5"), 1, "cannot connect",
                   f"DOWN at 127.0.0.1:{peers['DOWN']['port']}")


def test_rejected_association_exits_1(node: NodeProcess, caller: Path) -> None:
    one_line_error(echo(caller, "WRONGAE"), 1, f"WRONGAE at 127.0.0.1:{node.port}", "rejected",
                   "Called AE title not recognised")


def test_unknown_peer_exits_2_naming_the_known_ones(caller: Path) -> None:
    line = one_line_error(echo(caller, "NOSUCHAE"), 2, "unknown peer", "NOSUCHAE", "DICOMNODE",
                          "DOWN", "CALLER (this node)")
    assert line.startswith("dicom-node: ")


def test_bad_timeout_and_calling_ae_exit_2(caller: Path) -> None:
    done = echo(caller, "DICOMNODE", "--timeout", "0")
    assert done.returncode == 2 and "--timeout" in done.stderr
    one_line_error(echo(caller, "DICOMNODE", "--calling-ae", "WAY-TOO-LONG-AE-TITLE"), 2,
                   "WAY-TOO-LONG-AE-TITLE")
