"""The domain's exceptions: what can go wrong inside, before the edge turns it into a status.

Store, index and ingest raise these; only handlers map them to DIMSE statuses.
"""


class NodeError(Exception):
    """Base of every error the node's domain raises on purpose."""


class RejectedInstance(NodeError):
    """The instance will not be kept; nothing of it is left behind."""


class UnreadableDataset(RejectedInstance):
    """The dataset cannot be decoded, or lacks the SOP Class/Instance UIDs that name it."""


class InvalidDataset(RejectedInstance):
    """The dataset decodes but does not fit its command or the information model."""


class DuplicateRejected(RejectedInstance):
    """The SOP Instance UID is held with other content and the policy is ``reject``."""


class OutOfResources(NodeError):
    """The node cannot keep the instance now (disk full, index unavailable); retry later."""


class StorageFull(OutOfResources):
    """No space left in the store."""


class IndexUnavailable(OutOfResources):
    """The index database could not be written after the configured retries."""


class StartupError(NodeError):
    """The node cannot start: port taken, store not writable, index not openable."""
