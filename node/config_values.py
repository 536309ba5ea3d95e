"""The value checkers of the configuration: each takes a raw YAML value and its key, and returns
the typed value or raises ConfigError naming the key (node.config, node.config_peers)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the offending key."""


_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: AE, no backslash/controls


def ae_title(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _AE_TITLE.match(value) or not value.strip():
        raise ConfigError(f"{key}: must be an AE title of 1-16 printable characters, no '\\'")
    return value.strip()


def host(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise ConfigError(f"{key}: must be a host name or IP address")
    return value


def port(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{key}: must be a port number 0-65535, got {value!r}")
    return value


def positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: must be a whole number of at least 1, got {value!r}")
    return value


def non_negative_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}: must be a whole number of at least 0, got {value!r}")
    return value


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def seconds(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{key}: must be a number of seconds above 0, got {value!r}")
    return float(value)


def max_pdu(value: Any, key: str) -> int:
    # PS3.8 D.3.3.2.1: 0 means unlimited; anything else must hold a PDV header and some data.
    if isinstance(value, bool) or not isinstance(value, int) or not (value == 0 or value >= 4096):
        raise ConfigError(f"{key}: must be 0 (unlimited) or at least 4096 bytes, got {value!r}")
    return value


def choice(*choices: str) -> Callable[[Any, str], str]:
    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    return check


def string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty string")
    return value


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size(value: Any, key: str) -> int:
    """A number of bytes: a whole number, or a string such as ``500 GB`` or ``2 GiB``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{key}: must be a size in bytes or with a unit (e.g. 500 GB, "
                          f"2 GiB), got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


def string_set(value: Any, key: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{key}: must be a list of non-empty strings")
    return frozenset(v.strip() for v in value)


def section(value: Any, key: str, spec: dict[str, Callable[[Any, str], Any]]) -> dict[str, Any]:
    """Check a mapping-valued key: every sub-key known, each value checked by ``spec``."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a mapping with keys {', '.join(spec)}")
    unknown = sorted(set(map(str, value)) - set(spec))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (allowed: {', '.join(spec)})")
    return {name: spec[name](value[name], f"{key}.{name}") for name in spec if name in value}
