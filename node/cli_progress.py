"""The progress of a pull on stderr: a bar redrawn in place on a terminal, plain lines otherwise.

On a terminal: ``[#########...........]  120/200 instances  35.2/s  2 failed  0:03``, redrawn
at most ten times a second and cleared at the end. Anywhere else (a log file, a pipe) a redrawn
line would be noise, so a plain line goes out every ``interval`` seconds, the first one only
after the first interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 24
REDRAW_EVERY = 0.1  # seconds, on a terminal
PLAIN_EVERY = 10.0  # seconds, elsewhere


class ProgressBar:
    """Implements ``node.remote.pull.Progress`` on a text stream (normally stderr)."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic,
                 interval: float = PLAIN_EVERY, tty: bool | None = None) -> None:
        self.stream = stream
        self.clock = clock
        self.tty = stream.isatty() if tty is None else tty
        self.interval = REDRAW_EVERY if self.tty else interval
        self.total = 0
        self.done = 0
        self.failed = 0
        self._started = 0.0
        # When the last line was drawn. Off a terminal the first line waits a whole interval,
        # so a quick pull writes nothing but its summary.
        self._shown = float("-inf") if self.tty else clock()
        self._drawn = False  # a bar is on the terminal's current line

    def listing(self, done: int, total: int) -> None:
        """Listing the instances of study ``done`` of ``total`` at the remote."""
        now = self.clock()
        if done < total and now - self._shown >= self.interval:
            self._show(f"listing study {done + 1} of {total} at the peer", now)

    def start(self, total: int) -> None:
        self.total = total
        self.done = self.failed = 0
        self._started = self.clock()
        if total and self.tty:
            self._show(self.text(), self._started)

    def update(self, done: int, failed: int) -> None:
        self.done, self.failed = done, failed
        now = self.clock()
        if now - self._shown >= self.interval:
            self._show(self.text(), now)

    def finish(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")  # the summary takes the line's place
            self.stream.flush()
            self._drawn = False

    def text(self) -> str:
        """The progress line: bar (terminal only), done of total, rate, failures, time."""
        elapsed = max(self.clock() - self._started, 0.0)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        minutes, seconds = divmod(int(elapsed), 60)
        parts = [f"{self.done}/{self.total} instances", f"{rate:.1f}/s"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        parts.append(f"{minutes}:{seconds:02d}")
        if not self.tty:
            return "pull: " + ", ".join(parts)
        filled = BAR_WIDTH * self.done // self.total if self.total else BAR_WIDTH
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return f"[{bar}]  " + "  ".join(parts)

    def _show(self, text: str, now: float) -> None:
        self._shown = now
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
