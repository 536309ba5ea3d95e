"""Build the application entity from the config and the services, run it, stop it cleanly.

``serve`` is the daemon: signals (SIGTERM/SIGINT stop, SIGHUP reloads the config) are turned
into work in the main thread's loop, and systemd is told when the node is ready, reloading and
stopping (node.systemd).
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from node.config import NodeConfig
from node.config_reload import reload_config
from node.dicom.contexts import (
    query_contexts,
    retrieve_contexts,
    storage_contexts,
    verification_contexts,
)
from node.errors import NodeError, StartupError
from node.handlers.access import AccessGate
from node.handlers.association import AssociationLog
from node.handlers.direct import DirectRouter
from node.handlers.echo import handle_echo
from node.handlers.find import FindService, negotiate_find_extensions
from node.handlers.get import handle_get
from node.handlers.move import handle_move
from node.handlers.retrieve_common import RetrieveService
from node.handlers.store import handle_store
from node.handlers.store_direct import StoreService
from node.latency import make_association_responsive
from node.logs import set_level
from node.metrics import NO_METRICS, Endpoint, Metrics, Recorder, index_totals, start_endpoint
from node.recovery import SharedSweeper, SweepReport, sweep, sweep_shared
from node.scu.send import Outgoing
from node.services import Services, open_services
from node.systemd import Notifier, Watchdog, watchdog_interval
from node.tls import HandshakeFailed, client_context, handshake, server_context

log = logging.getLogger(__name__)

# After aborting an association, how long its handler may take to finish (see RunningNode.stop).
ABORT_WAIT = 2.0
# How often serve's loop checks, between signals, that the listener threads still run.
LIVENESS_CHECK = 5.0


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with Nagle's algorithm off on every accepted connection.

    DIMSE responses are small writes; with Nagle on, each can wait for the peer's delayed ACK.
    With an ``ssl_context`` (the TLS listener) the TLS handshake is done in the connection's
    own thread, bounded by the ACSE timeout: pynetdicom's would hold the accepting thread for
    as long as a client keeps quiet.
    """

    daemon_threads = True
    reuse_port = False  # config reuse_port: _SharedPortServer

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                handshake(request, self.ae.acse_timeout)
            except HandshakeFailed as exc:
                log.warning("TLS connection from %s refused: %s", client_address[0], exc)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def server_bind(self) -> None:
        if self.reuse_port:
            # Before bind: Linux lets a socket share a port only with sockets that all set
            # SO_REUSEPORT (same user); the kernel then spreads new connections among them.
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def shutdown(self) -> None:
        # pynetdicom's shutdown also unregisters from AE.start_server's list; we use make_server.
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class _SharedPortServer(NodeAssociationServer):
    """The listener of one of several nodes sharing a port on this host (reuse_port).

    A class rather than an argument: pynetdicom's make_server builds the server with fixed
    arguments, and the socket is bound in the constructor.
    """

    reuse_port = True


class _SupportedContext(PresentationContext):
    """A supported context that pynetdicom can copy cheaply.

    pynetdicom deep-copies the server's ~180 supported contexts for every association it
    accepts (transport.py ``_create_association``), copying each UID through pydicom: tens of
    milliseconds of CPU per association.  A context holds only immutable values and one list,
    so a shallow copy with its own list is the same thing.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _SupportedContext:
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


def _cheap_to_copy(contexts: list[PresentationContext]) -> list[PresentationContext]:
    cheap: list[PresentationContext] = []
    for cx in contexts:
        clone = _SupportedContext()
        clone.__dict__.update(cx.__dict__)
        cheap.append(clone)
    return cheap


def build_ae(config: NodeConfig) -> AE:
    """The application entity with the node's title, limits and accepted contexts."""
    ae = AE(ae_title=config.ae_title)
    for cx in (verification_contexts() + storage_contexts() + query_contexts()
               + retrieve_contexts()):
        # Roles passed on explicitly: C-GET needs the storage contexts' (node.dicom.contexts).
        ae.add_supported_context(str(cx.abstract_syntax), cx.transfer_syntax, cx.scu_role,
                                 cx.scp_role)
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = config.max_pdu
    ae.acse_timeout = config.acse_timeout
    ae.dimse_timeout = config.dimse_timeout
    ae.network_timeout = config.network_timeout
    # PS3.8 9.3.4: reject an association addressed to another AE title (reason 7).
    ae.require_called_aet = True
    return ae


@dataclass
class Acceptor:
    """One listening socket (plain or TLS) and the thread accepting on it."""

    server: NodeAssociationServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


