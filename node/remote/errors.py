"""What can go wrong when the node talks to a peer AE as a client.

Kept free of pynetdicom so the command line can tell its kinds apart without loading the
network stack. Every class derives from ``NodeError``, so the command line turns any of them into
one line on stderr.
"""

from __future__ import annotations

from node.errors import NodeError


class RemoteError(NodeError):
    """Base of every failure of a request the node makes to a peer."""


class BadRequest(RemoteError):
    """The request is wrong before anything is sent (unknown peer, bad key or level).

    The command line answers it like a usage error (exit 2).
    """


class UnknownPeer(BadRequest):
    """The AE title is neither a configured peer nor the node's own."""


class InvalidQuery(BadRequest):
    """A query key, value, level or information model that cannot make a valid identifier."""


class PeerUnavailable(RemoteError):
    """No usable association: the peer cannot be reached, rejected or aborted it."""


class ServiceNotSupported(PeerUnavailable):
    """The peer accepted none of the presentation contexts the request needs."""


class QueryFailed(RemoteError):
    """The peer answered the query with a failure or cancel status, or broke off mid-answer."""

    def __init__(self, message: str, status: int | None = None, comment: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.comment = comment


class EchoFailed(RemoteError):
    """The peer accepted the association but did not answer the C-ECHO with Success."""


class RetrieveFailed(RemoteError):
    """The peer answered a C-MOVE or C-GET with a failure or cancel status, or broke off."""

    def __init__(self, message: str, status: int | None = None, comment: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.comment = comment


class MoveDestinationUnknown(RetrieveFailed):
    """The peer does not know the C-MOVE destination AE title (PS3.4 C.4.2.1.5: 0xA801).

    Every further C-MOVE to that destination fails the same way, so a pull stops at once.
    """


class DestinationUnavailable(RemoteError):
    """The node cannot receive C-MOVE results: it cannot listen on its port, and whatever holds
    the port does not answer C-ECHO as the node's AE title."""
