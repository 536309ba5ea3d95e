"""Serve some DIMSE requests before pynetdicom's service classes see them.

pynetdicom's reactor hands every complete request to ``Association._serve_request``, which
runs the library's service class for it (decode, call the event handler, encode each response
through pydicom).  For the services whose cost is per response or per sub-operation (C-FIND
matches, C-MOVE/C-GET sub-operations) the node answers itself with directly encoded messages
(``node.scu.messages``).  A ``DirectRouter`` attached to an association offers each request
to the node's direct services in turn and passes on to the library whatever none of them
takes.

This relies on pynetdicom 3.0 internals (``_serve_request``, ``_sent_release``,
``dimse.cancel_req``), which is why pynetdicom is pinned to 3.0.x.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from node.scu.messages import ConnectionLost

log = logging.getLogger(__name__)

# Takes the request (returning True once it is answered) or declines it (False).
# An attribute of each attached association: True while one of its requests is being served
# (by the reactor, or on the DUL thread: node.handlers.store_direct).
SERVING = "_node_serving"
DirectService = Callable[[Association, Any, PresentationContext], bool]


class DirectRouter:
    """Offers each request of the associations it is attached to to the direct services."""

    def __init__(self, services: Sequence[DirectService],
                 after_request: Callable[[], None] | None = None) -> None:
        self.services = tuple(services)
        # Run in the association's thread once each request is answered, by whichever path
        # (the node gives back the thread's pooled database connection there).
        self.after_request = after_request

    def attach(self, assoc: Association) -> None:
        """Wrap ``assoc._serve_request`` for this one association."""
        library = assoc._serve_request

        def serve_request(msg: Any, context_id: int) -> None:
            setattr(assoc, SERVING, True)
            try:
                if not self._serve(assoc, msg, context_id):
                    library(msg, context_id)
            finally:
                setattr(assoc, SERVING, False)
                if self.after_request is not None:
                    self.after_request()

        setattr(assoc, SERVING, False)
        assoc._serve_request = serve_request  # type: ignore[method-assign]

    def _serve(self, assoc: Association, msg: Any, context_id: int) -> bool:
        if assoc._sent_release or not getattr(msg, "is_valid_request", False):
            return False  # pynetdicom ignores requests after release, answers invalid ones
        # pynetdicom keeps the accepted contexts by ID (``accepted_contexts`` sorts a copy).
        context = assoc._accepted_cx.get(context_id)
        if context is None:
            return False  # pynetdicom aborts on a request on a context never accepted
        # pynetdicom's rule: a C-CANCEL that arrived before this request is not for it.
        assoc.dimse.cancel_req = {}
        try:
            return any(service(assoc, msg, context) for service in self.services)
        except ConnectionLost as exc:  # the writer aborted the association: nobody to answer
            log.warning("association with %s lost while answering: %s",
                        str(assoc.requestor.ae_title).strip(), exc)
            return True
        except Exception:  # a bug: the request may be half answered, so the association ends
            log.exception("request from %s failed; aborting the association",
                          str(assoc.requestor.ae_title).strip())
            assoc.abort()
            return True
        finally:
            assoc.dimse.cancel_req = {}
