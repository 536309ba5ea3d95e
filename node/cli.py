"""The command line: ``dicom-node SUBCOMMAND [-c CONFIG] …``; ``main(argv)`` returns the exit code.

Every failure the node expects ends as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from node import __version__
from node.config import ConfigError, NodeConfig, load_config
from node.errors import NodeError
from node.index.database import SchemaMismatch
from node.logs import setup_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


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


Command = Callable[[NodeConfig, argparse.Namespace], int]

COMMANDS: dict[str, tuple[Command, str]] = {
    "serve": (_serve, "run the node in the foreground until SIGTERM/SIGINT"),
    "check-config": (_check_config, "validate a configuration file and say what is wrong"),
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
