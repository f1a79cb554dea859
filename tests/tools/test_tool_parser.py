import random
import re

import pytest

from parley.tools import (
    ContentDelta,
    ToolCallArgumentsDelta,
    ToolCallStart,
    ToolCallStreamParser,
    parse_tool_calls,
    tool_call_grammar,
)
from parley.types import ToolCall

TWO_CALLS = (
    'Checking.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}</tool_call>\n'
    '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
)
TEXTS = [
    "",
    "Just text, no calls.",
    "a < b and <tool_ is not a call <tool",
    TWO_CALLS,
    '<tool_call>{"name": "echo", "arguments": {"text": "} ] \\" { </tool_call> \\\\", "n": [1, {"a": null}]}}</tool_call>',
    '<tool_call> {\n  "name" : "spaced",\n  "arguments" : { "a" : [ 1 , 2 ] }\n} </tool_call>\n\n<tool_call>{"name": "b", "arguments": {}}</tool_call>',
    '<tool_call>{"arguments": {"x": 1}, "name": "late_name"}</tool_call>',
    '<tool_call>{"name": "ok", "arguments": {}}</tool_call>\nnot a call',
    '<tool_call>["not", "an", "object"]</tool_call>',
    '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
    'Hi <tool_call>{"name": "unicode", "arguments": {"s": "héllo ✓ \\u00e9"}}</tool_call>',
]


def comparable(calls):
    return [(call.name, call.arguments) for call in calls]


def stream(text, rng):
    """Feed `text` in random pieces; rebuild (content, [(name, arguments)]) from the events."""
    parser, events, pos = ToolCallStreamParser(), [], 0
    while pos < len(text):
        size = rng.randint(1, 8)
        events += parser.feed(text[pos : pos + size])
        pos += size
    events += parser.finish()
    content = "".join(event.text for event in events if isinstance(event, ContentDelta))
    starts = [event for event in events if isinstance(event, ToolCallStart)]
    assert [start.index for start in starts] == list(range(len(starts)))
    calls = [ToolCall(start.id, start.name, "") for start in starts]
    for event in events:
        if isinstance(event, ToolCallArgumentsDelta):
            calls[event.index].arguments += event.arguments
    return content, calls


def test_parse_two_calls():
    content, calls = parse_tool_calls(TWO_CALLS)
    assert content == "Checking.\n"
    assert comparable(calls) == [("get_weather", '{"city":"Paris","days":3}'), ("now", "{}")]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", call.id) for call in calls)
    assert calls[0].id != calls[1].id


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Just text.", ("Just text.", [])),
        (TEXTS[5], ("", [("spaced", '{"a":[1,2]}'), ("b", "{}")])),
        (TEXTS[6], ("", [("late_name", '{"x":1}')])),
        (TEXTS[7], ("", [("ok", "{}")])),
        (TEXTS[8], ("", [])),
        (TEXTS[9], ("", [])),
        ('Hi <tool_call>{"name": "cut", "argum', ("Hi ", [])),
        ('<tool_call>{"name": "no_end", "arguments": {}}', ("", [])),
    ],
)
def test_parse_edge_cases(text, expected):
    content, calls = parse_tool_calls(text)
    assert (content, comparable(calls)) == expected


def test_strings_keep_their_whitespace_and_escapes():
    _, calls = parse_tool_calls(TEXTS[4])
    assert comparable(calls) == [("echo", '{"text":"} ] \\" { </tool_call> \\\\","n":[1,{"a":null}]}')]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_whole_text_parse(text, seed):
    content, calls = parse_tool_calls(text)
    streamed_content, streamed_calls = stream(text, random.Random(seed))
    assert (streamed_content, comparable(streamed_calls)) == (content, comparable(calls))


def test_stream_sends_name_before_arguments_and_arguments_in_pieces():
    parser = ToolCallStreamParser()
    events = []
    for piece in [
        '<tool_call>{"name": "get_weather", "arg',
        'uments": {"city": "Pa',
        'ris"}}</tool_call>',
    ]:
        events.append(parser.feed(piece))
    assert events[0] == []
    assert [type(event) for event in events[1]] == [ToolCallStart, ToolCallArgumentsDelta]
    assert events[1][0].name == "get_weather" and events[1][1].arguments == '{"city":"Pa'
    assert events[2] == [ToolCallArgumentsDelta(0, 'ris"}')]


def test_stream_holds_back_what_may_start_a_call():
    parser = ToolCallStreamParser()
    assert parser.feed("a <tool") == [ContentDelta("a ")]
    assert parser.feed("box>") == [ContentDelta("<toolbox>")]
    assert parser.feed(" <") == [ContentDelta(" ")]
    assert parser.finish() == [ContentDelta("<")]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("parallel", [True, False])
def test_stream_equals_whole_text_on_grammar_output(walk, seed, parallel):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                    "required": ["a", "b"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "say",
                "parameters": {
                    "type": "object",
                    "properties": {"text": {"type": "string"}},
                    "required": ["text"],
                },
            },
        },
    ]
    text = walk(tool_call_grammar(tools, "auto", parallel), seed, prefix="Sure! <tool_call>")
    content, calls = parse_tool_calls(text)
    assert content == "Sure! " and calls
    streamed_content, streamed_calls = stream(text, random.Random(seed))
    assert (streamed_content, comparable(streamed_calls)) == (content, comparable(calls))
