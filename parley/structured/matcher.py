"""One request's position in its grammar: which tokens may come next."""

from __future__ import annotations

import re

import llguidance
import numpy as np
import torch

from parley.structured.calls import CallGuard, allows

# The output so far ends inside a number (or so it seems without knowing whether a string is
# open): only then can the number bound take a token away.
_IN_NUMBER = re.compile(rb"[0-9]([.eE]|[eE][+-])?\Z")


class GrammarMatcher:
    """Follows one generated sequence through a compiled grammar. Made by `GrammarCompiler.matcher`.

    Besides the grammar, a JSON output is held to `numbers`, a lexical grammar that bounds the
    digits of its numbers (see `numbers.py`): a token must be allowed by both. The bound never
    makes the grammar's own mask empty: where the grammar insists (a schema that needs more
    digits, separators of its own), it is followed alone, and the bound is dropped for the rest
    of the output. The output of a tool-call grammar is also followed by `calls`, which keeps its
    calls from repeating and from starting without room (see `calls.py`).
    """

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        token_bytes: list[bytes] | None = None,
        numbers: llguidance.LLMatcher | None = None,
        calls: CallGuard | None = None,
    ):
        self._matcher = matcher
        self._token_bytes = token_bytes  # each token's bytes, when a bound follows the output
        self._numbers = numbers
        self._calls = calls
        self._tail = b""  # the last few bytes of the output
        self._tokens: list[int] = []  # accepted so far, when a bound needs them back on rollback
        self._scratch: np.ndarray | None = None

    @property
    def llg_matcher(self) -> llguidance.LLMatcher:
        """The llguidance matcher of the grammar alone."""
        return self._matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (bit set = allowed); once the grammar
        is complete or broken, only EOS is allowed."""
        check_bitmask(bitmask)
        self.fill_row(bitmask.numpy()[row])

    def fill_row(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into one bitmask row (a contiguous int32 array). No torch
        op runs here (see `fill_bitmasks`)."""
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        words = row.view(np.uint32)
        if self._numbers is not None and _IN_NUMBER.search(self._tail):
            if self._scratch is None:
                self._scratch = np.empty_like(words)
            self._numbers.unsafe_compute_mask_ptr(self._scratch.ctypes.data, self._scratch.nbytes)
            np.bitwise_and(self._scratch, words, out=self._scratch)
            if self._scratch.any():
                words[:] = self._scratch
        if self._calls is not None:
            self._calls.restrict(words, self._matcher)

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`. False: the token was not allowed (a bug upstream); the matcher
        then stays broken and `error` says why."""
        if not self._matcher.consume_token(token_id):
            return False
        if self._token_bytes is None:
            return True
        self._tokens.append(token_id)
        self._tail = (self._tail + self._token_bytes[token_id])[-3:]
        if self._numbers is not None and not (self._numbers.validate_tokens([token_id]) and
                                              self._numbers.consume_token(token_id)):
            self._numbers = None  # the grammar insisted on what the bound refuses: follow it alone
        if self._calls is not None:
            self._calls.accept(self._token_bytes[token_id])
        return True

    def fill_draft_rows(self, drafts: list[int], rows: np.ndarray) -> None:
        """rows[i] (bitmask rows, as fill_row writes them): the mask after drafts[:i], each draft taken
        as the output would take it, for as long as the mask allows the next draft and the grammar
        is not complete; rows after that are left as they are (they cannot be used: the draft before
        them is not kept, or the output ends). The matcher is left where it was."""
        numbers, tail, num_tokens = self._numbers, self._tail, len(self._tokens)
        calls = self._calls.snapshot() if self._calls is not None else None
        bounded = 0  # drafts the number bound consumed (before dropping out, if it did)
        self.fill_row(rows[0])
        taken = 0
        for token in drafts:
            if self._matcher.is_stopped() or not allows(rows[taken].view(np.uint32), token):
                break
            followed = self._numbers
            if not self.accept(token):
                raise ValueError(f"draft token {token} refused by the grammar: {self.error}")
            bounded += followed is not None and self._numbers is followed
            taken += 1
            self.fill_row(rows[taken])
        if not self._matcher.rollback(taken):
            raise ValueError(f"cannot roll back {taken} draft tokens: {self._matcher.get_error()}")
        if numbers is not None and not numbers.rollback(bounded):
            raise ValueError(f"cannot roll back the number bound: {numbers.get_error()}")
        self._numbers, self._tail = numbers, tail
        del self._tokens[num_tokens:]
        if calls is not None:
            self._calls.restore(calls)

    def is_terminated(self) -> bool:
        """The grammar is complete (or broken): nothing but EOS may follow, generation must stop."""
        return self._matcher.is_stopped()

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted tokens (rejected speculative tokens)."""
        if not self._matcher.rollback(num_tokens):
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self._matcher.get_error()}")
        if self._token_bytes is None or num_tokens == 0:
            return
        del self._tokens[len(self._tokens) - num_tokens :]
        self._tail = b"".join(self._token_bytes[t] for t in self._tokens[-3:])[-3:]
        if self._numbers is not None and not self._numbers.rollback(num_tokens):
            self._numbers = None
        if self._calls is not None:
            self._calls.rollback(num_tokens)

    @property
    def error(self) -> str:
        """Why the matcher broke; empty while it is fine."""
        return self._matcher.get_error()


def check_bitmask(bitmask: torch.Tensor) -> int:
    """Bytes per row of a bitmask llguidance may write into (llguidance checks the size itself)."""
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous():
        raise ValueError("a bitmask must be a contiguous int32 CPU tensor")
    return bitmask.shape[-1] * bitmask.element_size()
