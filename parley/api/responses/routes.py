"""OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`,
`POST /v1/responses/{id}/cancel`.

A request (input text or items, instructions, the stored conversation of `previous_response_id`)
becomes the OpenAI-style chat body every dialect shares (openai/convert.py makes the one
GenerationRequest; tools and `text.format` through the same grammars). The answer is a Response
whose output items are a message (output_text) and function calls; streamed, the typed events in
OpenAI's order, each named and numbered: response.created, response.in_progress, per item
output_item.added, (content_part.added, output_text.delta..., output_text.done, content_part.done
| function_call_arguments.delta..., .done), output_item.done, then response.completed (or
response.incomplete when max_output_tokens cut it). Answers are kept (store.py) unless `store` is
false. There is no background mode, so cancel answers 400 as OpenAI does for a foreground answer."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute

from parley.api import dialects
from parley.api.dialects import OPENAI, ChatBody, speaking
from parley.api.errors import ERROR_RESPONSES, ApiError, fields_named, refuse_unknown_fields, require
from parley.api.jsonio import JSONBody
from parley.api.openai import convert, reasoning
from parley.api.openai.tool_calls import ToolPlan, names_as_sent
from parley.tools.format import ToolFormat
from parley.api.responses.schemas import (FunctionCallItem, FunctionCallOutputItem, MessageItem, ReasoningItem,
                                          ResponsesRequest)
from parley.api.responses.store import CAPACITY, Stored
from parley.api.serving import STREAMING_RESPONSES, GenerationRoute, respond
from parley.api.state import server_of
from parley.tokenization.reasoning import split_reasoning
from parley.tools.parser import (ContentDelta, OutputEvents, ReasoningDelta, StreamEvent, ToolCallArgumentsDelta,
                                 ToolCallStart, parse_tool_calls)
from parley.types import FinalEvent, FinishReason, TokenEvent

router = APIRouter(tags=["OpenAI Responses"], route_class=speaking(GenerationRoute, OPENAI),
                   responses={**ERROR_RESPONSES, **STREAMING_RESPONSES})
stored_router = APIRouter(tags=["OpenAI Responses"], route_class=speaking(APIRoute, OPENAI), responses=ERROR_RESPONSES)
# the chat body's fields -> the Responses API's, where they differ
WIRE_NAMES = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}
SENT_AS = names_as_sent(WIRE_NAMES, "parameters")  # a chat field, of its tools too -> the client's


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def input_messages(body: ResponsesRequest, history: list[dict]) -> list[dict]:
    """`input` as chat messages: function calls join the assistant message before them. A call's
    output must answer a call made before it, in `input` or the stored conversation."""
    items = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    messages: list[dict] = []
    called = {call["id"] for message in history for call in message.get("tool_calls") or []}
    for i, item in enumerate(items):
        if isinstance(item, MessageItem):
            text = item.content if isinstance(item.content, str) else "".join(part.text for part in item.content)
            if item.role == "assistant" and messages and _thought_only(messages[-1]):
                messages[-1]["content"] = text  # the answer of the reasoning item before it
            else:
                messages.append({"role": "system" if item.role == "developer" else item.role, "content": text})
        elif isinstance(item, ReasoningItem):  # the thinking of the assistant turn that follows it
            messages.append({"role": "assistant", "content": None,
                             "reasoning_content": "".join(part.text for part in item.content or [])})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            if not (messages and messages[-1]["role"] == "assistant"):
                messages.append({"role": "assistant", "content": None})
            messages[-1].setdefault("tool_calls", []).append(call)
            called.add(item.call_id)
        elif isinstance(item, FunctionCallOutputItem):
            require(item.call_id in called, f"Input validation error: `input.{i}`: function_call_output "
                    f"{item.call_id!r} answers no function_call before it", f"input.{i}")
            output = item.output if isinstance(item.output, str) else "".join(part.text for part in item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    return messages


def _thought_only(message: dict) -> bool:
    return message["role"] == "assistant" and message["content"] is None and "tool_calls" not in message \
        and "reasoning_content" in message


def chat_body(body: ResponsesRequest, messages: list[dict]) -> ChatBody:
    fields = {"messages": messages, "max_tokens": body.max_output_tokens, "temperature": body.temperature,
              "top_p": body.top_p, "parallel_tool_calls": body.parallel_tool_calls, "stream": body.stream,
              "user": body.user, "safety_identifier": body.safety_identifier}
    if body.tools:
        fields["tools"] = [{"type": "function", "function": t.declared(exclude={"type"}, exclude_none=True)}
                           for t in body.tools]
    if body.tool_choice is not None:
        fields["tool_choice"] = body.tool_choice if isinstance(body.tool_choice, str) else \
            {"type": "function", "function": {"name": body.tool_choice.name}}
    text_format = body.text.format if body.text else None
    if text_format and text_format.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    elif text_format and text_format.type == "json_schema":
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": text_format.name or "output", "schema": text_format.schema_, "strict": text_format.strict}}
    return dialects.translated_chat_body(fields, WIRE_NAMES)


async def create(body: ResponsesRequest, http: Request) -> Response:
    server = server_of(http)
    refuse_unknown_fields(body, 400, server.config.unknown_fields == "refuse")
    dialects.check_model(http, body.model)
    engine = server.ready_engine()
    history: list[dict] = []
    if body.previous_response_id:
        previous = server.responses.get(body.previous_response_id)
        if previous is None:
            raise ApiError(400, f"Previous response with id '{body.previous_response_id}' not found: it was not stored "
                           f"(store: false), was deleted, or is older than the last {CAPACITY} this server keeps",
                           "invalid_request_error", "previous_response_id")
        history = previous.history
    new_messages = input_messages(body, history)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    chat = chat_body(body, system + history + new_messages)
    tools = ToolPlan.of(chat, engine, SENT_AS)
    with fields_named(dialects.engine_names(chat, WIRE_NAMES, tools=tools is not None)):
        request = await convert.chat_request(chat, engine, tools)
        phase = reasoning.split_phase(request, chat, server.config.reasoning_format == "auto")
        shape = ResponseShape(body, server.model_name, tools.format if tools else None, phase)

        def keep(response: dict) -> dict:
            if body.store is not False:
                server.responses.put(Stored(response, history + new_messages + shape.assistant_messages(response)))
            return response

        return await respond(
            http, [request], stream=bool(body.stream), to_json=lambda finals: keep(shape.response(finals[0][0])),
            to_payloads=lambda batches: shape.events(batches, keep), done_marker=False, named_events=True)


def _stored(http: Request, response_id: str) -> Stored:
    stored = server_of(http).responses.get(response_id)
    if stored is None:
        raise ApiError(404, f"Response with id '{response_id}' not found", "not_found", "response_id")
    return stored


async def retrieve(response_id: str, http: Request) -> Response:
    return JSONBody(_stored(http, response_id).response)


async def delete(response_id: str, http: Request) -> Response:
    _stored(http, response_id)
    server_of(http).responses.delete(response_id)
    return JSONBody({"id": response_id, "object": "response.deleted", "deleted": True})


async def cancel(response_id: str, http: Request) -> Response:
    _stored(http, response_id)
    raise ApiError(400, "Only responses created with background=true can be cancelled; this server answers every "
                   "response in the foreground", "invalid_request_error", "response_id")


router.add_api_route("/v1/responses", create, methods=["POST"], summary="Create a response (OpenAI Responses)")
stored_router.add_api_route("/v1/responses/{response_id}", retrieve, methods=["GET"], summary="A stored response")
stored_router.add_api_route("/v1/responses/{response_id}", delete, methods=["DELETE"], summary="Delete a stored response")
stored_router.add_api_route("/v1/responses/{response_id}/cancel", cancel, methods=["POST"],
                            summary="Cancel a background response (none here: 400)")


class ResponseShape:
    """The engine's events of one request -> a Response, or its stream of typed events."""

    def __init__(self, body: ResponsesRequest, model: str, tools: ToolFormat | None, phase: str | None):
        """`phase`: where a thinking model's answer starts, for its reasoning item (None: no split)."""
        self.id, self.created_at, self.model, self.tools, self.phase = _new_id("resp"), int(time.time()), model, tools, phase
        choice = body.tool_choice or "auto"
        self.echo = {  # the request's settings, as the Response object repeats them
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "previous_response_id": body.previous_response_id, "temperature": body.temperature,
            "top_p": body.top_p, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "tool_choice": choice if isinstance(choice, str) else choice.declared(),
            "tools": [t.declared(exclude_none=True) for t in body.tools or []],
            "text": {"format": body.text.format.declared(by_alias=True, exclude_none=True)}
            if body.text and body.text.format else {"format": {"type": "text"}},
            "store": body.store is not False, "metadata": {}}

    def _response(self, status: str, output: list[dict], usage: dict | None, final: FinalEvent | None = None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if final and final.finish_reason == FinishReason.LENGTH else None
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status, "error": None,
                "incomplete_details": incomplete, "model": self.model, "output": output, "usage": usage, **self.echo}

    def response(self, final: FinalEvent) -> dict:
        thought, text = split_reasoning(final.text, self.phase) if self.phase else (None, final.text)
        text, calls = parse_tool_calls(text, self.tools) if self.tools else (text, [])
        output = [_reasoning(_new_id("rs"), thought, "completed")] if thought else []
        output += [_message(_new_id("msg"), text, "completed")] if text else []
        output += [_call(_new_id("fc"), c.id, c.name, c.arguments, "completed") for c in calls]
        return self._final(final, output)

    def _final(self, final: FinalEvent, output: list[dict]) -> dict:
        usage = {"input_tokens": final.prompt_tokens, "output_tokens": final.generated_tokens,
                 "total_tokens": final.prompt_tokens + final.generated_tokens,
                 "input_tokens_details": {"cached_tokens": final.cached_tokens},
                 "output_tokens_details": {"reasoning_tokens": final.reasoning_tokens}}
        return self._response("incomplete" if final.finish_reason == FinishReason.LENGTH else "completed", output,
                              usage, final)

    @staticmethod
    def assistant_messages(response: dict) -> list[dict]:
        """The answer as the chat message a later turn's template sees."""
        def text(kind: str) -> str:
            return "".join(part["text"] for item in response["output"] if item["type"] == kind for part in item["content"])

        calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
                 for item in response["output"] if item["type"] == "function_call"]
        thought = {"reasoning_content": text("reasoning")} if text("reasoning") else {}
        return [{"role": "assistant", "content": text("message") or None, **({"tool_calls": calls} if calls else {}),
                 **thought}]

    async def events(self, batches: AsyncIterator[list[tuple[int, object]]], keep) -> AsyncIterator[list[dict]]:
        numbered = Numbered()
        start = self._response("in_progress", [], None)
        yield numbered([{"type": "response.created", "response": start},
                        {"type": "response.in_progress", "response": start}])
        items, texts = Items(), OutputEvents(self.tools, self.phase)
        async for batch in batches:
            out = []
            for _, event in batch:
                out += items.feed(texts.of(event))
                if isinstance(event, TokenEvent):
                    continue
                out += items.close()
                response = keep(self._final(event, items.done))
                out.append({"type": f"response.{response['status']}", "response": response})
            yield numbered(out)


