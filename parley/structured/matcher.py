"""One request's position in its grammar: which tokens may come next."""

from __future__ import annotations

import llguidance
import torch


class GrammarMatcher:
    """Follows one generated sequence through a compiled grammar. Made by `GrammarCompiler.matcher`."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    @property
    def llg_matcher(self) -> llguidance.LLMatcher:
        """The llguidance matcher, for batched llguidance calls."""
        return self._matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (bit set = allowed); once the grammar
        is complete or broken, only EOS is allowed."""
        row_bytes = check_bitmask(bitmask)
        self._matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), row_bytes)

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`. False: the token was not allowed (a bug upstream); the matcher
        then stays broken and `error` says why."""
        return self._matcher.consume_token(token_id)

    def is_terminated(self) -> bool:
        """The grammar is complete (or broken): nothing but EOS may follow, generation must stop."""
        return self._matcher.is_stopped()

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted tokens (rejected speculative tokens)."""
        if not self._matcher.rollback(num_tokens):
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self._matcher.get_error()}")

    @property
    def error(self) -> str:
        """Why the matcher broke; empty while it is fine."""
        return self._matcher.get_error()


def check_bitmask(bitmask: torch.Tensor) -> int:
    """Bytes per row of a bitmask llguidance may write into (llguidance checks the size itself)."""
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous():
        raise ValueError("a bitmask must be a contiguous int32 CPU tensor")
    return bitmask.shape[-1] * bitmask.element_size()
