"""Prompt tokens the engine has accepted and not yet prefilled, and its bound (`--max-queued-tokens`).

The concurrency limit counts requests, but a queue of 128 long prompts holds minutes of prefill: the
last request would wait that long for its first token. Past the bound a new request is refused at
once (429), unless nothing is queued (a prompt as long as the context must always get in). Its
Retry-After is how long the excess takes to drain at the prefill speed seen lately.
"""

from __future__ import annotations

import math
import time

from parley.types import OverloadedError

_SMOOTHING = 0.2  # weight of the newest sample in the moving average of the drain rate


class PromptBacklog:
    def __init__(self, limit: int):
        self.limit = limit
        self.tokens = 0
        self.rate = 1000.0  # prompt tokens drained per second while busy; learnt as prompts drain
        self._since: float | None = None  # when the backlog last drained (or filled from empty)

    def admit(self, num_tokens: int) -> None:
        """Counts a prompt in, or refuses it (OverloadedError with retry_after) past the bound."""
        if self.tokens and self.tokens + num_tokens > self.limit:
            wait = (self.tokens + num_tokens - self.limit) / self.rate
            raise OverloadedError(
                f"Model is overloaded: {self.tokens} prompt tokens are waiting for prefill and this request's "
                f"{num_tokens} would pass the bound of {self.limit} (--max-queued-tokens)",
                retry_after=max(1, math.ceil(wait)))
        if not self.tokens:
            self._since = time.monotonic()
        self.tokens += num_tokens

    def drained(self, num_tokens: int, prefilled: bool) -> None:
        """A prompt counted in leaves: prefilled (its first event came), or aborted before that."""
        now = time.monotonic()
        if prefilled and self._since is not None and now > self._since:
            self.rate += _SMOOTHING * (num_tokens / (now - self._since) - self.rate)
        self.tokens -= num_tokens
        self._since = now if self.tokens else None
