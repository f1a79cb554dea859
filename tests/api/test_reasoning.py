"""A thinking model over HTTP (docs/API.md, "Reasoning"): its reasoning apart from the answer on
every API, the fields that steer it (thinking_budget, enable_thinking, chat_template_kwargs,
parse_reasoning, include_reasoning) and the refusals where they cannot take effect.

The model is a tiny random one whose template thinks (tiny_model.THINKING_TEMPLATE): its prompt
opens the thinking, so everything it writes is thinking until the budget forces "</think>"."""

from __future__ import annotations

import json
import sys

import anthropic
import httpx
import openai
import pytest

from parley.tokenization.reasoning import THINKING, split_reasoning
from server import CLIENT_TIMEOUT_S, ServerProcess, sse_events
from tiny_model import make_tiny_model

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def http(thinker):
    with httpx.Client(base_url=thinker.url, timeout=CLIENT_TIMEOUT_S) as client:
        yield client


def chat(http, path="/v1/chat/completions", **body) -> dict:
    response = http.post(path, json={"messages": HI, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_reasoning_comes_apart_from_the_answer(http):
    raw = chat(http, max_tokens=20, thinking_budget=6, parse_reasoning=False, logprobs=True)
    parsed = chat(http, max_tokens=20, thinking_budget=6)
    tokens = [t["token"] for t in raw["choices"][0]["logprobs"]["content"]]
    assert tokens[5] == "</think>", "the budget of 6 closed the thinking with its 6th token"
    text = raw["choices"][0]["message"]["content"]
    assert "reasoning_content" not in raw["choices"][0]["message"]
    message = parsed["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == split_reasoning(text, THINKING)
    assert message["reasoning_content"] and message["content"] and "think>" not in message["content"]
    assert parsed["usage"]["completion_tokens"] == 20
    assert parsed["usage"]["completion_tokens_details"] == {"reasoning_tokens": 6}


def test_without_a_budget_it_thinks_to_the_end(http):
    message = chat(http, max_tokens=12)["choices"][0]["message"]
    assert message["reasoning_content"] and message["content"] == ""


def test_include_reasoning_false_leaves_it_out(http):
    message = chat(http, max_tokens=20, thinking_budget=6, include_reasoning=False)["choices"][0]["message"]
    assert "reasoning_content" not in message
    assert message["content"] == chat(http, max_tokens=20, thinking_budget=6)["choices"][0]["message"]["content"]


def test_the_stream_joins_to_the_answer(http):
    whole = chat(http, max_tokens=20, thinking_budget=6)["choices"][0]["message"]
    with http.stream("POST", "/v1/chat/completions", json={"messages": HI, "temperature": 0, "max_tokens": 20,
                                                           "thinking_budget": 6, "stream": True}) as response:
        chunks = [json.loads(e) for e in sse_events(response) if e != "[DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d["reasoning_content"] or "" for d in deltas) == whole["reasoning_content"]
    assert "".join(d["content"] or "" for d in deltas) == whole["content"]
    first_content = next(i for i, d in enumerate(deltas) if d["content"])
    assert all(not d["reasoning_content"] for d in deltas[first_content:]), "the reasoning comes first"


def test_enable_thinking_false_reaches_the_template(http):
    on = chat(http, max_tokens=8)
    off = chat(http, max_tokens=8, enable_thinking=False)
    as_kwarg = chat(http, max_tokens=8, chat_template_kwargs={"enable_thinking": False})
    # the template closed an empty thinking: "<think>\n" became "<think>\n\n</think>\n\n"
    assert off["usage"]["prompt_tokens"] > on["usage"]["prompt_tokens"]
    assert off["choices"][0]["message"]["reasoning_content"] is None and off["choices"][0]["message"]["content"]
    assert as_kwarg["choices"] == off["choices"]
    assert as_kwarg["usage"]["prompt_tokens"] == off["usage"]["prompt_tokens"]


def test_chat_template_kwargs_reach_the_template_and_unread_ones_are_refused(http):
    free = chat(http, max_tokens=8, chat_template_kwargs={"free_thinking": True})
    assert free["usage"]["prompt_tokens"] < chat(http, max_tokens=8)["usage"]["prompt_tokens"]
    assert free["choices"][0]["message"]["reasoning_content"] is None  # it did not open one
    for kwargs, field in (({"persona": "pirate"}, "chat_template_kwargs.persona"),
                          ({"messages": []}, "chat_template_kwargs.messages")):
        response = http.post("/v1/chat/completions", json={"messages": HI, "chat_template_kwargs": kwargs})
        assert response.status_code == 422 and field in response.text, response.text
    both = http.post("/v1/chat/completions", json={"messages": HI, "enable_thinking": True,
                                                   "chat_template_kwargs": {"enable_thinking": False}})
    assert both.status_code == 422 and both.json()["error"]["param"] == "enable_thinking"


def test_a_grammar_constrains_the_answer_not_the_thinking(http):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    message = chat(http, max_tokens=40, thinking_budget=5, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})["choices"][0]["message"]
    assert message["reasoning_content"]
    assert isinstance(json.loads(message["content"])["ok"], bool)


def test_siliconflow_max_tokens_bounds_the_answer_alone(http):
    answer = chat(http, "/siliconflow/v1/chat/completions", max_tokens=5, thinking_budget=128)
    assert answer["usage"]["completion_tokens"] == 128 + 5
    assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": 128}
    assert answer["choices"][0]["finish_reason"] == "length"
    low = http.post("/siliconflow/v1/chat/completions", json={"messages": HI, "thinking_budget": 100})
    assert low.status_code == 422 and low.json()["error"]["param"] == "thinking_budget"
    # elsewhere max_tokens bounds the thinking and the answer together
    assert chat(http, max_tokens=5, thinking_budget=128)["usage"]["completion_tokens"] == 5


def test_friendli_reasoning_budget_is_the_thinking_budget(http):
    assert chat(http, max_tokens=20, reasoning_budget=6)["choices"] == \
        chat(http, max_tokens=20, thinking_budget=6)["choices"]


def test_an_earlier_answers_reasoning_reaches_the_template(http):
    turn = {"role": "assistant", "content": "x", "reasoning_content": "a long thought"}
    with_thought = chat(http, messages=[*HI, turn], max_tokens=2)
    without = chat(http, messages=[*HI, {"role": "assistant", "content": "x"}], max_tokens=2)
    as_friendli = chat(http, messages=[*HI, {"role": "assistant", "content": "x", "reasoning": "a long thought"}],
                       max_tokens=2)
    assert with_thought["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]
    assert as_friendli["usage"]["prompt_tokens"] == with_thought["usage"]["prompt_tokens"]


def test_the_responses_api_returns_a_reasoning_item(thinker):
    client = openai.OpenAI(base_url=thinker.url + "/v1", api_key="x", timeout=CLIENT_TIMEOUT_S)
    response = client.responses.create(model="thinker", input="hi", max_output_tokens=12, temperature=0)
    reasoning = next(item for item in response.output if item.type == "reasoning")
    assert response.output[0] is reasoning and response.status == "incomplete"
    chat_message = chat(httpx.Client(base_url=thinker.url, timeout=CLIENT_TIMEOUT_S), max_tokens=12)
    assert reasoning.content[0].text == chat_message["choices"][0]["message"]["reasoning_content"]
    assert response.usage.output_tokens_details.reasoning_tokens == 12
    events = list(client.responses.create(model="thinker", input="hi", max_output_tokens=12, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.reasoning_text.delta"]
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert streamed == reasoning.content[0].text
    assert events[-1].response.output[0].content[0].text == streamed
    # the reasoning item goes back as input, as OpenAI's docs tell clients to do
    again = client.responses.create(model="thinker", input=[{"role": "user", "content": "hi"},
                                                            reasoning.model_dump(exclude_none=True),
                                                            {"role": "assistant", "content": "x"},
                                                            {"role": "user", "content": "and?"}],
                                    max_output_tokens=2, temperature=0)
    assert again.status == "incomplete"


def test_anthropic_thinking_blocks(thinker):
    client = anthropic.Anthropic(base_url=thinker.url, api_key="x", timeout=CLIENT_TIMEOUT_S)
    message = client.messages.create(model="thinker", max_tokens=12, messages=HI, extra_body={"temperature": 0})
    assert [b.type for b in message.content] == ["thinking"] and message.content[0].thinking
    off = client.messages.create(model="thinker", max_tokens=12, messages=HI, thinking={"type": "disabled"},
                                 extra_body={"temperature": 0})
    assert [b.type for b in off.content] == ["text"] and off.usage.input_tokens > message.usage.input_tokens
    with client.messages.stream(model="thinker", max_tokens=12, messages=HI, extra_body={"temperature": 0}) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].thinking == message.content[0].thinking
    # a thinking block sent back reaches the template as that turn's reasoning (shown in the latest turn)
    def counted(blocks: list[dict]) -> int:
        return client.messages.count_tokens(model="thinker", messages=[*HI, {"role": "assistant", "content": blocks}]
                                            ).input_tokens

    text = {"type": "text", "text": "x"}
    assert counted([{"type": "thinking", "thinking": "a long thought", "signature": ""}, text]) > counted([text])


def test_a_model_that_does_not_think_refuses_to_be_made_to(fake_server):
    for body, field in (({"enable_thinking": True}, "enable_thinking"),
                        ({"chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs.enable_thinking"),
                        ({"thinking_budget": 100}, "thinking_budget"),
                        ({"reasoning_budget": 100}, "reasoning_budget")):
        response = httpx.post(fake_server.url + "/v1/chat/completions", json={"messages": HI, **body},
                              timeout=CLIENT_TIMEOUT_S)
        assert response.status_code == 422 and response.json()["error"]["param"] == field, response.text
    ok = httpx.post(fake_server.url + "/v1/chat/completions", json={"messages": HI, "enable_thinking": False,
                                                                    "max_tokens": 2}, timeout=CLIENT_TIMEOUT_S)
    assert ok.status_code == 200 and "reasoning_content" not in ok.json()["choices"][0]["message"]
    refused = httpx.post(fake_server.url + "/v1/messages", json={"model": "fake-model", "max_tokens": 5, "messages": HI,
                                                                 "thinking": {"type": "adaptive"}},
                         timeout=CLIENT_TIMEOUT_S)
    assert refused.status_code == 400 and "thinking.type" in refused.text


def test_reasoning_format_none_leaves_the_thinking_in_the_content(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("raw_thinker"), seed=3, thinking=True)
    proc = ServerProcess([sys.executable, "-m", "parley", "serve", "--model-id", model, "--dtype", "float32",
                          "--num-threads", "1", "--max-batch-total-tokens", "4096", "--reasoning-format", "none"],
                         tmp_path_factory.mktemp("raw_thinker_server") / "server.log").start()
    try:
        with httpx.Client(base_url=proc.url, timeout=CLIENT_TIMEOUT_S) as raw:
            message = chat(raw, max_tokens=20, thinking_budget=6)["choices"][0]["message"]
            assert "</think>" in message["content"] and "reasoning_content" not in message
            parsed = chat(raw, max_tokens=20, thinking_budget=6, parse_reasoning=True)["choices"][0]["message"]
            assert (parsed["reasoning_content"], parsed["content"]) == split_reasoning(message["content"], THINKING)
    finally:
        proc.stop()
