"""C-ECHO SCP (PS3.4 A.4): the peer checks that the node is there."""

from __future__ import annotations

from pynetdicom.events import Event

from node.dimse.status import SUCCESS
from node.metrics import NO_METRICS, Recorder


def handle_echo(event: Event, metrics: Recorder = NO_METRICS) -> int:
    metrics.operation("C-ECHO", SUCCESS)
    return SUCCESS
