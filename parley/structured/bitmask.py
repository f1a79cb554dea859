"""Batched token bitmasks: one int32 row per sequence, bit `t` of the row set when token `t` is allowed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from parley.structured.matcher import GrammarMatcher, check_bitmask

# Per byte value, its 8 bits as bools. On CPU, looking the bitmask's bytes up in this table is ~3x
# faster than testing bits.
_BYTE_BITS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool()  # [256, 8]


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """An all-allowed bitmask for `batch` sequences, shape [batch, ceil(vocab_size / 32)]."""
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def fill_bitmasks(matchers: Sequence[GrammarMatcher | None], bitmask: torch.Tensor) -> None:
    """Row i gets the mask of `matchers[i]`; rows whose matcher is None are left as they are
    (all-allowed from `allocate_bitmask`).

    No torch op runs here, so the engine may call it on another thread while its forward runs
    (llguidance releases the GIL while it computes). Row by row on the calling thread, not on
    llguidance's rayon pool: on a small machine the pool's spinning workers take the cores from
    the forward's OpenMP threads (measured: the sampler's bool mask 6x slower, the step 10% slower).
    """
    check_bitmask(bitmask)
    rows = bitmask.numpy()  # the same memory, as numpy rows
    for row, matcher in enumerate(matchers):
        if matcher is not None:
            matcher.fill_row(rows[row])


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] int32 bitmask -> [B, vocab_size] bool, True = allowed. Bytes are little-endian, so
    token t is bit t % 8 of byte t // 8."""
    as_bytes = bitmask.view(torch.uint8).flatten().int()  # [B * 4W]
    per_token = _BYTE_BITS.index_select(0, as_bytes)  # [B * 4W, 8]
    return per_token.view(bitmask.shape[0], -1)[:, :vocab_size]
