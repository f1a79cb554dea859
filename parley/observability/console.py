"""What the console tells a person while the server works: weights loading, and load when busy.

- `LoadProgress`: while weights load, a bar redrawn in place on a terminal, with tensors, MB and
  MB/s; in a log file (stderr not a terminal) a line every few seconds instead, so a slow load of
  a large model still shows it moves, and a quick one stays one line.
- `StatusLine`: a short line of what the server is doing (requests running and waiting, tokens/s,
  KV-cache use), made from two successive reads of the engine's counters; nothing while idle.

Both write text only; the model loader and the server decide when to call them.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Protocol, TextIO

log = logging.getLogger("parley")

BAR_WIDTH = 30
REDRAW_S = 0.1  # a terminal's bar: at most this often
LOG_EVERY_S = 5.0  # not a terminal: a line this often, while loading lasts


class LoadProgress:
    """Progress of reading `total_bytes` of weights, tensor by tensor (`advance`), then `finish`."""

    def __init__(self, label: str, total_bytes: int, stream: TextIO | None = None):
        self.label = label
        self.total_bytes = max(total_bytes, 1)
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.tensors = 0
        self.bytes = 0
        self.started = time.monotonic()
        self._shown_at = self.started

    def advance(self, nbytes: int) -> None:
        """One more tensor, of `nbytes` bytes as stored."""
        self.tensors += 1
        self.bytes += nbytes
        now = time.monotonic()
        if now - self._shown_at >= (REDRAW_S if self.interactive else LOG_EVERY_S):
            self._shown_at = now
            self._show(self.line(now))

    def finish(self) -> str:
        """Ends the bar; returns the summary (the caller logs it)."""
        self.total_bytes = max(self.bytes, 1)  # all read: a folder's total counted its files' headers too
        if self.interactive:
            self._show(self.line(time.monotonic()))
            self.stream.write("\n")
            self.stream.flush()
        seconds = time.monotonic() - self.started
        return (f"read {self.tensors} tensors, {self.bytes / 1e6:.1f} MB in {seconds:.1f} s "
                f"({_rate(self.bytes, seconds)})")

    def line(self, now: float) -> str:
        share = min(self.bytes / self.total_bytes, 1.0)
        done = round(share * BAR_WIDTH)
        return (f"loading {self.label} [{'#' * done}{'.' * (BAR_WIDTH - done)}] {share:4.0%} "
                f"{self.tensors} tensors, {self.bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB, "
                f"{_rate(self.bytes, now - self.started)}")

    def _show(self, text: str) -> None:
        if self.interactive:
            self.stream.write("\r" + text + "\x1b[K")  # clear what a longer line left
            self.stream.flush()
        else:
            log.info("%s", text)


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / 1e6 / seconds:.1f} MB/s" if seconds > 0 else "- MB/s"


class EngineCounters(Protocol):
    """What a status line reads (the engine's `stats()`)."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    generated_tokens: int


@dataclass
class _Reading:
    at: float
    generated_tokens: int


class StatusLine:
    """`line(stats)` gives the status since the previous call, or None when the server was idle
    all along (nothing running or waiting, and no token generated since)."""

    def __init__(self):
        self._last: _Reading | None = None

    def line(self, stats: EngineCounters, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        last, self._last = self._last, _Reading(now, stats.generated_tokens)
        if last is None:
            return None
        tokens = stats.generated_tokens - last.generated_tokens
        if not (tokens or stats.running or stats.waiting):
            return None
        rate = tokens / (now - last.at) if now > last.at else 0.0
        kv = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
        return (f"status: {stats.running} running, {stats.waiting} waiting, {rate:.1f} tok/s, "
                f"KV cache {kv:.0%} ({stats.kv_blocks_used}/{stats.kv_blocks_total} blocks)")
