"""Anthropic's prefill: a last message of the assistant's is continued, not closed. The prompt ends
inside that turn (as Mistral's `prefix` does, tests/api/test_assistant_prefix.py), and the answer's
content holds only the new text, as Anthropic's does."""

from __future__ import annotations

import asyncio

from fake_engine import FakeEngine

from parley.api.anthropic.routes import chat_body
from parley.api.anthropic.schemas import MessagesRequest
from parley.api.openai.convert import chat_request
from parley.config import EngineConfig

QUESTION = {"role": "user", "content": "What is the capital of France?"}
PREFILL = "The capital of France is"
TOOL = {"name": "capital", "input_schema": {"type": "object", "properties": {}}}


def rendered_prompt(messages: list[dict], **fields) -> str:
    engine = FakeEngine(EngineConfig())
    body = MessagesRequest(model="m", max_tokens=5, messages=messages, **fields)
    return engine.tokenizer.decode(asyncio.run(chat_request(chat_body(body), engine)).prompt)


def test_the_prompt_ends_inside_the_prefilled_turn():
    for prefill in (PREFILL, [{"type": "text", "text": PREFILL}]):
        assert rendered_prompt([QUESTION, {"role": "assistant", "content": prefill}]) == (
            "<|user|>What is the capital of France?\n<|assistant|>" + PREFILL)
    # an assistant turn before the last message is a finished one
    history = [QUESTION, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Why?"}]
    assert rendered_prompt(history).endswith("<|assistant|>Paris.\n<|user|>Why?\n<|assistant|>")


def test_the_answer_continues_the_prefill_and_holds_only_the_new_text(http):
    prefilled = [QUESTION, {"role": "assistant", "content": PREFILL}]
    r = http.post("/v1/messages", json={"model": "m", "max_tokens": 6, "temperature": 0, "messages": prefilled})
    assert r.status_code == 200, r.text
    answer = r.json()
    prompt = http.post("/v1/chat/completions", json={"max_tokens": 6, "temperature": 0, "messages": [
        QUESTION, {"role": "assistant", "content": PREFILL, "prefix": True}]}).json()
    # the same continuation as Mistral's prefix gives (whose answer repeats the prefix)
    assert PREFILL + answer["content"][0]["text"] == prompt["choices"][0]["message"]["content"]
    counted = http.post("/v1/messages/count_tokens", json={"model": "m", "messages": prefilled}).json()
    assert counted["input_tokens"] == answer["usage"]["input_tokens"] == prompt["usage"]["prompt_tokens"]


def test_a_prefill_with_tools_is_refused_naming_the_message(http):
    prefilled = [QUESTION, {"role": "assistant", "content": PREFILL}]
    body = {"model": "m", "max_tokens": 6, "messages": prefilled, "tools": [TOOL]}
    r = http.post("/v1/messages", json=body)
    assert r.status_code == 400 and "messages.1.content" in r.json()["error"]["message"], r.text
    assert http.post("/v1/messages", json={**body, "tool_choice": {"type": "none"}}).status_code == 200
