"""Tool calls read back out of generated text in the model's format (`format.py`), whole or as it
streams.

A call's `arguments` is the JSON text the model wrote with the whitespace between tokens removed,
so the streamed fragments concatenate to exactly the string the whole-text parse returns (the
whole-text parse is the stream parser fed at once). A call cut short (e.g. by max_tokens) is
dropped by the whole-text parse, but the stream may already have announced it. The markers are
matched without their surrounding whitespace, so any whitespace around them is allowed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from parley.tokenization.detokenizer import partial_suffix
from parley.tokenization.reasoning import ReasoningSplitter
from parley.tools.format import DEFAULT_FORMAT, ToolFormat
from parley.types import FinalEvent, TokenEvent, ToolCall

_DECODER = json.JSONDecoder()
_JSON_WHITESPACE = " \t\n\r"


def parse_tool_calls(text: str, fmt: ToolFormat = DEFAULT_FORMAT) -> tuple[str, list[ToolCall]]:
    """Split a whole output into its text content (before the first call) and its complete calls."""
    parser = ToolCallStreamParser(fmt)
    events = parser.feed(text) + parser.finish()
    return "".join(event.text for event in events if isinstance(event, ContentDelta)), parser.complete


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
    """Turns streamed text deltas into content deltas and tool-call pieces, in format `fmt`.

    Call `feed` with each text delta and `finish` at the end; both return the events now known.
    `complete` holds the calls written in full so far.
    """

    def __init__(self, fmt: ToolFormat = DEFAULT_FORMAT) -> None:
        self._fmt = fmt
        calls = fmt.calls
        self._lead = calls.lead.strip()  # opens the calls (after a marker token, which shows no text)
        self._end = calls.end.strip()
        self._next = [m for m in (calls.separator.strip(), calls.start.strip()) if m]  # before another call
        self._pending = ""  # text received but not yet turned into events
        # whole formats start "undecided"; then content -> call -> end -> next -> call ... | done
        self._state = "undecided" if calls.whole else "content"
        self._step_in_next = 0
        self._call: _CallScanner | None = None
        self._calls = 0
        self.complete: list[ToolCall] = []

    def feed(self, delta: str) -> list[StreamEvent]:
        self._pending += delta
        events: list[StreamEvent] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[StreamEvent]:
        """Flush text held back because it might have begun a call."""
        held, self._pending = self._pending, ""
        return [ContentDelta(held)] if self._state in ("content", "undecided", "text") and held else []

    def _step(self, events: list[StreamEvent]) -> bool:
        """Turn what it can of `_pending` into events; False when it must wait for more text."""
        if self._state == "undecided":
            return self._decide()
        if self._state == "text":  # a whole format's answer that is no call: all content
            if self._pending:
                events.append(ContentDelta(self._pending))
            self._pending = ""
            return False
        if self._state == "content":
            return self._read_content(events)
        if self._state == "call":
            return self._read_call(events)
        if self._state == "end":
            return self._read_end()
        if self._state == "next":
            return self._read_next()
        self._pending = ""  # done: the format allows nothing more
        return False

    def _decide(self) -> bool:
        """A whole format: the answer is calls when it begins as they do, else it is all content."""
        head = self._lead + "{"
        stripped = self._pending.lstrip(_JSON_WHITESPACE)
        if stripped.startswith(head):
            self._pending = stripped[len(self._lead):]
            self._begin_call()
            return True
        if head.startswith(stripped):
            return False
        self._state = "text"
        return True

    def _read_content(self, events: list[StreamEvent]) -> bool:
        start = self._pending.find(self._lead)
        shown = start if start >= 0 else len(self._pending) - partial_suffix(self._pending, self._lead)
        if shown:
            events.append(ContentDelta(self._pending[:shown]))
        if start < 0:
            self._pending = self._pending[shown:]
            return False
        self._pending = self._pending[start + len(self._lead):]
        self._begin_call()
        return True

    def _begin_call(self) -> None:
        self._state = "call"
        self._call = _CallScanner(self._calls, self._fmt)
        self._calls += 1

    def _read_call(self, events: list[StreamEvent]) -> bool:
        used = self._call.feed(self._pending)
        self._pending = self._pending[used:]
        events.extend(self._call.take_events())
        if self._call.done:
            self._state = "end" if self._call.call else "done"
        return self._call.done

    def _read_end(self) -> bool:
        found = self._match(self._end)
        if found:
            self.complete.append(ToolCall(id=self._call.id, name=self._call.call[0], arguments=self._call.call[1]))
            self._state = "next"
        return found is not None

    def _read_next(self) -> bool:
        """Past the separator and start marker into the next call; anything else ends the calls."""
        if not self._next:  # a format without them: one call
            self._state = "done"
            return True
        found = self._match(self._next[self._step_in_next])
        if found:
            self._step_in_next += 1
            if self._step_in_next == len(self._next):
                self._step_in_next = 0
                self._begin_call()
        return found is not None

    def _match(self, marker: str) -> bool | None:
        """Move past whitespace and `marker`: True; None: wait for more text; False: it is something
        else, which ends the calls."""
        self._pending = self._pending.lstrip(_JSON_WHITESPACE)
        if self._pending.startswith(marker):
            self._pending = self._pending[len(marker):]
            return True
        if marker.startswith(self._pending):
            return None
        self._state = "done"
        return False


class _CallScanner:
    """One call's JSON object read as it arrives; its arguments stream once its name is known."""

    def __init__(self, index: int, fmt: ToolFormat):
        self.index = index
        self.id = fmt.new_call_id()
        self.done = False  # the object is over (or was no object)
        self.call: tuple[str, str] | None = None  # (name, arguments) once done, if it was a call
        self._key = fmt.arguments_key
        # A compact call that names its function first, up to where the arguments object begins.
        self._name_first = re.compile(r'\{"name":("(?:[^"\\]|\\.)*"),' + re.escape(json.dumps(self._key)) + ":")
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
        match = self._name_first.fullmatch("".join(self._json.chars[:-1]))
        if match:
            self._arguments_start = len(self._json.chars) - 1
            self._events.append(ToolCallStart(self.index, self.id, json.loads(match.group(1))))

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
        self.call = _call_from_json("".join(self._json.chars), self._key)
        if self._arguments_start is not None:
            self._send_arguments()
        elif self.call:  # the name came after the arguments: all is known only now
            self._events.append(ToolCallStart(self.index, self.id, self.call[0]))
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


def _call_from_json(compact: str, key: str) -> tuple[str, str] | None:
    """(name, arguments text) of a compact call object; None if it is not a call."""
    try:
        members = _members(compact)
    except (ValueError, IndexError):
        return None
    name, arguments = members.get("name", ""), members.get(key, "")
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


class OutputEvents:
    """A streamed answer's text, token by token, as stream events: a thinking model's reasoning split
    off first (`phase`: where its prompt left it; None: no split), the rest parsed for tool calls
    in the model's format `tools` when the request offered tools (None: all content)."""

    def __init__(self, tools: ToolFormat | None, phase: str | None = None):
        self._parser = ToolCallStreamParser(tools) if tools else None
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
