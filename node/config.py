"""Read the node's YAML configuration once into typed, frozen objects.

Every setting is described once in ``SETTINGS`` (name, default, help); the parser checks each
key against it, so an unknown key, a wrong type or a bad value stops start-up with a
``ConfigError`` whose message names the key.  Relative paths resolve against the folder of the
config file (or the working directory when the node runs on its embedded default).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

DEFAULT_AE_TITLE = "DICOMNODE"
DEFAULT_PORT = 11112


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the offending key."""


class DuplicatePolicy(StrEnum):
    """What to do when a SOP Instance UID we hold arrives again with different content."""

    KEEP = "keep"  # keep the first copy, answer Success (Orthanc's default)
    REPLACE = "replace"  # the newer copy wins
    REJECT = "reject"  # refuse the newer copy with a failure status


@dataclass(frozen=True)
class Peer:
    """A remote application entity the node knows by AE title."""

    ae_title: str
    host: str
    port: int
    # May C-MOVE requests (from anyone) send this peer instances? PS3.4 C.4.2.1.5: a
    # destination the node does not allow is answered 0xA801, as an unknown one.
    move_destination: bool = True


@dataclass(frozen=True)
class DatabaseURL:
    """Where the index lives: ``sqlite`` with a file path, or ``postgresql`` with a DSN."""

    scheme: str
    path: Path | None = None  # sqlite only
    url: str = ""  # the URL as written, for other backends

    def describe(self) -> str:
        """A printable form that never shows a password."""
        if self.path is not None:
            return f"sqlite:{self.path}"
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", self.url)


@dataclass(frozen=True)
class NodeConfig:
    """The whole configuration of one node; built only by ``load_config``/``default_config``."""

    ae_title: str
    bind: str
    port: int
    storage: Path
    database: DatabaseURL
    peers: Mapping[str, Peer] = field(default_factory=dict)
    duplicates: DuplicatePolicy = DuplicatePolicy.KEEP
    log_level: str = "INFO"
    max_associations: int = 16
    max_pdu: int = 262144
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 120.0
    database_retries: int = 3
    database_timeout: float = 10.0
    stop_grace: float = 10.0
    names_case_insensitive: bool = True
    find_max_matches: int = 0
    source: Path | None = None  # the file it came from, for messages


# --- value checkers: each takes the raw YAML value and the key, returns the typed value ------

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: AE, no backslash/controls


