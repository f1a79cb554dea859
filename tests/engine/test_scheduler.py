"""Scheduler and block manager, driven without a model (pure Python, like vLLM's CPU scheduler tests)."""

import pytest

from parley.engine.block_manager import NULL_BLOCK, BlockManager, KVLayout
from parley.engine.scheduler import Scheduler
from parley.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=16, block_size=4, max_batch_size=8, prefill=8):
    return Scheduler(BlockManager(num_blocks, block_size), max_batch_size=max_batch_size,
                     max_batch_prefill_tokens=prefill)


def run_step(sched: Scheduler, next_token=7):
    """One step with a fake runner: every sampling sequence gets `next_token`."""
    out = sched.schedule()
    sched.update(out)
    for s in out.scheduled:
        if s.seq.num_computed_tokens == len(s.seq):
            s.seq.token_ids.append(next_token)
    return out


def test_long_prompt_is_chunked_and_decodes_keep_running():
    sched = make(prefill=8)
    short = Sequence([1, 2, 3])
    sched.add(short)
    run_step(sched)  # short prefilled, sampled its first token
    long = Sequence(list(range(100, 120)))  # 20 tokens: 3 chunks of at most 8
    sched.add(long)
    chunks = []
    for _ in range(3):
        out = run_step(sched)
        assert [s.seq for s in out.decodes] == [short]  # the decode never waits for the long prompt
        chunks.append(sum(s.num_new_tokens for s in out.prefills if s.seq is long))
    assert chunks == [8, 8, 4]
    assert long.num_computed_tokens == 20 and len(long) == 21


def test_blocks_follow_sequence_growth_and_are_freed():
    sched = make(block_size=4)
    seq = Sequence([1, 2, 3, 4, 5])
    sched.add(seq)
    run_step(sched)
    assert len(seq.block_table) == 2  # 5 tokens
    for _ in range(3):
        run_step(sched)
    assert len(seq.block_table) == 2 and len(seq) == 9  # 8 computed + 1 pending
    run_step(sched)
    assert len(seq.block_table) == 3
    sched.finish(seq)
    assert sched.blocks.num_used_blocks == 0 and not sched.has_work


def test_preemption_frees_the_newest_and_it_resumes_from_the_prefix_cache():
    sched = make(num_blocks=4, block_size=4, prefill=64)
    old, new = Sequence(list(range(1, 8))), Sequence(list(range(20, 27)))  # 2 blocks each
    sched.add(old)
    sched.add(new)
    run_step(sched)
    run_step(sched)
    assert sched.blocks.num_used_blocks == sched.blocks.num_blocks  # none free
    out = run_step(sched)  # both at 9 tokens: each needs a 3rd block; none free
    assert out.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.block_table == []
    assert [s.seq for s in out.scheduled] == [old]
    sched.finish(old)
    out = run_step(sched)
    # new recomputes only its last block: its first full block is still cached
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(new, 5)]
    assert new.num_computed_tokens == 9


def test_a_preempted_sequence_resumes_before_other_users_waiting():
    sched = make(num_blocks=4, block_size=4, prefill=64)
    old, new = Sequence(list(range(1, 8)), user="a"), Sequence(list(range(20, 27)), user="b")  # 2 blocks each
    sched.add(old)
    sched.add(new)
    run_step(sched)
    run_step(sched)
    late = Sequence([40, 41, 42], user="c")  # never admitted: its user's turn would come first
    sched.add(late)
    assert run_step(sched).preempted == [new]
    sched.finish(old)
    assert [s.seq for s in run_step(sched).prefills] == [new, late]


def test_siblings_share_prompt_blocks():
    sched = make(block_size=4, prefill=64)
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks + 2
    a = Sequence(prompt)
    sched.add(a)
    run_step(sched)
    b = Sequence(prompt)
    sched.add(b)
    out = run_step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.prefills] == [(b, 2)]
    assert b.block_table[:2] == a.block_table[:2]
    assert sched.blocks.blocks[a.block_table[0]].ref_count == 2
    sched.finish(a)
    assert sched.blocks.blocks[b.block_table[0]].ref_count == 1


