"""C-MOVE SCP (PS3.4 C.4.2): send the named instances to a configured peer, over a new association.

The Move Destination must be one of the configured peers allowed as a move destination, else
the request is refused with 0xA801 before anything is looked up.  The peers are asked for on
every request (``peers()``), so a reloaded configuration applies to the next C-MOVE.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from node.config import Peer
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
from node.scu.send import Outgoing, move_destination

PeerLookup = Callable[[], Mapping[str, Peer]]


def handle_move(retrieval: Retrieval, planner: RetrievePlanner, peers: PeerLookup,
                outgoing: Outgoing) -> None:
    destination = retrieval.move_destination
    retrieval.destination = destination or "?"
    peer = peers().get(destination)
    if peer is None or not peer.move_destination:
        # PS3.4 C.4.2.1.5, Table C.4-2: 0xA801 Refused: Move Destination unknown.  A peer the
        # configuration does not allow as a destination is answered the same way.
        reason = "is not a configured peer" if peer is None else "is not a move destination"
        retrieval.finish(MOVE_DESTINATION_UNKNOWN, comment=f"{destination!r} {reason}")
        return
    instances = matching_instances(retrieval, planner)
    if instances is None:
        return
    comment = ""
    try:
        with move_destination(peer, outgoing, instances, retrieval.priority,
                              originator=(retrieval.requester, retrieval.message_id)) as sender:
            tally, cancelled = run_sub_operations(retrieval, instances, sender.send)
    except PeerUnavailable as exc:
        # PS3.4 C.4.2.3.1: a sub-operation for which no association or presentation context
        # can be had has failed; with none possible, all of them have.
        tally, cancelled, comment = Tally.all_failed(instances), False, str(exc)
    if not retrieval.requester_present:
        comment = "requester gone"
    retrieval.finish(final_status(tally, cancelled), tally, comment)
