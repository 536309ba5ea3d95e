"""The command line: ``dicom-node SUBCOMMAND [-c CONFIG] …``; ``main(argv)`` returns the exit code.

Every failure the node expects ends as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from node import __version__
from node.config import ConfigError, NodeConfig, load_config
from node.errors import NodeError
from node.index.database import SchemaMismatch
from node.logs import setup_logging
from node.remote.errors import BadRequest

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


def _find(config: NodeConfig, args: argparse.Namespace) -> int:
    from node.cli_output import print_matches
    from node.remote.query import build_query, parse_key_values, resolve_peer
    from node.scu.find import find_query

    peer = resolve_peer(config, args.peer)
    query = build_query(args.level, parse_key_values(args.key), args.root)
    calling_ae = args.calling_ae or config.ae_title
    # A client's stderr is for its answer: the node's log level is for serving, and
    # pynetdicom's own error lines would repeat the one-line failure the client prints.
    setup_logging("DEBUG" if config.log_level == "DEBUG" else "WARNING")
    if config.log_level != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    matches = list(find_query(peer, calling_ae, query, timeout=args.timeout))
    print_matches(query.keys, matches, as_json=args.json, out=sys.stdout)
    print(f"{len(matches)} match{'' if len(matches) == 1 else 'es'}", file=sys.stderr)
    return EXIT_OK


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

    command.add_argument(
        "peer", metavar="PEER",
        help="AE title of a configured peer, or the node's own AE title to query this node",
    )
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
    command.add_argument(
        "--calling-ae", metavar="AE_TITLE", help="our AE title (default: the node's ae_title)"
    )
    command.add_argument(
        "--timeout", type=_seconds, default=30.0, metavar="SECONDS",
        help="limit on connecting and on each wait for the peer (default: 30)",
    )


Command = Callable[[NodeConfig, argparse.Namespace], int]

COMMANDS: dict[str, tuple[Command, str]] = {
    "serve": (_serve, "run the node in the foreground until SIGTERM/SIGINT"),
    "check-config": (_check_config, "validate a configuration file and say what is wrong"),
    "find": (
        _find, "query a peer (or this node: use its own AE title) with C-FIND and print the matches"
    ),
}
# Arguments a command takes besides -c/--config.
ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "find": _find_arguments,
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
