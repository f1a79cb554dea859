"""Streaming detokenization: generated token ids -> text deltas that are safe to send now."""

from __future__ import annotations

from collections.abc import Iterable

from parley.tokenization.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Text of one generated sequence, released as it becomes final.

    Decoding a token alone is wrong in general: a token may hold part of a UTF-8 character, and
    SentencePiece decoders drop a leading space at the start of the text. So, as TGI and vLLM do,
    each step decodes a small window: the ids since `prefix_offset`, compared with the ids in
    [`prefix_offset`, `read_offset`), which were already turned into text. The window restarts
    after every emission, so a step costs O(window), not O(output length).

    Text that could be the start of a stop sequence is held back until it is known not to be one.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop_sequences: list[str],
        skip_special_tokens: bool = True,
        prompt_tail_ids: Iterable[int] = (),
        keep_stop: bool = False,
    ):
        """`keep_stop`: the stop sequence that ends the text stays in it."""
        self._decode = tokenizer.decode
        self._skip_special_tokens = skip_special_tokens
        self._stops = [s for s in stop_sequences if s]
        self._keep_stop = keep_stop
        self._longest_stop = max(map(len, self._stops), default=0)
        # The prompt's last ids give the first generated token its context (e.g. its leading space).
        self._ids = list(prompt_tail_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._released: list[str] = []
        self._held = ""  # decoded text that may begin a stop sequence
        self.stopped = False
        self.stop_sequence: str | None = None  # the one that stopped it (the earliest in the text)

    @property
    def output_text(self) -> str:
        return "".join(self._released) + self._held

    def add(self, token_id: int) -> str:
        """Take the next generated token; return the text that may be shown now."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text, new_text = self._window_texts()
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing visible yet, or a UTF-8 character still incomplete
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(new_text[len(prefix_text) :], final=False)

    def flush(self) -> str:
        """The sequence ended for another reason than a stop sequence: release what was held."""
        if self.stopped:
            return ""
        prefix_text, new_text = self._window_texts()
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._release(new_text[len(prefix_text) :], final=True)

    def _window_texts(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset :]
        read = self._read_offset - self._prefix_offset
        return (
            self._decode(window[:read], self._skip_special_tokens),
            self._decode(window, self._skip_special_tokens),
        )

    def _release(self, text: str, final: bool) -> str:
        pending = self._held + text
        # Any stop sequence touching the new text starts inside `pending`: an earlier start would
        # have been a held-back prefix.
        found = [(i, stop) for i, stop in ((pending.find(stop), stop) for stop in self._stops) if i >= 0]
        if found:
            start, self.stop_sequence = min(found, key=lambda hit: hit[0])
            self.stopped = True
            out, self._held = pending[: start + (len(self.stop_sequence) if self._keep_stop else 0)], ""
        else:
            keep = 0 if final else self._stop_prefix_length(pending)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self._released.append(out)
        return out

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop sequence."""
        for n in range(min(len(text), self._longest_stop - 1), 0, -1):
            suffix = text[-n:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return n
        return 0


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the beginning of `marker`: text to hold back
    while a streamed marker may still be arriving."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
