"""Draft tokens from a predicted output and from a sequence's own tokens (parley/engine/drafts.py)."""

from parley.engine.drafts import PredictedOutput, PromptLookup, verifies_exactly
from parley.engine.request import SequenceState
from parley.types import GenerationRequest, Reasoning, SamplingParams

PREDICTION = [10, 11, 12, 13, 14, 15, 16]
PROMPT = [1, 2]


def drafts(prediction: PredictedOutput, output: list[int], k: int) -> tuple[list[int], int]:
    return prediction.propose(PROMPT + output, len(output), k), prediction.cursor


def test_the_prediction_is_proposed_from_where_the_output_is():
    prediction = PredictedOutput(PREDICTION)
    assert drafts(prediction, [], 3) == ([10, 11, 12], 0)
    assert drafts(prediction, [10, 11], 3) == ([12, 13, 14], 2)
    assert drafts(prediction, [10, 11, 12, 13], 8) == ([14, 15, 16], 4)


def test_the_output_rejoins_the_prediction_after_leaving_it():
    prediction = PredictedOutput(PREDICTION)
    assert drafts(prediction, [10, 11], 2) == ([12, 13], 2)
    # the model wrote 99 instead of 12, then went on with 13: the n-gram lookup finds 13 again
    assert drafts(prediction, [10, 11, 99], 2) == ([], 2)  # nowhere to rejoin yet
    assert drafts(prediction, [10, 11, 99, 13], 2) == ([14, 15], 4)


def test_the_first_occurrence_at_or_after_the_output_is_taken():
    prediction = PredictedOutput([5, 6, 7, 5, 6, 8, 5, 6, 9])
    assert drafts(prediction, [5, 6], 1) == ([7], 2)
    assert drafts(prediction, [5, 6, 7, 5, 6], 1) == ([8], 5)  # "7 5 6" at 2; not "5 6" at 0
    assert drafts(prediction, [5, 6, 7, 5, 6, 8, 5, 6], 1) == ([9], 8)  # "8 5 6" at 5
    assert drafts(prediction, [5, 6, 7, 5, 6, 8, 5, 6, 9, 1, 5, 6], 1) == ([9], 8)  # "5 6" at 6, not at 0 or 3


def test_a_fork_shares_the_index_and_keeps_its_own_cursor():
    prediction = PredictedOutput(PREDICTION)
    fork = prediction.fork()
    assert fork.starts is prediction.starts
    assert drafts(prediction, [10, 11], 2) == ([12, 13], 2)
    assert drafts(fork, [], 2) == ([10, 11], 0)  # not where the other sequence is
    assert drafts(fork, [10, 11, 12, 13], 1) == ([14], 4) and prediction.cursor == 2


def test_no_room_no_drafts():
    assert drafts(PredictedOutput(PREDICTION), [10], 0) == ([], 0)


def test_prompt_lookup_proposes_what_followed_the_longest_ngram_that_ends_the_sequence():
    lookup = PromptLookup(k=3)
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 4, 5, 9, 3, 7, 1, 2]
    assert lookup.propose(tokens, 0, 8) == [3, 4, 5]  # "1 2" at 0: what followed it, 3 at most
    tokens += [3]
    assert lookup.propose(tokens, 0, 8) == [4, 5, 9]  # "1 2 3" at 0
    tokens += [8]
    assert lookup.propose(tokens, 0, 8) == []  # "3 8" never occurred before
    tokens += [1, 2]
    assert lookup.propose(tokens, 0, 8) == [3, 8, 1]  # "1 2" at 0 and at 8: the latest
    assert lookup.propose(tokens, 0, 1) == [3]  # the room left
    assert lookup.propose(tokens, 0, 0) == []


def test_prompt_lookup_needs_two_tokens_in_common():
    # one token in common drafted mostly wrong tokens: each costs a row of the step (BENCHMARKS.md)
    assert PromptLookup(k=3).propose([5, 6, 7, 5], 0, 8) == []


def test_drafts_are_used_unless_a_thinking_budget_or_a_thinking_grammar_decides_tokens():
    state = SequenceState(detokenizer=None, generator=None, seed=None)
    any_sampling = [SamplingParams(), SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, top_k=20),
                    SamplingParams(logit_bias={1: 2.0}), SamplingParams(top_n_tokens=3),
                    SamplingParams(repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.5),
                    SamplingParams(watermark=True)]
    assert all(verifies_exactly(GenerationRequest("x", sampling=p), state) for p in any_sampling)
    thinks = Reasoning(start_id=1, end_id=2, close_ids=[2])
    budget = Reasoning(start_id=1, end_id=2, close_ids=[2], budget=5)
    assert verifies_exactly(GenerationRequest("x", reasoning=thinks), state)
    assert not verifies_exactly(GenerationRequest("x", reasoning=budget), state)
    state.matcher = object()  # a grammar: its masks follow the drafts (GrammarMatcher.fill_draft_rows)
    assert verifies_exactly(GenerationRequest("x"), state)
    assert not verifies_exactly(GenerationRequest("x", reasoning=thinks), state)