class Numbered:
    """Every event of a stream carries its sequence_number, from 0."""

    def __init__(self):
        self.next = 0

    def __call__(self, events: list[dict]) -> list[dict]:
        for event in events:
            event["sequence_number"], self.next = self.next, self.next + 1
        return events


def _message(item_id: str, text: str, status: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _reasoning(item_id: str, text: str, status: str) -> dict:
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"type": "reasoning", "id": item_id, "status": status, "summary": [], "content": content}


# Items whose text streams as one content part: item type -> (new item, part type, event prefix).
_TEXT_ITEMS = {"message": (_message, "output_text", "response.output_text"),
               "reasoning": (_reasoning, "reasoning_text", "response.reasoning_text")}


def _call(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _part(kind: str, text: str) -> dict:
    return {"type": _TEXT_ITEMS[kind][1], "text": text, **({"annotations": []} if kind == "message" else {})}


class Items:
    """A streamed response's output items as they open, fill and close: a message's text, or a
    function call whose arguments arrive as JSON pieces."""

    def __init__(self):
        self.done: list[dict] = []
        self.open: dict | None = None  # the item being streamed, with its text or arguments so far

    def feed(self, events: list[StreamEvent]) -> list[dict]:
        out = []
        for event in events:
            if isinstance(event, (ContentDelta, ReasoningDelta)) and event.text:
                kind = "message" if isinstance(event, ContentDelta) else "reasoning"
                new, _, prefix = _TEXT_ITEMS[kind]
                if self.open is None or self.open["type"] != kind:
                    out += self._start(new(_new_id("msg" if kind == "message" else "rs"), "", "in_progress"))
                    out.append({"type": "response.content_part.added", **self._where(), "content_index": 0,
                                "part": _part(kind, "")})
                self.open["text"] += event.text
                out.append({"type": f"{prefix}.delta", **self._where(), "content_index": 0, "delta": event.text})
            elif isinstance(event, ToolCallStart):
                out += self._start(_call(_new_id("fc"), event.id, event.name, "", "in_progress"))
            elif isinstance(event, ToolCallArgumentsDelta):
                self.open["text"] += event.arguments
                out.append({"type": "response.function_call_arguments.delta", **self._where(), "delta": event.arguments})
        return out

    def close(self) -> list[dict]:
        if self.open is None:
            return []
        item, text, where = self.open["item"], self.open["text"], self._where()
        if item["type"] in _TEXT_ITEMS:
            new, _, prefix = _TEXT_ITEMS[item["type"]]
            done = new(item["id"], text, "completed")
            out = [{"type": f"{prefix}.done", **where, "content_index": 0, "text": text},
                   {"type": "response.content_part.done", **where, "content_index": 0, "part": done["content"][0]}]
        else:
            done = _call(item["id"], item["call_id"], item["name"], text, "completed")
            out = [{"type": "response.function_call_arguments.done", **where, "arguments": text}]
        self.done.append(done)
        self.open = None
        return out + [{"type": "response.output_item.done", "output_index": where["output_index"], "item": done}]

    def _start(self, item: dict) -> list[dict]:
        out = self.close()
        self.open = {"type": item["type"], "item": item, "text": ""}
        return out + [{"type": "response.output_item.added", "output_index": len(self.done), "item": item}]

    def _where(self) -> dict:
        return {"item_id": self.open["item"]["id"], "output_index": len(self.done)}
