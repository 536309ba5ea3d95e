"""SIGHUP reloads the configuration of a running node: peers and log_level change at once,
open associations stay open; a change that needs a restart, or a broken file, is refused as a
whole and the node serves on with the configuration it had.

The process tests run ``dicom-node serve`` and move instances to DCMTK's storescp; the first
few check the reload rules on real files without a process.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelMove,
)

from node.config import LIVE_KEYS, SETTINGS, NodeConfig, changed_keys, load_config
from node.config_reload import LiveConfig, Outcome, reload_config
from tests import retrievedata as rd
from tests.conftest import NodeProcess, dcmtk_tool, echo, free_port, poll_until
from tests.dicomdata import make_instance, no_delay, send_datasets

SUCCESS, UNKNOWN_DESTINATION = 0x0000, 0xA801
STUDY_UID = "1.2.826.0.1.3680043.10.1234.77.1"


# --- the rules, on real files ------------------------------------------------------------

def _write(path: Path, settings: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


BASE: dict[str, Any] = {
    "ae_title": "DICOMNODE", "port": 11112, "storage": "store",
    "peers": {"DEST": {"host": "127.0.0.1", "port": 4000}},
}


@pytest.fixture
def live(tmp_path: Path) -> LiveConfig:
    return LiveConfig(load_config(_write(tmp_path / "node.yaml", BASE)))


def test_every_setting_is_compared() -> None:
    # changed_keys compares NodeConfig's fields: each key of the file must be one of them,
    # or a change to it would go unnoticed (and be neither applied nor refused).
    assert {f.name for f in fields(NodeConfig)} - {"source"} == set(SETTINGS)
    assert set(SETTINGS) >= LIVE_KEYS


def test_live_change_is_applied(live: LiveConfig) -> None:
    before = live.current
    assert before.source is not None
    peers = {**BASE["peers"], "NEW": {"host": "192.0.2.1", "port": 104}}
    _write(before.source, {**BASE, "peers": peers, "log_level": "debug", "stop_grace": 2})
    result = reload_config(live)
    assert result.outcome is Outcome.APPLIED
    assert result.changed == ("peers", "log_level", "stop_grace")
    assert set(live.current.peers) == {"DEST", "NEW"}
    assert (live.current.log_level, live.current.stop_grace) == ("DEBUG", 2.0)
    assert before.peers.keys() == {"DEST"}  # the old config object is untouched (frozen)


def test_unchanged_file_changes_nothing(live: LiveConfig) -> None:
    before = live.current
    assert reload_config(live).outcome is Outcome.UNCHANGED
    assert live.current is before


@pytest.mark.parametrize(("change", "keys"), [
    ({"port": 11113}, ["port"]),
    ({"ae_title": "OTHER"}, ["ae_title"]),
    ({"storage": "elsewhere"}, ["storage", "database"]),  # the index lives in the store
    ({"max_pdu": 65536, "duplicates": "reject"}, ["duplicates", "max_pdu"]),
])
def test_restart_only_change_refuses_the_whole_file(
        live: LiveConfig, change: dict[str, Any], keys: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    before = live.current
    assert before.source is not None
    peers = {**BASE["peers"], "NEW": {"host": "192.0.2.1", "port": 104}}
    _write(before.source, {**BASE, **change, "peers": peers})
    result = reload_config(live)
    assert result.outcome is Outcome.NEEDS_RESTART
    assert result.reason == ", ".join(keys)
    assert live.current is before  # all or nothing: the new peer is not taken either
    message = caplog.records[-1].getMessage()
    assert f"reload refused: {', '.join(keys)} cannot change" in message
    assert "so peers did not change either" in message


@pytest.mark.parametrize(("text", "named"), [
    ("port: [1, 2\n", "not valid YAML at line 2"),
    ("bogus: 1\n", "bogus: unknown key"),
    ("peers: {DEST: {host: 127.0.0.1, port: 99999}}\n", "peers.DEST.port"),
    ("log_level: loud\n", "log_level: must be one of"),
    ("- a list\n", "top level must be a mapping"),
])
def test_broken_file_is_refused_naming_the_key(live: LiveConfig, text: str, named: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    before = live.current
    assert before.source is not None
    before.source.write_text(text, encoding="utf-8")
    result = reload_config(live)
    assert result.outcome is Outcome.INVALID
    assert live.current is before
    assert named in result.reason and named in caplog.records[-1].getMessage()
    assert caplog.records[-1].levelname == "ERROR"


def test_binary_file_is_refused(live: LiveConfig) -> None:
    before = live.current
    assert before.source is not None
    before.source.write_bytes(b"port: 1\n\xff\xfe\x00 not text")
    result = reload_config(live)
    assert result.outcome is Outcome.INVALID and "not UTF-8" in result.reason
    assert live.current is before


def test_missing_file_is_refused(live: LiveConfig) -> None:
    before = live.current
    assert before.source is not None
    before.source.unlink()
    assert reload_config(live).outcome is Outcome.INVALID
    assert live.current is before


def test_embedded_default_has_nothing_to_reload() -> None:
    live = LiveConfig(load_config(None))
    result = reload_config(live)
    assert result.outcome is Outcome.NO_FILE
    assert result.status() == "nothing to reload: running on the embedded default configuration"


def test_changed_keys_compares_parsed_values(tmp_path: Path) -> None:
    one = load_config(_write(tmp_path / "a.yaml", {**BASE, "stop_grace": 10}))
    other = load_config(_write(tmp_path / "b.yaml", {**BASE, "stop_grace": 10.0,
                                                     "log_level": "INFO"}))
    assert changed_keys(one, other) == []


# --- a running node ---------------------------------------------------------------------

def _peer(port: int) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port}


def _reload(node: NodeProcess, expect: str, count: int = 1) -> str:
    """Write the node's settings, SIGHUP it, and wait for ``expect`` in its log."""
    assert node.process is not None
    node.write_config()
    os.kill(node.process.pid, signal.SIGHUP)
    return node.wait_for_log(expect, count)


