import json

from parley.tools import DEFAULT_TOOL_PROMPT, tool_system_prompt

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "now"}},
]


def test_prompt_explains_the_format_and_lists_each_function():
    prompt = tool_system_prompt(TOOLS)
    instructions, *definitions = prompt.split("\n")
    assert instructions == DEFAULT_TOOL_PROMPT
    assert '<tool_call>{"name": ' in instructions
    assert [json.loads(line) for line in definitions] == [tool["function"] for tool in TOOLS]


def test_tool_prompt_replaces_the_instructions_only():
    prompt = tool_system_prompt(TOOLS, "required", tool_prompt="Use these tools:")
    assert prompt.startswith("Use these tools:\n{")
    assert prompt.count("\n") == len(TOOLS)


def test_no_prompt_without_tools_or_with_none():
    assert tool_system_prompt(TOOLS, "none") is None
    assert tool_system_prompt([], "auto") is None
