"""errors.describe_validation names each field as the client sent it: pydantic's own paths hold the
union members it tried (a tagged union's tag, `list[...]`, `constrained-int`), and a union whose
members fail at different depths complains about each. Without a server: the bodies are validated
by the routes' own schemas, as FastAPI does."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from parley.api.anthropic.schemas import MessagesRequest
from parley.api.dialects import ChatBody
from parley.api.errors import describe_validation
from parley.api.responses.schemas import ResponsesRequest


def described(schema: type[BaseModel], body: dict):
    with pytest.raises(ValidationError) as caught:
        schema.model_validate(body)
    errors = [{**error, "loc": ("body", *error["loc"])} for error in caught.value.errors()]
    return describe_validation(RequestValidationError(errors, body=body))


ANTHROPIC = {"model": "m", "max_tokens": 5}


@pytest.mark.parametrize("schema, body, field", [
    # a tagged block whose field shares the tag's name: the tag left out, the field kept
    (MessagesRequest, {**ANTHROPIC, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content.0.text"),
    (MessagesRequest, {**ANTHROPIC, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages.0.content.0.text"),  # missing
    (MessagesRequest, {**ANTHROPIC, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": 5}]}]}]},
     "messages.0.content.0.content.0.text"),
    # chat's content parts are no tagged union: a part's `text` is its field
    (ChatBody, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages.0.content.0.text"),
    (ChatBody, {"messages": [{"role": "user", "content": "Hi"}], "seed": -1}, "seed"),
    # an item whose tag is its default (a message may leave `type` out)
    (ResponsesRequest, {"input": [{"role": "wizard", "content": "Hi"}]}, "input.0.role"),
    (ResponsesRequest, {"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input.0.arguments"),
    (ResponsesRequest, {"input": [{"type": "reasoning", "summary": [{"type": "summary_text", "text": "x"}]}]},
     "input.0.summary"),
    # an end user's id: at most 256 characters
    (ChatBody, {"messages": [{"role": "user", "content": "Hi"}], "user": "u" * 257}, "user"),
    (ChatBody, {"messages": [{"role": "user", "content": "Hi"}], "safety_identifier": "u" * 257}, "safety_identifier"),
    (MessagesRequest, {**ANTHROPIC, "messages": [{"role": "user", "content": "Hi"}], "metadata": {"user_id": "u" * 257}},
     "metadata.user_id"),
    (ResponsesRequest, {"input": "Hi", "user": "u" * 257}, "user"),
])
def test_the_field_is_named_as_sent(schema, body, field):
    error = described(schema, body)
    assert error.param == field and error.message.startswith(f"Input validation error: `{field}`: "), error.message


def test_the_union_member_that_did_not_apply_is_not_blamed():
    error = described(ResponsesRequest, {"input": [{"role": "user", "content": [{"type": "input_image"}]}]})
    assert error.param == "input.0.content.0" and "valid string" not in error.message, error.message
    # two real faults are both named
    error = described(ChatBody, {"messages": [], "temperature": 9})
    assert "`messages`" in error.message and "`temperature`" in error.message, error.message
