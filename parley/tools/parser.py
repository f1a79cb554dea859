"""Tool calls read back out of generated text (see `format.py`), whole or as it streams.

A call's `arguments` is the JSON text the model wrote with the whitespace between tokens removed,
so the streamed fragments concatenate to exactly the string the whole-text parse returns. A call
cut short (e.g. by max_tokens) is dropped by the whole-text parse, but the stream may already
have announced it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from parley.tokenization.detokenizer import partial_suffix
from parley.tokenization.reasoning import ReasoningSplitter
from parley.tools.format import CALL_END, CALL_START, new_call_id
from parley.types import FinalEvent, TokenEvent, ToolCall

_DECODER = json.JSONDecoder()
_JSON_WHITESPACE = " \t\n\r"
# A compact call that names its function first, up to where the arguments object begins.
_NAME_FIRST = re.compile(r'\{"name":("(?:[^"\\]|\\.)*"),"arguments":')


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split a whole output into its text content (before the first call) and its complete calls."""
    start = text.find(CALL_START)
    if start < 0:
        return text, []
    calls: list[ToolCall] = []
    pos = start
    while text.startswith(CALL_START, pos):
        scanner = _CallScanner(len(calls))
        pos += len(CALL_START)
        pos = _skip_whitespace(text, pos + scanner.feed(text[pos:]))
        if scanner.call is None or not text.startswith(CALL_END, pos):
            break
        calls.append(ToolCall(id=new_call_id(), name=scanner.call[0], arguments=scanner.call[1]))
        pos = _skip_whitespace(text, pos + len(CALL_END))
    return text[:start], calls


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallStart:
    """Call number `index` (0-based) begins: OpenAI's first `delta.tool_calls` entry of a call."""

    index: int
    id: str
    name: str


@dataclass
class ToolCallArgumentsDelta:
    index: int
    arguments: str  # the next piece of the call's arguments JSON


@dataclass
class ReasoningDelta:
    """The next piece of a thinking model's reasoning (see tokenization/reasoning.py)."""

    text: str


StreamEvent = ContentDelta | ReasoningDelta | ToolCallStart | ToolCallArgumentsDelta


class ToolCallStreamParser:
    """Turns streamed text deltas into content deltas and tool-call pieces.

    Call `feed` with each text delta and `finish` at the end; both return the events now known.
    """

    def __init__(self) -> None:
        self._pending = ""  # text received but not yet turned into events
        self._state = "content"  # content -> call -> call_end -> between -> call ... | done
        self._call: _CallScanner | None = None
        self._calls = 0

    def feed(self, delta: str) -> list[StreamEvent]:
        self._pending += delta
        events: list[StreamEvent] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[StreamEvent]:
        """Flush text held back because it might have begun a call."""
        held, self._pending = self._pending, ""
        return [ContentDelta(held)] if self._state == "content" and held else []

    def _step(self, events: list[StreamEvent]) -> bool:
        """Turn what it can of `_pending` into events; False when it must wait for more text."""
        if self._state == "content":
            return self._read_content(events)
        if self._state == "call":
            used = self._call.feed(self._pending)
            self._pending = self._pending[used:]
            events.extend(self._call.take_events())
            if self._call.done:
                self._state = "call_end" if self._call.call else "done"
            return self._call.done
        if self._state == "call_end":
            return self._expect(CALL_END, "between")
        if self._state == "between":
            return self._expect(CALL_START, "call")
        self._pending = ""  # done: the format allows nothing more
        return False

    def _read_content(self, events: list[StreamEvent]) -> bool:
        start = self._pending.find(CALL_START)
        shown = start if start >= 0 else len(self._pending) - partial_suffix(self._pending, CALL_START)
        if shown:
            events.append(ContentDelta(self._pending[:shown]))
        if start < 0:
            self._pending = self._pending[shown:]
            return False
        self._pending = self._pending[start:]
        return self._expect(CALL_START, "call")

    def _expect(self, marker: str, next_state: str) -> bool:
        """Move past whitespace and `marker` into `next_state`; anything else ends the calls."""
        self._pending = self._pending.lstrip(_JSON_WHITESPACE)
        if self._pending.startswith(marker):
            self._pending = self._pending[len(marker) :]
            self._state = next_state
            if next_state == "call":
                self._call = _CallScanner(self._calls)
                self._calls += 1
            return True
        if not marker.startswith(self._pending):
            self._state = "done"
            return True
        return False


