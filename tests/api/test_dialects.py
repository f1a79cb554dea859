"""The dialect table and per-vendor rules, without a server (tests/sdk drives them through each SDK)."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from parley.api import dialects
from parley.api.dialects import SAFE_PROMPT, ChatBody
from parley.api.errors import ApiError
from parley.api.openai import routes as chat_routes
from parley.types import GenerationRequest

HI = [{"role": "user", "content": "Hi"}]


def internal(**fields) -> GenerationRequest:
    request = GenerationRequest(prompt="x")
    dialects.apply(ChatBody(messages=HI, **fields), request)
    return request


def http(path: str = "/v1/chat/completions", **headers: str) -> Request:
    """A request as routed to the chat route at `path`, which carries the dialect its registration bound."""
    route = next(route for route in chat_routes.router.routes if route.path == path)
    return Request({"type": "http", "method": "POST", "path": path, "query_string": b"", "route": route,
                    "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]})


@pytest.mark.parametrize("fields, read, expected", [
    ({"seed": 3}, "seeds", 3),  # choice i: seed + i
    ({"seed": [3, 4]}, "seeds", [3, 4]),  # Friendli
    ({"random_seed": 3}, "seeds", 3),  # Mistral
    ({"max_tokens": 5}, "stopping.max_new_tokens", 5),
    ({"max_new_tokens": 5}, "stopping.max_new_tokens", 5),
    ({"max_tokens": 9, "max_completion_tokens": 5}, "stopping.max_new_tokens", 5),  # the newer name wins
    ({"eos_token": [7, 8]}, "stopping.extra_eos_token_ids", [7, 8]),
    ({"timeout_microseconds": 1500}, "timeout_s", 0.0015),
    ({"prediction": {"type": "content", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}},
     "draft_text", "ab"),
    ({"user": "u1"}, "user", "u1"),
    ({"user": "u1", "safety_identifier": "u2"}, "user", "u2"),  # OpenAI's newer name wins
])
def test_every_spelling_lands_in_one_internal_field(fields, read, expected):
    value = internal(**fields)
    for name in read.split("."):
        value = getattr(value, name)
    assert value == expected


def test_the_end_user_of_anthropic_and_responses_requests_is_the_chat_bodys():
    from parley.api.anthropic.routes import chat_body as anthropic_chat_body
    from parley.api.anthropic.schemas import MessagesRequest
    from parley.api.responses.routes import chat_body as responses_chat_body
    from parley.api.responses.schemas import ResponsesRequest

    claude = MessagesRequest(model="m", max_tokens=5, messages=HI, metadata={"user_id": "u1"})
    assert anthropic_chat_body(claude).user == "u1"
    assert anthropic_chat_body(MessagesRequest(model="m", max_tokens=5, messages=HI, metadata={})).user is None
    responses = ResponsesRequest(input="Hi", user="u1", safety_identifier="u2")
    body = responses_chat_body(responses, HI)
    assert (body.user, body.safety_identifier) == ("u1", "u2")


def test_unset_fields_leave_the_defaults():
    request = internal()
    assert request == GenerationRequest(prompt="x", request_id=request.request_id)


def test_safe_prompt_goes_before_the_client_system_text():
    body = ChatBody(messages=[{"role": "system", "content": "Be brief."}, *HI], safe_prompt=True)
    dialects.normalize(body, http())
    assert body.messages[0].content == SAFE_PROMPT + "\n\nBe brief." and len(body.messages) == 2
    body = ChatBody(messages=HI, safe_prompt=True)
    dialects.normalize(body, http())
    assert [m.role for m in body.messages] == ["system", "user"] and body.messages[0].content == SAFE_PROMPT


@pytest.mark.parametrize("path, adapter", [("/dedicated/v1/chat/completions", "lora"),
                                           ("/v1/chat/completions", None)])
def test_friendli_model_suffix_names_the_adapter_on_its_route(path, adapter):
    body = ChatBody(messages=HI, model="endpoint:lora")
    dialects.normalize(body, http(path))
    assert body.adapter_id == adapter


@pytest.mark.parametrize("header, unknown, status", [("error", {"x": 1}, 422), ("error", {}, None),
                                                     ("drop", {"x": 1}, None), ("bogus", {}, 422)])
def test_extra_parameters_header(header, unknown, status):
    body = ChatBody(messages=HI, n=2, **unknown)
    if status is None:
        dialects.normalize(body, http(extra_parameters=header))
        return
    with pytest.raises(ApiError) as err:
        dialects.normalize(body, http(extra_parameters=header))
    assert err.value.status == status and err.value.param == ("x" if unknown else "extra-parameters")


def test_unknown_fields_are_refused_by_name_unless_the_server_ignores_them():
    body = ChatBody(messages=HI, temprature=0, stop_token=None)  # the typo is the point; a null counts as absent
    with pytest.raises(ApiError) as err:
        dialects.normalize(body, http())
    assert err.value.status == 400 and err.value.param == "temprature" and "`temprature`" in err.value.message
    assert "stop_token" not in err.value.message
    dialects.normalize(body, http(), enforce_known=False)  # --unknown-fields ignore
    dialects.normalize(body, http(extra_parameters="pass-through"))  # Azure's SDK, with model_extras


def test_engine_errors_name_the_fields_the_body_sent():
    """The engine names its own fields (engine/validation.py); FIELDS takes each to what the body sent."""
    names = dialects.engine_names(ChatBody(messages=HI, random_seed=1, max_completion_tokens=5))
    assert (names["seeds"], names["max_new_tokens"]) == ("random_seed", "max_completion_tokens")
    assert (names["extra_eos_token_ids"], names["min_new_tokens"], names["prompt"]) == ("eos_token", "min_tokens", "messages")
    names = dialects.engine_names(ChatBody(messages=HI), tools=True)
    assert (names["seeds"], names["max_new_tokens"], names["grammar"]) == ("seed", "max_tokens", "tools")
    anthropic = dialects.engine_names(ChatBody(messages=HI, max_tokens=5), {"stop": "stop_sequences"})
    assert (anthropic["stop_sequences"], anthropic["max_new_tokens"]) == ("stop_sequences", "max_tokens")
