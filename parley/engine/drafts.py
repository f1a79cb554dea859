"""Draft tokens from a predicted output (Mistral's `prediction`, OpenAI's predicted outputs).

The prediction is a guess of the whole answer. After each step we find where the output's last
few tokens occur in the prediction (at or after where we last were) and propose what follows;
when the output has left the prediction, an n-gram lookup finds where it rejoins.
"""

from __future__ import annotations

from parley.types import GenerationRequest


def propose(prediction: list[int], cursor: int, output: list[int], k: int) -> tuple[list[int], int]:
    """Up to `k` draft tokens and the new cursor (index in `prediction` of the next expected token)."""
    if k <= 0:
        return [], cursor
    if not output:
        return prediction[:k], 0
    for n in (3, 2, 1):
        if len(output) < n:
            continue
        tail = output[-n:]
        for j in range(max(cursor - n, 0), len(prediction) - n + 1):
            if prediction[j : j + n] == tail:
                cursor = j + n
                return prediction[cursor : cursor + k], cursor
    return [], cursor


def verifies_exactly(request: GenerationRequest, state) -> bool:
    """Whether draft tokens may be used: they are checked by greedy argmax, which is exact only for
    plain greedy decoding with no grammar (`state.matcher`) or thinking budget forcing tokens."""
    p = request.sampling
    plain = not (p.do_sample or p.frequency_penalty or p.presence_penalty or p.logit_bias or p.watermark
                 or p.top_n_tokens or p.repetition_penalty != 1.0)
    return plain and state.matcher is None and (request.reasoning is None or request.reasoning.budget is None)