@dataclass
class RunningNode:
    """A listening node (the plain listener, and the TLS one beside it); ``stop`` ends it."""

    plain: Acceptor
    tls: Acceptor | None = None

    @property
    def port(self) -> int:
        return self.plain.port

    @property
    def acceptors(self) -> list[Acceptor]:
        return [self.plain] if self.tls is None else [self.plain, self.tls]

    def alive(self) -> bool:
        """Every listener still accepts."""
        return all(acceptor.thread.is_alive() for acceptor in self.acceptors)

    def stop(self, grace: float) -> None:
        """Stop accepting, let associations in flight finish for ``grace`` seconds, then abort."""
        for acceptor in self.acceptors:
            acceptor.server.shutdown()
        deadline = time.monotonic() + grace
        still_open = [assoc for acceptor in self.acceptors
                      for assoc in acceptor.server.active_associations]
        if still_open:
            log.info("no longer accepting associations; %d open, given up to %g s to finish",
                     len(still_open), grace)
        for assoc in still_open:
            assoc.join(max(0.0, deadline - time.monotonic()))
            if assoc.is_alive():
                log.warning("aborting an association still open after %g s", grace)
                assoc.abort()
                # pynetdicom runs handlers in the association's thread, so a C-STORE may be
                # between its file and its index row: let it end before the index closes.  Its
                # response cannot be sent any more (the association is gone), so nothing is
                # acknowledged that is not kept; a file left without a row is swept at the
                # next start (node.recovery).
                assoc.join(ABORT_WAIT)
        for acceptor in self.acceptors:
            acceptor.thread.join(grace)


def _tune_connection(event: Event, router: DirectRouter, gate: AccessGate) -> None:
    make_association_responsive(event.assoc)
    gate.attach(event.assoc)
    router.attach(event.assoc)


def retrieve_service(services: Services, metrics: Recorder = NO_METRICS) -> RetrieveService:
    """C-MOVE and C-GET (PS3.4 C.4.2, C.4.3), served by the node's handlers."""
    config = services.config
    # Sub-operation associations to move destinations wait as long as a DIMSE exchange may.
    outgoing = Outgoing(config.ae_title, config.dimse_timeout, config.max_pdu,
                        client_context(config.tls) if config.tls is not None else None)
    return RetrieveService(
        move=partial(handle_move, planner=services.planner,
                     config=lambda: services.config, outgoing=outgoing),
        get=partial(handle_get, planner=services.planner),
        metrics=metrics,
    )


def start(services: Services, metrics: Recorder = NO_METRICS) -> RunningNode:
    """Bind the listeners (plain, and TLS when configured) and serve each in a background
    thread; the handlers, the same on both, count into ``metrics``."""
    config = services.config
    ae = build_ae(config)
    associations = AssociationLog(metrics)
    gate = AccessGate(lambda: services.config, metrics)  # the rules in force, at each decision
    store = StoreService(services.ingestor, associations, metrics, config.max_instance_size)
    handlers = [
        # C-FIND, C-MOVE and C-GET are taken off each association here, not through pynetdicom's
        # events: its service classes encode every response (and re-encode every instance)
        # through pydicom (node.handlers.direct, retrieve_common, find).
        (evt.EVT_CONN_OPEN, _tune_connection,
         [DirectRouter([gate.serve,  # first: a request the caller may not make goes no further
                        store.serve,
                        retrieve_service(services, metrics).serve,
                        FindService(services.finder, metrics).serve],
                       after_request=services.release_connection), gate]),
        # Every message's size is bounded from the first (max_instance_size).
        (evt.EVT_CONN_OPEN, store.connected),
        (evt.EVT_C_ECHO, handle_echo, [metrics]),
        (evt.EVT_C_STORE, handle_store, [services.ingestor, associations, metrics]),
        (evt.EVT_SOP_EXTENDED, negotiate_find_extensions),
        *associations.handlers(),
    ]
    tls = server_context(config.tls) if config.tls is not None else None  # files checked first
    plain = _listen(ae, config.bind, config.port, handlers, None, config.reuse_port)
    if config.tls is None:
        return RunningNode(plain)
    try:
        secure = _listen(ae, config.bind, config.tls.port, handlers, tls, config.reuse_port)
    except StartupError:
        plain.server.shutdown()
        raise
    return RunningNode(plain, secure)


def _listen(ae: AE, bind: str, port: int, handlers: list[Any],
            tls: ssl.SSLContext | None, reuse_port: bool = False) -> Acceptor:
    """A listener on ``bind``:``port`` (over TLS with ``tls``), accepting in its own thread;
    with ``reuse_port``, other nodes on this host that set it too may listen on the port."""
    server_class = _SharedPortServer if reuse_port else NodeAssociationServer
    try:
        server = ae.make_server((bind, port), evt_handlers=handlers,
                                server_class=server_class, ssl_context=tls)
    except OSError as exc:
        raise StartupError(f"cannot listen on {bind}:{port}: {exc.strerror}") from exc
    assert isinstance(server, NodeAssociationServer)
    server.contexts = _cheap_to_copy(server.contexts)
    name = "dicom-listener" if tls is None else "dicom-tls-listener"
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return Acceptor(server, thread)


