"""The node's clients hold pynetdicom's requestor reactor before a request goes out
(node.scu.send.paused_while), so that no response is taken off the queue and dropped as
"unexpected" (pynetdicom issue #875).

Found by two benchmark clients querying one node at once: about one C-FIND in 40 came back one
match short, because the pause was taken after pynetdicom had sent the request, and trusted
pynetdicom's ``_is_paused`` flag, which is True a moment before the reactor blocks and a moment
after it has passed the checkpoint.  These tests drive ``paused_while`` with a stand-in for the
association whose reactor is a real thread on a real ``threading.Event``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from node.scu.send import paused_while


@dataclass
class FakeAssociation:
    """What paused_while touches of a pynetdicom Association."""

    _reactor_checkpoint: threading.Event = field(default_factory=threading.Event)
    _is_paused: bool = False
    is_established: bool = True
    reactor: threading.Thread | None = None

    def is_alive(self) -> bool:
        return True


def _blocked(checkpoint: threading.Event) -> bool:
    condition = checkpoint._cond  # type: ignore[attr-defined]
    with condition:
        return bool(condition._waiters)


def test_the_request_goes_out_only_once_the_reactor_is_blocked() -> None:
    """The flag says paused while the reactor is still running (as in pynetdicom, between
    setting the flag and blocking); the request must wait until the reactor really waits."""
    assoc = FakeAssociation()
    assoc._reactor_checkpoint.set()
    assoc._is_paused = True  # stale: the reactor has not reached its wait yet
    may_block = threading.Event()

    def reactor() -> None:
        may_block.wait(30)
        assoc._reactor_checkpoint.wait()

    thread = threading.Thread(target=reactor, daemon=True)
    thread.start()
    sent_while_blocked: list[bool] = []

    def send() -> Iterator[int]:
        sent_while_blocked.append(_blocked(assoc._reactor_checkpoint))
        return iter([1, 2, 3])

    # Let the reactor reach its wait only after paused_while has begun looking.
    threading.Timer(0.05, may_block.set).start()
    responses = paused_while(assoc, send)  # type: ignore[arg-type]

    assert sent_while_blocked == [True]
    assert not assoc._reactor_checkpoint.is_set()  # held while the responses come
    assert list(responses) == [1, 2, 3]
    assert assoc._reactor_checkpoint.is_set()  # resumed after the last one
    thread.join(5)
    assert not thread.is_alive()


def test_the_reactor_resumes_when_sending_fails() -> None:
    assoc = FakeAssociation()
    thread = threading.Thread(target=assoc._reactor_checkpoint.wait, daemon=True)
    thread.start()

    def send() -> Iterator[int]:
        raise ValueError("identifier cannot be encoded")

    with pytest.raises(ValueError, match="cannot be encoded"):
        paused_while(assoc, send)  # type: ignore[arg-type]
    assert assoc._reactor_checkpoint.is_set()
    thread.join(5)
    assert not thread.is_alive()


def test_the_reactor_resumes_when_the_caller_stops_early() -> None:
    assoc = FakeAssociation()
    thread = threading.Thread(target=assoc._reactor_checkpoint.wait, daemon=True)
    thread.start()
    responses = paused_while(assoc, lambda: iter(range(10)))  # type: ignore[arg-type]
    assert next(responses) == 0
    assert not assoc._reactor_checkpoint.is_set()
    responses.close()  # type: ignore[attr-defined]
    assert assoc._reactor_checkpoint.is_set()
    thread.join(5)
    assert not thread.is_alive()
