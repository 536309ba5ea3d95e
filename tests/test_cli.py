"""The command line: help, exit codes, and one clear line (no traceback) on failure."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from node.cli import COMMANDS
from tests.conftest import REPO

SUBCOMMANDS = list(COMMANDS)  # every subcommand: --help, -c after its name


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )


def assert_one_clear_line(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command: str) -> None:
    done = run(command, "--help")
    assert done.returncode == 0
    assert "-c PATH, --config PATH" in done.stdout


def test_console_script_matches_module() -> None:
    from node.cli import build_parser

    assert {a.dest for a in build_parser()._actions}  # parser builds
    done = run("--version")
    assert done.returncode == 0 and "dicom-node" in done.stdout


def test_check_config_ok() -> None:
    done = run("check-config", "-c", "config/node.yaml")
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


def test_check_config_names_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: 99999\n")
    done = run("check-config", "-c", str(bad))
    assert done.returncode == 2
    assert_one_clear_line(done, "port")


def test_missing_config_file(tmp_path: Path) -> None:
    assert_one_clear_line(run("check-config", "-c", str(tmp_path / "nope.yaml")), "nope.yaml")


def test_serve_with_bad_config_fails_fast(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("duplicates: maybe\n")
    assert_one_clear_line(run("serve", "-c", str(bad)), "duplicates")


def test_serve_on_taken_port_fails_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "node.yaml"
        config.write_text(f"bind: 127.0.0.1\nport: {port}\nlog_level: error\nstorage: s\n")
        assert_one_clear_line(run("serve", "-c", str(config)), str(port))


def test_serve_with_unusable_store_fails_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    config = tmp_path / "node.yaml"
    config.write_text("bind: 127.0.0.1\nport: 0\nlog_level: error\nstorage: afile/store\n")
    assert_one_clear_line(run("serve", "-c", str(config)), "store")
