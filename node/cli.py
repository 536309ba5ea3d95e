"""The command line: ``dicom-node SUBCOMMAND [-c CONFIG] …``; ``main(argv)`` returns the exit code.

Every failure the node expects ends as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from node import __version__
from node.cli_maintenance import (
    delete_arguments,
    import_arguments,
    migrate_arguments,
    reindex_arguments,
    run_delete,
    run_import,
    run_migrate,
    run_reindex,
    run_stats,
    run_verify,
    stats_arguments,
    verify_arguments,
)
from node.config import ConfigError, NodeConfig, Peer, load_config
from node.errors import NodeError
from node.index.database import SchemaMismatch
from node.logs import setup_logging
from node.remote.errors import BadRequest

if TYPE_CHECKING:
    from node.remote.pull import Plan
    from node.services import Services

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_USAGE = 2  # bad arguments, as argparse answers them


def _serve(config: NodeConfig, args: argparse.Namespace) -> int:
    from node.server import serve  # pynetdicom is imported only by commands that need it

    setup_logging(config.log_level)
    serve(config)
    return EXIT_OK


def _check_config(config: NodeConfig, args: argparse.Namespace) -> int:
    where = config.source or "embedded default"
    print(f"{where}: OK")
    print(f"  ae_title {config.ae_title}, listening on {config.bind}:{config.port}")
    print(f"  storage  {config.storage}")
    print(f"  database {config.database.describe()}")
    print(f"  peers    {', '.join(sorted(config.peers)) or '(none)'}")
    return EXIT_OK


def _client_logging(config: NodeConfig) -> None:
    """A client's stderr is for its answer: the node's log level is for serving, and
    pynetdicom's own error lines would repeat the one-line failure the client prints."""
    setup_logging("DEBUG" if config.log_level == "DEBUG" else "WARNING")
    if config.log_level != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def _peer_tls(config: NodeConfig, peer: Peer) -> ssl.SSLContext | None:
    """The context to call ``peer`` over TLS with: built (its files read) for a TLS peer only."""
    from node.tls import client_context

    return client_context(config.tls) if peer.tls and config.tls is not None else None


def _find(config: NodeConfig, args: argparse.Namespace) -> int:
    from node.cli_output import print_matches
    from node.remote.query import build_query, parse_key_values, resolve_peer
    from node.scu.find import find_query

    peer = resolve_peer(config, args.peer)
    query = build_query(args.level, parse_key_values(args.key), args.root)
    calling_ae = args.calling_ae or config.ae_title
    _client_logging(config)
    matches = list(find_query(peer, calling_ae, query, timeout=args.timeout,
                              tls=_peer_tls(config, peer)))
    print_matches(query.keys, matches, as_json=args.json, out=sys.stdout)
    print(f"{len(matches)} match{'' if len(matches) == 1 else 'es'}", file=sys.stderr)
    return EXIT_OK


def _echo(config: NodeConfig, args: argparse.Namespace) -> int:
    from node.remote.query import resolve_peer
    from node.scu.association import where
    from node.scu.echo import echo

    peer = resolve_peer(config, args.peer)
    _client_logging(config)
    times = echo(peer, args.calling_ae or config.ae_title, timeout=args.timeout,
                 tls=_peer_tls(config, peer))
    print(f"{where(peer)}: C-ECHO answered in {times.round_trip * 1000:.1f} ms "
          f"(association established in {times.association * 1000:.1f} ms)")
    return EXIT_OK


