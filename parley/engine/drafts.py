"""Draft tokens, verified by the next step (runner._verify), from one of two sources.

A predicted output (GenerationRequest.draft_text) is a guess of the whole
answer. After each step we find where the output's last few tokens occur in the prediction (at or
after where we last were) and propose what follows; when the output has left the prediction, an
n-gram lookup finds where it rejoins.

Without one, `--speculate N` looks the sequence's last tokens up in its own prompt and
output (prompt lookup): answers that quote or repeat, as code edits, summaries and extraction do,
continue as they did before.
"""

from __future__ import annotations

from bisect import bisect_left

from parley.types import GenerationRequest

MAX_DRAFT_TOKENS = 8  # per step and sequence; each is a row of the step (4 drafts: 1.4x a one-token step, Zen 4)


class PredictedOutput:
    """Drafts from a predicted output: after each step, where the output's last three (else two,
    else one) tokens first occur in the prediction at or after where the output last was, and what
    follows. The prediction's n-grams are indexed once (a 2,000-token prediction the output had left
    was scanned in ~0.6 ms a step before)."""

    NGRAMS = (3, 2, 1)

    def __init__(self, prediction: list[int]):
        self.prediction = prediction
        self.cursor = 0  # index in `prediction` of the next expected token
        self.starts: dict[tuple[int, ...], list[int]] = {}  # n-gram -> where it starts, ascending
        for n in self.NGRAMS:
            for j in range(len(prediction) - n + 1):
                self.starts.setdefault(tuple(prediction[j : j + n]), []).append(j)

    def fork(self) -> PredictedOutput:
        """The same prediction for another sequence of the request (n > 1): its own cursor, the index shared."""
        other = PredictedOutput.__new__(PredictedOutput)
        other.prediction, other.cursor, other.starts = self.prediction, 0, self.starts
        return other

    def propose(self, tokens: list[int], num_output: int, k: int) -> list[int]:
        """Up to `k` draft tokens to follow `tokens`, whose last `num_output` are the output."""
        if k <= 0:
            return []
        if not num_output:
            return self.prediction[:k]
        for n in self.NGRAMS:
            if num_output < n:
                continue
            starts = self.starts.get(tuple(tokens[-n:]), ())
            at = bisect_left(starts, max(self.cursor - n, 0))
            if at < len(starts):
                self.cursor = starts[at] + n
                return self.prediction[self.cursor : self.cursor + k]
        return []


class PromptLookup:
    """Where each 2- and 3-gram of a sequence's tokens last occurred, indexed as the sequence grows
    (two dict updates a token); the draft is what followed the longest n-gram ending the sequence at
    its latest earlier occurrence. Not 1-grams: on the default model (bench/prediction.py
    --speculate 4, greedy, six prompts) they drafted 739 tokens of which 127 were kept, and the
    chats that quote nothing got slower (0.80x); with 2- and 3-grams 97 of 362, none slower."""

    NGRAMS = (3, 2)

    def __init__(self, k: int):
        self.k = k  # draft tokens per step
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> the position after its latest occurrence
        self.indexed = 0  # n-grams ending before this position are in `after`

    def propose(self, tokens: list[int], num_output: int, k: int) -> list[int]:
        """Up to min(k, self.k) draft tokens to follow `tokens` (prompt and output)."""
        end = len(tokens) - 1  # the n-grams ending at the last token are the ones looked up
        for i in range(self.indexed, end):
            for n in self.NGRAMS:
                if i + 1 >= n:
                    self.after[tuple(tokens[i + 1 - n : i + 1])] = i + 1
        self.indexed = max(self.indexed, end)
        k = min(k, self.k)
        if k <= 0:
            return []
        for n in self.NGRAMS:
            at = self.after.get(tuple(tokens[-n:])) if len(tokens) >= n else None
            if at is not None:
                return tokens[at : at + k]
        return []


def verifies_exactly(request: GenerationRequest, state) -> bool:
    """Whether draft tokens may be used: each draft position is sampled as a one-token step would
    sample it there (runner.py), its row taking the drafts before it as output (penalties, the
    watermark's previous token, EOS before min_new_tokens: engine/inputs.py) and its grammar mask
    the one after them (GrammarMatcher.fill_draft_rows). Not with a thinking budget forcing tokens,
    nor with a grammar on a thinking model (the grammar would have to follow the drafts' phases)."""
    if request.reasoning is None:
        return True
    return request.reasoning.budget is None and state.matcher is None
