"""Tool calling on the chat routes: request rules, the prompt, and tool calls back in OpenAI's shape.

The request side (`ToolPlan`) accepts every dialect's `tool_choice` (SDK-WIRE §1.4) and checks the
tools with `parley.tools`. The model's calls are made well-formed by `tool_call_grammar` and read
back by `parley.tools`' parsers into `message.tool_calls` / `delta.tool_calls` (SDK-WIRE §1.5),
in the model's own call format (`EngineInfo.tool_format`: found from its chat template by the engine, at load).

A chat template that reads the `tools` variable renders them (and the tool turns of the history) itself.
For one that does not, like SmolLM2's, the tools are described in the system message, and the
history is written as text: an assistant's calls as `<tool_call>{...}</tool_call>` lines after its
text (the format the model is asked to use), and each tool result as a user turn, "The get_weather
function returned: <content>". Such a template knows no `tool` role; SmolLM2 answers from a result
put this way, while it only echoes one wrapped in Hermes' `<tool_response>` tags.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from parley.api.errors import require, validation_error
from parley.api.openai.responses import ChatShape
from parley.api.openai.response_format import body_grammar, grammar_field
from parley.tokenization.chat_template import reads_tools
from parley.tools import (
    StreamEvent,
    ToolCallArgumentsDelta,
    ToolCallStart,
    ToolChoice,
    ToolSpecError,
    parse_tool_calls,
    tool_call_grammar,
    tool_system_prompt,
    validate_tools,
)
from parley.tools.format import DEFAULT_FORMAT, ToolFormat
from parley.tools.validation import TOOL_CHOICE_MODES
from parley.types import Engine, FinalEvent, Grammar, ToolCall



# -- the request ----------------------------------------------------------------------------------
@dataclass
class ToolPlan:
    """The tools a request lets the model call: only made when it may call one."""

    tools: list[dict[str, Any]]
    choice: ToolChoice
    parallel: bool
    tool_prompt: str | None  # TGI: replaces the instructions before the tool definitions
    format: ToolFormat = DEFAULT_FORMAT  # how the model writes calls

    @classmethod
    def of(cls, body, engine: Engine | None = None, sent_as: Callable[[str], str] | None = None) -> ToolPlan | None:
        """The plan for a chat body to `engine`'s model (None: the default format); None when it
        offers no tools or `tool_choice` is "none". `sent_as`: for a chat body translated from
        another API's request, a chat field -> that API's (`names_as_sent`), for the errors to name
        it as its client sent it."""
        sent_as = sent_as or (lambda field: field)
        tools, choice = body.tools or [], _tool_choice(body.tool_choice)
        try:
            validate_tools(tools, choice)
        except ToolSpecError as exc:
            field = sent_as(exc.field)
            raise validation_error(f"Input validation error: {field}: {exc.problem}", field) from exc
        if not tools or choice == "none":
            return None
        # Friendli documents min_tokens with tools as unsupported: masking EOS would force more
        # calls after the ones the model meant to make.
        require(not body.min_tokens, "Input validation error: `min_tokens` cannot be used with `tools`",
                "min_tokens")
        response_format = sent_as(grammar_field(body))
        require(body_grammar(body) is None,
                f"Input validation error: `{response_format}` and `tools` cannot be combined: drop one, or set "
                '`tool_choice` to "none"', response_format)
        fmt = DEFAULT_FORMAT if engine is None else engine.info.tool_format
        return cls(tools, choice, body.parallel_tool_calls is not False, body.tool_prompt, fmt)

    def grammar(self) -> Grammar:
        return tool_call_grammar(self.tools, self.choice, self.parallel, self.format)


def names_as_sent(wire_names: dict[str, str], schema_field: str) -> Callable[[str], str]:
    """For `ToolPlan.of`'s `sent_as`, on an API translated into chat whose tools are flat, {name,
    description, <schema_field>, strict} (Anthropic's `input_schema`, the Responses API's
    `parameters`), and whose named tool_choice is {type, name}: a chat field -> that API's, through
    its `wire_names` (dialects.translated_chat_body) and the shape of its tools."""
    def sent_as(field: str) -> str:
        field = re.sub(r"^(tools\[\d+\])\.function\.parameters\b", rf"\1.{schema_field}", field)
        field = re.sub(r"^(tools\[\d+\]|tool_choice)\.function\b", r"\1", field)
        return wire_names.get(field, field)
    return sent_as


def _tool_choice(raw: str | dict | None) -> ToolChoice:
    if raw is None:
        return "auto"
    if raw == "any":  # Mistral
        return "required"
    if isinstance(raw, str) and raw not in TOOL_CHOICE_MODES:  # text-generation: a bare function name
        return {"type": "function", "function": {"name": raw}}
    return raw


def template_inputs(messages: list[dict], plan: ToolPlan | None,
                    template_source: str | None) -> tuple[list[dict], dict[str, Any]]:
    """The messages and extra render arguments for the chat template (see the module docstring)."""
    if reads_tools(template_source):
        return messages, ({"tools": plan.tools} if plan else {})
    names = {call.get("id"): (call.get("function") or {}).get("name")
             for m in messages for call in m.get("tool_calls") or []}
    messages = [_as_text_turn(m, names) for m in messages]
    if plan:
        messages = _with_system_text(messages, tool_system_prompt(plan.tools, plan.choice, plan.tool_prompt))
    return messages, {}


def _as_text_turn(message: dict, names: dict[str, str]) -> dict:
    """`names`: the function of each call id in the history, to say whose result a tool message is."""
    if message["role"] == "tool":
        name = message.get("name") or names.get(message.get("tool_call_id"))
        intro = f"The {name} function returned: " if name else "The function returned: "
        return {"role": "user", "content": _wrap(message.get("content"), intro, "")}
    calls = message.get("tool_calls")
    if not calls:
        return message
    text = DEFAULT_FORMAT.calls.separator.join(_call_text(call) for call in calls)
    message = {k: v for k, v in message.items() if k != "tool_calls"}
    return {**message, "content": _wrap(message.get("content"), "", text)}


def _call_text(call: dict) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # shown as the client sent it
    call = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return DEFAULT_FORMAT.calls.start + call + DEFAULT_FORMAT.calls.end


def _with_system_text(messages: list[dict], text: str) -> list[dict]:
    """The tool description after the client's own system text, or as a new system message."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": _wrap(messages[0].get("content"), "", "\n\n" + text)}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _wrap(content: str | list[dict] | None, before: str, after: str) -> str | list[dict]:
    """`content` (a string or text chunks) between two pieces of text."""
    if isinstance(content, list):
        return [{"type": "text", "text": before}, *content, {"type": "text", "text": after}]
    return before + (content or "") + after


