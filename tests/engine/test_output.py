"""update_from_output alone (parley/engine/output.py): a step's tokens through stop rules, grammars,
a thinking model's rules and detokenization into events, without a model. Characters are tokens:
token id i is chr(i); 0 is the end-of-sequence token."""

from __future__ import annotations

import asyncio

import pytest

from parley.engine.output import OutputProcessor
from parley.engine.request import PreparedRequest, RequestState, SequenceState, Sink
from parley.engine.runner import StepResult
from parley.engine.scheduler import ScheduledSequence, SchedulerOutput
from parley.engine.sequence import Sequence
from parley.engine.thinking import ThinkingState
from parley.sampling.sampler import SamplerOutput
from parley.tokenization.detokenizer import IncrementalDetokenizer
from parley.types import (FinalEvent, FinishReason, GenerationRequest, Reasoning, StoppingCriteria, TokenEvent)

EOS = 0


class CharTokenizer:
    special_ids = frozenset({EOS})
    eos_token_ids = [EOS]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == EOS))

    def token_text(self, token_id):
        return chr(token_id)


class RecordingScheduler:
    def __init__(self):
        self.finished, self.added, self.advanced = [], [], []

    def finish(self, seq):
        self.finished.append(seq)
        seq.status = seq.status.FINISHED

    def add(self, seq):
        self.added.append(seq)

    def advance(self, seq, n):
        self.advanced.append((seq, n))


class Matcher:
    """Accepts only the given text, then is terminated."""

    error = "expected the given text"

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def accept(self, token_id: int) -> bool:
        if self.pos < len(self.text) and chr(token_id) == self.text[self.pos]:
            self.pos += 1
            return True
        return False

    def is_terminated(self) -> bool:
        return self.pos == len(self.text)


class Harness:
    def __init__(self):
        self.tokenizer, self.scheduler, self.states = CharTokenizer(), RecordingScheduler(), {}
        self.failed, self.forgotten, self.delivered = [], [], []
        self.output = OutputProcessor(self.scheduler, self.tokenizer, self.states,
                                      lambda req, error: self.failed.append((req, error)), self.forgotten.append)
        self.loop = asyncio.new_event_loop()  # the sinks' loop, run after each step

    def request(self, request: GenerationRequest, n: int = 1, matcher=None) -> RequestState:
        req = RequestState(PreparedRequest(request, [ord("p")], [None] * n, []), Sink(self.loop, self.delivered.append),
                           arrival=0.0, deadline=None)
        for index in range(n):
            seq = Sequence([ord("p")], group=req, index=index)
            state = SequenceState(IncrementalDetokenizer(self.tokenizer, request.stopping.stop_sequences), None, None,
                                  matcher, thinking=ThinkingState.start(request.reasoning) if request.reasoning else None)
            self.states[seq.seq_id] = state
            req.sequences.append(seq)
        req.waiting_siblings = req.sequences[1:]
        return req

    def step(self, tokens: dict[Sequence, str]) -> list:
        """Each sequence samples its character; returns the events its request's sink got."""
        seqs = list(tokens)
        sched = SchedulerOutput(decodes=[ScheduledSequence(s, 1) for s in seqs])
        result = StepResult(SamplerOutput([ord(tokens[s]) for s in seqs], [-0.5] * len(seqs),
                                          [[] for _ in seqs], [[] for _ in seqs]))
        self.output.update_from_output(sched, seqs, result, started=1.0)
        self.loop.run_until_complete(asyncio.sleep(0))  # deliver what the step sent
        events = [event for batch in self.delivered for event in batch]
        self.delivered.clear()
        return events


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.loop.close()


def request(max_new_tokens=10, stop=(), **kw) -> GenerationRequest:
    return GenerationRequest("p", stopping=StoppingCriteria(max_new_tokens=max_new_tokens, stop_sequences=list(stop)),
                             **kw)


def test_tokens_become_events_until_the_budget_ends_the_sequence(h):
    req = h.request(request(max_new_tokens=3))
    seq = req.sequences[0]
    assert [e.text for e in h.step({seq: "a"}) + h.step({seq: "b"})] == ["a", "b"]
    *tokens, final = h.step({seq: "c"})
    assert isinstance(final, FinalEvent) and final.finish_reason is FinishReason.LENGTH
    assert (final.text, final.generated_tokens, final.prompt_tokens) == ("abc", 3, 1)
    assert h.scheduler.finished == [seq] and h.forgotten == [req] and seq.seq_id not in h.states
    assert final.queue_s == 1.0  # arrival 0.0, first scheduled at the step's start
    assert h.output.num_generated_tokens == 3


def test_end_of_sequence_and_stop_strings(h):
    eos = h.request(request())
    stop = h.request(request(stop=["xy"]))
    a, b = eos.sequences[0], stop.sequences[0]
    h.step({a: "h", b: "x"})
    events = h.step({a: chr(EOS), b: "y"})
    finals = {e.finish_reason: e for e in events if isinstance(e, FinalEvent)}
    assert finals[FinishReason.EOS_TOKEN].text == "h"
    assert finals[FinishReason.STOP_SEQUENCE].text == "" and finals[FinishReason.STOP_SEQUENCE].stop_sequence == "xy"


def test_a_terminated_grammar_ends_the_sequence_and_a_rejected_token_fails_only_its_request(h):
    ok = h.request(request(), matcher=Matcher("ok"))
    bad = h.request(request(), matcher=Matcher("ok"))
    h.step({ok.sequences[0]: "o", bad.sequences[0]: "o"})
    events = h.step({ok.sequences[0]: "k", bad.sequences[0]: "x"})
    assert [e.finish_reason for e in events if isinstance(e, FinalEvent)] == [FinishReason.EOS_TOKEN]
    assert [req for req, _ in h.failed] == [bad] and "rejected by the grammar" in str(h.failed[0][1])


def test_siblings_wait_for_the_first_token_then_share_its_cached_prompt(h):
    req = h.request(request(), n=3)
    assert h.scheduler.added == []
    h.step({req.sequences[0]: "a"})
    assert h.scheduler.added == req.sequences[1:] and req.waiting_siblings == []


def test_a_thinking_sequence_counts_its_thought_and_its_answer_cap(h):
    rules = Reasoning(start_id=ord("<"), end_id=ord(">"), close_ids=[ord(">")], phase="thinking",
                      max_answer_tokens=2)
    req = h.request(request(max_new_tokens=50, reasoning=rules))
    seq = req.sequences[0]
    for char in "hm>ab":
        events = h.step({seq: char})
    final = events[-1]
    assert isinstance(final, FinalEvent) and final.finish_reason is FinishReason.LENGTH
    assert (final.reasoning_tokens, final.generated_tokens, final.text) == (3, 5, "hm>ab")


def test_the_events_of_one_step_reach_their_loop_in_one_wake_up(h, monkeypatch):
    a, b = h.request(request()), h.request(request())
    wake_ups = []
    monkeypatch.setattr(h.loop, "call_soon_threadsafe", lambda fn, items: wake_ups.append(items))
    h.output.update_from_output(SchedulerOutput(decodes=[ScheduledSequence(a.sequences[0], 1),
                                                         ScheduledSequence(b.sequences[0], 1)]),
                                [a.sequences[0], b.sequences[0]],
                                StepResult(SamplerOutput([ord("1"), ord("2")], [0.0, 0.0], [[], []], [[], []])), 1.0)
    assert len(wake_ups) == 1
    assert [[e.text for e in events] for _, events in wake_ups[0]] == [["1"], ["2"]]
    assert all(isinstance(e, TokenEvent) for _, events in wake_ups[0] for e in events)
