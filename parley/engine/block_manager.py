"""Paged KV-cache bookkeeping: which physical blocks each sequence owns, with prefix sharing.

A block that has been filled by computation is registered under a hash chained from the hashes of
the blocks before it (and the sequence's cache salt), so a later sequence with the same prefix
(an `n` sibling, a chat with the same system prompt) reuses it instead of recomputing it.
Freed blocks keep their hash until they are handed out again, least recently freed first.
Pure Python: the tensors live in the runner.
"""

from __future__ import annotations

from collections import OrderedDict

from parley.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def allocate_cached_prefix(self, seq: Sequence) -> None:
        """For a sequence with no blocks yet: take every full prompt block already in the cache and
        count it as computed. The last prompt block is always recomputed so the sequence still
        produces logits and never writes into a shared block."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if seq.needs_prompt_logprobs:
            return
        bs = self.block_size
        h = seq.cache_salt
        for start in range(0, len(seq) - bs, bs):
            tokens = tuple(seq.token_ids[start : start + bs])
            h = hash((h, tokens))
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.num_computed_tokens += bs

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens; False (and nothing taken) if short."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self.free):
            return False
        for _ in range(needed):
            block_id = next(iter(self.free))
            block = self.blocks[block_id]
            if block.hash is not None:  # evict its cached contents
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash, block.token_ids = None, ()
            self._take(block_id)
            seq.block_table.append(block_id)
        return True

    def register_computed(self, seq: Sequence, old_computed: int) -> None:
        """Hash the blocks that became full between `old_computed` and `seq.num_computed_tokens`."""
        bs = self.block_size
        first, last = old_computed // bs, seq.num_computed_tokens // bs
        if first >= last:
            return
        h = self.blocks[seq.block_table[first - 1]].hash if first else seq.cache_salt
        if h is None:  # an earlier block was never registered (prompt-logprob sequence)
            return
        for i in range(first, last):
            block = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash((h, tokens))
            if block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.cached.setdefault(h, block.block_id)

    def free_sequence(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1
