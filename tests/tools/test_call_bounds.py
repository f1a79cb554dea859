"""Forced tool calls end: no call repeats an earlier one of the answer byte for byte, no call is
begun that the tokens left cannot hold (a call as long as the longest so far, then EOS), and the
numbers in the arguments are bounded like every JSON number. Different calls stay allowed."""

import json
import re

import pytest

from parley.structured import allocate_bitmask, bitmask_to_bool
from parley.tools import parse_tool_calls, tool_call_grammar


def tool(name, properties=None):
    parameters = {"type": "object", "properties": properties or {}, "required": list(properties or {}),
                  "additionalProperties": False}
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


WEATHER = tool("get_weather", {"city": {"type": "string", "maxLength": 20},
                               "unit": {"enum": ["celsius", "fahrenheit"]}})
NOW = tool("now")  # no arguments: once named, the whole call is forced
PARIS = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}</tool_call>'
LONDON = '<tool_call>{"name":"get_weather","arguments":{"city":"London","unit":"celsius"}}</tool_call>'


@pytest.fixture
def after(compiler, backend_tokenizer):
    """after(tools, text, max_tokens=None) -> (allowed token texts, number of tokens in text): the
    mask of a required-calls grammar once `text` is written."""

    def run(tools, text, max_tokens=None):
        text = text.replace('":', '": ').replace(',"', ', "')  # written compactly here, spaced as the format is
        matcher = compiler.matcher(tool_call_grammar(tools, "required"), max_tokens)
        tokens = backend_tokenizer.encode(text, add_special_tokens=False).ids
        for token in tokens:
            assert matcher.accept(token), matcher.error
        bitmask = allocate_bitmask(1, compiler.vocab_size)
        matcher.fill_bitmask(bitmask, 0)
        allowed = bitmask_to_bool(bitmask, compiler.vocab_size)[0].nonzero().flatten().tolist()
        return {backend_tokenizer.id_to_token(t) for t in allowed}, len(tokens)

    return run


def test_a_call_may_not_end_as_a_copy_of_an_earlier_one(after):
    allowed, _ = after([WEATHER], PARIS + '\n<tool_call>{"name":"get_weather","arguments":{"city":"Paris","unit":"')
    assert any(t.startswith("f") for t in allowed)
    assert not any(t.startswith("c") for t in allowed)  # "c" forces "elsius": a copy of the first call


def test_a_call_may_differ_anywhere(after):
    allowed, _ = after([WEATHER], PARIS + '\n<tool_call>{"name":"get_weather","arguments":{"city":"Lon')
    assert "don" in allowed
    allowed, _ = after([WEATHER], LONDON + '\n<tool_call>{"name":"get_weather","arguments":{"city":"Paris","unit":"')
    assert any(t.startswith("c") for t in allowed)  # Paris in celsius is new here


def test_a_call_that_can_only_repeat_is_not_begun(after):
    call = '<tool_call>{"name":"now","arguments":{}}</tool_call>'
    allowed, _ = after([NOW], call)
    assert allowed == {"<|im_end|>", "<|endoftext|>"}  # a second call could only be the same
    allowed, _ = after([NOW, WEATHER], call)
    assert "Ċ" in allowed  # "\n": get_weather may follow


def test_no_call_is_begun_without_room_for_one_as_long_and_eos(after):
    _, used = after([WEATHER], PARIS)
    longest = used + 1  # the first call, with the separator the next one needs
    allowed, _ = after([WEATHER], PARIS, max_tokens=used + longest)
    assert allowed == {"<|im_end|>", "<|endoftext|>"}
    allowed, _ = after([WEATHER], PARIS, max_tokens=used + longest + 1)
    assert "Ċ" in allowed


def test_parallel_calls_that_differ_are_all_made(after):
    allowed, _ = after([WEATHER], PARIS + "\n" + LONDON, max_tokens=200)
    assert "Ċ" in allowed and "<|im_end|>" in allowed


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_numbers_in_arguments_are_bounded_and_free_text_is_not(digit_lover, choice):
    tools = [tool("add", {"a": {"type": "number"}, "b": {"type": "integer"}})]
    prefix = "Adding 123456789012345678901234567890 now: " if choice == "auto" else ""
    text = digit_lover(tool_call_grammar(tools, choice, parallel_tool_calls=False), prefix=prefix + "<tool_call>")
    content, calls = parse_tool_calls(text)
    assert content == prefix and len(calls) == 1
    assert set(json.loads(calls[0].arguments)) == {"a", "b"}
    assert [len(digits) for digits in re.findall("[0-9]+", calls[0].arguments)] == [17, 17], calls[0].arguments
