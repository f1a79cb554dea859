"""The engine loop: schedule -> grammar mask -> run -> update, one step at a time, in its own thread.

Requests arrive and are aborted through an inbox (thread-safe); each request's events leave
through its `sink`, called once per step with the events of that step (or with an exception), on
the sink's event loop. One step's events for every request of a loop travel in one wake-up of that
loop: a wake-up per request made the event loop fight the engine thread for the GIL and the cores.
Anything else that must not race a step (loading or unloading a LoRA adapter) goes through the
inbox too, as a function `call` runs between steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from parley.adapters.registry import LoRARegistry
from parley.engine.drafts import propose
from parley.engine.runner import ModelRunner
from parley.engine.scheduler import Scheduler, SchedulerOutput
from parley.engine.sequence import Sequence
from parley.sampling.metadata import SamplingRow
from parley.structured import allocate_bitmask, bitmask_to_bool, fill_bitmasks
from parley.tokenization.detokenizer import IncrementalDetokenizer
from parley.types import (FinalEvent, FinishReason, GenerationError, GenerationRequest, NotFoundError,
                          RequestTimeoutError, Token, TokenEvent)

log = logging.getLogger("parley.engine")

MAX_DRAFT_TOKENS = 8  # per step; verifying them costs little more than one token on a memory-bound step



@dataclass(frozen=True)
class Sink:
    """Where a request's events go: `put` (a list of events, or an exception that ends the request)
    runs on `loop`."""

    loop: asyncio.AbstractEventLoop
    put: Callable[[object], None]

    def send(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.put, item)


def _deliver(items: list[tuple[Callable[[object], None], object]]) -> None:
    for put, item in items:
        put(item)


@dataclass
class PreparedRequest:
    """A validated request: prompt tokenized, seeds chosen, grammar compiled."""

    request: GenerationRequest
    prompt_ids: list[int]
    seeds: list[int | None]
    matchers: list  # one grammar matcher per sequence, or empty
    draft_ids: list[int] = field(default_factory=list)  # predicted output, verified as draft tokens
    cache_salt: int = 0  # prefix-cache namespace: one per LoRA adapter load, 0 for the base model
    lora_id: int = 0  # the LoRA adapter load it runs with (LoRARegistry); 0: the base model


@dataclass
class SequenceState:
    """Everything about one sequence's output that the scheduler does not need."""

    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    seed: int | None
    matcher: object | None = None
    tokens: list[Token] = field(default_factory=list)
    top_tokens: list[list[Token]] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    draft: list[int] = field(default_factory=list)  # empty unless the sequence can speculate exactly
    draft_cursor: int = 0


