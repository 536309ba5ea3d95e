"""C-FIND SCU (PS3.4 C.4.1): ask a peer AE which patients, studies, series or instances match.

``find_query`` opens one association to the peer, sends one C-FIND request in the Patient Root
or Study Root Query/Retrieve information model (PS3.4 C.6.1, C.6.2) and yields the identifier
of every Pending response; the final status decides whether the query succeeded.  Requests are
built and checked by ``node.remote.query``.

Patient names and IDs are never logged above DEBUG.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterator, Mapping

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import build_context

from node.config import Peer
from node.dimse.status import SUCCESS, describe_status, is_pending, is_warning
from node.remote.errors import QueryFailed
from node.remote.query import Query, build_query
from node.scu.association import check_calling_ae, close, open_association, where
from node.scu.send import paused_while

log = logging.getLogger(__name__)


def find(
    peer: Peer,
    calling_ae: str,
    level: str,
    keys: Mapping[str, str],
    root: str | None = "study",
    timeout: float = 30,
    tls: ssl.SSLContext | None = None,
) -> Iterator[Dataset]:
    """Query ``peer``; yields each match's identifier (see ``find_query``).

    The request is checked at once (InvalidQuery); the association opens on the first
    ``next()``.
    """
    return find_query(peer, calling_ae, build_query(level, keys, root), timeout, tls)


def find_query(
    peer: Peer, calling_ae: str, query: Query, timeout: float = 30,
    tls: ssl.SSLContext | None = None,
) -> Iterator[Dataset]:
    """Send ``query`` to ``peer`` on one association; yields each match's identifier.

    Raises (while iterating) PeerUnavailable when no association comes about,
    ServiceNotSupported when the peer does not offer the information model, QueryFailed on a
    failure status or when the peer breaks off. Stopping early aborts the association.
    ``timeout`` bounds connecting and every wait for a message, in seconds; ``tls`` is for a
    peer with ``tls: true`` (node.scu.association).
    """
    return _matches(peer, check_calling_ae(calling_ae), query, timeout, tls)


def _matches(peer: Peer, calling_ae: str, query: Query, timeout: float,
             tls: ssl.SSLContext | None) -> Iterator[Dataset]:
    started = time.monotonic()
    context = build_context(query.model, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = open_association(
        peer, calling_ae, [context], timeout,
        service=f"C-FIND in the {query.root.capitalize()} Root Query/Retrieve information model",
        tls=tls,
    )
    finished = False  # the final response arrived: release; anything else: abort
    count = 0
    try:
        try:
            responses: Iterator[tuple[Dataset, Dataset | None]] = paused_while(
                assoc, lambda: assoc.send_c_find(query.identifier, query.model))
        except (ValueError, RuntimeError) as exc:  # identifier not encodable, association gone
            raise QueryFailed(f"cannot send the query to {where(peer)}: {exc}") from exc
        for status, identifier in responses:
            code = int(status.Status) if "Status" in status else None
            if code is None:  # pynetdicom's sign of an abort, a DIMSE timeout or a bad message
                raise QueryFailed(
                    f"{where(peer)} aborted the association or sent no valid answer within "
                    f"{timeout:g} s after {count} matches"
                )
            if is_pending(code):
                if identifier is None:
                    raise QueryFailed(f"{where(peer)} sent a match that cannot be decoded")
                count += 1
                yield identifier
                continue
            finished = True
            if code == SUCCESS:
                break
            comment = str(status.get("ErrorComment", "") or "").strip()
            if is_warning(code):  # C-FIND defines no warning; the answer is otherwise complete
                log.warning("%s ended the C-FIND with warning status %s%s", where(peer),
                            describe_status(code), f": {comment}" if comment else "")
                break
            raise QueryFailed(
                f"{where(peer)} answered the C-FIND with status {describe_status(code)}"
                + (f": {comment}" if comment else ""),
                status=code, comment=comment,
            )
        log.debug("C-FIND %s %s: %d matches in %.3f s", where(peer), query.level, count,
                  time.monotonic() - started)
    finally:
        close(assoc, finished)
