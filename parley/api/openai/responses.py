"""Engine events -> OpenAI chat.completion(.chunk) and text_completion objects.

Shapes follow SDK-WIRE §1.5: int `created`, string `system_fingerprint`, `usage` on every answer,
the `logprobs` key on every choice, `delta.role` and `delta.tool_calls` on every chunk, and only
OpenAI's finish reasons. Choice i of prompt p is index p * n + i (several prompts: completions).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import AsyncIterator

from parley.tokenization.reasoning import split_reasoning
from parley.tools.parser import ContentDelta, OutputEvents, ReasoningDelta
from parley.types import FinalEvent, FinishReason, Token, TokenEvent

FINISH_REASONS = {FinishReason.LENGTH: "length", FinishReason.EOS_TOKEN: "stop", FinishReason.STOP_SEQUENCE: "stop"}


@dataclass
class Envelope:
    """The fields every response object and chunk of one request share."""

    model: str
    system_fingerprint: str
    id_prefix: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or f"{self.id_prefix}-{uuid.uuid4().hex}"

    def wrap(self, object_name: str, choices: list[dict], usage: dict | None) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint, "choices": choices, "usage": usage}


class Usage:
    def __init__(self):
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = self.reasoning_tokens = 0
        self.prediction: list[int] | None = None  # accepted, rejected: with a prediction
        self._prompts_counted: set[int] = set()

    def add(self, request_index: int, final: FinalEvent) -> None:
        if request_index not in self._prompts_counted:  # n sequences share one prompt
            self._prompts_counted.add(request_index)
            self.prompt_tokens += final.prompt_tokens
        if final.index == 0:  # the prompt's own lookup (its siblings reuse the blocks it filled)
            self.cached_tokens += final.cached_tokens
        self.completion_tokens += final.generated_tokens
        self.reasoning_tokens += final.reasoning_tokens
        if final.prediction_tokens is not None:
            self.prediction = [a + b for a, b in zip(self.prediction or [0, 0], final.prediction_tokens)]

    def json(self) -> dict:
        """OpenAI's usage; `prompt_tokens_details.cached_tokens`: prompt tokens the prefix cache held;
        `completion_tokens_details.reasoning_tokens` only for thinking models, which have some, and
        its `accepted_prediction_tokens` / `rejected_prediction_tokens` with a prediction: its draft
        tokens kept, and those verified and not kept (which cost a step's rows as OpenAI bills them)."""
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                 "total_tokens": self.prompt_tokens + self.completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}
        details = {"reasoning_tokens": self.reasoning_tokens} if self.reasoning_tokens else {}
        if self.prediction is not None:
            details["accepted_prediction_tokens"], details["rejected_prediction_tokens"] = self.prediction
        if details:
            usage["completion_tokens_details"] = details
        return usage


class ChatShape:
    """Chat answers. `phase`: where a thinking model's answer starts (tokenization/reasoning.py), for
    its reasoning to go to `reasoning_content` (left out with `include_reasoning` false); None: all
    of the text is content. `tools`: the text may hold tool calls (tool_calls.py's ToolChatShape)."""

    response_object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"
    tools = None  # ToolChatShape: the format the model writes tool calls in

    def __init__(self, token_bytes: Callable[[int], bytes], logprobs: bool, phase: str | None = None,
                 include_reasoning: bool = True, answer_prefix: str = ""):
        """`token_bytes`: a token's bytes (the engine's), for the logprobs' `bytes`. `answer_prefix`:
        the text each choice's content starts with before the generated text (Mistral's `prefix`: its
        answer repeats the assistant message it continues, as Mistral's own guide shows)."""
        self.token_bytes = token_bytes
        self.logprobs = logprobs
        self.phase = phase
        self.include_reasoning = include_reasoning
        self.answer_prefix = answer_prefix
        self._outputs: dict[int, OutputEvents] = {}  # per choice, when its text must be parsed
        self._prefixed: set[int] = set()  # choices whose stream has sent answer_prefix

    def _entry(self, t: Token) -> dict:
        return {"token": t.text, "logprob": t.logprob, "bytes": list(self.token_bytes(t.id)),
                "token_id": t.id}

    def _logprob(self, token: Token, top: list[Token]) -> dict:
        return {**self._entry(token), "top_logprobs": [self._entry(t) for t in top]}

    def choice(self, index: int, final: FinalEvent) -> dict:
        logprobs = None
        if self.logprobs:
            tops = final.top_tokens or [[] for _ in final.tokens]
            logprobs = {"content": [self._logprob(t, top) for t, top in zip(final.tokens, tops)]}
        reasoning, content = split_reasoning(final.text, self.phase) if self.phase else (None, final.text)
        message = {"role": "assistant", "content": self.answer_prefix + content, "tool_calls": None}
        if self.phase and self.include_reasoning:
            message["reasoning_content"] = reasoning
        return {"index": index, "message": message, "logprobs": logprobs,
                "finish_reason": FINISH_REASONS[final.finish_reason]}

    def token_choice(self, index: int, event: TokenEvent) -> dict:
        logprobs = {"content": [self._logprob(event.token, event.top_tokens)]} if self.logprobs else None
        return {"index": index, "delta": self._delta(index, event), "logprobs": logprobs, "finish_reason": None}

    def final_choice(self, index: int, final: FinalEvent) -> dict:
        return {"index": index, "delta": self._delta(index, final), "logprobs": None,
                "finish_reason": FINISH_REASONS[final.finish_reason]}

    def _delta(self, index: int, event: TokenEvent | FinalEvent) -> dict:
        """One chunk's delta: content, and the reasoning and tool-call pieces when they are parsed."""
        prefix = ""
        if self.answer_prefix and index not in self._prefixed:  # the choice's first chunk
            self._prefixed.add(index)
            prefix = self.answer_prefix
        if self.phase is None and not self.tools:
            text = event.text if isinstance(event, TokenEvent) else event.text_tail
            return {"role": "assistant", "content": prefix + text, "tool_calls": None}
        events = self._outputs.setdefault(index, OutputEvents(self.tools, self.phase)).of(event)
        calls = self._call_deltas(index, events)
        content = prefix + "".join(e.text for e in events if isinstance(e, ContentDelta))
        reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
        delta = {"role": "assistant", "content": content or (None if calls or reasoning else ""),
                 "tool_calls": calls or None}
        if self.phase and self.include_reasoning:
            delta["reasoning_content"] = reasoning or None
        return delta

    def _call_deltas(self, index: int, events: list) -> list[dict]:
        return []