class _CallScanner:
    """One call's JSON object read as it arrives; its arguments stream once its name is known."""

    def __init__(self, index: int):
        self.index = index
        self.done = False  # the object is over (or was no object)
        self.call: tuple[str, str] | None = None  # (name, arguments) once done, if it was a call
        self._json = _JsonCompactor()
        self._arguments_start: int | None = None  # in the compact text
        self._arguments_end: int | None = None
        self._arguments_sent = 0
        self._events: list[StreamEvent] = []

    def feed(self, text: str) -> int:
        """Read `text` up to the end of the object; returns how many characters were used."""
        for i, char in enumerate(text):
            if not self._json.chars and char not in _JSON_WHITESPACE and char != "{":
                self.done = True  # not an object, so not a call
                return i
            before = self._json.depth
            self._json.take(char)
            after = self._json.depth
            if after == 2 > before and self._arguments_start is None:
                self._announce_if_arguments()
            elif (
                after == 1 < before and self._arguments_start is not None and self._arguments_end is None
            ):
                self._arguments_end = len(self._json.chars)
            elif after == 0 < before:
                self._close()
                return i + 1
        self._send_arguments()
        return len(text)

    def take_events(self) -> list[StreamEvent]:
        events, self._events = self._events, []
        return events

    def _announce_if_arguments(self) -> None:
        """An object just opened inside the call: if it is the arguments, after the name, announce the call."""
        match = _NAME_FIRST.fullmatch("".join(self._json.chars[:-1]))
        if match:
            self._arguments_start = len(self._json.chars) - 1
            self._events.append(ToolCallStart(self.index, new_call_id(), json.loads(match.group(1))))

    def _send_arguments(self) -> None:
        if self._arguments_start is None:
            return
        end = len(self._json.chars) if self._arguments_end is None else self._arguments_end
        fragment = "".join(self._json.chars[self._arguments_start + self._arguments_sent : end])
        if fragment:
            self._events.append(ToolCallArgumentsDelta(self.index, fragment))
            self._arguments_sent += len(fragment)

    def _close(self) -> None:
        self.done = True
        self.call = _call_from_json("".join(self._json.chars))
        if self._arguments_start is not None:
            self._send_arguments()
        elif self.call:  # the name came after the arguments: all is known only now
            self._events.append(ToolCallStart(self.index, new_call_id(), self.call[0]))
            self._events.append(ToolCallArgumentsDelta(self.index, self.call[1]))


class _JsonCompactor:
    """Copies JSON text without the whitespace between its tokens, tracking the nesting depth."""

    def __init__(self) -> None:
        self.chars: list[str] = []
        self.depth = 0
        self._in_string = self._escaped = False

    def take(self, char: str) -> None:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
        elif char in _JSON_WHITESPACE:
            return
        elif char == '"':
            self._in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
        self.chars.append(char)


def _call_from_json(compact: str) -> tuple[str, str] | None:
    """(name, arguments text) of a compact call object; None if it is not a call."""
    try:
        members = _members(compact)
    except (ValueError, IndexError):
        return None
    name, arguments = members.get("name", ""), members.get("arguments", "")
    if not (name.startswith('"') and arguments.startswith("{")):
        return None
    return json.loads(name), arguments


def _members(compact: str) -> dict[str, str]:
    """The members of a compact JSON object, each value as its own JSON text."""
    if compact == "{}":
        return {}
    members: dict[str, str] = {}
    pos = 0  # at the "{" or "," before each member
    while compact[pos] != "}":
        if compact[pos] not in "{," or compact[pos + 1] != '"':
            raise ValueError("not an object")
        key, pos = json.decoder.scanstring(compact, pos + 2)  # pos: after the key's closing quote
        if compact[pos] != ":":
            raise ValueError("not an object")
        _, end = _DECODER.raw_decode(compact, pos + 1)
        members[key] = compact[pos + 1 : end]
        pos = end
    return members


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _JSON_WHITESPACE:
        pos += 1
    return pos


class OutputEvents:
    """A streamed answer's text, token by token, as stream events: a thinking model's reasoning split
    off first (`phase`: where its prompt left it; None: no split), the rest parsed for tool calls
    when the request offered tools, else all content."""

    def __init__(self, tools: bool, phase: str | None = None):
        self._parser = ToolCallStreamParser() if tools else None
        self._splitter = ReasoningSplitter(phase) if phase else None

    def of(self, event: TokenEvent | FinalEvent) -> list[StreamEvent]:
        if isinstance(event, TokenEvent):
            return self._content(self._split(event.text, end=False), end=False)
        return self._content(self._split(event.text_tail, end=True), end=True)

    def _split(self, text: str, end: bool) -> list[tuple[str, str]]:
        if self._splitter is None:
            return [("content", text)]
        return self._splitter.feed(text) + (self._splitter.finish() if end else [])

    def _content(self, pieces: list[tuple[str, str]], end: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for kind, text in pieces:
            if kind == "reasoning":
                events.append(ReasoningDelta(text))
            elif self._parser is None:
                events.append(ContentDelta(text))
            else:
                events += self._parser.feed(text)
        if end and self._parser is not None:
            events += self._parser.finish()
        return events
