"""Random walks through the tool-call grammars: any allowed output parses into valid calls."""

import json

import jsonschema
import pytest

from parley.tools import parse_tool_calls, tool_call_grammar

FUNCTIONS = [
    {
        "name": "get_weather",
        "description": "Current weather; see https://example.com/#units // for units",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
        },
    },
    {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {
                    "type": "object",
                    "properties": {
                        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}
                    },
                    "additionalProperties": False,
                },
            },
            "required": ["query", "filters"],
            "additionalProperties": False,
        },
    },
    {"name": "now"},
    {
        "name": "set-flag_2",
        "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]},
    },
]
TOOLS = [{"type": "function", "function": function} for function in FUNCTIONS]
SCHEMAS = {
    f["name"]: f.get("parameters", {"type": "object", "additionalProperties": False}) for f in FUNCTIONS
}
SEEDS = range(6)


def assert_valid_calls(calls):
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        assert call.arguments == json.dumps(
            json.loads(call.arguments), separators=(",", ":"), ensure_ascii=False
        )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("parallel", [True, False])
def test_required_walk_gives_only_valid_calls(compiler, walk, seed, parallel):
    text = walk(tool_call_grammar(TOOLS, "required", parallel), seed)
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert len(calls) >= 1 if parallel else len(calls) == 1
    assert_valid_calls(calls)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["search", "now", "set-flag_2"])
def test_named_walk_gives_one_call_to_that_function(walk, seed, name):
    choice = {"type": "function", "function": {"name": name}}
    content, calls = parse_tool_calls(walk(tool_call_grammar(TOOLS, choice, True), seed))
    assert content == "" and [call.name for call in calls] == [name]
    assert_valid_calls(calls)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("parallel", [True, False])
def test_auto_walk_after_the_call_start_gives_valid_calls(walk, seed, parallel):
    prefix = "Let me look that up.\n<tool_call>"
    content, calls = parse_tool_calls(
        walk(tool_call_grammar(TOOLS, "auto", parallel), seed, prefix=prefix)
    )
    assert content == "Let me look that up.\n"
    assert len(calls) >= 1 if parallel else len(calls) == 1
    assert_valid_calls(calls)


@pytest.mark.parametrize("seed", SEEDS)
def test_auto_allows_plain_text(walk, seed):
    text = walk(tool_call_grammar(TOOLS, "auto"), seed, prefix="The weather is", budget=10)
    assert text.startswith("The weather is") and "<tool_call>" not in text
    assert parse_tool_calls(text) == (text, [])


def test_required_output_must_start_with_a_call(compiler, backend_tokenizer):
    matcher = compiler.matcher(tool_call_grammar(TOOLS, "required"))
    assert not matcher.accept(backend_tokenizer.token_to_id("Hello"))


def test_no_grammar_for_none_or_without_tools():
    assert tool_call_grammar(TOOLS, "none") is None
    assert tool_call_grammar([], "auto") is None


def test_grammar_is_lark():
    assert tool_call_grammar(TOOLS, "required").kind == "lark"


def test_unsupported_keyword_in_parameters_is_reported(compiler):
    from parley.structured import GrammarError

    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {
                    "type": "object",
                    "properties": {"ids": {"type": "array", "uniqueItems": True}},
                },
            },
        }
    ]
    with pytest.raises(GrammarError, match="uniqueItems"):
        compiler.validate(tool_call_grammar(tools, "required"))
