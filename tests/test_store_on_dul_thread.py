"""C-STORE requests answered on the association's DUL thread (node.handlers.store_direct).

The node answers a plain C-STORE on the thread that read it, when nothing else is being served
on the association, sparing two thread hand-overs per instance.  What that must not break,
checked on a node running in this process (so that a fault can be injected into the handler):
the request really is answered there; a handler fault that aborts the association aborts it
at once (a blocking abort from the DUL thread would wait for itself for ever); and the node
stops cleanly afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, _config
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import build_context

from node.config import build_config
from node.server import RunningNode, start
from node.services import Services, open_services
from tests.conftest import free_port, poll_until
from tests.dicomdata import CT_IMAGE, encoded_as, make_instance, no_delay, reactor_paused


@pytest.fixture
def running(tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[RunningNode, Services]]:
    # As ``serve`` sets it below DEBUG (node.logs): pynetdicom binds no trace handlers, which
    # would keep every decoded message its own.
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")
    config = build_config({"port": free_port(), "storage": "storage"}, tmp_path)
    services = open_services(config)
    node = start(services)
    try:
        yield node, services
    finally:
        node.stop(2)
        services.close()


def _associate(port: int) -> Any:
    ae = AE(ae_title="TESTSCU")
    ae.requested_contexts = [build_context(CT_IMAGE)]
    ae.dimse_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    no_delay(assoc)
    return assoc


def test_a_store_is_answered_on_the_thread_that_read_it(
        running: tuple[RunningNode, Services], monkeypatch: pytest.MonkeyPatch) -> None:
    node, services = running
    threads: list[threading.Thread] = []
    receive = services.ingestor.receive

    def recording(item: Any) -> Any:
        threads.append(threading.current_thread())
        return receive(item)

    monkeypatch.setattr(services.ingestor, "receive", recording)
    assoc = _associate(node.port)
    try:
        statuses = [reactor_paused(assoc).send_c_store(encoded_as(make_instance())).Status
                    for _ in range(3)]
    finally:
        assoc.release()
    assert statuses == [0, 0, 0]
    assert len(threads) == 3 and len(set(threads)) == 1
    assert isinstance(threads[0], DULServiceProvider)  # not the association's reactor


def test_a_fault_while_answering_aborts_the_association_at_once(
        running: tuple[RunningNode, Services], monkeypatch: pytest.MonkeyPatch) -> None:
    """The response cannot be written (a bug, injected): the router aborts the association.
    From the DUL thread that abort must not wait for the DUL thread to end."""
    node, _ = running

    answering: list[threading.Thread] = []

    def broken(*args: Any) -> bytes:
        answering.append(threading.current_thread())
        raise RuntimeError("injected fault in the response writer")

    monkeypatch.setattr("node.handlers.store_direct.store_response", broken)
    assoc = _associate(node.port)
    started = time.monotonic()
    status = reactor_paused(assoc).send_c_store(encoded_as(make_instance()))
    elapsed = time.monotonic() - started
    assert "Status" not in status  # no response: the association was aborted
    assert elapsed < 10, f"the abort took {elapsed:.1f} s (the client waited for it)"
    assert poll_until(lambda: assoc.is_aborted, 10)  # by the node's A-ABORT
    # And the node's DUL thread, which was answering, has ended (a blocking abort leaves it
    # waiting for itself for ever, holding one of max_associations).
    assert len(answering) == 1 and isinstance(answering[0], DULServiceProvider)
    assert poll_until(lambda: not answering[0].is_alive(), 10)

    monkeypatch.undo()
    assoc = _associate(node.port)  # the node serves on
    try:
        assert reactor_paused(assoc).send_c_store(encoded_as(make_instance())).Status == 0
    finally:
        assoc.release()
    stopping = time.monotonic()
    node.stop(2)
    assert time.monotonic() - stopping < 10
