"""Decides, each step, which sequences run and how many of their tokens go through the model.

There is no prefill or decode phase: every sequence has `num_pending_tokens` (the whole prompt on
arrival, 1 while decoding, everything after a preemption) and gets a share of the step.
Decoding sequences always get their token; prompt chunks share `max_batch_prefill_tokens`, so a
long prompt is split over several steps and never stalls the others (chunked prefill).
When blocks run out, the most recently admitted sequences are preempted: their blocks are freed
and they go back to the front of the queue, to be recomputed (mostly from the prefix cache).
Waiting sequences are admitted in arrival order, except where their requests name users
(GenerationRequest.user): then by turns, the earliest sequence of the
waiting user admitted least recently (one never admitted first), so a user's burst of requests does
not hold back another user's request (requests naming no user take their turns as one user). A
preempted sequence had its turn: it resumes first, whoever waits.
Sliding-window layers' blocks behind the window are released as sequences advance, and their own
pool, where they have one, is checked like the main one (parley/engine/block_manager.py).
Pure Python, no torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from parley.engine.block_manager import BlockManager
from parley.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # includes the speculative tokens
    spec_tokens: list[int] = field(default_factory=list)  # draft tokens fed after the last real token

    @property
    def samples(self) -> bool:
        """True when this step reaches the sequence's last token, so its logits pick the next one."""
        return self.seq.num_computed_tokens + self.num_new_tokens - len(self.spec_tokens) == len(self.seq)


@dataclass
class SchedulerOutput:
    decodes: list[ScheduledSequence] = field(default_factory=list)  # one new token each
    prefills: list[ScheduledSequence] = field(default_factory=list)  # prompt (or recompute) chunks
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def scheduled(self) -> list[ScheduledSequence]:
        return self.decodes + self.prefills

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_batch_size: int, max_batch_prefill_tokens: int):
        self.blocks = block_manager
        self.max_batch_size = max_batch_size
        self.max_batch_prefill_tokens = max_batch_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.admitted_at: dict[str | None, int] = {}  # each user's last admission (a count), for turns
        self.num_admitted = 0
        # prefix-cache use, over every sequence's first admission: prompt tokens looked up, and found
        self.num_prompt_tokens_admitted = 0
        self.num_prompt_tokens_cached = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_batch_prefill_tokens

        # Running sequences first, oldest first; make room by preempting the newest.
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            pending = seq.num_pending_tokens
            num_new = pending + len(seq.spec_tokens) if pending == 1 else min(pending, budget)
            if num_new == 0:
                i += 1
                continue
            while not self.blocks.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            self._emit(out, seq, num_new)
            if num_new > 1 or seq.num_computed_tokens + num_new < len(seq):
                budget -= num_new
            i += 1

        # Then admit waiting sequences while the step has room (none if memory just ran out).
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size and not out.preempted:
            turn = self._next_turn()
            seq = self.waiting[turn]
            self.blocks.allocate_cached_prefix(seq)
            num_new = min(seq.num_pending_tokens, budget)
            if not self.blocks.allocate(seq, num_new):
                self.blocks.free_sequence(seq)
                if not self.running and not out.scheduled:
                    # Nothing else holds blocks: this sequence can never fit.
                    raise RuntimeError(f"KV cache too small for a sequence of {len(seq)} tokens")
                break
            del self.waiting[turn]
            self.num_admitted += 1
            self.admitted_at[seq.user] = self.num_admitted
            if len(self.admitted_at) > 2 * len(self.waiting) + 64:  # forget users with nothing waiting
                self.admitted_at = {s.user: self.admitted_at[s.user] for s in self.waiting if s.user in self.admitted_at}
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.num_cached_tokens is None:  # first admission (not a preempted one's return)
                seq.num_cached_tokens = seq.num_computed_tokens
                self.num_prompt_tokens_admitted += seq.num_prompt_tokens
                self.num_prompt_tokens_cached += seq.num_computed_tokens
            self._emit(out, seq, num_new)
            budget -= num_new
        return out

    def _next_turn(self) -> int:
        """The index in `waiting` of the next sequence to admit (see the module): ~85 us with 2,000
        waiting, a few times a step at most."""
        if self.waiting[0].num_cached_tokens is not None:  # admitted before: preempted, it resumes first
            return 0
        turn, least, seen = 0, None, set()
        for i, seq in enumerate(self.waiting):
            if seq.user not in seen:
                seen.add(seq.user)
                at = self.admitted_at.get(seq.user, 0)
                if least is None or at < least:
                    turn, least = i, at
        return turn

    def _emit(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        is_decode = num_new == 1 and seq.num_computed_tokens + 1 == len(seq)
        spec = seq.spec_tokens if seq.num_pending_tokens == 1 else []
        (out.decodes if is_decode else out.prefills).append(ScheduledSequence(seq, num_new, spec))

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        seq.spec_tokens = []
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        for bucket in (out.decodes, out.prefills):
            bucket[:] = [s for s in bucket if s.seq is not seq]

    def update(self, out: SchedulerOutput) -> None:
        """After the step ran: the scheduled real tokens are now in the cache (drafts: see `advance`)."""
        for s in out.scheduled:
            if not s.seq.is_finished:
                self.advance(s.seq, s.num_new_tokens - len(s.spec_tokens))

    def advance(self, seq: Sequence, num_tokens: int) -> None:
        """Count `num_tokens` more tokens of `seq` as computed (e.g. accepted draft tokens)."""
        seq.num_computed_tokens += num_tokens
        self.blocks.register_computed(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence that ended or was aborted and free its blocks at once."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
