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

from node import config_values as check
from node.config_peers import ALL_SERVICES as ALL_SERVICES
from node.config_peers import Peer as Peer
from node.config_peers import Service as Service
from node.config_peers import UnknownPeers as UnknownPeers
from node.config_peers import parse_peers
from node.config_values import ConfigError as ConfigError
from node.store_sync import StoreSync

DEFAULT_AE_TITLE = "DICOMNODE"
DEFAULT_PORT = 11112


class DuplicatePolicy(StrEnum):
    """What to do when a SOP Instance UID we hold arrives again with different content."""

    KEEP = "keep"  # keep the first copy, answer Success (Orthanc's default)
    REPLACE = "replace"  # the newer copy wins
    REJECT = "reject"  # refuse the newer copy with a failure status


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
class MetricsEndpoint:
    """Where the optional Prometheus endpoint listens (HTTP, ``/metrics``)."""

    bind: str = "127.0.0.1"
    port: int = 9112


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS (PS3.15 B.9-B.12): the node's certificate, and whom it trusts.

    ``port`` is the TLS listener (beside the plain one); the certificate and key also serve
    the node's outgoing TLS associations (peers with ``tls: true``), where ``ca`` verifies the
    peer's certificate.  On the listener, ``ca`` verifies client certificates, which are
    required only with ``require_client_certificate``.
    """

    port: int
    certificate: Path
    key: Path
    ca: Path | None = None
    require_client_certificate: bool = False


@dataclass(frozen=True)
class Retention:
    """When the node deletes studies by itself (oldest received first), and which never.

    ``max_store_size`` bounds the bytes of the indexed files; ``max_age_days`` the days since a
    study's first instance arrived.  0 turns a limit off; with both off nothing is deleted.
    """

    max_store_size: int = 0
    max_age_days: int = 0
    protected_patients: frozenset[str] = frozenset()
    protected_studies: frozenset[str] = frozenset()
    check_interval: float = 60.0

    @property
    def enabled(self) -> bool:
        return bool(self.max_store_size or self.max_age_days)


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
    max_instance_size: int = 2 * 1024**3
    metrics: MetricsEndpoint | None = None
    retention: Retention = Retention()
    unknown_peers: UnknownPeers = UnknownPeers.STORE
    max_associations_per_peer: int = 0
    tls: TlsSettings | None = None
    min_free_space: int = 100 * 1000**2
    reuse_port: bool = False
    store_sync: StoreSync = StoreSync.FILESYSTEM
    source: Path | None = None  # the file it came from, for messages


def _metrics(value: Any, key: str) -> MetricsEndpoint:
    checked = check.section(value, key, {"bind": check.host, "port": check.port})
    if checked.get("port") == 0:
        raise ConfigError(f"{key}.port: must be a port number 1-65535")
    return MetricsEndpoint(**checked)


def _retention(value: Any, key: str) -> Retention:
    checked = check.section(value, key, {
        "max_store_size": check.size, "max_age_days": check.non_negative_int,
        "protected_patients": check.string_set, "protected_studies": check.string_set,
        "check_interval": check.seconds,
    })
    return Retention(**checked)


def _instance_size(value: Any, key: str) -> int:
    size = check.size(value, key)
    if size < 1024:
        raise ConfigError(f"{key}: must be at least 1 KiB, got {value!r}")
    return size


@dataclass(frozen=True)
class Setting:
    """One top-level key: how to check it, its default, and what it means."""

    check: Callable[[Any, str], Any]
    default: Any
    help: str


SETTINGS: dict[str, Setting] = {
    "ae_title": Setting(check.ae_title, DEFAULT_AE_TITLE, "the node's own AE title"),
    "bind": Setting(check.host, "0.0.0.0", "address the DICOM listener binds to"),
    "port": Setting(check.port, DEFAULT_PORT, "TCP port of the DICOM listener"),
    "storage": Setting(check.string, "storage", "directory of the content-hashed store"),
    "database": Setting(check.string, None, "index URL; default: SQLite inside the store"),
    "peers": Setting(lambda v, k: v, {}, "remote AEs: AE title -> {host, port}"),
    "duplicates": Setting(
        check.choice("keep", "replace", "reject"), "keep", "same SOP Instance UID, other content"
    ),
    "log_level": Setting(check.choice("debug", "info", "warning", "error"), "info",
                         "log verbosity"),
    "max_associations": Setting(check.positive_int, 16, "associations served at once"),
    "max_pdu": Setting(check.max_pdu, 262144, "largest PDU the node accepts, bytes (0: unlimited)"),
    "acse_timeout": Setting(check.seconds, 30.0, "seconds to wait for association messages"),
    "dimse_timeout": Setting(check.seconds, 60.0, "seconds to wait for DIMSE messages"),
    "network_timeout": Setting(check.seconds, 120.0, "seconds an idle association is kept"),
    "database_retries": Setting(check.non_negative_int, 3, "retries of a failed index write"),
    "database_timeout": Setting(check.seconds, 10.0, "seconds to wait for a locked index"),
    "stop_grace": Setting(check.seconds, 10.0, "seconds open associations get to finish on stop"),
    "names_case_insensitive": Setting(check.boolean, True, "C-FIND person names ignore case"),
    "find_max_matches": Setting(check.non_negative_int, 0, "C-FIND answers at most this (0: all)"),
    "max_instance_size": Setting(_instance_size, 2 * 1024**3,
                                 "largest instance a C-STORE may send, bytes or with a unit"),
    "metrics": Setting(_metrics, None, "Prometheus endpoint {bind, port}; absent: none"),
    "retention": Setting(_retention, None, "automatic deletion of the oldest studies"),
    "unknown_peers": Setting(check.choice(*(u.value for u in UnknownPeers)), "store",
                             "what calling AEs not among peers may do"),
    "max_associations_per_peer": Setting(check.non_negative_int, 0,
                                         "associations one calling AE title may hold (0: any)"),
    "tls": Setting(lambda v, k: v, None, "DICOM TLS listener and outgoing TLS; absent: none"),
    "min_free_space": Setting(check.size, "100 MB",
                              "C-STORE answers 0xA700 while the store's disk has less free"),
    "reuse_port": Setting(check.boolean, False,
                          "several nodes on this host may listen on the same port"),
    "store_sync": Setting(check.choice(*(s.value for s in StoreSync)), "filesystem",
                          "new files made durable by one shared syncfs, or an fsync each"),
}

# Keys a running node takes on when it reloads its configuration (SIGHUP, node.config_reload).
# Every other key went into something built once at start-up (the listening socket, the AE's
# title and limits, the store, the index connection, the C-FIND engine), so changing it needs a
# restart; a new key is in that group until someone makes it live and lists it here.
LIVE_KEYS = frozenset({"peers", "log_level", "stop_grace", "retention", "unknown_peers",
                       "max_associations_per_peer"})


def changed_keys(old: NodeConfig, new: NodeConfig) -> list[str]:
    """The settings whose values differ between two configs, in NodeConfig's field order.

    Values are compared as parsed (paths resolved, defaults filled in), so rewriting a value
    in another form is not a change; ``source`` says where a config came from, not what it is.
    """
    return [f.name for f in fields(NodeConfig)
            if f.name != "source" and getattr(old, f.name) != getattr(new, f.name)]


def _tls(raw: Any, base: Path) -> TlsSettings | None:
    """The ``tls`` section; file paths resolve against ``base`` (checked at start-up)."""
    if raw is None:
        return None
    spec: dict[str, Callable[[Any, str], Any]] = {
        "port": check.port, "certificate": check.string, "key": check.string,
        "ca": check.string, "require_client_certificate": check.boolean}
    checked = check.section(raw, "tls", spec)
    for needed in ("port", "certificate", "key"):
        if needed not in checked:
            raise ConfigError(f"tls.{needed}: missing")
    if checked["port"] == 0:
        raise ConfigError("tls.port: must be a port number 1-65535")
    if checked.get("require_client_certificate") and "ca" not in checked:
        raise ConfigError("tls.require_client_certificate: needs tls.ca to verify them against")
    return TlsSettings(
        port=checked["port"], certificate=(base / checked["certificate"]).resolve(),
        key=(base / checked["key"]).resolve(),
        ca=(base / checked["ca"]).resolve() if "ca" in checked else None,
        require_client_certificate=checked.get("require_client_certificate", False))


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
            values[name] = parse_peers(value)
        elif name == "tls":
            values[name] = _tls(value, base)
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
        max_instance_size=values["max_instance_size"],
        metrics=values["metrics"],
        retention=values["retention"] or Retention(),
        unknown_peers=UnknownPeers(values["unknown_peers"]),
        max_associations_per_peer=values["max_associations_per_peer"],
        tls=values["tls"],
        min_free_space=values["min_free_space"],
        reuse_port=values["reuse_port"],
        store_sync=StoreSync(values["store_sync"]),
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
