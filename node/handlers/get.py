"""C-GET SCP (PS3.4 C.4.3): send the named instances back on the requester's own association.

The C-STORE sub-operations use the storage contexts the requester proposed with the SCP role
for itself (SCP/SCU Role Selection, PS3.7 D.3.3.4); an instance whose SOP class it did not
propose, in a syntax the node can send, is a failed sub-operation (PS3.4 C.4.3.3.1).
"""

from __future__ import annotations

from node.handlers.retrieve_common import (
    Retrieval,
    final_status,
    matching_instances,
    run_sub_operations,
)
from node.retrieve.plan import RetrievePlanner
from node.scu.send import Sender


def handle_get(retrieval: Retrieval, planner: RetrievePlanner) -> None:
    with matching_instances(retrieval, planner) as instances:
        if instances is None:
            return
        # Sub-operation Message IDs follow the C-GET's own, so none is outstanding twice.
        sender = Sender(retrieval.assoc, retrieval.requester or "the requester",
                        retrieval.priority, first_message_id=retrieval.message_id % 0xFFFF + 1)
        tally, cancelled = run_sub_operations(retrieval, instances, sender.send)
    retrieval.finish(final_status(tally, cancelled), tally,
                     "" if retrieval.requester_present else "requester gone")
