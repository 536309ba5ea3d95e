"""The association reactor wakes when there is work for it (node.latency).

Between requests the reactor of an association (pynetdicom's thread that serves DIMSE messages
and watches for release and abort) waits REACTOR_TICK at most; what it must act on wakes it at
once: a request, a release or abort from the peer, a thread that pauses it (pynetdicom's
release and ``send_c_*``), and the end of the association (kill).  Here the tick is set to a
minute on a node running in this process and on the node's own kind of client association:
every step below would take that minute if its wake-up were missing, and must take seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from node import latency
from node.config import build_config
from node.latency import ResponsiveAssociation
from node.scu.send import _responsive
from node.server import RunningNode, start
from node.services import open_services
from tests.conftest import free_port, poll_until

TICK = 60.0  # what a missing wake-up would cost, per step
PROMPT = 10.0  # what each step may take here, on a loaded machine


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningNode]:
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as serve sets it
    monkeypatch.setattr(latency, "REACTOR_TICK", TICK)
    config = build_config({"port": free_port(), "storage": "storage", "unknown_peers": "all"},
                          tmp_path)
    services = open_services(config)
    running = start(services)
    try:
        yield running
    finally:
        running.stop(2)
        services.close()


def _associate(port: int, responsive: bool) -> Any:
    ae = AE(ae_title="WAKESCU")
    ae.requested_contexts = [build_context(Verification)]
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 2 * TICK
    handlers = [(evt.EVT_CONN_OPEN, _responsive)] if responsive else []
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", evt_handlers=handlers)
    assert assoc.is_established
    assert isinstance(assoc, ResponsiveAssociation) == responsive
    return assoc


def _open(node: RunningNode) -> list[Any]:
    return list(node.plain.server.active_associations)


def test_the_node_serves_and_sees_a_release_at_once(node: RunningNode) -> None:
    assoc = _associate(node.port, responsive=False)
    started = time.monotonic()
    assert assoc.send_c_echo().Status == 0x0000  # the request wakes the node's reactor
    assoc.release()  # its A-RELEASE-RQ too: else no A-RELEASE-RP for a minute
    assert assoc.is_released
    assert poll_until(lambda: not _open(node), PROMPT)
    assert time.monotonic() - started < PROMPT


def test_the_node_sees_an_abort_at_once(node: RunningNode) -> None:
    assoc = _associate(node.port, responsive=False)
    assert poll_until(lambda: len(_open(node)) == 1, PROMPT)
    started = time.monotonic()
    assoc.abort()
    assert poll_until(lambda: not _open(node), PROMPT)
    assert time.monotonic() - started < PROMPT


def test_a_client_association_pauses_and_ends_at_once(node: RunningNode) -> None:
    # The node's own client associations (C-MOVE sub-operations, find, pull) are responsive
    # too: send_c_echo and release each pause the reactor (the checkpoint wakes it), and the
    # release ends it (kill wakes it, and waits for the DUL in short steps).
    assoc = _associate(node.port, responsive=True)
    started = time.monotonic()
    for _ in range(3):
        assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released
    assoc.join(PROMPT)
    assert not assoc.is_alive()  # the reactor thread has ended
    assert time.monotonic() - started < PROMPT