def _pull(config: NodeConfig, args: argparse.Namespace) -> int:
    from node.cli_progress import ProgressBar
    from node.index.holdings import Holdings
    from node.remote.pull import FetchRequest, SubOperations, fetch, plan_pull
    from node.remote.query import resolve_peer
    from node.remote.selection import Selection
    from node.scu.find import find_query
    from node.scu.retrieve import get, move
    from node.services import open_services

    started = time.monotonic()
    selection = Selection(args.patient_id or "", tuple(args.study), args.accession or "",
                          args.modality or "", args.date or "", args.all).check()
    peer = resolve_peer(config, args.peer)
    if args.peer not in config.peers:
        raise BadRequest(f"{args.peer} is this node's own AE title: pull from another peer")
    calling_ae, timeout = args.calling_ae or config.ae_title, args.timeout
    _client_logging(config)
    tls = _peer_tls(config, peer)
    services = open_services(config)
    try:
        holdings = Holdings(services.db)
        progress = ProgressBar(sys.stderr)
        plan = plan_pull(selection,
                         partial(find_query, peer, calling_ae, timeout=timeout, tls=tls),
                         holdings, progress)
        if plan.dropped:
            print(f"dicom-node: {plan.dropped} of the studies {peer.ae_title} answered do not "
                  "fit the selection; skipped", file=sys.stderr)
        if args.dry_run:
            _print_plan(plan)
            return EXIT_OK

        def retrieve(request: FetchRequest,
                     on_progress: Callable[[SubOperations], None]) -> SubOperations:
            if args.method == "get":
                return get(peer, calling_ae, request.identifier(), request.sop_classes,
                           services.ingestor.receive, timeout, on_progress, tls=tls)
            return move(peer, calling_ae, request.identifier(), config.ae_title, timeout,
                        on_progress, tls=tls)

        moving = args.method == "move" and plan.missing > 0
        with _receiving_moves(services) if moving else nullcontext(False):
            summary = fetch(plan, retrieve, holdings, progress, peer.ae_title, started)
    finally:
        services.close()
    print(f"pulled from {peer.ae_title}: {summary.line()}")
    for message, count in summary.errors.items():
        print(f"dicom-node: {message}{f' ({count} requests)' if count > 1 else ''}",
              file=sys.stderr)
    return EXIT_OK if summary.ok else EXIT_FAILURE


def _receiving_moves(services: Services) -> AbstractContextManager[bool]:
    """The node's own listener for the C-MOVE results: a temporary one, or a running node."""
    from node.remote.pull import move_destination
    from node.remote.query import resolve_peer
    from node.scu.echo import echo
    from node.server import start

    config = services.config
    if config.port == 0:
        raise BadRequest("port 0 in the configuration: a peer cannot send C-MOVE results to "
                         "an unknown port (set port, or use --method get)")
    itself = resolve_peer(config, config.ae_title)
    return move_destination(lambda: start(services),
                            lambda: echo(itself, config.ae_title, timeout=5.0),
                            config.ae_title)


def _print_plan(plan: Plan) -> None:
    """The dry run's answer: one row per selected study, then the totals."""
    from node.cli_output import table_lines

    columns = ["StudyInstanceUID", "StudyDate", "AccessionNumber", "Modalities", "Instances",
               "Held", "Fetch"]
    rows = [
        dict(zip(columns, [
            study.uid, study.date, study.accession, "\\".join(study.modalities),
            str(study.instances), str(len(study.held)),
            ", ".join(r.describe() for r in study.requests()) or "-",
        ], strict=True))
        for study in plan.studies
    ]
    print("\n".join(table_lines(columns, rows)))
    count = len(plan.studies)
    print(f"dry run: {count} {'study' if count == 1 else 'studies'}, {plan.instances} "
          f"instances, {plan.held} already held, {plan.missing} to fetch")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"must be 0 < SECONDS < 86400, got {text!r}")
    return value


def _find_arguments(command: argparse.ArgumentParser) -> None:
    from node.remote.query import LEVELS, ROOTS

    _peer_arguments(command, timeout=30.0)
    command.add_argument(
        "-L", "--level", type=str.upper, choices=LEVELS, default="STUDY",
        help="query level (default: STUDY)",
    )
    command.add_argument(
        "-k", "--key", action="append", default=[], metavar="KEY=VALUE",
        help="match KEY (a keyword such as PatientID, or a tag such as 0010,0020) against "
        "VALUE, or with an empty VALUE just return it; repeatable; added to the level's "
        "default keys",
    )
    command.add_argument(
        "--root", type=str.lower, choices=ROOTS,
        help="information model (default: patient for -L PATIENT, study otherwise)",
    )
    command.add_argument("--json", action="store_true", help="print a JSON list of matches")


def _peer_arguments(command: argparse.ArgumentParser, timeout: float) -> None:
    """PEER, --calling-ae and --timeout, as every client command takes them."""
    command.add_argument(
        "peer", metavar="PEER",
        help="AE title of a configured peer, or the node's own AE title to talk to this node",
    )
    command.add_argument(
        "--calling-ae", metavar="AE_TITLE", help="our AE title (default: the node's ae_title)"
    )
    command.add_argument(
        "--timeout", type=_seconds, default=timeout, metavar="SECONDS",
        help=f"limit on connecting and on each wait for the peer (default: {timeout:g})",
    )