class _Signals:
    """SIGTERM/SIGINT (stop) and SIGHUP (reload) as flags for ``serve``'s loop.

    The handlers only record the signal and wake the loop; stopping and reloading run in the
    main thread's loop, outside the signal handler.
    """

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.stop: str | None = None  # name of the signal that asked to stop
        self.reloads = 0  # SIGHUPs received; only the handler writes it

    def install(self) -> None:
        # Before anything else: SIGHUP's default action would end the process.
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop = signal.Signals(signum).name
        self.wake.set()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reloads += 1
        self.wake.set()


def serve(config: NodeConfig, environ: Mapping[str, str] | None = None) -> None:
    """Run the node in the foreground: SIGHUP reloads the config, SIGTERM or SIGINT stops it.

    ``environ`` (default: the process environment) may name systemd's notification socket and
    watchdog (node.systemd).  Raises StartupError when the node cannot start, NodeError when
    the listener stops on its own.
    """
    environ = os.environ if environ is None else environ
    signals = _Signals()
    signals.install()
    notifier = Notifier.from_environment(environ)
    services = open_services(config)
    try:
        # A crash leaves at most one unacknowledged file per writer in flight: the
        # associations, and a pull's or an import's workers beside them.
        max_orphans = 4 * config.max_associations + 64
        sweep(services.store, max_orphans, services.index.is_referenced)
        metrics = (Metrics(config.ae_title, partial(index_totals, services.db))
                   if config.metrics is not None else None)
        node = start(services, metrics or NO_METRICS)
        endpoint = _start_metrics(node, metrics, config)
        log.info(
            "%s listening on %s:%d; store %s; index %s",
            config.ae_title, config.bind, node.port, config.storage,
            config.database.describe(),
        )
        if node.tls is not None:
            log.info("TLS listening on %s:%d (client certificates %s)", config.bind,
                     node.tls.port, _client_certificates(config))
        notifier.ready(f"serving {config.ae_title} on {config.bind}:{node.port}")
        stopping = threading.Event()
        interval = watchdog_interval(environ, os.getpid())
        # Once stopping, the listener is meant to be gone: the pings go on until the end.
        watchdog = (Watchdog(notifier, interval,
                             lambda: stopping.is_set() or node.alive())
                    if interval is not None else None)
        if watchdog is not None:
            watchdog.start()
        services.retention.start()
        sweeper = SharedSweeper(partial(_sweep_shared, services, max_orphans))
        sweeper.start()
        try:
            _run(node, services, signals, notifier)
        finally:
            stopping.set()
            notifier.stopping()
            node.stop(services.config.stop_grace)
            sweeper.stop()
            services.retention.stop()
            if endpoint is not None:
                endpoint.stop()
            if watchdog is not None:
                watchdog.stop()
    finally:
        services.close()
    log.info("stopped")


def _sweep_shared(services: Services, max_orphans: int) -> SweepReport:
    try:
        return sweep_shared(services.store, services.index.is_referenced, max_orphans)
    finally:
        services.release_connection()  # the sweeper's thread holds no pooled connection


def _client_certificates(config: NodeConfig) -> str:
    tls = config.tls
    if tls is None or tls.ca is None:
        return "not asked for"
    return "required" if tls.require_client_certificate else "verified when presented"


def _start_metrics(node: RunningNode, metrics: Metrics | None,
                   config: NodeConfig) -> Endpoint | None:
    """The Prometheus endpoint, once the listener is up; a failure stops the listener."""
    if metrics is None or config.metrics is None:
        return None
    try:
        endpoint = start_endpoint(metrics, config.metrics)
    except StartupError:
        node.stop(0.0)
        raise
    bind = config.metrics.bind
    log.info("metrics on http://%s:%d/metrics", f"[{bind}]" if ":" in bind else bind,
             endpoint.port)
    return endpoint


def _run(node: RunningNode, services: Services, signals: _Signals, notifier: Notifier) -> None:
    """The main thread's loop: reload on SIGHUP, return on SIGTERM/SIGINT."""
    reloads_done = 0
    while True:
        signals.wake.wait(LIVENESS_CHECK)
        signals.wake.clear()  # before reading the flags, so a signal now wakes the next wait
        if signals.stop is not None:
            log.info("received %s, stopping", signals.stop)
            return
        if signals.reloads != reloads_done:
            reloads_done = signals.reloads  # several SIGHUPs in a row: one reload reads them all
            notifier.reloading()
            result = reload_config(services.live)
            if result.applied and "log_level" in result.changed:
                set_level(services.config.log_level)
            notifier.reloaded(result.status())
        if not node.alive():
            # serve_forever ended by itself: exit non-zero so systemd (Restart=on-failure)
            # starts the node again, rather than run on deaf.
            raise NodeError("a DICOM listener stopped unexpectedly")
