"""Prometheus metrics of a running node: what the handlers count, and the HTTP endpoint.

The handlers call a ``Recorder``, one call per operation (or per sub-operation, or per
association event).  The base ``Recorder`` records nothing: the node without a ``metrics``
section pays one no-op method call.  ``Metrics`` counts into its own ``CollectorRegistry``
(never prometheus_client's process-wide default), and ``start_endpoint`` serves that registry
over HTTP (any path; ``/metrics`` by convention) until ``Endpoint.stop``.

Exported (all prefixed ``dicom_node_``):

- ``associations_current`` (gauge), ``associations_total`` (accepted),
  ``associations_rejected_total`` (A-ASSOCIATE-RJ sent, PS3.8 7.1.1.9: wrong called AE title,
  too many associations...), ``associations_aborted_total`` (ended by an A-ABORT, PS3.8 7.3).
- ``operations_total{service, status, result}``: C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET by
  final status only (never Pending, PS3.7 C.1), ``status`` as answered (``0xA700``) and
  ``result`` its class (PS3.7 C.1-C.4): ``success``, ``warning``, ``cancel`` or ``failure``.
- ``operation_duration_seconds{service}`` (histogram): request in to final response out
  (not for C-ECHO, answered at once).
- ``received_instances_total``, ``received_bytes_total``: C-STOREs answered Success, and
  their data set bytes as received (without File Meta).
- ``sent_instances_total{service}``, ``sent_bytes_total{service}``: C-MOVE/C-GET
  sub-operations that delivered their instance (completed or warning), and the bytes of the
  stored files they sent; ``sub_operations_failed_total{service}`` for the others.
- ``store_instances``, ``store_bytes`` (gauges): the index's COUNT and SUM(size), read at
  scrape time at most every ``STORE_TOTALS_MAX_AGE`` seconds, so a scrape storm cannot load
  the database.
- ``build_info{version, ae_title}`` and ``start_time_seconds``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final
from wsgiref.simple_server import WSGIServer

from peewee import Database, PeeweeException, fn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import start_http_server as start_wsgi_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from node import __version__
from node.config import MetricsEndpoint
from node.dimse.status import CANCELLED, SUCCESS, is_warning
from node.errors import StartupError
from node.index.models import Instance

log = logging.getLogger(__name__)

PREFIX = "dicom_node"
TIMED_SERVICES = ("C-STORE", "C-FIND", "C-MOVE", "C-GET")  # a C-ECHO takes no time to tell
RETRIEVE_SERVICES = ("C-MOVE", "C-GET")
# From a C-ECHO's or a small C-STORE's milliseconds to a large C-MOVE's minutes.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# Seconds a reading of the index's totals is exported again before the index is asked anew.
STORE_TOTALS_MAX_AGE = 15.0


def status_class(status: int) -> str:
    """The ``result`` label of a final status (PS3.7 C.1-C.4)."""
    if status == SUCCESS:
        return "success"
    if status == CANCELLED:
        return "cancel"
    if is_warning(status):
        return "warning"
    return "failure"


class Recorder:
    """What the handlers call.  This one records nothing: the node without an endpoint."""

    def association_accepted(self) -> None:
        """An A-ASSOCIATE-AC was sent."""

    def association_rejected(self) -> None:
        """An A-ASSOCIATE-RJ was sent."""

    def association_ended(self, aborted: bool) -> None:
        """An accepted association's connection closed (after a release, or an abort)."""

    def operation(self, service: str, status: int, seconds: float | None = None) -> None:
        """A DIMSE operation answered with its final ``status``; how long it took, if known."""

    def stored(self, status: int, size: int, seconds: float) -> None:
        """A C-STORE of ``size`` data set bytes answered with ``status``."""

    def sub_operation(self, service: str, delivered: bool, size: int) -> None:
        """A C-MOVE/C-GET sub-operation sent a stored file of ``size`` bytes (``delivered``)
        or failed."""


NO_METRICS: Final = Recorder()  # stateless: one shared instance is as good as many


