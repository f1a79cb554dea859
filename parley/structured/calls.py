"""Tool calls that end: no call repeats an earlier one of the answer, and no call is begun that the
tokens left are unlikely to hold.

A small model asked for calls tends to loop: it calls a function, then another, then the first
again, byte for byte, until `max_tokens` cuts the answer in the middle of a call. The tool-call
grammar cannot see this (it knows neither the calls already made nor the budget), so `CallGuard`
follows the output beside it and takes tokens out of the grammar's mask:

- a token after which the grammar forces a byte-identical copy of an earlier call (the copy's
  remaining bytes are all forced) is refused while the call can still turn out different, so the
  model writes a new call or stops;
- after a complete call, when fewer tokens are left than the longest call so far took (with the
  text between calls before it) plus one for EOS (and one for the calls' closing, if the format
  has one), the tokens that would begin another call are refused: the answer ends with its
  complete calls rather than with one cut short.

It finds the calls in any format (`CallFormat`): they begin after the format's lead, and each is
a JSON object, followed by its brace depth; special tokens write no bytes here.
Neither rule ever leaves a row with no allowed token: a restriction that would is not applied.
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
        self._lead = calls.lead.encode()
        self._whole = calls.whole
        self._end = calls.end.encode()
        self._between = calls.between.encode()
        self._next_call = self._between + b"{"  # from a call's last byte to the next one's JSON
        self._closing_tokens = 1 if calls.closing else 0
        self._vocab = vocab
        self._max_tokens = max_tokens
        self._history: list[bytes] = []
        self._reset()

    def _reset(self) -> None:
        self._text = bytearray()
        self._ends: list[int] = []  # byte offset where each token ends
        self._calls_at: int | None = None  # byte offset of the calls' lead, once found
        self._free = False  # a whole format's answer that did not begin as calls: no calls follow
        self._scanned = 0  # bytes of the calls followed so far
        self._depth = 0
        self._in_string = self._escaped = False
        self._json_start = 0
        self._json_end: int | None = None  # after the last complete call's JSON
        self._unrecorded: bytes | None = None  # that call's JSON, until its end marker is written
        self._segment_token = 0  # tokens up to the last recorded call
        self._earlier: list[bytes] = []  # the text between calls + the JSON, of each recorded call
        self._longest = 0  # tokens the longest recorded call took

    def accept(self, token: bytes) -> None:
        """The grammar took a token with these bytes."""
        self._history.append(token)
        self._follow(token)

    def snapshot(self) -> dict:
        """Where it stands, for `restore` (drafts followed, then forgotten): a copy, not a replay."""
        state = dict(vars(self))
        state.update(_text=bytearray(self._text), _ends=list(self._ends), _earlier=list(self._earlier),
                     _history=list(self._history))
        return state

    def restore(self, state: dict) -> None:
        vars(self).update(state)

    def rollback(self, num_tokens: int) -> None:
        history = self._history[: len(self._history) - num_tokens]
        self._history = history
        self._reset()
        for token in history:
            self._follow(token)

    def _follow(self, token: bytes) -> None:
        self._text += token
        self._ends.append(len(self._text))
        if self._calls_at is None and not self._free:
            self._find_calls(len(token))
        if self._calls_at is not None:
            self._scan()
            self._record()

    def _find_calls(self, new_bytes: int) -> None:
        if not self._whole:  # the lead may end in the new bytes
            at = self._text.find(self._lead, max(0, len(self._text) - new_bytes - len(self._lead) + 1))
            if at >= 0:
                self._calls_at, self._scanned = at, at + len(self._lead)
            return
        head = self._lead + b"{"
        if self._text.startswith(head):
            self._calls_at, self._scanned = 0, len(self._lead)
        elif not head.startswith(bytes(self._text)):
            self._free = True

    def _scan(self) -> None:
        """Follow the JSON of the calls: a call is an object at depth 0 (strings respected)."""
        text = self._text
        for i in range(self._scanned, len(text)):
            byte = text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif byte == 0x5C:  # backslash
                    self._escaped = True
                elif byte == 0x22:
                    self._in_string = False
            elif byte == 0x22 and self._depth > 0:
                self._in_string = True
            elif byte == 0x7B:  # {
                if self._depth == 0:
                    self._json_start = i
                self._depth += 1
            elif byte == 0x7D and self._depth > 0:  # }
                self._depth -= 1
                if self._depth == 0:
                    self._json_end = i + 1
                    self._unrecorded = bytes(text[self._json_start : i + 1])
        self._scanned = len(text)

    def _record(self) -> None:
        """Once a call's end marker is written, remember the call and how many tokens it took."""
        if self._unrecorded is None or len(self._text) - self._json_end < len(self._end):
            return
        if self._earlier:  # a later call: counted with the text between calls before it
            tokens = len(self._ends) - self._segment_token
        else:  # the first: from its lead (not any text before), plus a token for a separator
            tokens = len(self._ends) - bisect.bisect_right(self._ends, self._calls_at) + 1
        self._longest = max(self._longest, tokens)
        self._earlier.append(self._between + self._unrecorded)
        self._unrecorded = None
        self._segment_token = len(self._ends)

    def restrict(self, row: np.ndarray, matcher: llguidance.LLMatcher) -> None:
        """Clear bits of `row` (the grammar's mask, uint32 words) as the module describes;
        `matcher` is the grammar's matcher at the same point (only copies of it are advanced)."""
        if not self._earlier:
            return
        current = bytes(self._text[self._json_end :])  # the text since the last call's JSON
        refused: set[int] = set()
        room = self._max_tokens is None or (
            self._max_tokens - len(self._ends) >= self._longest + 1 + self._closing_tokens)
        if not room and self._unrecorded is None and current == self._end:  # just after a call
            rest = self._next_call[len(current) :]  # what would begin another call
            refused.update(self._vocab.starting_with(rest))
            refused.update(self._vocab.prefixes_of(rest))
        for earlier in self._earlier:
            if len(earlier) > len(current) and earlier.startswith(current):
                rest = earlier[len(current) :]
                refused.update(self._vocab.starting_with(rest))
                refused.update(t for t in self._vocab.prefixes_of(rest)
                               if allows(row, t) and _forces(matcher, t, self._vocab.of[t], rest))
        _clear(row, refused)


def _forces(matcher: llguidance.LLMatcher, token: int, token_bytes: bytes, text: bytes) -> bool:
    """After `token`, does the grammar force the rest of `text`?"""
    after = matcher.deep_copy()
    return after.consume_token(token) and (token_bytes + after.compute_ff_bytes()).startswith(text)


def allows(row: np.ndarray, token: int) -> bool:
    """Whether a bitmask row of uint32 words allows `token`."""
    return bool(row[token >> 5] >> np.uint32(token & 31) & np.uint32(1))


def _clear(row: np.ndarray, tokens: set[int]) -> None:
    """Clear the bits of `tokens`, unless that leaves no token allowed."""
    allowed = [t for t in tokens if t < len(row) * 32 and allows(row, t)]
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
        if t < len(row) * 32 and allows(row, t):
            kept[t >> 5] |= np.uint32(1 << (t & 31))
    if kept.any():
        row[:] = kept
