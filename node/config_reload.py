"""The running configuration, and reloading it from its file while the node serves (SIGHUP).

Configs stay frozen: a reload reads the file into a whole new NodeConfig and, when it may be
applied, swaps the one reference ``LiveConfig`` holds.  Whoever needs a value that can change
(the C-MOVE handler looking up its destination, the stop that reads ``stop_grace``) asks the
holder each time, and sees the old config or the new one, never a mix of the two.

All or nothing: the file is applied only if every key that differs from the running config is
live-changeable (``node.config.LIVE_KEYS``).  If any other key differs (``port``, ``ae_title``,
``storage``, ...), nothing is applied and the log names those keys; a file that does not parse
or check is refused the same way with the error naming the key.  Either way the node keeps
serving with the config it had, which is always one file the administrator wrote as a whole,
never a mixture of two versions of it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from node.config import LIVE_KEYS, ConfigError, NodeConfig, Peer, changed_keys, load_config

log = logging.getLogger(__name__)


class LiveConfig:
    """Holds the config in force; ``current`` is read per request, ``replace`` swaps it.

    Only the main thread replaces it (node.server's loop), and replacing or reading one
    attribute is atomic in CPython, so readers need no lock.
    """

    def __init__(self, config: NodeConfig) -> None:
        self._current = config

    @property
    def current(self) -> NodeConfig:
        return self._current

    def replace(self, config: NodeConfig) -> None:
        self._current = config


class Outcome(StrEnum):
    APPLIED = "applied"
    UNCHANGED = "unchanged"
    NEEDS_RESTART = "refused: needs a restart"
    INVALID = "refused: invalid"
    NO_FILE = "no file"


@dataclass(frozen=True)
class Reload:
    """What a reload did: its outcome, the keys that changed (or would have) and why."""

    outcome: Outcome
    changed: tuple[str, ...] = ()
    reason: str = ""

    @property
    def applied(self) -> bool:
        return self.outcome is Outcome.APPLIED

    def status(self) -> str:
        """One short line for systemd's STATUS (``systemctl status``)."""
        if self.outcome is Outcome.APPLIED:
            return f"configuration reloaded: {', '.join(self.changed)} changed"
        if self.outcome is Outcome.NEEDS_RESTART:
            return f"reload refused, restart needed for: {self.reason}"
        if self.outcome is Outcome.INVALID:
            return f"reload refused, invalid configuration: {self.reason}"
        if self.outcome is Outcome.NO_FILE:
            return "nothing to reload: running on the embedded default configuration"
        return "configuration reloaded: unchanged"


def reload_config(live: LiveConfig) -> Reload:
    """Read the running config's file again and apply it if it may be; log what happened."""
    current = live.current
    if current.source is None:
        log.warning("reload: the node runs on the embedded default configuration (no -c "
                    "file), nothing to reload")
        return Reload(Outcome.NO_FILE)
    try:
        new = load_config(current.source)
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays in force: %s", exc)
        return Reload(Outcome.INVALID, reason=str(exc))
    changed = changed_keys(current, new)
    restart = [key for key in changed if key not in LIVE_KEYS]
    if restart:
        live_too = [key for key in changed if key in LIVE_KEYS]
        log.error(
            "reload refused: %s cannot change while the node runs (restart it to apply); "
            "the running configuration stays in force as a whole%s",
            ", ".join(restart),
            f", so {', '.join(live_too)} did not change either" if live_too else "",
        )
        return Reload(Outcome.NEEDS_RESTART, tuple(changed), reason=", ".join(restart))
    if not changed:
        log.info("configuration %s reloaded: nothing changed", current.source)
        return Reload(Outcome.UNCHANGED)
    details = [_describe_peers(current.peers, new.peers) if key == "peers"
               else f"{key} {getattr(current, key)} -> {getattr(new, key)}" for key in changed]
    live.replace(new)
    log.info("configuration %s reloaded: %s", current.source, "; ".join(details))
    return Reload(Outcome.APPLIED, tuple(changed))


def _describe_peers(old: Mapping[str, Peer], new: Mapping[str, Peer]) -> str:
    """``peers +ADDED -REMOVED ~CHANGED`` by AE title (titles only: no patient data here)."""
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    modified = sorted(title for title in set(old) & set(new) if old[title] != new[title])
    parts = ([f"+{t}" for t in added] + [f"-{t}" for t in removed]
             + [f"~{t}" for t in modified])
    return f"peers {' '.join(parts)}"