class Metrics(Recorder):
    """Counts into its own registry; ``registry`` is what the endpoint exports.

    Each method is a few dictionary look-ups and counter increments (the C-STORE path calls
    ``stored`` once per instance): the labelled children are resolved once and kept.
    """

    def __init__(self, ae_title: str, store_totals: Callable[[], tuple[int, int]] | None = None,
                 max_age: float = STORE_TOTALS_MAX_AGE) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._current = Gauge(f"{PREFIX}_associations_current",
                              "Associations accepted and not yet closed", registry=registry)
        self._accepted = Counter(f"{PREFIX}_associations", "Associations accepted",
                                 registry=registry)
        self._rejected = Counter(f"{PREFIX}_associations_rejected",
                                 "Associations rejected (A-ASSOCIATE-RJ)", registry=registry)
        self._aborted = Counter(f"{PREFIX}_associations_aborted",
                                "Accepted associations that ended in an A-ABORT",
                                registry=registry)
        self._operations = Counter(
            f"{PREFIX}_operations", "DIMSE operations by service and final status",
            ["service", "status", "result"], registry=registry)
        self._durations = Histogram(
            f"{PREFIX}_operation_duration_seconds",
            "Time from request to final response, by service", ["service"],
            buckets=DURATION_BUCKETS, registry=registry)
        self._received_instances = Counter(
            f"{PREFIX}_received_instances", "Instances received by C-STORE and answered Success",
            registry=registry)
        self._received_bytes = Counter(
            f"{PREFIX}_received_bytes",
            "Data set bytes of the instances received by C-STORE and answered Success",
            registry=registry)
        sent_instances = Counter(
            f"{PREFIX}_sent_instances", "Instances delivered by C-MOVE/C-GET sub-operations",
            ["service"], registry=registry)
        sent_bytes = Counter(
            f"{PREFIX}_sent_bytes", "Bytes of the stored files delivered by C-MOVE/C-GET "
            "sub-operations", ["service"], registry=registry)
        failed = Counter(f"{PREFIX}_sub_operations_failed", "C-MOVE/C-GET sub-operations that "
                         "failed", ["service"], registry=registry)
        Info(f"{PREFIX}_build", "The node's version and AE title", registry=registry).info(
            {"version": __version__, "ae_title": ae_title})
        Gauge(f"{PREFIX}_start_time_seconds", "When the node started, seconds since the epoch",
              registry=registry).set_to_current_time()
        if store_totals is not None:
            registry.register(StoreTotals(store_totals, max_age))
        # Resolved once: ``labels()`` validates and locks on every call.
        self._by_service = {s: self._durations.labels(s) for s in TIMED_SERVICES}
        self._sent = {s: (sent_instances.labels(s), sent_bytes.labels(s), failed.labels(s))
                      for s in RETRIEVE_SERVICES}
        self._outcomes: dict[tuple[str, int], Counter] = {}

    def association_accepted(self) -> None:
        self._accepted.inc()
        self._current.inc()

    def association_rejected(self) -> None:
        self._rejected.inc()

    def association_ended(self, aborted: bool) -> None:
        self._current.dec()
        if aborted:
            self._aborted.inc()

    def operation(self, service: str, status: int, seconds: float | None = None) -> None:
        outcome = self._outcomes.get((service, status))
        if outcome is None:
            # Bounded: the services are fixed and each answers a handful of statuses.
            outcome = self._operations.labels(service, f"0x{status:04X}", status_class(status))
            self._outcomes[(service, status)] = outcome
        outcome.inc()
        if seconds is not None:
            histogram = self._by_service.get(service)
            if histogram is None:
                histogram = self._by_service[service] = self._durations.labels(service)
            histogram.observe(seconds)

    def stored(self, status: int, size: int, seconds: float) -> None:
        self.operation("C-STORE", status, seconds)
        if status == SUCCESS:
            self._received_instances.inc()
            self._received_bytes.inc(size)

    def sub_operation(self, service: str, delivered: bool, size: int) -> None:
        instances, sent_bytes, failed = self._sent[service]
        if not delivered:
            failed.inc()
            return
        instances.inc()
        sent_bytes.inc(size)


class StoreTotals:
    """A collector: the index's instance count and bytes, read at most every ``max_age`` s.

    Concurrent scrapes of a stale reading wait for the one that reads the index.  When the
    index cannot be read the two gauges are left out of that scrape (an ``absent()`` alert
    sees it) and the failure is logged; the next try is ``max_age`` seconds later.
    """

    def __init__(self, read: Callable[[], tuple[int, int]], max_age: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.read = read
        self.max_age = max_age
        self.clock = clock
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._totals: tuple[int, int] | None = None

    def describe(self) -> Iterable[Metric]:
        # The names, without samples: registering must not read the index.
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        totals = self._current()
        if totals is None:
            return []
        instances, size = self._families()
        instances.add_metric([], totals[0])
        size.add_metric([], totals[1])
        return [instances, size]

    def _current(self) -> tuple[int, int] | None:
        with self._lock:
            now = self.clock()
            if self._read_at is None or now - self._read_at >= self.max_age:
                self._read_at = now
                try:
                    self._totals = self.read()
                except PeeweeException as exc:
                    log.warning("metrics: cannot read the store totals from the index: %s", exc)
                    self._totals = None
            return self._totals

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily(f"{PREFIX}_store_instances", "Instances in the index"),
                GaugeMetricFamily(f"{PREFIX}_store_bytes",
                                  "Bytes of the indexed files (File Meta included)"))


def index_totals(db: Database) -> tuple[int, int]:
    """(instances, bytes) in the index: COUNT(*) and SUM(size) of the instance table.

    Runs on the endpoint's request thread: a connection is opened for it and closed (returned
    to the pool) again, never left behind with the thread.
    """
    opened = db.is_closed()
    if opened:
        db.connect()
    try:
        query = Instance.select(fn.COUNT(Instance.id), fn.COALESCE(fn.SUM(Instance.size), 0))
        count, size = query.tuples().execute(db)[0]
        return int(count or 0), int(size or 0)
    finally:
        if opened:
            db.close()


@dataclass
class Endpoint:
    """The HTTP server exporting a registry; ``stop`` ends it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def start_endpoint(metrics: Metrics, where: MetricsEndpoint) -> Endpoint:
    """Serve ``metrics`` over HTTP on ``where`` in a daemon thread; StartupError if it cannot."""
    try:
        server, thread = start_wsgi_server(where.port, where.bind, registry=metrics.registry)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {where.bind}:{where.port}: "
                           f"{exc.strerror or exc}") from exc
    return Endpoint(server, thread)