@dataclass
class RequestState:
    prepared: PreparedRequest
    sink: Sink
    arrival: float
    deadline: float | None
    sequences: list[Sequence] = field(default_factory=list)
    waiting_siblings: list[Sequence] = field(default_factory=list)  # started once the prompt is cached
    first_scheduled: float | None = None
    events: list = field(default_factory=list)

    @property
    def request(self) -> GenerationRequest:
        return self.prepared.request


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, tokenizer, vocab_size: int,
                 adapters: LoRARegistry | None = None):
        self.scheduler = scheduler
        self.runner = runner
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.requests: dict[str, RequestState] = {}
        self.states: dict[int, SequenceState] = {}
        self.special_ids = tokenizer.special_ids
        self.model_eos_ids = frozenset(tokenizer.eos_token_ids)
        self._stopping = False
        self.fatal_error: BaseException | None = None  # what stopped the loop, if anything did
        self.num_steps = 0  # forward passes run
        # Fills grammar bitmasks while the forward runs (llguidance only: no torch op off the engine thread).
        self._grammar_thread = ThreadPoolExecutor(1, thread_name_prefix="parley-grammar")

    # -- thread-safe entry points ------------------------------------------------------------
    def submit(self, prepared: PreparedRequest, sink: Sink) -> None:
        self.inbox.put(("add", prepared, sink, time.monotonic()))
        if self.fatal_error is not None:  # the loop is gone: nobody else will answer it
            self._refuse_inbox()

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def stop(self) -> None:
        self._stopping = True
        self.inbox.put(("stop",))
        self._grammar_thread.shutdown(wait=False)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between two steps; the future holds its result or error."""
        future: Future = Future()
        self.inbox.put(("call", fn, future))
        if self.fatal_error is not None:
            self._refuse_inbox()
        return future

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # -- the loop ----------------------------------------------------------------------------
    def run_forever(self, num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)  # OpenMP thread settings are per calling thread
        try:
            while not self._stopping:
                self._drain_inbox(block=not self.scheduler.has_work)
                if self.scheduler.has_work and not self._stopping:
                    self.step()
        except BaseException as exc:  # a fault outside a step's own guards: fail everything, hang nothing
            log.exception("engine loop stopped")
            self.fatal_error = exc
            for req in list(self.requests.values()):
                self._fail(req, self._stopped())
            self._refuse_inbox()  # and the thread ends: the log above has the traceback

    def _stopped(self) -> GenerationError:
        return GenerationError(f"engine stopped: {self.fatal_error!r}")

    def _refuse_inbox(self) -> None:
        """Answers what waits in the inbox with the fatal error (from any thread: sinks and futures are
        thread-safe, and each item is taken once)."""
        error = self._stopped()
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                item[2].send(error)
            elif item[0] == "call":
                item[2].set_exception(error)

    def step(self) -> None:
        self._expire_deadlines()
        try:
            sched = self.scheduler.schedule()
        except RuntimeError as exc:  # the head of the queue can never fit in the KV cache
            self._fail(self.scheduler.waiting[0].group, GenerationError(str(exc)))
            return
        if sched.is_empty:
            return
        now = time.monotonic()
        sampling = [s.seq for s in sched.scheduled if s.samples and not s.spec_tokens]
        filled = None
        try:
            allowed, filled = self._grammar_mask(sampling)
            result = self.runner.execute(sched, [self._sampling_row(seq) for seq in sampling], allowed)
        except Exception as exc:  # a failed forward: fail the requests in it, keep serving the rest
            log.exception("engine step failed")
            for req in {id(s.seq.group): s.seq.group for s in sched.scheduled}.values():
                self._fail(req, GenerationError(f"generation failed: {exc}"))
            return
        finally:
            if filled is not None:
                filled.exception()  # the matchers advance below: their mask must be done with them
        self.num_steps += 1
        self.scheduler.update(sched)
        for s in sched.scheduled:
            req = s.seq.group
            if req.first_scheduled is None:
                req.first_scheduled = now
            if s.seq.seq_id in result.prompt_logprobs:
                self.states[s.seq.seq_id].prompt_logprobs.extend(result.prompt_logprobs[s.seq.seq_id])
        for row, seq in enumerate(sampling):
            out = result.sampled
            self._safely(self._append_token, seq, out.token_ids[row], out.logprobs[row],
                         out.top_ids[row], out.top_logprobs[row])
        for seq_id, (tokens, logprobs) in result.verified.items():
            self._safely(self._append_verified, self._scheduled_seq(sched, seq_id), tokens, logprobs)
        self._flush_events({id(s.seq.group): s.seq.group for s in sched.scheduled}.values())

    def _safely(self, append, seq: Sequence, *args) -> None:
        if seq.is_finished:
            return
        try:
            append(seq, *args)
        except Exception as exc:  # one request's failure (grammar, detokenizer) ends that request only
            log.exception("request %s failed", seq.group.request.request_id)
            self._fail(seq.group, GenerationError(str(exc)))

    @staticmethod
    def _scheduled_seq(sched: SchedulerOutput, seq_id: int) -> Sequence:
        return next(s.seq for s in sched.scheduled if s.seq.seq_id == seq_id)

    # -- requests ----------------------------------------------------------------------------
    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self.inbox.get(block=block)
            while True:
                self._handle(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, item: tuple) -> None:
        if item[0] == "add":
            self._add(*item[1:])
        elif item[0] == "abort":
            req = self.requests.get(item[1])
            if req is not None:
                self._finish_request(req)
        elif item[0] == "call":
            fn, future = item[1:]
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    def _add(self, prepared: PreparedRequest, sink: Sink, arrival: float) -> None:
        request = prepared.request
        if prepared.lora_id and not self.adapters.acquire(prepared.lora_id):
            sink.send(NotFoundError(f"adapter {request.adapter_id!r} was unloaded"))
            return
        deadline = arrival + request.timeout_s if request.timeout_s is not None else None
        req = RequestState(prepared, sink, arrival, deadline)
        tail = prepared.prompt_ids[-4:]
        for index, seed in enumerate(prepared.seeds):
            seq = Sequence(prepared.prompt_ids, group=req, index=index, cache_salt=prepared.cache_salt,
                           lora_id=prepared.lora_id,
                           needs_prompt_logprobs=request.decoder_input_details and index == 0)
            generator = None
            if request.sampling.do_sample:
                generator = torch.Generator(device=self.runner.device)
                generator.manual_seed(seed)
            state = SequenceState(
                IncrementalDetokenizer(self.tokenizer, request.stopping.stop_sequences, prompt_tail_ids=tail),
                generator, seed, prepared.matchers[index] if prepared.matchers else None)
            if prepared.draft_ids and self._verifies_exactly(request, state):
                state.draft = prepared.draft_ids
            self.states[seq.seq_id] = state
            req.sequences.append(seq)
        self.requests[request.request_id] = req
        self.scheduler.add(req.sequences[0])
        req.waiting_siblings = req.sequences[1:]

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for req in [r for r in self.requests.values() if r.deadline is not None and now > r.deadline]:
            self._fail(req, RequestTimeoutError(
                f"request timed out after {req.request.timeout_s * 1e6:.0f} microseconds"))

    def _fail(self, req: RequestState, error: Exception) -> None:
        self._finish_request(req)
        req.events.clear()
        req.sink.send(error)

    def _finish_request(self, req: RequestState) -> None:
        for seq in req.sequences:
            if not seq.is_finished:
                self.scheduler.finish(seq)
            self.states.pop(seq.seq_id, None)
        req.waiting_siblings = []
        self._forget(req)

    def _forget(self, req: RequestState) -> None:
        """The request is over: the engine lets go of it and of its adapter."""
        if self.requests.pop(req.request.request_id, None) is not None and req.prepared.lora_id:
            self.adapters.release(req.prepared.lora_id)

    # -- one sampled token -------------------------------------------------------------------
    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        req: RequestState = seq.group
        state = self.states[seq.seq_id]
        params, stopping = req.request.sampling, req.request.stopping
        needs_history = params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty
        suppressed = ()
        if seq.num_output_tokens < stopping.min_new_tokens:
            suppressed = tuple(self.model_eos_ids.union(stopping.extra_eos_token_ids))
        return SamplingRow(
            params=params,
            generator=state.generator,
            prompt_ids=seq.token_ids[: seq.num_prompt_tokens] if needs_history else [],
            output_ids=seq.output_ids if needs_history or params.watermark else [],
            suppressed_ids=suppressed,
        )

    def _grammar_mask(self, sampling: list[Sequence]) -> tuple[Callable[[], torch.Tensor] | None, Future | None]:
        """The allowed tokens of the sampling rows as a function giving [B, V] bools once the forward
        has run, and the future of the bitmask being filled meanwhile on the grammar thread.
        (None, None) when no row is constrained."""
        matchers = [self.states[seq.seq_id].matcher for seq in sampling]
        if all(m is None for m in matchers):
            return None, None
        bitmask = allocate_bitmask(len(matchers), self.vocab_size)
        filled = self._grammar_thread.submit(fill_bitmasks, matchers, bitmask)

        def allowed() -> torch.Tensor:
            filled.result()
            return bitmask_to_bool(bitmask, self.vocab_size).to(self.runner.device)

        return allowed, filled

    @staticmethod
    def _verifies_exactly(request: GenerationRequest, state: SequenceState) -> bool:
        """Draft tokens are checked by greedy argmax, which is exact only for plain greedy decoding."""
        p = request.sampling
        plain = not (p.do_sample or p.frequency_penalty or p.presence_penalty or p.logit_bias or p.watermark
                     or p.top_n_tokens or p.repetition_penalty != 1.0)
        return plain and state.matcher is None

    def _append_verified(self, seq: Sequence, tokens: list[int], logprobs: list[float]) -> None:
        """Accepted draft tokens plus the model's next one; the drafts' K/V is already cached."""
        for token_id, logprob in zip(tokens, logprobs):
            self._append_token(seq, token_id, logprob, (), ())
            if seq.is_finished:
                return
        self.scheduler.advance(seq, len(tokens) - 1)

    def _propose_drafts(self, seq: Sequence, state: SequenceState) -> None:
        stopping = seq.group.request.stopping
        room = min(MAX_DRAFT_TOKENS, stopping.max_new_tokens - seq.num_output_tokens - 1)
        if seq.num_output_tokens < stopping.min_new_tokens:
            room = 0  # EOS is suppressed until then, which greedy verification does not model
        seq.spec_tokens, state.draft_cursor = propose(state.draft, state.draft_cursor, seq.output_ids, room)

    def _append_token(self, seq: Sequence, token_id: int, logprob: float, top_ids, top_logprobs) -> None:
        req: RequestState = seq.group
        state = self.states[seq.seq_id]
        stopping = req.request.stopping
        seq.token_ids.append(token_id)
        token = self._token(token_id, logprob)
        state.tokens.append(token)
        top = [self._token(i, lp) for i, lp in zip(top_ids, top_logprobs)]
        state.top_tokens.append(top)
        if state.matcher is not None and not state.matcher.accept(token_id):
            raise GenerationError(f"token {token_id} rejected by the grammar: {state.matcher.error}")
        text = state.detokenizer.add(token_id)

        if req.waiting_siblings and seq is req.sequences[0]:
            for sibling in req.waiting_siblings:  # the prompt is cached now: siblings reuse its blocks
                self.scheduler.add(sibling)
            req.waiting_siblings = []

        reason = None
        is_eos = token_id in self.model_eos_ids or token_id in stopping.extra_eos_token_ids
        if is_eos:
            reason = FinishReason.EOS_TOKEN
        elif state.detokenizer.stopped:
            reason = FinishReason.STOP_SEQUENCE
        elif state.matcher is not None and state.matcher.is_terminated():
            reason = FinishReason.EOS_TOKEN
        elif seq.num_output_tokens >= stopping.max_new_tokens:
            reason = FinishReason.LENGTH
        req.events.append(TokenEvent(seq.index, token, text, top))
        if reason is not None:
            self._finish_sequence(seq, reason)
        elif state.draft:
            self._propose_drafts(seq, state)

    def _finish_sequence(self, seq: Sequence, reason: FinishReason) -> None:
        req: RequestState = seq.group
        state = self.states.pop(seq.seq_id)
        self.scheduler.finish(seq)
        tail = "" if state.detokenizer.stopped else state.detokenizer.flush()
        now = time.monotonic()
        first = req.first_scheduled or now
        prefill = None
        if req.request.decoder_input_details and seq.index == 0:
            ids = seq.token_ids[: seq.num_prompt_tokens]
            logprobs = [None] + state.prompt_logprobs
            prefill = [Token(i, self.tokenizer.token_text(i), lp, i in self.special_ids) for i, lp in zip(ids, logprobs)]
        req.events.append(FinalEvent(
            index=seq.index, finish_reason=reason, text=state.detokenizer.output_text,
            generated_tokens=seq.num_output_tokens, prompt_tokens=seq.num_prompt_tokens, seed=state.seed,
            tokens=state.tokens, top_tokens=state.top_tokens, prefill=prefill, text_tail=tail,
            stop_sequence=state.detokenizer.stop_sequence, queue_s=first - req.arrival, inference_s=now - first))
        if all(s.is_finished for s in req.sequences) and not req.waiting_siblings:
            self._forget(req)

    def _token(self, token_id: int, logprob: float | None) -> Token:
        return Token(token_id, self.tokenizer.token_text(token_id), logprob, token_id in self.special_ids)

    def _flush_events(self, reqs) -> None:
        by_loop = defaultdict(list)
        for req in reqs:
            if req.events:
                events, req.events = req.events, []
                by_loop[req.sink.loop].append((req.sink.put, events))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)
