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
compared with the median of the last `probe_steps` steps of that shape before them. Fewer threads
are kept only when clearly faster (`down_margin`), more whenever they are not slower
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
        self.recent: dict[Shape, deque[float]] = {}  # the last step times of each shape, on self.threads
        self.probe: _Probe | None = None
        self.downward = False  # between 1 and max_threads, probes go down and up by turns

    def threads_for(self, shape: Shape) -> int:
        """The thread count for the next step, of `shape`."""
        if (self.probe is None and shape[1] == 0 and self.max_threads > 1 and self.clock() >= self.next_probe
                and len(self.recent.get(shape, ())) == self.probe_steps):
            self.probe = _Probe(self._candidate(), shape, steps_left=4 * self.probe_steps)
        return self.probe.threads if self.probe is not None and shape == self.probe.shape else self.threads

    def observe(self, shape: Shape, seconds: float) -> None:
        """A step of `shape` took `seconds`, on what `threads_for` gave it."""
        probe = self.probe
        if probe is not None and shape == probe.shape:
            probe.times.append(seconds)
            if len(probe.times) == self.probe_steps:
                self._decide(probe)
                return
        else:
            self.recent.setdefault(shape, deque(maxlen=self.probe_steps)).append(seconds)
        if probe is not None:
            probe.steps_left -= 1
            if probe.steps_left <= 0:
                self.probe, self.next_probe = None, self.clock() + self.period

    def _candidate(self) -> int:
        if self.threads == self.max_threads:
            return self.threads - 1
        if self.threads == 1:
            return 2
        self.downward = not self.downward
        return self.threads - 1 if self.downward else self.threads + 1

    def _decide(self, probe: _Probe) -> None:
        tried, before = statistics.median(probe.times), statistics.median(self.recent[probe.shape])
        margin = self.down_margin if probe.threads < self.threads else self.up_margin
        if tried < margin * before:
            log.info("compute threads: %d -> %d of %d (a step of %d rows %.1f -> %.1f ms)", self.threads,
                     probe.threads, self.max_threads, probe.shape[0], 1e3 * before, 1e3 * tried)
            self.threads, self.period = probe.threads, self.base_period
            self.recent = {probe.shape: deque(probe.times, maxlen=self.probe_steps)}
        else:
            self.period = min(2 * self.period, self.max_period)
        self.probe, self.next_probe = None, self.clock() + self.period
