"""How many compute threads each engine step runs on: all it was given, unless fewer are faster
because other processes hold some of the cores.

Why: a step is ~150 parallel regions, each ending in a barrier, so a compute thread that the OS
deschedules for another process stalls the others at the next barrier. Measured on the 2-core AMD
EPYC of BENCHMARKS.md (one request, 128 sampled tokens): with another process spinning on one
core, two threads decoded 65-72 tok/s and one thread 182-192; with a process taking 11% of a core
(about what the HTTP event loop and a client on the same machine take), two threads lost 20-25%
and ended level with one; quiet, two threads were 15-30% faster than one.

How: decode-only steps of the same shape (the same number of rows) cost about the same from one
step to the next, so every `period` the next `probe_steps` such steps run on one thread fewer (or,
when already fewer, one more: the machine may be quiet again), and the median of their times is
compared with the median of the last `probe_steps` steps of that shape before them, all of the
last second. Fewer threads are taken only when clearly faster (`down_margin`) in two probes in a
row, each against its own baseline: over HTTP on a quiet machine, the first decode steps of a new
request once took 10.8 ms against the 4.1 ms of the probe after them, and the server ran a second
on one thread for nothing. More threads are taken back as soon as one probe finds them faster
(`up_margin`). A probe that keeps the count doubles the period up to `max_period`; a change
brings it back to `period`. Prompt chunks are never probed (a chunk's cost grows with its
context, and a slow probe would delay a first token); they run on the count of the moment.

Exactness: the engine takes this only where every kernel of a step computes each row on one
thread, whatever the number of threads (async_engine.AsyncEngine._build), so a request's tokens do
not depend on the count its steps ran on (tests/engine/test_real_model.py).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("parley.engine")

Shape = tuple[int, int]  # a step's decode rows and prompt (or draft) tokens
FRESH = 1.0  # seconds: how recent a probe's baseline steps must be


@dataclass
class _Probe:
    threads: int
    shape: Shape
    times: list[float] = field(default_factory=list)
    steps_left: int = 0  # steps of any shape before it is given up (the batch changed shape)


class ThreadTuner:
    def __init__(self, max_threads: int, *, period: float = 1.0, max_period: float = 8.0, probe_steps: int = 4,
                 down_margin: float = 0.85, up_margin: float = 0.95, clock: Callable[[], float] = time.monotonic):
        self.max_threads = max_threads
        self.threads = max_threads  # the count steps run on outside probes
        self.base_period, self.max_period, self.period = period, max_period, period
        self.probe_steps, self.down_margin, self.up_margin = probe_steps, down_margin, up_margin
        self.clock = clock
        self.next_probe = clock() + period
        # decode-only shape -> its last steps on self.threads: (end, seconds); at most one per batch size
        self.recent: dict[Shape, deque[tuple[float, float]]] = {}
        self.probe: _Probe | None = None
        self.downward = False  # between 1 and max_threads, probes go down and up by turns
        self.confirming: int | None = None  # a count fewer that won one probe, to be probed once more

    def threads_for(self, shape: Shape) -> int:
        """The thread count for the next step, of `shape`."""
        now = self.clock()
        baseline = self.recent.get(shape, ())
        if (self.probe is None and shape[1] == 0 and self.max_threads > 1 and now >= self.next_probe
                and len(baseline) == self.probe_steps and baseline[0][0] >= now - FRESH):
            self.probe = _Probe(self.confirming or self._candidate(), shape, steps_left=4 * self.probe_steps)
        return self.probe.threads if self.probe is not None and shape == self.probe.shape else self.threads

    def observe(self, shape: Shape, seconds: float) -> None:
        """A step of `shape` took `seconds`, on what `threads_for` gave it."""
        probe = self.probe
        if probe is not None and shape == probe.shape:
            probe.times.append(seconds)
            if len(probe.times) == self.probe_steps:
                self._decide(probe)
                return
        elif shape[1] == 0:  # only decode-only shapes are probed: the others' times would go unread
            self.recent.setdefault(shape, deque(maxlen=self.probe_steps)).append((self.clock(), seconds))
        if probe is not None:
            probe.steps_left -= 1
            if probe.steps_left <= 0:
                self.probe, self.confirming, self.next_probe = None, None, self.clock() + self.period

    def _candidate(self) -> int:
        if self.threads == self.max_threads:
            return self.threads - 1
        if self.threads == 1:
            return 2
        self.downward = not self.downward
        return self.threads - 1 if self.downward else self.threads + 1

    def _decide(self, probe: _Probe) -> None:
        tried, before = statistics.median(probe.times), statistics.median(s for _, s in self.recent[probe.shape])
        fewer = probe.threads < self.threads
        faster = tried < (self.down_margin if fewer else self.up_margin) * before
        self.probe, now = None, self.clock()
        if faster and fewer and self.confirming is None:  # once more, after a baseline of its own
            self.confirming, self.next_probe = probe.threads, now
            del self.recent[probe.shape]
            return
        self.confirming = None
        if faster:
            log.info("compute threads: %d -> %d of %d (a step of %d rows %.1f -> %.1f ms)", self.threads,
                     probe.threads, self.max_threads, probe.shape[0], 1e3 * before, 1e3 * tried)
            self.threads, self.period = probe.threads, self.base_period
            self.recent = {probe.shape: deque(((now, s) for s in probe.times), maxlen=self.probe_steps)}
        else:
            self.period = min(2 * self.period, self.max_period)
        self.next_probe = now + self.period