def test_cache_is_namespaced_by_salt_and_prompt_logprobs_hit_only_where_kept():
    sched = make(block_size=4, prefill=64)
    prompt = list(range(1, 11))
    first = Sequence(prompt)
    sched.add(first)
    run_step(sched)
    other = Sequence(prompt, cache_salt=99)
    needs_logprobs = Sequence(prompt, needs_prompt_logprobs=True)
    same = Sequence(prompt)
    for seq in (other, needs_logprobs, same):
        sched.add(seq)
    out = run_step(sched)
    assert {s.seq.seq_id: s.num_new_tokens for s in out.prefills} == {
        other.seq_id: 10, needs_logprobs.seq_id: 10, same.seq_id: 2}

    # the first sequence's prompt logprobs kept with its two full blocks (token p + 1's at p)
    logprobs, tops = [-0.5 - p for p in range(9)], [([p], [-0.1 - p]) for p in range(9)]
    sched.blocks.keep_prompt_logprobs(first, logprobs, [])
    hit, other_top_n = Sequence(prompt, needs_prompt_logprobs=True), Sequence(prompt, needs_prompt_logprobs=True, prompt_top_n=1)
    sched.add(hit)
    sched.add(other_top_n)
    out = run_step(sched)
    # one block from the cache: the first computed token's logprob came from the second kept block
    assert {s.seq.seq_id: s.num_new_tokens for s in out.prefills} == {hit.seq_id: 6, other_top_n.seq_id: 10}
    assert hit.cached_prompt_logprobs == (logprobs[:4], [])
    for seq in list(sched.running):  # their blocks stay cached
        sched.finish(seq)
    kept = Sequence(prompt + [5, 6], needs_prompt_logprobs=True, prompt_top_n=1)  # three full blocks now
    sched.add(kept)
    run_step(sched)
    sched.blocks.keep_prompt_logprobs(kept, logprobs + [-9.5, -10.5], tops + [([9], [-9.1]), ([10], [-10.1])])
    assert sched.blocks.blocks[kept.block_table[2]].prompt_logprobs[0] == 1  # blocks 0-1 kept theirs already
    sched.finish(kept)
    with_top = Sequence(prompt + [5, 6, 7], needs_prompt_logprobs=True, prompt_top_n=1)
    sched.add(with_top)
    out = run_step(sched)
    assert [s.num_new_tokens for s in out.prefills if s.seq is with_top] == [13]  # blocks 0-1 kept without tops


def test_waiting_sequences_respect_max_batch_size():
    sched = make(max_batch_size=2, prefill=100)
    seqs = [Sequence([i, i + 1]) for i in range(1, 8, 2)]
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 2


def test_a_sequence_larger_than_the_whole_cache_is_an_error_not_a_hang():
    sched = make(num_blocks=2, block_size=4)
    sched.add(Sequence(list(range(1, 20))))
    with pytest.raises(RuntimeError, match="KV cache too small"):
        for _ in range(10):
            run_step(sched)


def test_prefix_cache_hits_are_counted_once_per_sequence_at_its_first_admission():
    """Sequence.num_cached_tokens (the request's usage.prompt_tokens_details.cached_tokens) and the
    scheduler's totals (/metrics): a preempted sequence's return is not a second lookup."""
    sched = make(num_blocks=4, block_size=4, prefill=64)
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks + 2
    a = Sequence(prompt)
    sched.add(a)
    run_step(sched)
    assert (a.num_cached_tokens, sched.num_prompt_tokens_admitted, sched.num_prompt_tokens_cached) == (0, 10, 0)
    sched.finish(a)
    b = Sequence(prompt)
    sched.add(b)
    run_step(sched)
    assert (b.num_cached_tokens, sched.num_prompt_tokens_admitted, sched.num_prompt_tokens_cached) == (8, 20, 8)
    sched.finish(b)

    old, new = Sequence(list(range(30, 37))), Sequence(list(range(20, 27)))  # as in the preemption test above
    sched.add(old)
    sched.add(new)
    run_step(sched)
    run_step(sched)
    assert run_step(sched).preempted == [new] and new.num_cached_tokens == 0
    sched.finish(old)
    run_step(sched)  # new comes back, its first block found in the cache: not counted again
    assert new.status is SequenceStatus.RUNNING and new.num_computed_tokens == 9 and new.num_cached_tokens == 0
    assert (sched.num_prompt_tokens_admitted, sched.num_prompt_tokens_cached) == (34, 8)


# Sliding windows: blocks of 4 tokens, a window of 6 (the next token reads the 5 before it), so a
# sequence reads at most 2 blocks of its past and writes into a 3rd.

def make_windowed(layout, num_blocks=16, max_batch_size=8, prefill=64):
    return Scheduler(BlockManager(num_blocks, 4, layout), max_batch_size=max_batch_size,
                     max_batch_prefill_tokens=prefill)


