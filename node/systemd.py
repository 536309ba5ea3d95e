"""Talk to systemd: readiness, reload, stop and watchdog notifications (sd_notify(3)).

The protocol is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket named by
``$NOTIFY_SOCKET``; a name starting with ``@`` is in the abstract namespace (the ``@`` stands for
a leading NUL byte).  Small enough to write here rather than add a dependency.  Without
``$NOTIFY_SOCKET`` (not started by systemd with ``Type=notify``) every call does nothing.

The watchdog (``WatchdogSec=`` in the unit, ``$WATCHDOG_USEC`` here) is pinged from its own
thread only while a health check passes, so a node whose listener has died stops pinging and
systemd restarts it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _address(name: str) -> str | None:
    """The socket address for ``$NOTIFY_SOCKET``: a path, or an abstract name."""
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    return None  # e.g. systemd 254's "vsock:" addresses: not for a service on this host


class Notifier:
    """Sends notifications to the service manager; a no-op when there is none."""

    def __init__(self, socket_name: str | None) -> None:
        self._name = socket_name or None
        self._address = _address(socket_name) if socket_name else None
        self._failed = False  # warn once; the watchdog would repeat it every few seconds
        if socket_name and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a Unix socket path: systemd will not be told "
                        "when the node is ready", socket_name)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET"))

    def send(self, **fields: str | int) -> bool:
        """Send one notification, ``READY=1`` as ``send(READY=1)``; True when it was sent.

        A failure is logged, not raised: the node serves on either way, and systemd acts on
        what it did not hear (start-up timeout, watchdog) by its own rules.
        """
        if self._address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self._address)
        except OSError as exc:
            log.log(logging.DEBUG if self._failed else logging.WARNING,
                    "cannot notify systemd at %s: %s", self._name, exc.strerror or exc)
            self._failed = True
            return False
        return True

    def ready(self, status: str) -> bool:
        """The listener is up (``Type=notify``: systemd starts the units ordered after us)."""
        return self.send(READY=1, STATUS=status)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) match this to its request.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec, STATUS="reloading configuration")

    def reloaded(self, status: str) -> bool:
        """End of a reload, whether it was applied or refused (sd_notify(3): READY=1)."""
        return self.send(READY=1, STATUS=status)

    def stopping(self) -> bool:
        return self.send(STOPPING=1, STATUS="stopping: finishing open associations")

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings (half the timeout, as sd_watchdog_enabled(3) advises),
    or None when systemd asked for no watchdog or asked another process."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    return int(usec) / 1_000_000 / 2


class Watchdog:
    """Pings ``WATCHDOG=1`` every ``interval`` seconds while ``healthy()`` holds.

    When the check fails it asks systemd to act at once (``WATCHDOG=trigger``, systemd >= 246)
    and stops pinging, so an older systemd acts when the timeout runs out.
    """

    def __init__(self, notifier: Notifier, interval: float, healthy: Callable[[], bool]) -> None:
        self._notifier = notifier
        self._interval = interval
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            if not self._healthy():
                log.error("the DICOM listener is not running: asking systemd to restart the node")
                self._notifier.send(WATCHDOG="trigger")
                return
            self._notifier.send(WATCHDOG=1)
            if self._stop.wait(self._interval):
                return

