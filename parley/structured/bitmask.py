"""Batched token bitmasks: one int32 row per sequence, bit `t` of the row set when token `t` is allowed."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import llguidance
import torch

from parley.structured.matcher import GrammarMatcher, check_bitmask

# Per byte value, its 8 bits as bools and as logit biases (0 allowed, -inf not). On CPU, looking the
# bitmask's bytes up in these is ~3x faster than testing bits, and adding the bias ~2x faster than
# masked_fill_ (up to 15x on irregular masks, where masked_fill_'s branches mispredict).
_BYTE_BITS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool()  # [256, 8]
_BYTE_BIAS = torch.zeros(256, 8).masked_fill_(~_BYTE_BITS, float("-inf"))


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """An all-allowed bitmask for `batch` sequences, shape [batch, ceil(vocab_size / 32)]."""
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def fill_bitmasks(matchers: Sequence[GrammarMatcher | None], bitmask: torch.Tensor) -> None:
    """Row i gets the mask of `matchers[i]`, or all-allowed where it is None (unconstrained)."""
    constrained = []
    for row, matcher in enumerate(matchers):
        if matcher is None:
            bitmask[row].fill_(-1)
        else:
            constrained.append((matcher.llg_matcher, row))
    if constrained:
        row_bytes = check_bitmask(bitmask)
        _executor().unsafe_compute_mask_ptr(constrained, bitmask.data_ptr(), row_bytes, bitmask.shape[0])


@functools.cache
def _executor() -> llguidance.LLExecutor:
    """llguidance's thread pool that fills many rows at once (made on first use)."""
    return llguidance.LLExecutor()


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] int32 bitmask -> [B, vocab_size] bool, True = allowed."""
    return _per_token(_BYTE_BITS, bitmask, vocab_size)


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Add -inf to the logits of disallowed tokens, in place. logits: [B, V], V covered by the mask."""
    bias = _BYTE_BIAS.to(device=logits.device, dtype=logits.dtype)
    return logits.add_(_per_token(bias, bitmask.to(logits.device), logits.shape[-1]))


def _per_token(table: torch.Tensor, bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """table[byte] for each byte of the bitmask (little-endian, so token t is bit t % 8 of byte t // 8)."""
    as_bytes = bitmask.view(torch.uint8).flatten().int()  # [B * 4W]
    per_token = table.index_select(0, as_bytes)  # [B * 4W, 8]
    return per_token.view(bitmask.shape[0], -1)[:, :vocab_size]