def held(table):
    return [b for b in table if b != NULL_BLOCK]


def test_when_every_layer_slides_blocks_before_the_window_are_released():
    # 6 blocks hold 24 tokens: a 60-token sequence fits only because it keeps just its window
    sched = make_windowed(KVLayout(window=6), num_blocks=6)
    seq = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 9])
    sched.add(seq)
    most = 0
    while len(seq) < 60:
        run_step(sched)
        most = max(most, sched.blocks.num_used_blocks)
        assert held(seq.block_table) == seq.block_table[-len(held(seq.block_table)):]  # released: a prefix
    assert most <= 3 and len(seq.block_table) == 15
    sched.finish(seq)
    assert sched.blocks.num_used_blocks == 0


def test_split_layout_keeps_every_block_for_full_layers_and_a_window_for_sliding_ones():
    sched = make_windowed(KVLayout(window=6, window_blocks=4))
    seq = Sequence([1, 2, 3])
    sched.add(seq)
    while len(seq) < 40:
        run_step(sched)
        assert len(held(seq.window_table)) <= 3
    assert len(held(seq.block_table)) == 10 and len(seq.window_table) == 10
    assert [len(p.blocks) - len(p.free) for p in sched.blocks.pools] == [10, 2]
    sched.finish(seq)
    assert sched.blocks.num_used_blocks == 0


def test_window_pool_running_short_preempts_and_the_sequence_comes_back():
    sched = make_windowed(KVLayout(window=6, window_blocks=4), prefill=64)
    a, b = Sequence(list(range(1, 8))), Sequence(list(range(20, 27)))  # 7 tokens: 2 window blocks each
    sched.add(a)
    sched.add(b)
    run_step(sched)
    preempted = []
    while len(a) < 30:
        preempted += run_step(sched).preempted
    assert preempted == [b]
    sched.finish(a)
    while len(b) < 30:
        run_step(sched)
    assert b.num_computed_tokens == 29


def test_a_prefix_is_reused_only_as_far_as_the_window_blocks_are_still_cached():
    sched = make_windowed(KVLayout(window=6))
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks + 1
    first = Sequence(prompt)
    sched.add(first)
    run_step(sched)  # prefilled: blocks 0 and 1 hold nothing its next token reads, released (still cached)
    assert first.block_table[:2] == [NULL_BLOCK, NULL_BLOCK]
    sched.finish(first)

    again = Sequence(prompt)
    sched.add(again)
    out = run_step(sched)
    # the last prompt token reads blocks 1 and 2 only: block 0 need not be cached
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(again, 1)]
    assert again.block_table[0] == NULL_BLOCK
    block1 = sched.blocks.pools[0].cached[again.block_hashes[1]]
    sched.finish(again)

    pool = sched.blocks.pools[0]  # block 1 is the next free block to be handed out: its contents go
    pool.free.move_to_end(block1, last=False)
    pool.release(pool.take_free())
    assert pool.blocks[block1].hash is None
    third = Sequence(prompt)
    sched.add(third)
    out = run_step(sched)
    # 12 cached tokens need blocks 1-2 and 8 need 0-1: block 1 is gone, so only block 0 is reused
    assert [(s.seq, s.num_new_tokens) for s in out.prefills] == [(third, 9)]


def admission_order(sched: Scheduler, seqs: list[Sequence]) -> list[Sequence]:
    """The order `sched` admits `seqs` in, each finished in the step it was admitted."""
    for seq in seqs:
        sched.add(seq)
    admitted = []
    while sched.has_work:
        out = run_step(sched)
        admitted += [s.seq for s in out.prefills]
        for s in out.prefills:
            sched.finish(s.seq)
    return admitted


def test_waiting_users_are_admitted_by_turns():
    """A user's burst does not hold back another user's request: one admission a step here (one
    running sequence at a time), each the earliest sequence of the waiting user admitted least
    recently. Sequences naming no user take their turns as one user; with none named, arrival order."""
    burst = [Sequence([1, 2], user="a") for _ in range(3)]
    late = [Sequence([3, 4], user="b"), Sequence([5, 6]), Sequence([7, 8], user="b")]
    admitted = admission_order(make(max_batch_size=1, prefill=100), burst + late)
    assert admitted == [burst[0], late[0], late[1], burst[1], late[2], burst[2]]
    seqs = [Sequence([i, i + 1]) for i in range(1, 6)]
    assert admission_order(make(max_batch_size=1, prefill=100), seqs) == seqs
