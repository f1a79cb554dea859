"""Anthropic's Messages API. A request becomes the OpenAI-style chat body every dialect shares
(openai/convert.py makes the one GenerationRequest from it, tools through the same grammar); the
engine's events become Anthropic's message, or its stream: message_start; per content block (text,
tool_use) content_block_start, its deltas (text_delta, input_json_delta), content_block_stop;
then message_delta (stop_reason, stop_sequence, usage) and message_stop, each event named.
Errors take Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`, errors.py) and
its 400 where Parley says 422; `x-api-key` is a key like the others (auth.py)."""

from __future__ import annotations

import json
import re
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request, Response

from parley.api import dialects
from parley.api.anthropic.schemas import (CountTokensRequest, MessagesRequest, TextBlock, ThinkingBlock, ThinkingConfig,
                                          ToolResultBlock, ToolUseBlock)
from parley.api.dialects import ANTHROPIC, ChatBody, speaking
from parley.api.errors import ERROR_RESPONSES, fields_named, refuse_unknown_fields, require
from parley.api.jsonio import JSONBody
from parley.api.openai import convert, reasoning
from parley.api.openai.tool_calls import ToolPlan, names_as_sent
from parley.tools.format import ToolFormat
from parley.api.serving import STREAMING_RESPONSES, GenerationRoute, StrictJSONRoute, respond
from parley.api.state import server_of
from parley.tokenization.reasoning import split_reasoning
from parley.tools.parser import (ContentDelta, OutputEvents, ReasoningDelta, StreamEvent, ToolCallArgumentsDelta,
                                 ToolCallStart, parse_tool_calls)
from parley.types import FinalEvent, FinishReason, TokenEvent

STOP_REASONS = {FinishReason.LENGTH: "max_tokens", FinishReason.EOS_TOKEN: "end_turn",
                FinishReason.STOP_SEQUENCE: "stop_sequence"}
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # "tool": the named function

router = APIRouter(tags=["Anthropic"], route_class=speaking(GenerationRoute, ANTHROPIC),
                   responses={**ERROR_RESPONSES, **STREAMING_RESPONSES})
count_router = APIRouter(tags=["Anthropic"], route_class=speaking(StrictJSONRoute, ANTHROPIC), responses=ERROR_RESPONSES)
# the chat body's fields -> the Messages API's, where they differ
WIRE_NAMES = {"stop": "stop_sequences", "response_format": "output_config.format", "user": "metadata.user_id",
              "thinking_budget": "thinking.budget_tokens", "enable_thinking": "thinking.type"}
_AS_WIRE_NAME = names_as_sent(WIRE_NAMES, "input_schema")


def sent_as(field: str) -> str:
    """A chat field, of its tools too -> the client's, with list indices as the Messages API's own
    errors and this route's schema errors write them: `tools.0.name`, not chat's `tools[0].name`."""
    return re.sub(r"\[(\d+)\]", r".\1", _AS_WIRE_NAME(field))


