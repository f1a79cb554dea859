"""Draft tokens from a predicted output (Mistral's `prediction`, OpenAI's predicted outputs).

The prediction is a guess of the whole answer. After each step we find where the output's last
few tokens occur in the prediction (at or after where we last were) and propose what follows;
when the output has left the prediction, an n-gram lookup finds where it rejoins.
"""

from __future__ import annotations


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
