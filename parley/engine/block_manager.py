"""Paged KV-cache bookkeeping: which physical blocks each sequence owns, with prefix sharing.

A block that has been filled by computation is registered under a hash chained from the hashes of
the blocks before it (and the sequence's cache salt), so a later sequence with the same prefix
(an `n` sibling, a chat with the same system prompt) reuses it instead of recomputing it.
Freed blocks keep their hash until they are handed out again, least recently freed first.

Sliding windows (`KVLayout`): a layer that sees only its last `window` tokens never reads a block
wholly before the window of the next token to compute, so such blocks are released as the sequence
moves on (their table entries become NULL_BLOCK), as vLLM's SlidingWindowManager does. Where every
layer slides (Mistral) that is the one table; where some layers slide and others see everything
(Gemma 2/3, Qwen2 with max_window_layers), the sliding layers keep their own table in their own,
smaller pool (the runner sizes their caches by it), and the others keep every block. A released
block keeps its hash while it waits in the free list, so it may still serve a prefix hit; a prefix
is reused only as far as every pool still holds the blocks the next token reads (for a sliding pool:
those in its window), never further.
Pure Python: the tensors live in the runner.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from parley.config import ModelConfig
from parley.engine.sequence import Sequence

NULL_BLOCK = -1  # a table entry whose block was released (before its layers' window); read as no block


@dataclass(frozen=True)
class KVLayout:
    """Which block tables a sequence holds. window None: every layer sees the whole context, one
    table. window set, window_blocks None: every layer slides, one table whose blocks before the
    window are released. Both set: the sliding layers have their own table, in a pool of
    window_blocks blocks; the other layers the main one, keeping every block."""

    window: int | None = None
    window_blocks: int | None = None

    @property
    def split(self) -> bool:
        """Whether the sliding layers hold their own table (seq.window_table)."""
        return self.window_blocks is not None


def kv_layout(config: ModelConfig, num_blocks: int, block_size: int, max_batch_size: int,
              max_batch_prefill_tokens: int) -> KVLayout:
    """The layout for `config`'s layers, with `num_blocks` blocks for the layers that see everything.
    The sliding layers' own pool holds what the running sequences can read at once: per sequence the
    blocks of one window (ceil((window - 1) / block_size) + 1: the window may straddle a block) plus
    the block being written and one for draft tokens, and the step's prefill budget; no more than
    `num_blocks`. Should it ever run short, the scheduler preempts as for the main pool."""
    windows = {config.window(i) for i in range(config.num_layers)}
    if len(windows) == 1:
        return KVLayout(window=windows.pop())
    (window,) = windows - {None}  # ModelConfig has one window for every sliding layer
    per_sequence = -(-(window - 1) // block_size) + 3
    needed = max_batch_size * per_sequence + -(-max_batch_prefill_tokens // block_size)
    return KVLayout(window=window, window_blocks=min(num_blocks, needed))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids", "prompt_logprobs")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()
        # a cached block's tokens' prompt logprobs, each given the tokens before it (the first of a
        # sequence: None), and their top_n alternatives: (top_n, logprobs, tops); see keep_prompt_logprobs
        self.prompt_logprobs: tuple[int, tuple, tuple] | None = None


class BlockPool:
    """One pool of blocks and the prefix cache over them; `window`: the layers it serves slide."""

    def __init__(self, num_blocks: int, window: int | None):
        self.window = window
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id

    def lookup(self, h: int, tokens: tuple[int, ...]) -> int | None:
        block_id = self.cached.get(h)
        return block_id if block_id is not None and self.blocks[block_id].token_ids == tokens else None

    def take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def take_free(self) -> int:
        """The least recently freed block, its cached contents forgotten."""
        block_id = next(iter(self.free))
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids, block.prompt_logprobs = None, (), None
        self.take(block_id)
        return block_id

    def release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block_id] = None

    def register(self, block_id: int, h: int, tokens: tuple[int, ...]) -> None:
        block = self.blocks[block_id]
        if block.hash is None:
            block.hash, block.token_ids = h, tokens
            self.cached.setdefault(h, block_id)

    def first_needed(self, num_computed: int, block_size: int) -> int:
        """The first block the next token (at position `num_computed`) reads: its window's."""
        return 0 if self.window is None else max(0, num_computed - self.window + 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, layout: KVLayout = KVLayout()):
        self.block_size = block_size
        self.layout = layout
        self.pools = [BlockPool(num_blocks, None if layout.split else layout.window)]
        if layout.split:
            self.pools.append(BlockPool(layout.window_blocks, layout.window))

    @property
    def blocks(self) -> list[Block]:
        """The main pool's blocks."""
        return self.pools[0].blocks

    @property
    def num_blocks(self) -> int:
        return sum(len(p.blocks) for p in self.pools)

    @property
    def num_used_blocks(self) -> int:
        return sum(len(p.blocks) - len(p.free) for p in self.pools)

    def _tables(self, seq: Sequence) -> tuple[list[int], ...]:
        """seq's table in each pool, in pool order."""
        return (seq.block_table, seq.window_table) if self.layout.split else (seq.block_table,)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks each pool must hand `seq` for `num_new_tokens` more tokens."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def allocate_cached_prefix(self, seq: Sequence) -> None:
        """For a sequence with no blocks yet: take the longest run of full prompt blocks whose K/V
        every pool still holds where the next token reads it, and count it as computed. The last
        prompt block is always recomputed so the sequence still produces logits and never writes
        into a shared block. A sequence that needs its prompt's logprobs takes blocks only as far as
        the blocks' kept logprobs reach (keep_prompt_logprobs), one block short of them: the first
        token it computes has its logprob from the block after (the logits that gave it were those of
        the last block taken); they land in seq.cached_prompt_logprobs."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        bs, hashes, h = self.block_size, [], seq.cache_salt
        blocks = [tuple(seq.token_ids[start : start + bs]) for start in range(0, len(seq) - bs, bs)]
        for tokens in blocks:
            h = hash((h, tokens))
            hashes.append(h)
        found = [[pool.lookup(h, tokens) for h, tokens in zip(hashes, blocks)] for pool in self.pools]
        hit = len(hashes)
        if self.pools[0].window is None and None in found[0]:  # layers that see everything: every block
            hit = found[0].index(None)
        if seq.needs_prompt_logprobs:
            kept = [self._kept_logprobs(block_id, seq.prompt_top_n) for block_id in found[0]] + [None]
            hit = max(0, min(hit, kept.index(None) - 1))
        while hit and not all(None not in ids[pool.first_needed(hit * bs, bs) : hit]
                              for pool, ids in zip(self.pools, found) if pool.window is not None):
            hit -= 1
        for pool, ids, table in zip(self.pools, found, self._tables(seq)):
            first = pool.first_needed(hit * bs, bs)
            for block_id in ids[first:hit]:
                pool.take(block_id)
            table.extend([NULL_BLOCK] * first + ids[first:hit])
        seq.block_hashes = hashes[:hit]
        seq.num_computed_tokens = hit * bs
        if seq.needs_prompt_logprobs and hit:
            logprobs = [x for block_id in found[0][: hit + 1] for x in self.blocks[block_id].prompt_logprobs[1]]
            tops = [x for block_id in found[0][: hit + 1] for x in self.blocks[block_id].prompt_logprobs[2]]
            seq.cached_prompt_logprobs = logprobs[1 : hit * bs + 1], tops[1 : hit * bs + 1] if seq.prompt_top_n else []

    def _kept_logprobs(self, block_id: int | None, top_n: int) -> bool | None:
        """True if the block keeps its tokens' prompt logprobs with `top_n` alternatives (any, for 0); else None."""
        kept = None if block_id is None else self.blocks[block_id].prompt_logprobs
        return True if kept is not None and (top_n == 0 or kept[0] == top_n) else None

    def keep_prompt_logprobs(self, seq: Sequence, logprobs: list[float], tops: list) -> None:
        """Keep with each of seq's full prompt blocks in the prefix cache the logprobs of its tokens
        (`logprobs[p]`: token p + 1's) and their seq.prompt_top_n alternatives (`tops`, alike), once
        `logprobs` reaches the block's last token; a block that keeps some already keeps them."""
        bs, pool = self.block_size, self.pools[0]
        for j in range(min(len(seq.block_hashes), (len(logprobs) + 1) // bs)):
            block_id = pool.lookup(seq.block_hashes[j], tuple(seq.token_ids[j * bs : (j + 1) * bs]))
            if block_id is None or pool.blocks[block_id].prompt_logprobs is not None:
                continue
            first = j * bs - 1  # the index of the block's first token's logprob; -1: the sequence's first token
            pool.blocks[block_id].prompt_logprobs = (
                seq.prompt_top_n,
                tuple([None] * (first < 0) + logprobs[max(first, 0) : first + bs]),
                tuple([((), ())] * (first < 0) + tops[max(first, 0) : first + bs]) if seq.prompt_top_n else ())

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens; False (and nothing taken) if short."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if any(needed > len(pool.free) for pool in self.pools):
            return False
        for pool, table in zip(self.pools, self._tables(seq)):
            table.extend(pool.take_free() for _ in range(needed))
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Hash the blocks that became full since the last call (up to `seq.num_computed_tokens`),
        then release the sliding pools' blocks that no later token reads."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash((seq.block_hashes[-1] if i else seq.cache_salt, tokens))
            seq.block_hashes.append(h)
            for pool, table in zip(self.pools, self._tables(seq)):
                pool.register(table[i], h, tokens)
        for pool, table in zip(self.pools, self._tables(seq)):
            # from the last block before the window back to the first already released
            for i in reversed(range(pool.first_needed(seq.num_computed_tokens, bs))):
                if table[i] == NULL_BLOCK:
                    break
                pool.release(table[i])
                table[i] = NULL_BLOCK

    def free_sequence(self, seq: Sequence) -> None:
        for pool, table in zip(self.pools, self._tables(seq)):
            for block_id in reversed(table):
                if block_id != NULL_BLOCK:
                    pool.release(block_id)
            table.clear()
        seq.block_hashes = []
        seq.num_computed_tokens = 0