# -- the response ---------------------------------------------------------------------------------
class ToolChatShape(ChatShape):
    """Chat answers whose content may hold tool calls: they become `tool_calls`, and the choice's
    finish_reason "tool_calls" (unless max_tokens cut the output: "length")."""

    def __init__(self, tools: ToolFormat, token_bytes, logprobs: bool, phase: str | None = None,
                 include_reasoning: bool = True):
        super().__init__(token_bytes, logprobs, phase, include_reasoning)
        self.tools = tools  # the format the model writes calls in
        self._called: set[int] = set()  # choices that announced a call while streaming

    def choice(self, index: int, final: FinalEvent) -> dict:
        choice = super().choice(index, final)
        content, calls = parse_tool_calls(choice["message"]["content"], self.tools)
        if calls:  # without a complete call, the content stays the whole text
            choice["message"].update(content=content or None, tool_calls=[_call_json(c) for c in calls])
            choice["finish_reason"] = _with_calls(choice["finish_reason"])
        return choice

    def final_choice(self, index: int, final: FinalEvent) -> dict:
        choice = super().final_choice(index, final)
        if index in self._called:
            choice["finish_reason"] = _with_calls(choice["finish_reason"])
        return choice

    def _call_deltas(self, index: int, events: list[StreamEvent]) -> list[dict]:
        """A call's pieces in one chunk merge into one entry."""
        calls: dict[int, dict] = {}
        for event in events:
            if isinstance(event, ToolCallStart):
                self._called.add(index)
                calls[event.index] = {"index": event.index, "id": event.id, "type": "function",
                                      "function": {"name": event.name, "arguments": ""}}
            elif isinstance(event, ToolCallArgumentsDelta):
                entry = calls.setdefault(event.index, {"index": event.index, "function": {"arguments": ""}})
                entry["function"]["arguments"] += event.arguments
        return list(calls.values())


def _with_calls(finish_reason: str) -> str:
    return "tool_calls" if finish_reason == "stop" else finish_reason


def _call_json(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
