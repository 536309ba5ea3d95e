"""C-MOVE SCP (PS3.4 C.4.2): send the named instances to a configured peer, over a new association.

The Move Destination must be one of the configured peers allowed as a move destination, and
one the requester may send to (``move_destinations``), else the request is refused with 0xA801
before anything is looked up.  The config is asked for on every request (``config()``), so a
reloaded configuration applies to the next C-MOVE.
"""

from __future__ import annotations

from collections.abc import Callable

from node.access import move_destination
from node.config import NodeConfig
from node.dimse.status import MOVE_DESTINATION_UNKNOWN
from node.handlers.retrieve_common import (
    Retrieval,
    Tally,
    final_status,
    matching_instances,
    run_sub_operations,
)
from node.remote.errors import PeerUnavailable
from node.retrieve.plan import RetrievePlanner
from node.scu.send import Outgoing
from node.scu.send import move_destination as open_destination


def handle_move(retrieval: Retrieval, planner: RetrievePlanner,
                config: Callable[[], NodeConfig], outgoing: Outgoing) -> None:
    destination = retrieval.move_destination
    retrieval.destination = destination or "?"
    peer = move_destination(config(), retrieval.requester, destination)
    if isinstance(peer, str):
        # PS3.4 C.4.2.1.5, Table C.4-2: 0xA801 Refused: Move Destination unknown.  A peer the
        # configuration does not allow as a destination (for anyone, or for this requester)
        # is answered the same way.
        retrieval.finish(MOVE_DESTINATION_UNKNOWN, comment=peer)
        return
    with matching_instances(retrieval, planner) as instances:
        if instances is None:
            return
        comment = ""
        try:
            with open_destination(peer, outgoing, instances, retrieval.priority,
                                  originator=(retrieval.requester,
                                              retrieval.message_id)) as sender:
                tally, cancelled = run_sub_operations(retrieval, instances, sender.send)
        except PeerUnavailable as exc:
            # PS3.4 C.4.2.3.1: a sub-operation for which no association or presentation
            # context can be had has failed; with none possible, all of them have.
            tally, cancelled, comment = Tally.all_failed(instances), False, str(exc)
    if not retrieval.requester_present:
        comment = "requester gone"
    retrieval.finish(final_status(tally, cancelled), tally, comment)
