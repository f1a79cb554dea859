"""update_from_output: a step's sampled and verified tokens applied to their sequences.

Each token goes through the sequence's thinking rules and grammar, its detokenizer and the stop
rules; it becomes a TokenEvent, and a sequence that ends a FinalEvent. The step's events leave in
one wake-up per event loop (core.py says why).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

from parley.engine.drafts import MAX_DRAFT_TOKENS, PredictedOutput, PromptLookup
from parley.engine.request import RequestState, SequenceState, deliver
from parley.engine.runner import StepResult
from parley.engine.scheduler import Scheduler, SchedulerOutput
from parley.engine.sequence import Sequence
from parley.sampling.sampler import SamplerOutput
from parley.types import FinalEvent, FinishReason, GenerationError, Token, TokenEvent

log = logging.getLogger("parley.engine")

# --speculate's drafts only while this few sequences run: each draft token is a row of the step, and
# past one or two rows a step costs about as many more rows (Zen 4, default model, sampled chats with
# 4 drafts each: 1.03x at concurrency 1, 0.94x at 2, 0.85x at 4, 0.76x at 32)
LOOKUP_MAX_RUNNING = 2


class OutputProcessor:
    """`fail(request, error)` ends a request whose token failed (its grammar rejected it...);
    `forget(request)` lets go of a request whose sequences all ended."""

    def __init__(self, scheduler: Scheduler, tokenizer, states: dict[int, SequenceState],
                 fail: Callable[[RequestState, Exception], None], forget: Callable[[RequestState], None]):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.states = states
        self.special_ids = tokenizer.special_ids
        self.model_eos_ids = frozenset(tokenizer.eos_token_ids)
        self.fail = fail
        self.forget = forget
        self.num_generated_tokens = 0  # tokens appended to outputs, drafts verified included (/metrics, status line)
        self.num_draft_tokens = 0  # draft tokens verified (/metrics)
        self.num_accepted_tokens = 0  # ... and kept

    def update_from_output(self, sched: SchedulerOutput, sampling: list[Sequence], result: StepResult,
                           started: float) -> None:
        """`sampling`: the sequences of `result.sampled`'s rows, in order; `started`: when the step began."""
        for s in sched.scheduled:
            req = s.seq.group
            if req.first_scheduled is None:
                req.first_scheduled = started
            if s.seq.seq_id in result.prompt_logprobs:
                # entry p is token p + 1's; this step's start from where it began (the scheduler has
                # counted its tokens): a prompt preempted midway is computed again from its start
                state, start = self.states[s.seq.seq_id], s.seq.num_computed_tokens - s.num_new_tokens
                if len(state.prompt_logprobs) < min(start, s.seq.num_prompt_tokens - 1):  # the cache gave those before start
                    cached, cached_top = s.seq.cached_prompt_logprobs
                    state.prompt_logprobs[:], state.prompt_top[:] = cached[:start], cached_top[:start]
                del state.prompt_logprobs[start:], state.prompt_top[start:]
                state.prompt_logprobs.extend(result.prompt_logprobs[s.seq.seq_id])
                state.prompt_top.extend(result.prompt_top.get(s.seq.seq_id, ()))
                self.scheduler.blocks.keep_prompt_logprobs(s.seq, state.prompt_logprobs, state.prompt_top)
        for row, seq in enumerate(sampling):
            out = result.sampled
            self._safely(self._append_token, seq, out.token_ids[row], out.logprobs[row],
                         out.top_ids[row], out.top_logprobs[row])
        if result.verified:
            scheduled = {s.seq.seq_id: s for s in sched.scheduled}
            for seq_id, verified in result.verified.items():
                s = scheduled[seq_id]
                self._safely(self._append_verified, s.seq, verified, len(s.spec_tokens))
        self._flush_events({id(s.seq.group): s.seq.group for s in sched.scheduled}.values())

    def _safely(self, append, seq: Sequence, *args) -> None:
        if seq.is_finished:
            return
        try:
            append(seq, *args)
        except Exception as exc:  # one request's failure (grammar, detokenizer) ends that request only
            log.exception("request %s failed", seq.group.request.request_id)
            self.fail(seq.group, GenerationError(str(exc)))

    def _append_verified(self, seq: Sequence, out: SamplerOutput, drafted: int) -> None:
        """Accepted draft tokens plus the model's next one; the drafts' K/V is already cached."""
        state, kept = self.states[seq.seq_id], len(out.token_ids) - 1
        state.drafts_rejected += drafted - kept
        self.num_draft_tokens += drafted
        for i, token in enumerate(zip(out.token_ids, out.logprobs, out.top_ids, out.top_logprobs)):
            if i < kept:  # a kept draft counts as it joins the output (a stop string may end it first)
                state.drafts_kept += 1
                self.num_accepted_tokens += 1
            self._append_token(seq, *token)
            if seq.is_finished:
                return
        self.scheduler.advance(seq, kept)

    def _propose_drafts(self, seq: Sequence, state: SequenceState) -> None:
        stopping = seq.group.request.stopping
        room = min(MAX_DRAFT_TOKENS, stopping.max_new_tokens - seq.num_output_tokens - 1)
        if isinstance(state.drafts, PromptLookup) and len(self.scheduler.running) > LOOKUP_MAX_RUNNING:
            return
        seq.spec_tokens = state.drafts.propose(seq.token_ids, seq.num_output_tokens, room)

    def _append_token(self, seq: Sequence, token_id: int, logprob: float, top_ids, top_logprobs) -> None:
        req: RequestState = seq.group
        state = self.states[seq.seq_id]
        stopping = req.request.stopping
        seq.token_ids.append(token_id)
        self.num_generated_tokens += 1
        token = self._token(token_id, logprob)
        state.tokens.append(token)
        top = [self._token(i, lp) for i, lp in zip(top_ids, top_logprobs)]
        state.top_tokens.append(top)
        answers = state.thinking is None or state.thinking.advance(token_id)
        if answers and state.matcher is not None and not state.matcher.accept(token_id):
            raise GenerationError(f"token {token_id} rejected by the grammar: {state.matcher.error}")
        is_eos = token_id in stopping.extra_eos_token_ids or (
            token_id in self.model_eos_ids and not stopping.ignore_eos)
        # the token that ends the sequence writes no text unless the request keeps it: a stop token
        # need not be a special one (special ones, the model's EOS as a rule, write none anyway)
        text = "" if is_eos and not stopping.keep_stop else state.detokenizer.add(token_id)

        if req.waiting_siblings and seq is req.sequences[0]:
            for sibling in req.waiting_siblings:  # the prompt is cached now: siblings reuse its blocks
                self.scheduler.add(sibling)
            req.waiting_siblings = []

        reason = None
        if is_eos:
            reason = FinishReason.EOS_TOKEN
        elif state.detokenizer.stopped:
            reason = FinishReason.STOP_SEQUENCE
        elif answers and state.matcher is not None and state.matcher.is_terminated():
            reason = FinishReason.EOS_TOKEN
        elif seq.num_output_tokens >= stopping.max_new_tokens or (state.thinking and state.thinking.answer_spent()):
            reason = FinishReason.LENGTH
        req.events.append(TokenEvent(seq.index, token, text, top))
        if reason is not None:
            self._finish_sequence(seq, reason)
        elif state.drafts is not None:
            self._propose_drafts(seq, state)

    def _finish_sequence(self, seq: Sequence, reason: FinishReason) -> None:
        req: RequestState = seq.group
        state = self.states.pop(seq.seq_id)
        self.scheduler.finish(seq)
        tail = "" if state.detokenizer.stopped else state.detokenizer.flush()
        now = time.monotonic()
        first = req.first_scheduled or now
        prefill = prefill_top = None
        if req.request.decoder_input_details and seq.index == 0:
            ids = seq.token_ids[: seq.num_prompt_tokens]
            logprobs = [None] + state.prompt_logprobs
            prefill = [self._token(i, lp) for i, lp in zip(ids, logprobs)]
            if req.request.prompt_top_tokens:  # none before the first token (nor any with top_n_tokens 0)
                tops = state.prompt_top or [((), ())] * len(state.prompt_logprobs)
                prefill_top = [[]] + [[self._token(i, lp) for i, lp in zip(*top)] for top in tops]
        req.events.append(FinalEvent(
            index=seq.index, finish_reason=reason, text=state.detokenizer.output_text,
            generated_tokens=seq.num_output_tokens, prompt_tokens=seq.num_prompt_tokens, seed=state.seed,
            tokens=state.tokens, top_tokens=state.top_tokens, prefill=prefill, prefill_top=prefill_top, text_tail=tail,
            stop_sequence=state.detokenizer.stop_sequence, queue_s=first - req.arrival, inference_s=now - first,
            cached_tokens=seq.num_cached_tokens or 0,
            reasoning_tokens=state.thinking.thought if state.thinking else 0,
            prediction_tokens=((state.drafts_kept, state.drafts_rejected) if isinstance(state.drafts, PredictedOutput)
                               else None)))
        if all(s.is_finished for s in req.sequences) and not req.waiting_siblings:
            self.forget(req)

    def _token(self, token_id: int, logprob: float | None) -> Token:
        return Token(token_id, self.tokenizer.token_text(token_id), logprob, token_id in self.special_ids)

    @staticmethod
    def _flush_events(reqs) -> None:
        by_loop = defaultdict(list)
        for req in reqs:
            if req.events:
                events, req.events = req.events, []
                by_loop[req.sink.loop].append((req.sink.put, events))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(deliver, items)