def _ae_title(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _AE_TITLE.match(value) or not value.strip():
        raise ConfigError(f"{key}: must be an AE title of 1-16 printable characters, no '\\'")
    return value.strip()


def _host(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise ConfigError(f"{key}: must be a host name or IP address")
    return value


def _port(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{key}: must be a port number 0-65535, got {value!r}")
    return value


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: must be a whole number of at least 1, got {value!r}")
    return value


def _non_negative_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}: must be a whole number of at least 0, got {value!r}")
    return value


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def _seconds(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{key}: must be a number of seconds above 0, got {value!r}")
    return float(value)


def _max_pdu(value: Any, key: str) -> int:
    # PS3.8 D.3.3.2.1: 0 means unlimited; anything else must hold a PDV header and some data.
    if isinstance(value, bool) or not isinstance(value, int) or not (value == 0 or value >= 4096):
        raise ConfigError(f"{key}: must be 0 (unlimited) or at least 4096 bytes, got {value!r}")
    return value


def _choice(*choices: str) -> Callable[[Any, str], str]:
    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    return check


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty string")
    return value


@dataclass(frozen=True)
class Setting:
    """One top-level key: how to check it, its default, and what it means."""

    check: Callable[[Any, str], Any]
    default: Any
    help: str


SETTINGS: dict[str, Setting] = {
    "ae_title": Setting(_ae_title, DEFAULT_AE_TITLE, "the node's own AE title"),
    "bind": Setting(_host, "0.0.0.0", "address the DICOM listener binds to"),
    "port": Setting(_port, DEFAULT_PORT, "TCP port of the DICOM listener"),
    "storage": Setting(_string, "storage", "directory of the content-hashed store"),
    "database": Setting(_string, None, "index URL; default: SQLite inside the store"),
    "peers": Setting(lambda v, k: v, {}, "remote AEs: AE title -> {host, port}"),
    "duplicates": Setting(
        _choice("keep", "replace", "reject"), "keep", "same SOP Instance UID, other content"
    ),
    "log_level": Setting(_choice("debug", "info", "warning", "error"), "info", "log verbosity"),
    "max_associations": Setting(_positive_int, 16, "associations served at once"),
    "max_pdu": Setting(_max_pdu, 262144, "largest PDU the node accepts, bytes (0: unlimited)"),
    "acse_timeout": Setting(_seconds, 30.0, "seconds to wait for association messages"),
    "dimse_timeout": Setting(_seconds, 60.0, "seconds to wait for DIMSE messages"),
    "network_timeout": Setting(_seconds, 120.0, "seconds an idle association is kept"),
    "database_retries": Setting(_non_negative_int, 3, "retries of a failed index write"),
    "database_timeout": Setting(_seconds, 10.0, "seconds to wait for a locked index"),
    "stop_grace": Setting(_seconds, 10.0, "seconds open associations get to finish on stop"),
    "names_case_insensitive": Setting(_boolean, True, "C-FIND person names ignore case"),
    "find_max_matches": Setting(_non_negative_int, 0, "C-FIND answers at most this (0: all)"),
}

# Keys a running node takes on when it reloads its configuration (SIGHUP, node.config_reload).
# Every other key went into something built once at start-up (the listening socket, the AE's
# title and limits, the store, the index connection, the C-FIND engine), so changing it needs a
# restart; a new key is in that group until someone makes it live and lists it here.
LIVE_KEYS = frozenset({"peers", "log_level", "stop_grace"})


def changed_keys(old: NodeConfig, new: NodeConfig) -> list[str]:
    """The settings whose values differ between two configs, in NodeConfig's field order.

    Values are compared as parsed (paths resolved, defaults filled in), so rewriting a value
    in another form is not a change; ``source`` says where a config came from, not what it is.
    """
    return [f.name for f in fields(NodeConfig)
            if f.name != "source" and getattr(old, f.name) != getattr(new, f.name)]


_PEER_KEYS = {"host", "port"}  # required
_PEER_OPTIONAL = {"move_destination"}


def _peers(raw: Any) -> dict[str, Peer]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("peers: must be a mapping from AE title to {host, port}")
    peers: dict[str, Peer] = {}
    for title, spec in raw.items():
        key = f"peers.{title}"
        ae = _ae_title(title, key)
        if not isinstance(spec, dict):
            raise ConfigError(f"{key}: must be a mapping with host and port")
        unknown = sorted(set(map(str, spec)) - _PEER_KEYS - _PEER_OPTIONAL)
        if unknown:
            allowed = ", ".join(sorted(_PEER_KEYS | _PEER_OPTIONAL))
            raise ConfigError(f"{key}.{unknown[0]}: unknown key (allowed: {allowed})")
        for needed in sorted(_PEER_KEYS - set(spec)):
            raise ConfigError(f"{key}.{needed}: missing")
        port = _port(spec["port"], f"{key}.port")
        if port == 0:
            raise ConfigError(f"{key}.port: must be a port number 1-65535")
        destination = _boolean(spec.get("move_destination", True), f"{key}.move_destination")
        peers[ae] = Peer(ae, _host(spec["host"], f"{key}.host"), port, destination)
    return peers


def parse_database_url(value: str, base: Path) -> DatabaseURL:
    """Turn ``sqlite:///rel``, ``sqlite:////abs`` or ``postgresql://…`` into a DatabaseURL."""
    if value.startswith("sqlite:///"):
        rest = value[len("sqlite:///") :]
        if not rest or rest == "/":
            raise ConfigError("database: sqlite URL needs a file path")
        path = Path(rest)  # "sqlite:////abs" leaves "/abs": absolute; otherwise relative
        return DatabaseURL("sqlite", path=path if path.is_absolute() else (base / path))
    if re.match(r"^postgres(ql)?://[^/]*/\w+", value):
        return DatabaseURL("postgresql", url=value)
    raise ConfigError(
        f"database: unsupported URL {value!r} (use sqlite:///path or postgresql://host/db)"
    )


def build_config(raw: Mapping[str, Any], base: Path, source: Path | None = None) -> NodeConfig:
    """Check a parsed YAML mapping and build the frozen config; paths resolve against ``base``."""
    unknown = sorted(set(map(str, raw)) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key")
    values: dict[str, Any] = {}
    for name, setting in SETTINGS.items():
        value = raw.get(name, setting.default)
        if name == "peers":
            values[name] = _peers(value)
        elif value is None:
            values[name] = None
        else:
            values[name] = setting.check(value, name)
    storage = (base / values["storage"]).resolve()
    database = (
        parse_database_url(values["database"], base)
        if values["database"]
        else DatabaseURL("sqlite", path=storage / "index.sqlite")
    )
    return NodeConfig(
        ae_title=values["ae_title"],
        bind=values["bind"],
        port=values["port"],
        storage=storage,
        database=database,
        peers=values["peers"],
        duplicates=DuplicatePolicy(values["duplicates"]),
        log_level=values["log_level"].upper(),
        max_associations=values["max_associations"],
        max_pdu=values["max_pdu"],
        acse_timeout=values["acse_timeout"],
        dimse_timeout=values["dimse_timeout"],
        network_timeout=values["network_timeout"],
        database_retries=values["database_retries"],
        database_timeout=values["database_timeout"],
        stop_grace=values["stop_grace"],
        names_case_insensitive=values["names_case_insensitive"],
        find_max_matches=values["find_max_matches"],
        source=source,
    )


def load_config(path: Path | None) -> NodeConfig:
    """Read ``path`` (or the embedded default when None) into a NodeConfig."""
    if path is None:
        return build_config({}, Path.cwd())
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return build_config(raw, path.resolve().parent, source=path)