class CompletionShape:
    """Legacy completions; logprobs in their legacy form (tokens, token_logprobs, top_logprobs,
    text_offset)."""

    response_object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, logprobs: bool, echo: list[str | None] | None = None):
        self.logprobs = logprobs
        self.echo = echo  # with `echo` (one choice a prompt): each prompt's text, None for token ids
        self._offsets: dict[int, int] = {}  # streamed text length per choice, for text_offset

    def _legacy(self, index: int, tokens: list[Token], tops: list[list[Token]]) -> dict:
        offset, offsets = self._offsets.get(index, 0), []
        for t in tokens:
            offsets.append(offset)
            offset += len(t.text)
        self._offsets[index] = offset
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{t.text: t.logprob for t in top} for top in tops], "text_offset": offsets}

    def choice(self, index: int, final: FinalEvent) -> dict:
        text, tokens, tops = final.text, final.tokens, final.top_tokens
        if self.echo is not None:  # the prompt first, as its tokens' text where it came as ids
            prompt = self.echo[index]
            text = ("".join(t.text for t in final.prefill) if prompt is None else prompt) + text
            tokens, tops = final.prefill + tokens, final.prefill_top + tops
        logprobs = self._legacy(index, tokens, tops) if self.logprobs else None
        if logprobs and self.echo is not None:
            logprobs["top_logprobs"][0] = None  # as OpenAI: nothing predicts the first token
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": FINISH_REASONS[final.finish_reason]}

    def token_choice(self, index: int, event: TokenEvent) -> dict:
        logprobs = self._legacy(index, [event.token], [event.top_tokens]) if self.logprobs else None
        return {"index": index, "text": event.text, "logprobs": logprobs, "finish_reason": None}

    def final_choice(self, index: int, final: FinalEvent) -> dict:
        return {"index": index, "text": final.text_tail, "logprobs": None,
                "finish_reason": FINISH_REASONS[final.finish_reason]}


Shape = ChatShape | CompletionShape


def response(shape: Shape, env: Envelope, finals: list[list[FinalEvent]], n: int) -> dict:
    usage, choices = Usage(), []
    for i, group in enumerate(finals):
        for final in group:
            usage.add(i, final)
            choices.append(shape.choice(i * n + final.index, final))
    return env.wrap(shape.response_object, choices, usage.json())


async def stream_payloads(shape: Shape, env: Envelope, batches: AsyncIterator[list[tuple[int, object]]],
                          n: int, num_requests: int, include_usage: bool) -> AsyncIterator[list[dict]]:
    """One chunk per token and one per finished choice. Usage rides on the last choice's final
    chunk (as TGI does), or, with stream_options.include_usage, on a last chunk with no choices."""
    usage, unfinished = Usage(), n * num_requests
    async for batch in batches:
        chunks = []
        for i, event in batch:
            index = i * n + event.index
            if isinstance(event, TokenEvent):
                chunks.append(env.wrap(shape.chunk_object, [shape.token_choice(index, event)], None))
                continue
            usage.add(i, event)
            unfinished -= 1
            last_usage = usage.json() if unfinished == 0 and not include_usage else None
            chunks.append(env.wrap(shape.chunk_object, [shape.final_choice(index, event)], last_usage))
        yield chunks
    if include_usage:
        yield [env.wrap(shape.chunk_object, [], usage.json())]
