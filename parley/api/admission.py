"""How many generation requests are in flight at the edge; past the limit, 429 at once.

TGI's `--max-concurrent-requests` semantics: the check happens before any work, so an overloaded
server answers immediately instead of queueing without bound. GenerationRoute takes the slot before
it reads the body; the request's EngineCall releases it when the answer ends. Each 429 says when to come back (Retry-After, seconds):
slots free at about `in_flight / hold` a second, `hold` being how long recent requests held theirs.
"""

from __future__ import annotations

import math
import time

from parley.api.errors import ApiError

_SMOOTHING = 0.1  # weight of the newest request in the moving average of hold times


class Admission:
    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self.hold_s = 1.0  # moving average of how long an admitted request holds its slot

    def acquire(self) -> float:
        """Takes a slot, or 429 if none is free now; returns when, for `release`."""
        if self.in_flight >= self.limit:
            raise ApiError(429, "Model is overloaded", "overloaded", retry_after=self.retry_after())
        self.in_flight += 1
        return time.monotonic()

    def release(self, acquired_at: float) -> None:
        self.in_flight -= 1
        self.hold_s += _SMOOTHING * (time.monotonic() - acquired_at - self.hold_s)

    def retry_after(self) -> int:
        """Whole seconds until a slot is likely free, at least 1."""
        return max(1, math.ceil(self.hold_s / max(self.in_flight, 1)))
