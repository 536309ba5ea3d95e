"""Who may talk to the node, and what each may ask: the access rules of the configuration.

Decisions only (no pynetdicom, no statuses): ``node.handlers.access`` turns them into
A-ASSOCIATE-RJ reasons and DIMSE statuses.  Every decision reads the config in force at that
moment, so a reload (SIGHUP) applies to the next association and the next request.

The calling AE title is what a peer says it is (PS3.8 offers nothing stronger); a peer with
``check_address`` must also call from an address of its configured ``host``, and TLS client
certificates bind it further.  The node's own AE title calling from this host (loopback) is the
administrator's own commands (``dicom-node find``, ``echo``) and may do everything.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from functools import lru_cache

from node.config import ALL_SERVICES, NodeConfig, Peer, Service

log = logging.getLogger(__name__)

# How long a peer host's resolved addresses are trusted before they are looked up again.
_RESOLVE_TTL = 60.0


@dataclass(frozen=True)
class Admission:
    """Whether an association may be accepted, and why not."""

    accepted: bool
    reason: str = ""
    transient: bool = False  # a limit of the moment, not a rule: the peer may try again later


ACCEPTED = Admission(True)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _time_slot() -> int:
    return int(time.monotonic() // _RESOLVE_TTL)


@lru_cache(maxsize=256)
def _addresses(host: str, slot: int) -> frozenset[str]:
    """The addresses ``host`` resolves to (cached per time slot; empty when it does not)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        log.warning("cannot resolve peer host %s: %s", host, exc)
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)


def _same_host(peer: Peer, address: str) -> bool:
    if address == peer.host:
        return True
    try:  # ::ffff:10.0.0.5 is 10.0.0.5
        ip = ipaddress.ip_address(address)
        mapped = getattr(ip, "ipv4_mapped", None)
        if mapped is not None:
            address = str(mapped)
    except ValueError:
        return False
    return address in _addresses(peer.host, _time_slot())


def services_of(config: NodeConfig, calling_ae: str, address: str) -> frozenset[Service]:
    """What the AE calling as ``calling_ae`` from ``address`` may ask of the node."""
    peer = config.peers.get(calling_ae)
    if peer is not None:
        return peer.services
    if calling_ae == config.ae_title and _is_loopback(address):
        return ALL_SERVICES
    return config.unknown_peers.services


def admit(config: NodeConfig, calling_ae: str, address: str, open_from_same: int) -> Admission:
    """May an association from ``calling_ae`` at ``address`` be accepted?

    ``open_from_same``: associations the same calling AE title holds already.
    """
    peer = config.peers.get(calling_ae)
    if peer is not None and peer.check_address and not _same_host(peer, address):
        return Admission(False, f"calling AE title {calling_ae!r} is configured for host "
                                f"{peer.host}, not {address}")
    if not services_of(config, calling_ae, address):
        return Admission(False, f"calling AE title {calling_ae!r} is not a configured peer "
                                "and unknown_peers is none")
    limit = config.max_associations_per_peer
    if limit and open_from_same >= limit:
        return Admission(False, f"{calling_ae!r} holds {open_from_same} associations already "
                                f"(max_associations_per_peer {limit})", transient=True)
    return ACCEPTED


def may(config: NodeConfig, calling_ae: str, address: str, service: Service) -> bool:
    """May this caller use ``service``?"""
    return service in services_of(config, calling_ae, address)


def move_destination(config: NodeConfig, calling_ae: str, destination: str) -> Peer | str:
    """The peer a C-MOVE from ``calling_ae`` may send to as ``destination``, or why not."""
    peer = config.peers.get(destination)
    if peer is None:
        return f"{destination!r} is not a configured peer"
    if not peer.move_destination:
        return f"{destination!r} is not a move destination"
    caller = config.peers.get(calling_ae)
    allowed = caller.move_destinations if caller is not None else None
    if allowed is not None and destination not in allowed:
        return f"{calling_ae!r} may not move to {destination!r}"
    return peer
