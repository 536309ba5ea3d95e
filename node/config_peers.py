"""The ``peers`` of the configuration: remote AEs, and what each may ask of the node.

A peer is where the node calls (C-MOVE destinations, ``dicom-node find/echo/pull``) and who may
call it (``services``, ``move_destinations``, ``check_address``; node.access applies them).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from node import config_values as check
from node.config_values import ConfigError


class Service(StrEnum):
    """The DIMSE services a calling AE may be allowed (PS3.4 A, B, C)."""

    ECHO = "echo"
    STORE = "store"
    FIND = "find"
    GET = "get"
    MOVE = "move"


ALL_SERVICES = frozenset(Service)


class UnknownPeers(StrEnum):
    """What a calling AE title that is not among ``peers`` may do."""

    NONE = "none"  # nothing: its association is rejected
    ECHO = "echo"
    STORE = "store"  # echo and store (the default: any modality may send)
    ALL = "all"  # everything, query and retrieve included (a closed test network only)

    @property
    def services(self) -> frozenset[Service]:
        return {
            UnknownPeers.NONE: frozenset(),
            UnknownPeers.ECHO: frozenset({Service.ECHO}),
            UnknownPeers.STORE: frozenset({Service.ECHO, Service.STORE}),
            UnknownPeers.ALL: ALL_SERVICES,
        }[self]


@dataclass(frozen=True)
class Peer:
    """A remote application entity the node knows by AE title."""

    ae_title: str
    host: str
    port: int
    # May C-MOVE requests (from anyone) send this peer instances? PS3.4 C.4.2.1.5: a
    # destination the node does not allow is answered 0xA801, as an unknown one.
    move_destination: bool = True
    # What it may ask of the node when it calls (all by default).
    services: frozenset[Service] = ALL_SERVICES
    # Where its C-MOVEs may send (AE titles of peers); None: any allowed destination.
    move_destinations: frozenset[str] | None = None
    # Accept an association calling as this AE title only from the address(es) of ``host``.
    check_address: bool = False
    # Call it over DICOM TLS (the node's tls settings give certificate, key and CA).
    tls: bool = False


_PEER_KEYS = {"host", "port"}  # required
_PEER_OPTIONAL = {"move_destination", "services", "move_destinations", "check_address",
                  "tls"}


def parse_services(value: Any, key: str) -> frozenset[Service]:
    names = [s.value for s in Service]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: must be a list of services ({', '.join(names)})")
    for item in value:
        if item.lower() not in names:
            raise ConfigError(f"{key}: unknown service {item!r} (known: {', '.join(names)})")
    return frozenset(Service(v.lower()) for v in value)



def parse_peers(raw: Any) -> dict[str, Peer]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("peers: must be a mapping from AE title to {host, port}")
    peers: dict[str, Peer] = {}
    for title, spec in raw.items():
        key = f"peers.{title}"
        ae = check.ae_title(title, key)
        if not isinstance(spec, dict):
            raise ConfigError(f"{key}: must be a mapping with host and port")
        unknown = sorted(set(map(str, spec)) - _PEER_KEYS - _PEER_OPTIONAL)
        if unknown:
            allowed = ", ".join(sorted(_PEER_KEYS | _PEER_OPTIONAL))
            raise ConfigError(f"{key}.{unknown[0]}: unknown key (allowed: {allowed})")
        for needed in sorted(_PEER_KEYS - set(spec)):
            raise ConfigError(f"{key}.{needed}: missing")
        port = check.port(spec["port"], f"{key}.port")
        if port == 0:
            raise ConfigError(f"{key}.port: must be a port number 1-65535")
        destination = check.boolean(spec.get("move_destination", True), f"{key}.move_destination")
        services = (parse_services(spec["services"], f"{key}.services") if "services" in spec
                    else ALL_SERVICES)
        destinations = None
        if "move_destinations" in spec:
            listed = check.string_set(spec["move_destinations"], f"{key}.move_destinations")
            destinations = frozenset(check.ae_title(title, f"{key}.move_destinations")
                                     for title in listed)
        check_address = check.boolean(spec.get("check_address", False), f"{key}.check_address")
        tls = check.boolean(spec.get("tls", False), f"{key}.tls")
        peers[ae] = Peer(ae, check.host(spec["host"], f"{key}.host"), port, destination, services,
                         destinations, check_address, tls)
    for peer in peers.values():  # a typo would silently refuse every C-MOVE of that peer
        for title in sorted(peer.move_destinations or ()):
            if title not in peers:
                raise ConfigError(f"peers.{peer.ae_title}.move_destinations: {title!r} is not "
                                  "a configured peer")
    return peers