def chat_body(body: CountTokensRequest) -> ChatBody:
    """The OpenAI-style chat body: system first; tool_use blocks as the assistant's tool_calls,
    tool_result blocks as tool messages right after it (before the user's own text)."""
    messages = [{"role": "system", "content": _text(body.system)}] if body.system else []
    called: set[str] = set()  # the tool_use ids of the assistant message before
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            called = set()
            continue
        where = f"messages.{i}.content"
        misplaced, name = (ToolResultBlock, "tool_result") if message.role == "assistant" else (ToolUseBlock, "tool_use")
        if message.role == "user" and any(isinstance(b, ThinkingBlock) for b in message.content):
            misplaced, name = ThinkingBlock, "thinking"
        require(not any(isinstance(b, misplaced) for b in message.content),
                f"Input validation error: `{where}`: {'an' if message.role == 'assistant' else 'a'} {message.role} "
                f"message cannot hold {name} blocks", where)
        for block in message.content:
            if isinstance(block, ToolResultBlock):
                require(block.tool_use_id in called, f"Input validation error: `{where}`: tool_result "
                        f"{block.tool_use_id!r} answers no tool_use of the assistant message before it", where)
                prefix = "Error: " if block.is_error else ""
                messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": prefix + _text(block.content)})
        text = "".join(b.text for b in message.content if isinstance(b, TextBlock))
        thought = "".join(b.thinking for b in message.content if isinstance(b, ThinkingBlock))
        calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                 for b in message.content if isinstance(b, ToolUseBlock)]
        if text or calls or thought:
            messages.append({"role": message.role, "content": text or None, "tool_calls": calls or None,
                             "reasoning_content": thought or None})
        called = {call["id"] for call in calls}
    _prefill(body, messages)
    fields = {"messages": messages, **_thinking_fields(body.thinking, getattr(body, "max_tokens", None))}
    if body.tools:
        fields["tools"] = [{"type": "function", "function": {
            "name": t.name, "description": t.description, "parameters": t.input_schema,
            **({"strict": t.strict} if t.strict is not None else {})}} for t in body.tools]
    if choice := body.tool_choice:
        require(choice.type != "tool" or choice.name is not None,
                'Input validation error: `tool_choice.name` is required with `"type": "tool"`', "tool_choice.name")
        require(choice.type != "any" or body.tools, 'Input validation error: `tool_choice.type` "any" needs at '
                "least one tool in `tools`", "tool_choice.type")  # chat's "required" says it in chat's words
        fields["tool_choice"] = TOOL_CHOICES.get(choice.type) or {"type": "function", "function": {"name": choice.name}}
        fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    if isinstance(body, MessagesRequest):
        fields.update(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                      stop=body.stop_sequences, stream=body.stream, user=body.metadata and body.metadata.user_id)
        if body.output_config and body.output_config.format:
            # chat's own check would advise chat's `tool_choice` "none"; the same rule, in this API's words
            require(not body.tools or (body.tool_choice is not None and body.tool_choice.type == "none"),
                    "Input validation error: `output_config.format` and `tools` cannot be combined: drop one, or "
                    'set `tool_choice` to {"type": "none"}', "output_config.format")
            fields["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "output", "schema": body.output_config.format.schema_}}
    return dialects.translated_chat_body(fields, WIRE_NAMES)


def _prefill(body: CountTokensRequest, messages: list[dict]) -> None:
    """A last message of the assistant's with text is Anthropic's prefill: the answer continues it
    (chat's `prefix`, the prompt ending inside that turn) and holds only the new text. Rendered as a
    finished turn, a new one would start after it. With tools the continuation could not be a tool
    call the grammar parses: refused, naming the message as sent."""
    last = messages[-1] if messages else None
    if not (body.messages and body.messages[-1].role == "assistant" and last and last["role"] == "assistant"
            and not last.get("tool_calls") and (last["content"] or "").strip()):
        return
    where = f"messages.{len(body.messages) - 1}.content"
    require(not body.tools or (body.tool_choice is not None and body.tool_choice.type == "none"),
            f"Input validation error: `{where}`: a prefilled assistant message (the last one) cannot be combined "
            'with `tools` here: drop one, or set `tool_choice` to {"type": "none"}', where)
    last["prefix"] = True


def _thinking_fields(thinking: ThinkingConfig | None, max_tokens: int | None) -> dict:
    """`thinking` as the chat body's reasoning fields (openai/reasoning.py)."""
    if thinking is None:
        return {}
    if thinking.type == "disabled":
        return {"enable_thinking": False}
    if thinking.type == "adaptive":
        return {"enable_thinking": True}
    require(thinking.budget_tokens is not None, 'Input validation error: `thinking.budget_tokens` is required with '
            '`"type": "enabled"`', "thinking.budget_tokens")
    require(max_tokens is None or thinking.budget_tokens < max_tokens, "Input validation error: "
            f"`thinking.budget_tokens` must be less than `max_tokens` ({max_tokens})", "thinking.budget_tokens")
    return {"enable_thinking": True, "thinking_budget": thinking.budget_tokens}


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


def _translated(body: CountTokensRequest, http: Request):
    """What both routes check first: unknown fields, the model's name; then the chat body."""
    server = server_of(http)
    refuse_unknown_fields(body, 400, server.config.unknown_fields == "refuse")
    dialects.check_model(http, body.model)
    engine = server.ready_engine()
    require(body.thinking is None or body.thinking.type == "disabled" or engine.info.reasoning is not None,
            f"Input validation error: `thinking.type` {body.thinking and body.thinking.type!r}: this model does not "
            "think", "thinking.type")
    return server, engine, chat_body(body)


async def messages(body: MessagesRequest, http: Request) -> Response:
    server, engine, chat = _translated(body, http)
    tools = ToolPlan.of(chat, engine, sent_as)
    with fields_named(dialects.engine_names(chat, WIRE_NAMES, tools=tools is not None)):
        request = await convert.chat_request(chat, engine, tools)
        shape = MessageShape(server.model_name, tools.format if tools else None,
                             reasoning.split_phase(request, chat, server.config.reasoning_format == "auto"))
        return await respond(
            http, [request], stream=bool(body.stream), to_json=lambda finals: shape.message(finals[0][0]),
            to_payloads=lambda batches: shape.events(batches, len(request.prompt)), done_marker=False,
            named_events=True)


async def count_tokens(body: CountTokensRequest, http: Request) -> Response:
    """The prompt's tokens as the chat template renders the messages, system and tools."""
    _, engine, chat = _translated(body, http)
    tools = ToolPlan.of(chat, sent_as=sent_as)
    with fields_named(dialects.engine_names(chat, WIRE_NAMES, tools=tools is not None)):
        request = await convert.chat_request(chat, engine, tools)
    return JSONBody({"input_tokens": len(request.prompt)})


router.add_api_route("/v1/messages", messages, methods=["POST"], summary="Message (Anthropic)")
count_router.add_api_route("/v1/messages/count_tokens", count_tokens, methods=["POST"],
                           summary="Count a message's input tokens (Anthropic)")


class MessageShape:
    """The engine's events of one request -> Anthropic's message, or its stream events."""

    def __init__(self, model: str, tools: ToolFormat | None, phase: str | None):
        """`phase`: where a thinking model's answer starts, for its thinking block (None: no split)."""
        self.id, self.model, self.tools, self.phase = f"msg_{uuid.uuid4().hex}", model, tools, phase

    def _message(self, content: list[dict], stop_reason: str | None, stop_sequence: str | None, usage: dict) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}

    def message(self, final: FinalEvent) -> dict:
        thought, text = split_reasoning(final.text, self.phase) if self.phase else (None, final.text)
        text, calls = parse_tool_calls(text, self.tools) if self.tools else (text, [])
        content = [{"type": "thinking", "thinking": thought, "signature": ""}] if thought else []
        content += [{"type": "text", "text": text}] if text else []
        content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": json.loads(c.arguments)} for c in calls]
        return self._message(content, _stop_reason(final, bool(calls)), final.stop_sequence,
                             {"input_tokens": final.prompt_tokens, "output_tokens": final.generated_tokens})

    async def events(self, batches: AsyncIterator[list[tuple[int, object]]], input_tokens: int) -> AsyncIterator[list[dict]]:
        yield [{"type": "message_start",
                "message": self._message([], None, None, {"input_tokens": input_tokens, "output_tokens": 0})}]
        blocks, texts = Blocks(), OutputEvents(self.tools, self.phase)
        async for batch in batches:
            out = []
            for _, event in batch:
                out += blocks.feed(texts.of(event))
                if isinstance(event, TokenEvent):
                    continue
                out += blocks.close()
                out.append({"type": "message_delta",
                            "delta": {"stop_reason": _stop_reason(event, blocks.called), "stop_sequence": event.stop_sequence},
                            "usage": {"output_tokens": event.generated_tokens}})
                out.append({"type": "message_stop"})
            yield out