def _echo_arguments(command: argparse.ArgumentParser) -> None:
    _peer_arguments(command, timeout=10.0)


PULL_EPILOG = """\
With --method move (the default) the peer sends the instances to this node's own AE title
(ae_title in the configuration) over a new association to this node's host and port: the
peer's administrator must have this node registered as a C-MOVE destination under that AE
title, host and port. If `dicom-node serve` runs with the same configuration, it receives
them; otherwise pull listens on the node's port itself while it runs. With --method get the
instances come back on pull's own association and the peer needs to know nothing about this
node. Instances the node already holds are never fetched again, so an interrupted pull
resumes where it stopped. Exit 0 when every instance is held at the end, 1 otherwise.
"""


def _pull_arguments(command: argparse.ArgumentParser) -> None:
    command.formatter_class = argparse.RawDescriptionHelpFormatter
    command.epilog = PULL_EPILOG
    _peer_arguments(command, timeout=60.0)
    pick = command.add_argument_group("selectors (at least one, or --all)")
    pick.add_argument("--patient-id", metavar="ID", help="studies of this Patient ID")
    pick.add_argument(
        "--study", action="append", default=[], metavar="UID",
        help="the study with this Study Instance UID (repeatable)",
    )
    pick.add_argument("--accession", metavar="NUMBER", help="studies with this Accession Number")
    pick.add_argument(
        "--modality", metavar="MOD", help="studies with a series of this modality (e.g. CT)"
    )
    pick.add_argument(
        "--date", metavar="YYYYMMDD[-YYYYMMDD]",
        help="studies of this Study Date or date range (open ranges: 20240101- or -20241231)",
    )
    pick.add_argument(
        "--all", action="store_true", help="every study the peer has (no selector needed)"
    )
    command.add_argument(
        "--method", choices=("move", "get"), default="move",
        help="C-MOVE to this node's AE title (default), or C-GET on pull's own association",
    )
    command.add_argument(
        "--dry-run", action="store_true",
        help="list the studies and what would be fetched, fetch nothing",
    )


Command = Callable[[NodeConfig, argparse.Namespace], int]

COMMANDS: dict[str, tuple[Command, str]] = {
    "serve": (_serve, "run the node in the foreground until SIGTERM/SIGINT"),
    "check-config": (_check_config, "validate a configuration file and say what is wrong"),
    "find": (
        _find, "query a peer (or this node: use its own AE title) with C-FIND and print the matches"
    ),
    "echo": (_echo, "check with C-ECHO that a peer (or this node) answers, and how fast"),
    "pull": (
        _pull, "fetch studies from a peer PACS onto this node (C-MOVE or C-GET), skipping what "
        "it already holds",
    ),
    "import": (run_import, "store DICOM files or folders from disk, as if received by C-STORE"),
    "verify": (
        run_verify, "check every indexed file is present and intact and every file indexed; "
        "--repair to fix",
    ),
    "reindex": (run_reindex, "rebuild the whole index from the store (serve must be stopped)"),
    "stats": (run_stats, "counts per level, store size, top modalities, last received"),
    "delete": (run_delete, "delete patients, studies, series or instances from the archive"),
    "migrate": (run_migrate, "copy the index into a new PostgreSQL database (serve stopped)"),
}
# Arguments a command takes besides -c/--config.
ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "find": _find_arguments,
    "echo": _echo_arguments,
    "pull": _pull_arguments,
    "import": import_arguments,
    "verify": verify_arguments,
    "reindex": reindex_arguments,
    "stats": stats_arguments,
    "delete": delete_arguments,
    "migrate": migrate_arguments,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node", description="A small, fast, trustworthy DICOM archive node."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument(
            "-c", "--config", type=Path, metavar="PATH",
            help="YAML configuration file (default: the embedded default configuration)",
        )
        if name in ARGUMENTS:
            ARGUMENTS[name](command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run, _ = COMMANDS[args.command]
    try:
        config = load_config(args.config)
        return run(config, args)
    except ConfigError as exc:
        print(f"dicom-node: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BadRequest as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (NodeError, SchemaMismatch, OSError) as exc:
        print(f"dicom-node: {_describe(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        target = exc.filename or ""
        return f"{exc.strerror}{f': {target}' if target else ''}"
    return str(exc)
