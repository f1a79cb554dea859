"""How many generation requests are in flight at the edge; past the limit, 429 at once.

TGI's `--max-concurrent-requests` semantics: the check happens before any work, so an overloaded
server answers immediately instead of queueing without bound.
"""

from __future__ import annotations

from parley.api.errors import ApiError


class Admission:
    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    def acquire(self) -> None:
        if self.in_flight >= self.limit:
            raise ApiError(429, "Model is overloaded", "overloaded")
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