def _stop_reason(final: FinalEvent, called: bool) -> str:
    return "tool_use" if called and final.finish_reason != FinishReason.LENGTH else STOP_REASONS[final.finish_reason]


class Blocks:
    """A streamed message's content blocks as they open, fill and close: text, or a tool_use whose
    input arrives as JSON pieces."""

    def __init__(self):
        self.index, self.open, self.called = -1, None, False

    def feed(self, events: list[StreamEvent]) -> list[dict]:
        out = []
        for event in events:
            if isinstance(event, ContentDelta) and event.text:
                if self.open != "text":
                    out += self._start({"type": "text", "text": ""})
                out.append(self._delta({"type": "text_delta", "text": event.text}))
            elif isinstance(event, ReasoningDelta) and event.text:
                if self.open != "thinking":
                    out += self._start({"type": "thinking", "thinking": "", "signature": ""})
                out.append(self._delta({"type": "thinking_delta", "thinking": event.text}))
            elif isinstance(event, ToolCallStart):
                self.called = True
                out += self._start({"type": "tool_use", "id": event.id, "name": event.name, "input": {}})
            elif isinstance(event, ToolCallArgumentsDelta):
                out.append(self._delta({"type": "input_json_delta", "partial_json": event.arguments}))
        return out

    def close(self) -> list[dict]:
        if self.open is None:
            return []
        # a thinking block ends with its signature (Anthropic's, to check the thinking sent back: none here)
        out = [self._delta({"type": "signature_delta", "signature": ""})] if self.open == "thinking" else []
        self.open = None
        return out + [{"type": "content_block_stop", "index": self.index}]

    def _start(self, block: dict) -> list[dict]:
        out = self.close()
        self.index, self.open = self.index + 1, block["type"]
        return out + [{"type": "content_block_start", "index": self.index, "content_block": block}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}
