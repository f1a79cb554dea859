"""The tool-call formats: how a model writes its calls, shared by the grammar, the parser and (for
templates that know no tools) the prompt. One row per format a chat template may be trained on:

    hermes (the default)  text<tool_call>{"name": "f", "arguments": {...}}</tool_call>\\n<tool_call>...
    qwen                  text<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>\\n<tool_call>\\n...
    llama3_json           {"name": "f", "parameters": {...}}          (the whole answer; one call)
    mistral               [TOOL_CALLS] [{"name": "f", "arguments": {...}}, {...}]   (the whole answer)
    granite               <|tool_call|>[{"name": "f", "arguments": {...}}, {...}]   (the whole answer)

A model's format is detected from its own chat template (`detect_format`): the template renders a
made-up assistant turn with calls, and the text it writes around them names the row. A template
that renders no calls of a row but tells the model, in the tool instructions it writes, to use a
row's syntax (Granite 3.x: "respond with <|tool_call|> followed by a JSON list") gets that row.
A template that does neither (like SmolLM2's) gets the default, described to the model in the
system prompt (`prompt.py`).

The JSON is written the way Python's `json.dumps` (and the templates' `tojson`) writes it.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, replace
from typing import Callable

from parley.tokenization.chat_template import ChatTemplate, ChatTemplateError, reads_tools
from parley.types import CallFormat

# llguidance JSON options ("x-guidance"): exactly ", " and ": " between items, no other whitespace,
# so the model cannot wander off into whitespace.
JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}

_ALPHANUMERIC = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolFormat:
    """One row of the table. `calls`: the text around the calls (the engine's view of them);
    `signature`: what the template writes just before a call's JSON (after `marker`, if any);
    `marker`: a token that opens the calls, a special token in the model's vocabulary when it is
    one there; `parallel`: the template renders several calls in one turn; `id_length`: the
    template accepts only call ids of exactly this many letters and digits (Mistral: 9);
    `described`: how the tool instructions of a template that renders no calls name the format."""

    name: str
    calls: CallFormat
    signature: str
    arguments_key: str = "arguments"
    marker: str = ""
    parallel: bool = True
    id_length: int | None = None
    described: str = ""

    def new_call_id(self) -> str:
        if self.id_length:
            return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(self.id_length))
        return "call_" + secrets.token_hex(12)


HERMES = ToolFormat("hermes", CallFormat("<tool_call>", "</tool_call>", "\n"), "<tool_call>")
QWEN = ToolFormat("qwen", CallFormat("<tool_call>\n", "\n</tool_call>", "\n"), "<tool_call>\n")
LLAMA3_JSON = ToolFormat("llama3_json", CallFormat("", "", "", whole=True), "<|end_header_id|>\n\n",
                         arguments_key="parameters", parallel=False)
MISTRAL = ToolFormat("mistral", CallFormat("", "", ", ", opening=" [", closing="]", whole=True), " [",
                     marker="[TOOL_CALLS]", id_length=9)
MISTRAL_TIGHT = replace(MISTRAL, calls=replace(MISTRAL.calls, opening="["), signature="[")  # v7 templates
GRANITE = ToolFormat("granite", MISTRAL_TIGHT.calls, "[", marker="<|tool_call|>",
                     described="<|tool_call|> followed by a JSON list")  # its template renders no calls

FORMATS = (QWEN, HERMES, LLAMA3_JSON, MISTRAL, MISTRAL_TIGHT, GRANITE)  # the most specific signature first
DEFAULT_FORMAT = HERMES

# A made-up exchange a template renders to show how it writes calls.
_PROBE_NAMES = ("probe_alpha", "probe_beta")
_PROBE_IDS = ("probe0001", "probe0002")  # 9 letters and digits, as Mistral's template demands
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": name, "description": "probe", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}
    for name in _PROBE_NAMES]


def model_format(template: ChatTemplate, source: str | None, special_token_id: Callable[[str], int | None]) -> ToolFormat:
    """The format a model writes tool calls in: its chat template's own (`source` is its text),
    when the template reads `tools` (it gets them: api/openai/tool_calls.template_inputs) and
    renders calls in one of `FORMATS`; else the default. The engine finds it once, at load."""
    if not reads_tools(source):
        return DEFAULT_FORMAT
    return detect_format(template, special_token_id) or DEFAULT_FORMAT


def detect_format(template: ChatTemplate, special_token_id: Callable[[str], int | None]) -> ToolFormat | None:
    """The format `template` writes calls in, or None when it is none of the table's.
    `special_token_id(text)`: the id of a special token of the model's vocabulary, or None."""
    one = _render_calls(template, 1)
    fmt = _described_format(template) if one is None else _rendered_format(template, one)
    return None if fmt is None else _with_marker(fmt, special_token_id)


def _rendered_format(template: ChatTemplate, one: tuple[str, str, str]) -> ToolFormat | None:
    """The row that writes calls as the template renders them (`one`: how it renders one call)."""
    before, json_key, _ = one
    two = _render_calls(template, 2)
    for fmt in FORMATS:
        if not before.endswith(fmt.marker + fmt.signature) or json_key != fmt.arguments_key:
            continue
        if two is not None and two[2] != fmt.calls.between:
            continue
        if two is None and fmt.parallel:
            continue
        return fmt
    return None


def _described_format(template: ChatTemplate) -> ToolFormat | None:
    """The row named by the tool instructions of a template that renders no calls (they are all
    there is to go on then)."""
    try:
        text = template.render([{"role": "user", "content": "probe"}], tools=_PROBE_TOOLS)
    except ChatTemplateError:
        return None
    return next((fmt for fmt in FORMATS if fmt.described and fmt.described in text), None)


def _with_marker(fmt: ToolFormat, special_token_id: Callable[[str], int | None]) -> ToolFormat:
    """A marker that is one special token is written as that token (it shows in no text); else
    it is text, part of the opening."""
    if not fmt.marker:
        return fmt
    token = special_token_id(fmt.marker)
    if token is not None:
        return replace(fmt, calls=replace(fmt.calls, marker_token=token))
    return replace(fmt, calls=replace(fmt.calls, opening=fmt.marker + fmt.calls.opening))


def _render_calls(template: ChatTemplate, n: int) -> tuple[str, str, str] | None:
    """(the text before the first call's JSON, the JSON's key for the arguments, the text between
    the first and second calls' JSON) as the template renders an assistant turn with `n` calls;
    None if it cannot, or renders no calls."""
    calls = [{"id": _PROBE_IDS[i], "type": "function",
              "function": {"name": _PROBE_NAMES[i], "arguments": json.dumps({"a": i + 1})}} for i in range(n)]
    messages = [{"role": "user", "content": "probe"}, {"role": "assistant", "tool_calls": calls},
                *({"role": "tool", "tool_call_id": call["id"], "content": "ok"} for call in calls)]
    try:
        text = template.render(messages, tools=_PROBE_TOOLS, add_generation_prompt=False)
    except ChatTemplateError:
        return None
    spans = [_call_span(text, name, {"a": i + 1}) for i, name in enumerate(_PROBE_NAMES[:n])]
    if None in spans:
        return None
    (start, end, key), *rest = spans
    between = text[end:rest[0][0]] if rest else ""
    return text[:start], key, between


def _call_span(text: str, name: str, arguments: dict) -> tuple[int, int, str] | None:
    """(start, end, arguments key) of the JSON object in `text` that calls `name` with `arguments`
    (not the tool's own definition, whose "parameters" are a schema)."""
    decoder = json.JSONDecoder()
    at = text.rfind(json.dumps(name))
    brace = text.rfind("{", 0, at)
    while brace >= 0:
        try:
            value, end = decoder.raw_decode(text, brace)
        except ValueError:
            value, end = None, -1
        if isinstance(value, dict) and value.get("name") == name and end > at:
            keys = [k for k in ("arguments", "parameters") if value.get(k) == arguments]
            return (brace, end, keys[0]) if keys else None
        brace = text.rfind("{", 0, brace)
    return None
