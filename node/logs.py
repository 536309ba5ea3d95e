"""The only place that sets up log output: plain lines on stderr, for a terminal or journald."""

from __future__ import annotations

import logging
import sys

from pynetdicom import _config

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """Send the node's logs to stderr at ``level``; pynetdicom's own chatter only when DEBUG."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)


def set_level(level: str) -> None:
    """Change the log level of a running node (a reload): the handlers stay as they are."""
    logging.getLogger().setLevel(level)
    # pynetdicom logs every PDU at INFO and dataset contents at DEBUG (patient data).
    debug = level == "DEBUG"
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if debug else logging.WARNING)
    # Its standard handlers also format a trace of every PDU and DIMSE message (copying each
    # dataset) whatever the log level; they are bound only when that trace is wanted.
    _config.LOG_HANDLER_LEVEL = "standard" if debug else "none"
    # Its C-FIND/C-GET/C-MOVE services pretty-print every request and response identifier
    # before calling logger.debug, so the cost is paid even when DEBUG is off.
    _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = debug