@pytest.fixture
def stored_node(node_factory: Any) -> Iterator[NodeProcess]:
    """A node holding one instance (study STUDY_UID), with one peer DEST (port set later)."""
    dcmtk_tool("storescp")
    node = node_factory(peers={"DEST": _peer(free_port())}).start()
    sent = send_datasets(node.port, [make_instance(study=STUDY_UID)])
    assert [s.status for s in sent] == [0]
    yield node
    assert node.stop() == 0


def _move_association(port: int) -> Association:
    ae = AE(ae_title="RETRIEVER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    no_delay(assoc)
    return assoc


def _move_on(assoc: Association, destination: str) -> int:
    query = rd.identifier("STUDY", StudyInstanceUID=STUDY_UID)
    responses = list(assoc.send_c_move(query, destination,
                                       StudyRootQueryRetrieveInformationModelMove))
    assert responses and "Status" in responses[-1][0]
    return int(responses[-1][0].Status)


def _movescu(node: NodeProcess, destination: str) -> rd.ToolResult:
    return rd.movescu(node.port, "study", "STUDY", [f"StudyInstanceUID={STUDY_UID}"],
                      destination=destination)


def test_sighup_adds_a_peer_used_at_once_on_an_open_association(
        stored_node: NodeProcess, tmp_path: Path) -> None:
    node = stored_node
    with rd.storescp(tmp_path / "out", ae_title="NEWDEST") as dest:
        assoc = _move_association(node.port)
        try:
            assert _move_on(assoc, "NEWDEST") == UNKNOWN_DESTINATION
            node.settings["peers"]["NEWDEST"] = _peer(dest.port)
            line = _reload(node, "reloaded: peers +NEWDEST")
            # The association opened before the reload is still there and sees the new peer.
            assert assoc.is_established
            assert _move_on(assoc, "NEWDEST") == SUCCESS
        finally:
            assoc.release()
        assert len(dest.received()) == 1
        fresh = _movescu(node, "NEWDEST")  # and a new association (DCMTK's movescu)
        assert (fresh.status, fresh.completed) == (SUCCESS, 1), fresh.log
    assert "reload refused" not in line

    del node.settings["peers"]["NEWDEST"]
    _reload(node, "reloaded: peers -NEWDEST")
    assert _movescu(node, "NEWDEST").status == UNKNOWN_DESTINATION


def test_sighup_changes_a_peers_address(stored_node: NodeProcess, tmp_path: Path) -> None:
    node = stored_node
    with rd.storescp(tmp_path / "out", ae_title="DEST") as dest:
        node.settings["peers"]["DEST"] = _peer(dest.port)
        _reload(node, "reloaded: peers ~DEST")
        result = _movescu(node, "DEST")
        assert (result.status, result.completed) == (SUCCESS, 1), result.log
        assert len(dest.received()) == 1


BROKEN = [  # (file text, what the log line must name)
    ("ae_title: DICOMNODE\npeers: {DEST: {host: 127.0.0.1, port: 1\n", "not valid YAML"),
    ("ae_title: DICOMNODE\nbogus_key: 1\n", "bogus_key: unknown key"),
    ("ae_title: DICOMNODE\npeers: {DEST: {host: 127.0.0.1, port: 99999}}\n", "peers.DEST.port"),
]


@pytest.mark.parametrize(("text", "named"), BROKEN)
def test_broken_config_on_reload_keeps_serving_with_the_old_one(
        node_factory: Any, tmp_path: Path, text: str, named: str) -> None:
    dcmtk_tool("storescp")
    with rd.storescp(tmp_path / "out", ae_title="DEST") as dest:
        node = node_factory(peers={"DEST": _peer(dest.port)}).start()
        assert [s.status for s in send_datasets(node.port, [make_instance(study=STUDY_UID)])] \
            == [0]
        assoc = _move_association(node.port)
        try:
            node.config_path.write_text(text, encoding="utf-8")
            assert node.process is not None
            os.kill(node.process.pid, signal.SIGHUP)
            log = node.wait_for_log("reload refused, the running configuration stays in force")
            refusal = next(line for line in log.splitlines() if "reload refused" in line)
            assert named in refusal and "ERROR" in refusal
            # Still serving: the open association, a new one, and the old peer.
            assert assoc.is_established and _move_on(assoc, "DEST") == SUCCESS
        finally:
            assoc.release()
        assert echo(node.port)
        result = _movescu(node, "DEST")
        assert (result.status, result.completed) == (SUCCESS, 1), result.log
        assert len(dest.received()) == 1
        assert node.process.poll() is None
        assert node.stop() == 0


@pytest.mark.parametrize(("change", "keys"), [
    ({"port": "free"}, "port"),
    ({"ae_title": "RENAMED"}, "ae_title"),
    ({"storage": "other-storage"}, "storage, database"),
])
def test_restart_only_change_is_refused_and_nothing_changes(
        stored_node: NodeProcess, tmp_path: Path, change: dict[str, Any], keys: str) -> None:
    node = stored_node
    old = dict(node.settings)
    port = node.port
    with rd.storescp(tmp_path / "out", ae_title="NEWDEST") as dest:
        node.settings.update({k: free_port() if v == "free" else v for k, v in change.items()})
        node.settings["peers"] = {**old["peers"], "NEWDEST": _peer(dest.port)}
        log = _reload(node, "reload refused")
        refusal = next(line for line in log.splitlines() if "reload refused" in line)
        if node.on_postgresql:  # the index is not inside the store: only storage changed
            keys = keys.replace(", database", "")
        assert f"{keys} cannot change while the node runs" in refusal
        assert "so peers did not change either" in refusal
        # The old config as a whole: same AE title and port, and no NEWDEST.
        assert echo(port, "DICOMNODE")
        node.settings["port"] = port  # where the test tools call
        assert _movescu(node, "NEWDEST").status == UNKNOWN_DESTINATION

        # Put the restart-only key back: the peer change alone is applied.
        node.settings.update({k: old[k] for k in change})
        _reload(node, "reloaded: peers +NEWDEST")
        result = _movescu(node, "NEWDEST")
        assert (result.status, result.completed) == (SUCCESS, 1), result.log
        assert len(dest.received()) == 1
    assert not (node.workdir / "other-storage").exists()


def test_log_level_changes_live(node_factory: Any) -> None:
    node = node_factory(log_level="warning").start()  # start-up is polled with C-ECHO
    assert node.process is not None
    assert echo(node.port)
    assert "association from" not in node.log()  # INFO lines are off
    node.settings["log_level"] = "info"
    node.write_config()
    os.kill(node.process.pid, signal.SIGHUP)
    # The reload's own line is INFO too, logged before the level changes: poll with C-ECHO
    # until the per-association INFO line appears.
    assert poll_until(lambda: echo(node.port) and "association from" in node.log(), 10), \
        node.log()
    assert node.stop() == 0
