"""The grammar that makes the model's tool calls well-formed (see `format.py`)."""

from __future__ import annotations

import json
from typing import Any

from parley.tools.format import CALL_END, CALL_FORMAT, CALL_SEPARATOR, CALL_START, JSON_STYLE
from parley.tools.validation import ToolChoice, function_name, strict_schema, validate_tools
from parley.types import Grammar


def tool_call_grammar(
    tools: list[dict[str, Any]], tool_choice: ToolChoice = "auto", parallel_tool_calls: bool = True
) -> Grammar | None:
    """A Lark grammar for llguidance, or None when the output is free ("none", or no tools).

    "required": one or more calls and nothing else. A named function: exactly one call to it.
    "auto": free text; once the text contains the call start, the rest must be calls.
    With `parallel_tool_calls` false, at most one call. Raises `ToolSpecError` on bad input.
    """
    validate_tools(tools, tool_choice)
    if tool_choice == "none" or not tools:
        return None
    forced = function_name(tool_choice)
    functions = [tool["function"] for tool in tools if forced in (None, tool["function"]["name"])]
    more_calls = ""
    if parallel_tool_calls and not forced:
        more_calls = f" ({_lark_str(CALL_SEPARATOR + CALL_START)} call_body)*"
    if tool_choice == "auto":
        # lazy: the text ends at the first call start, after which only calls may follow.
        rules = [
            f"start: TEXT | text_then_call_start call_body{more_calls}",
            f"text_then_call_start[lazy]: TEXT {_lark_str(CALL_START)}",
            "TEXT: /(?s:.*)/",
        ]
    else:
        rules = [f"start: {_lark_str(CALL_START)} call_body{more_calls}"]
    rules += [
        f"call_body: call_json {_lark_str(CALL_END)}",
        f"call_json: %json {json.dumps(_call_schema(functions))}",
    ]
    return Grammar(kind="lark", value="\n".join(rules) + "\n", calls=CALL_FORMAT)


def _call_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON Schema of one call: {"name": <a function>, "arguments": <its parameters>}."""
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": function["name"]},
                "arguments": {**_parameters(function), "type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for function in functions
    ]
    return {"x-guidance": JSON_STYLE, "anyOf": variants}


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    # OpenAI: a function without parameters takes none (an empty schema is read the same way).
    parameters = function.get("parameters") or {"properties": {}, "additionalProperties": False}
    if function.get("strict") is True:
        parameters = strict_schema(parameters, "parameters")  # validate_tools checked it
    return parameters


def _lark_str(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lark string literal
