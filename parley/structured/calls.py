"""Tool calls that end: no call repeats an earlier one of the same answer, and no call is begun that
the tokens left are unlikely to hold.

A small model asked for calls tends to loop: it calls a function, then another, then the first
again, byte for byte, until `max_tokens` cuts the answer in the middle of a call. The tool-call
grammar cannot see this (it knows neither the calls already made nor the budget), so `CallGuard`
follows the output beside it and takes tokens out of the grammar's mask:

- a token after which the grammar forces a byte-identical copy of an earlier call (the copy's
  remaining bytes are all forced) is refused while the call can still turn out different, so the
  model writes a new call or stops;
- after a complete call, when fewer tokens are left than the longest call so far took (with a
  separator before it) plus one for EOS, only EOS stays allowed: the answer ends with its
  complete calls rather than with one cut short.

Neither ever leaves a row with no allowed token: a restriction that would is not applied.
"""

from __future__ import annotations

import bisect

import llguidance
import numpy as np

from parley.types import CallFormat


class TokenBytes:
    """Each token's bytes, looked up by id, by exact bytes and by prefix."""

    def __init__(self, token_bytes: list[bytes], eos_token_ids: list[int]):
        self.of = token_bytes
        self.eos_token_ids = list(eos_token_ids)
        self._sorted = sorted((b, i) for i, b in enumerate(self.of) if b)
        self._keys = [b for b, _ in self._sorted]
        self._ids: dict[bytes, list[int]] = {}
        for b, i in self._sorted:
            self._ids.setdefault(b, []).append(i)
        self.longest = max(map(len, self._keys), default=0)

    def starting_with(self, prefix: bytes) -> list[int]:
        start = bisect.bisect_left(self._keys, prefix)
        end = start
        while end < len(self._keys) and self._keys[end].startswith(prefix):
            end += 1
        return [i for _, i in self._sorted[start:end]]

    def prefixes_of(self, text: bytes) -> list[int]:
        """Tokens whose bytes are a proper, non-empty prefix of `text`."""
        return [i for k in range(1, min(len(text), self.longest + 1)) for i in self._ids.get(text[:k], ())]


class CallGuard:
    """Follows one sequence through a tool-call grammar and restricts its masks (see the module)."""

    def __init__(self, calls: CallFormat, vocab: TokenBytes, max_tokens: int | None):
        self._start, self._end = calls.start.encode(), calls.end.encode()
        self._next_call = (calls.separator + calls.start).encode()
        self._vocab = vocab
        self._max_tokens = max_tokens
        self._history: list[tuple[bytes, bool]] = []  # (token bytes, grammar accepting after it)
        self._reset()

    def _reset(self) -> None:
        self._text = bytearray()
        self._ends: list[int] = []  # byte offset where each token ends
        self._segment = 0  # byte offset where the current call (with its separator) begins
        self._segment_token = 0
        self._earlier: list[bytes] = []  # separator + start + JSON of each complete call
        self._longest = 0  # tokens the longest complete call took
        self._at_boundary = False

    def accept(self, token: bytes, accepting: bool) -> None:
        """The grammar took a token with these bytes; `accepting`: it may end here."""
        self._history.append((token, accepting))
        self._follow(token, accepting)

    def rollback(self, num_tokens: int) -> None:
        history = self._history[: len(self._history) - num_tokens]
        self._history = history
        self._reset()
        for token, accepting in history:
            self._follow(token, accepting)

    def _follow(self, token: bytes, accepting: bool) -> None:
        self._text += token
        self._ends.append(len(self._text))
        start = self._text.find(self._start, self._segment)
        self._at_boundary = accepting and start >= 0 and self._text.endswith(self._end)
        if not self._at_boundary:
            return
        json_text = bytes(self._text[start + len(self._start) : len(self._text) - len(self._end)])
        if self._earlier:  # a later call: counted with the separator before it
            tokens = len(self._ends) - self._segment_token
        else:  # the first: from its start marker (not any text before), plus a separator token
            tokens = len(self._ends) - bisect.bisect_right(self._ends, start) + 1
        self._longest = max(self._longest, tokens)
        self._earlier.append(self._next_call + json_text)
        self._segment, self._segment_token = len(self._text), len(self._ends)

    def restrict(self, row: np.ndarray, matcher: llguidance.LLMatcher) -> None:
        """Clear bits of `row` (the grammar's mask, uint32 words) as the module describes;
        `matcher` is the grammar's matcher at the same point (only copies of it are advanced)."""
        if not self._earlier:
            return
        if self._at_boundary and self._max_tokens is not None:
            if self._max_tokens - len(self._ends) < self._longest + 1:  # a call as long, then EOS
                _keep_only(row, self._vocab.eos_token_ids)
                return
        current = bytes(self._text[self._segment :])
        refused: set[int] = set()
        for earlier in self._earlier:
            if len(earlier) > len(current) and earlier.startswith(current):
                rest = earlier[len(current) :]
                refused.update(self._vocab.starting_with(rest))
                refused.update(t for t in self._vocab.prefixes_of(rest)
                               if _allowed(row, t) and _forces(matcher, t, self._vocab.of[t], rest))
        _clear(row, refused)


def _forces(matcher: llguidance.LLMatcher, token: int, token_bytes: bytes, text: bytes) -> bool:
    """After `token`, does the grammar force the rest of `text`?"""
    after = matcher.deep_copy()
    return after.consume_token(token) and (token_bytes + after.compute_ff_bytes()).startswith(text)


def _allowed(row: np.ndarray, token: int) -> bool:
    return bool(row[token >> 5] >> np.uint32(token & 31) & np.uint32(1))


def _clear(row: np.ndarray, tokens: set[int]) -> None:
    """Clear the bits of `tokens`, unless that leaves no token allowed."""
    allowed = [t for t in tokens if t < len(row) * 32 and _allowed(row, t)]
    if not allowed:
        return
    cleared = row.copy()
    for t in allowed:
        cleared[t >> 5] &= ~np.uint32(1 << (t & 31))
    if cleared.any():
        row[:] = cleared


def _keep_only(row: np.ndarray, tokens: list[int]) -> None:
    """Allow only those of `tokens` the row allows, unless that leaves none."""
    kept = np.zeros_like(row)
    for t in tokens:
        if t < len(row) * 32 and _allowed(row, t):
            kept[t >> 5] |= np.uint32(1 << (t & 31))
    if kept.any():
        row[:] = kept
