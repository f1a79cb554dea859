"""The grammar that makes the model's tool calls well-formed, in the model's format (`format.py`)."""

from __future__ import annotations

import json
from typing import Any

from parley.tools.format import DEFAULT_FORMAT, JSON_STYLE, ToolFormat
from parley.tools.validation import ToolChoice, function_name, strict_schema, validate_tools
from parley.types import Grammar


def tool_call_grammar(
    tools: list[dict[str, Any]], tool_choice: ToolChoice = "auto", parallel_tool_calls: bool = True,
    fmt: ToolFormat = DEFAULT_FORMAT,
) -> Grammar | None:
    """A Lark grammar for llguidance, or None when the output is free ("none", or no tools).

    "required": one or more calls and nothing else. A named function: exactly one call to it.
    "auto": free text, or calls: after any text once the text reaches the calls' opening, or,
    in a format whose calls are the whole answer, when the answer begins as calls do.
    With `parallel_tool_calls` false (or a format whose template renders one call a turn), at
    most one call. Raises `ToolSpecError` on bad input.
    """
    validate_tools(tools, tool_choice)
    if tool_choice == "none" or not tools:
        return None
    calls = fmt.calls
    forced = function_name(tool_choice)
    functions = [tool["function"] for tool in tools if forced in (None, tool["function"]["name"])]
    more_calls = ""
    if parallel_tool_calls and fmt.parallel and not forced:
        more_calls = f" ({_lark_seq(_lark_str(calls.between), 'call_json')})*"
    lead = _lark_seq(f"<[{calls.marker_token}]>" if calls.marker_token is not None else "", _lark_str(calls.lead))
    rules = [f"calls: {_lark_seq('call_json' + more_calls, _lark_str(calls.end + calls.closing))}"]
    if tool_choice != "auto":
        rules.append(f"start: {_lark_seq(lead, 'calls')}")
    elif calls.whole:  # free text may not begin as the calls do (the parser skips whitespace first)
        rules += [f"start: TEXT | {_lark_seq(lead, 'calls')}",
                  f"TEXT: /(?s:.*)/ & ~(/[ \\t\\n\\r]*/ {_lark_str(calls.lead.strip() + '{')} /(?s:.*)/)"]
    else:  # lazy: the text ends at the first opening, after which only calls may follow
        rules += ["start: TEXT | text_then_lead calls",
                  f"text_then_lead[lazy]: TEXT {lead}",
                  f"TEXT: /(?s:.*)/ & ~(/(?s:.*)/ {_lark_str(calls.lead.strip())} /(?s:.*)/)"]  # as the parser sees it
    rules.append(f"call_json: %json {json.dumps(_call_schema(functions, fmt.arguments_key))}")
    return Grammar(kind="lark", value="\n".join(rules) + "\n", calls=calls)


def _call_schema(functions: list[dict[str, Any]], arguments_key: str) -> dict[str, Any]:
    """JSON Schema of one call: {"name": <a function>, <arguments_key>: <its parameters>}."""
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": function["name"]},
                arguments_key: {**_parameters(function), "type": "object"},
            },
            "required": ["name", arguments_key],
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
    return json.dumps(text) if text else ""  # a JSON string literal is a valid Lark string literal


def _lark_seq(*items: str) -> str:
    return " ".join(item for item in items if item)
