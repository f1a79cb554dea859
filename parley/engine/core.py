"""The engine loop: schedule -> inputs -> execute -> update_from_output, one step at a time, in its
own thread (vLLM v1's shape).

Requests arrive and are aborted through an inbox (thread-safe); each request's events leave
through its `sink`, called once per step with the events of that step (or with an exception), on
the sink's event loop. One step's events for every request of a loop travel in one wake-up of that
loop: a wake-up per request made the event loop fight the engine thread for the GIL and the cores.
Anything else that must not race a step (loading or unloading a LoRA adapter) goes through the
inbox too, as a function `call` runs between steps.

The pieces, each in its own file: request.py (a request's and its sequences' state), inputs.py
(sampling rows and the allowed-token mask), runner.py (the forward and the sampler), output.py
(a step's tokens applied: stop rules, grammars, detokenization, events).
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import Future
from typing import Callable

import torch

from parley.adapters.registry import LoRARegistry
from parley.engine.drafts import PredictedOutput, PromptLookup, verifies_exactly
from parley.engine.inputs import StepInputs
from parley.engine.output import OutputProcessor
from parley.engine.request import PreparedRequest, RequestState, SequenceState, Sink
from parley.engine.runner import ModelRunner
from parley.engine.scheduler import Scheduler
from parley.engine.sequence import Sequence
from parley.engine.thinking import ThinkingState
from parley.engine.threads import ThreadTuner
from parley.tokenization.detokenizer import IncrementalDetokenizer
from parley.types import GenerationError, NotFoundError, RequestTimeoutError

log = logging.getLogger("parley.engine")


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, tokenizer, vocab_size: int,
                 adapters: LoRARegistry | None = None, threads: ThreadTuner | None = None, speculate: int = 0):
        self.scheduler = scheduler
        self.speculate = speculate  # draft tokens a step from each sequence's own tokens (drafts.PromptLookup)
        self.threads = threads  # how many compute threads each step gets; None: always run_forever's
        self.compute_threads = 0  # the count the steps run on now (for stats, read from other threads)
        self.runner = runner
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.requests: dict[str, RequestState] = {}
        self.states: dict[int, SequenceState] = {}
        self._stopping = False
        self.fatal_error: BaseException | None = None  # what stopped the loop, if anything did
        self.num_steps = 0  # forward passes run
        self.inputs = StepInputs(self.states, vocab_size, frozenset(tokenizer.eos_token_ids), runner.device)
        self.output = OutputProcessor(scheduler, tokenizer, self.states, self._fail, self._forget)

    @property
    def num_generated_tokens(self) -> int:
        return self.output.num_generated_tokens

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
        self.inputs.grammar_thread.shutdown(wait=False)

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
        self.compute_threads = torch.get_num_threads()
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
        shape = (len(sched.decodes), sum(s.num_new_tokens for s in sched.prefills))
        if self.threads is not None and (count := self.threads.threads_for(shape)) != self.compute_threads:
            torch.set_num_threads(count)
            self.compute_threads = count
        started = time.monotonic()
        sampling = [s.seq for s in sched.scheduled if s.samples and not s.spec_tokens]
        filled = None
        try:
            drafting = [s for s in sched.scheduled if s.spec_tokens]
            allowed, draft_allowed, filled = self.inputs.allowed_tokens(sampling, [(s.seq, s.spec_tokens) for s in drafting])
            result = self.runner.execute(sched, [self.inputs.sampling_row(seq) for seq in sampling],
                                         [[self.inputs.sampling_row(s.seq, s.spec_tokens[:i])
                                           for i in range(len(s.spec_tokens) + 1)] for s in drafting],
                                         allowed, draft_allowed)
        except Exception as exc:  # a failed forward: fail the requests in it, keep serving the rest
            log.exception("engine step failed")
            for req in {id(s.seq.group): s.seq.group for s in sched.scheduled}.values():
                self._fail(req, GenerationError(f"generation failed: {exc}"))
            return
        finally:
            if filled is not None:
                filled.exception()  # the matchers advance below: their mask must be done with them
        self.num_steps += 1
        if self.threads is not None:
            self.threads.observe(shape, time.monotonic() - started)
        self.scheduler.update(sched)
        self.output.update_from_output(sched, sampling, result, started)

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
        prediction = PredictedOutput(prepared.draft_ids) if prepared.draft_ids else None  # indexed once, forked per sequence
        for index, seed in enumerate(prepared.seeds):
            seq = Sequence(prepared.prompt_ids, group=req, index=index, cache_salt=prepared.cache_salt,
                           lora_id=prepared.lora_id,
                           needs_prompt_logprobs=request.decoder_input_details and index == 0,
                           prompt_top_n=request.sampling.top_n_tokens if request.prompt_top_tokens else 0,
                           user=request.user)
            generator = None
            if request.sampling.do_sample:
                generator = torch.Generator(device=self.runner.device)
                generator.manual_seed(seed)
            state = SequenceState(
                IncrementalDetokenizer(self.tokenizer, request.stopping.stop_sequences, request.skip_special_tokens,
                                       prompt_tail_ids=tail, keep_stop=request.stopping.keep_stop),
                generator, seed, prepared.matchers[index] if prepared.matchers else None,
                thinking=ThinkingState.start(request.reasoning) if request.reasoning else None)
            if (prepared.draft_ids or self.speculate) and verifies_exactly(request, state):
                state.drafts = prediction.fork() if prediction else PromptLookup(self.speculate)
            self.states[seq.seq_id] = state
            req.sequences.append(seq)
        self.requests[request.request_id] = req
        self.scheduler.add(req.sequences[0])
        req.waiting_siblings = req.sequences[1:]

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for req in [r for r in self.requests.values() if r.deadline is not None and now > r.deadline]:
            self._fail(req, RequestTimeoutError(
                f"request timed out after {req.request.timeout_s:g} s"))

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
