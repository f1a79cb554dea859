"""Models that think before they answer: their markers, where a prompt leaves them, and their
output split into the reasoning and the answer.

A model thinks when its vocabulary holds `<think>` and `</think>` as single tokens and its chat
template writes `</think>` (Qwen3, QwQ, DeepSeek-R1 and its distillations...). Its template then
either leaves the thinking open at the end of the prompt (DeepSeek-R1: everything generated is
thinking until `</think>`), closes an empty one (Qwen3 with `enable_thinking: false`: nothing is),
or lets the model open one with its first token (Qwen3 by default).

The split is of text, as vLLM's and llama.cpp's reasoning parsers do: the markers never reach
either part, nor the whitespace the templates put around them (the leading whitespace of each part
and the trailing whitespace of the reasoning), so the streamed pieces join to the whole split.
"""

from __future__ import annotations

from parley.tokenization.detokenizer import partial_suffix
from parley.types import Reasoning

THINK_START, THINK_END = "<think>", "</think>"
THINKING, ANSWER, MAYBE = "thinking", "answer", "maybe"
_WHITESPACE = " \t\n\r"


def find_reasoning(tokenizer) -> Reasoning | None:
    """The model's thinking markers, or None if it does not think. The forced close is "\\n</think>"
    when that tokenizes to end on the marker, else the marker alone."""
    start, end = tokenizer.backend.token_to_id(THINK_START), tokenizer.backend.token_to_id(THINK_END)
    if start is None or end is None or THINK_END not in (tokenizer.chat_template or ""):
        return None
    close = tokenizer.encode("\n" + THINK_END, add_special_tokens=False)
    return Reasoning(start_id=start, end_id=end, close_ids=close if close[-1] == end else [end])


def prompt_phase(prompt: str) -> str:
    """Where a rendered prompt leaves the model: inside its thinking, past it, or free to open one."""
    start, end = prompt.rfind(THINK_START), prompt.rfind(THINK_END)
    if start > end:
        return THINKING
    if end >= 0 and prompt.rstrip(_WHITESPACE).endswith(THINK_END):
        return ANSWER
    return MAYBE


class ReasoningSplitter:
    """Streamed output text -> (reasoning, content) pieces. `feed` each delta, then `finish`; both
    return the pieces now known, as ("reasoning" | "content", text) pairs."""

    def __init__(self, phase: str):
        self.phase = phase
        self._pending = ""  # text not yet given out: a marker may begin in it
        self._started = {"reasoning": False, "content": False}  # a part's leading whitespace is dropped

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self._pending += delta
        pieces: list[tuple[str, str]] = []
        while self._step(pieces):
            pass
        return pieces

    def finish(self) -> list[tuple[str, str]]:
        held, self._pending = self._pending, ""
        if self.phase == THINKING:
            return self._piece("reasoning", held.rstrip(_WHITESPACE))
        return self._piece("content", held)

    def _step(self, pieces: list[tuple[str, str]]) -> bool:
        """Give out what is known of `_pending`; True when the phase changed and there is more to read."""
        if self.phase == MAYBE:
            text = self._pending.lstrip(_WHITESPACE)
            if text.startswith(THINK_START):
                self._pending, self.phase = text[len(THINK_START):], THINKING
                return True
            if THINK_START.startswith(text):
                return False  # wait: it may still open with the marker
            self.phase = ANSWER
        if self.phase == THINKING:
            end = self._pending.find(THINK_END)
            if end >= 0:
                pieces += self._piece("reasoning", self._pending[:end].rstrip(_WHITESPACE))
                self._pending, self.phase = self._pending[end + len(THINK_END):], ANSWER
                return True
            # hold back what may begin the marker, and trailing whitespace (it may precede the marker)
            keep = len(self._pending) - partial_suffix(self._pending, THINK_END)
            keep = len(self._pending[:keep].rstrip(_WHITESPACE))
            pieces += self._piece("reasoning", self._pending[:keep])
            self._pending = self._pending[keep:]
            return False
        pieces += self._piece("content", self._pending)
        self._pending = ""
        return False

    def _piece(self, kind: str, text: str) -> list[tuple[str, str]]:
        if not self._started[kind]:
            text = text.lstrip(_WHITESPACE)
            self._started[kind] = bool(text)
        return [(kind, text)] if text else []


def split_reasoning(text: str, phase: str) -> tuple[str | None, str]:
    """A whole output as (reasoning or None if it did not think, content)."""
    splitter = ReasoningSplitter(phase)
    pieces = splitter.feed(text) + splitter.finish()
    reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
    return reasoning or None, "".join(t for kind, t in pieces if kind == "content")

