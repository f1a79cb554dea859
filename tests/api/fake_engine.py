"""A stand-in for parley.engine.async_engine.AsyncEngine with the same interface, the HTTP layer's
`parley.types.Engine` (test_fake_engine_is_an_engine checks it): byte-level tokens, a fixed text
as "output". The HTTP tests run the real engine; this one serves the paths a
real model cannot be made to take on demand: a prompt holding `FAIL_AFTER_<k>` makes the engine
fail with GenerationError after k tokens (k=0: before any event).

It follows the real engine's contract: validation errors before any event; per step, one batch of
events (a sequence's last TokenEvent and its FinalEvent together); stop sequences held back;
closing the iterator frees the request's KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import re
import time

from parley.config import EngineConfig
from parley.tools.format import DEFAULT_FORMAT
from parley.types import (EngineInfo, EngineStats, FinalEvent, FinishReason, GenerationError, GenerationRequest,
                          OverloadedError, Token, TokenEvent, ValidationError)

OUTPUT = "The quick brown fox jumps over the lazy dog. "
BOS, EOS, OFFSET = 0, 1, 2  # byte b is token b + OFFSET


class FakeTokenizer:
    eos_token_ids = [EOS]
    vocab_size = 256 + OFFSET

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + [b + OFFSET for b in text.encode()]

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False) -> list[tuple[int, int, int]]:
        return ([(BOS, 0, 0)] if add_special_tokens else []) + [
            (ord(c) + OFFSET, i, i + 1) for i, c in enumerate(text) if ord(c) < 256]

    def token_bytes(self, token_id: int) -> bytes:
        return {BOS: b"<s>", EOS: b"</s>"}.get(token_id) or bytes([token_id - OFFSET])

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode(errors="replace")

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode(errors="replace")


class FakeEngine:
    STEP_S = 0.003
    BLOCK = 16
    failure: str | None = None  # the real engine's reason its loop stopped

    def __init__(self, config: EngineConfig):
        self.config = dataclasses.replace(config, max_input_tokens=config.max_input_tokens or 1000,
                                          max_total_tokens=config.max_total_tokens or 1024,
                                          max_batch_total_tokens=config.max_batch_total_tokens or 4096)
        self.tokenizer = FakeTokenizer()
        c = self.config
        # its chat template reads none of a request's chat_template_kwargs; the fake model does not think
        self.info = EngineInfo(
            c.model_id or "fake-model", "torch.float32", "cpu", c.max_input_tokens, c.max_total_tokens,
            c.max_batch_total_tokens, c.max_batch_size, c.max_concurrent_requests, c.max_best_of, c.max_stop_sequences,
            c.max_top_n_tokens, c.waiting_served_ratio, c.max_waiting_tokens, chat_template=None,
            template_variables=frozenset(), reasoning=None, tool_format=DEFAULT_FORMAT)
        self._blocks: dict[str, int] = {}
        self._running = 0
        self._generated = 0
        self.started = False

    @classmethod
    def load(cls, config: EngineConfig) -> "FakeEngine":
        time.sleep(0.5)  # lets tests see /health answer 503 first
        return cls(config)

    def start(self) -> None:
        self.started = True

    def render(self, messages: list[dict], continue_final_message: bool = False, **variables) -> str:
        parts = []
        for m in messages:
            content = m.get("content") or ""
            if isinstance(content, list):
                if any(c.get("type") != "text" for c in content):
                    raise ValueError("image content is not supported: this model is text-only")
                content = "".join(c["text"] for c in content)
            parts.append(f"<|{m['role']}|>{content}\n")
        text = "".join(parts)
        return text.removesuffix("\n") if continue_final_message else text + "<|assistant|>"

    async def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        if not text:
            raise ValidationError("Input validation error: `prompt` cannot be empty", "prompt")
        return self.tokenizer.encode(text, add_special_tokens)

    def tokenize_with_offsets(self, text: str, add_special_tokens: bool) -> list[tuple[int, int, int]]:
        return self.tokenizer.encode_with_offsets(text, add_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.token_bytes(token_id)

    def has_adapter(self, name) -> bool:
        return False

    def list_adapters(self) -> list:
        return []

    async def load_adapter(self, name: str, path: str) -> None:
        raise NotImplementedError("the fake engine serves no adapters")

    async def unload_adapter(self, name: str) -> int:
        raise NotImplementedError("the fake engine serves no adapters")

    async def shutdown(self) -> None:
        self.started = False

    def stats(self) -> EngineStats:
        return EngineStats(sum(self._blocks.values()), self.config.max_batch_total_tokens // self.BLOCK, 0,
                         self._running, generated_tokens=self._generated)

    def _validate(self, r: GenerationRequest) -> list[int]:
        ids = list(r.prompt)  # the HTTP layer tokenized it (self.tokenize)
        if r.truncate:
            ids = ids[-r.truncate:]
        c, s = self.config, r.stopping
        checks = [
            (len(ids) <= c.max_input_tokens, "prompt",
             f"`prompt` must have less than {c.max_input_tokens} tokens. Given: {len(ids)}"),
            (s.max_new_tokens > 0, "max_new_tokens", "`max_new_tokens` must be strictly positive"),
            (len(ids) + s.max_new_tokens <= c.max_total_tokens, "max_new_tokens",
             f"`prompt` tokens + `max_new_tokens` must be <= {c.max_total_tokens}. Given: {len(ids)} `prompt` "
             f"tokens and {s.max_new_tokens} `max_new_tokens`"),
            (len(s.stop_sequences) <= c.max_stop_sequences, "stop_sequences",
             f"`stop_sequences` supports up to {c.max_stop_sequences} stop sequences. Given: {len(s.stop_sequences)}"),
            (r.sampling.top_n_tokens <= c.max_top_n_tokens, "top_n_tokens",
             f"`top_n_tokens` must be <= {c.max_top_n_tokens}"),
            (all(0 <= i < self.tokenizer.vocab_size for i in r.sampling.logit_bias), "logit_bias",
             "`logit_bias` keys must be token ids"),
        ]
        for ok, field, message in checks:
            if not ok:
                raise ValidationError("Input validation error: " + message, field)
        return ids

    async def generate(self, request: GenerationRequest):
        r = request
        ids = self._validate(r)
        arrival = time.monotonic()
        seeds = [(r.seeds[0] + i if r.seeds else random.getrandbits(32)) if r.sampling.do_sample else None
                 for i in range(r.n)]
        seqs = [_Sequence(i, seed, r, self.tokenizer) for i, seed in enumerate(seeds)]
        text = self.tokenizer.decode(ids)
        fail = re.search(r"FAIL_AFTER_(\d+)", text)
        if "QUEUE_FULL" in text:  # as the real engine's PromptBacklog
            raise OverloadedError("Model is overloaded: prompt tokens waiting past --max-queued-tokens", retry_after=7)
        self._running += r.n
        try:
            await asyncio.sleep(self.STEP_S)  # prefill
            started = time.monotonic()
            while any(not s.done for s in seqs):
                if fail and len(seqs[0].tokens) >= int(fail.group(1)):
                    raise GenerationError("the fake engine failed as asked")
                batch = []
                for seq in (s for s in seqs if not s.done):
                    batch.append(seq.step())
                    self._generated += 1
                    if seq.done:
                        batch.append(seq.final(len(ids), started - arrival, time.monotonic() - started,
                                               r.decoder_input_details, ids))
                self._blocks[r.request_id] = sum(math.ceil((len(ids) + len(s.tokens)) / self.BLOCK) for s in seqs)
                for event in batch:
                    yield event
                await asyncio.sleep(self.STEP_S)
        finally:
            self._running -= r.n
            self._blocks.pop(r.request_id, None)


class _Sequence:
    def __init__(self, index: int, seed: int | None, r: GenerationRequest, tokenizer: FakeTokenizer):
        self.index, self.seed, self.r, self.tok = index, seed, r, tokenizer
        self.offset = 0 if seed is None else seed % len(OUTPUT)
        self.tokens: list[Token] = []
        self.tops: list[list[Token]] = []
        self.text = self.sent = ""
        self.done = False
        self.reason = FinishReason.LENGTH

    def step(self) -> TokenEvent:
        char = OUTPUT[(self.offset + len(self.tokens)) % len(OUTPUT)]
        token = Token(ord(char) + OFFSET, char, -0.5 - 0.01 * self.index)
        top = [token, Token(ord("x") + OFFSET, "x", -2.0)][: self.r.sampling.top_n_tokens]
        self.tokens.append(token)
        self.tops.append(top)
        self.text += char
        stops = self.r.stopping.stop_sequences
        hit = next((s for s in stops if s in self.text), None)
        if hit:
            self.text = self.text[: self.text.index(hit)]
            self.done, self.reason = True, FinishReason.STOP_SEQUENCE
        elif len(self.tokens) >= self.r.stopping.max_new_tokens:
            self.done = True
        # hold back any suffix that could start a stop sequence
        safe = len(self.text)
        if not self.done:
            for s in stops:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        new, self.sent = self.text[len(self.sent): safe], self.text[:safe]
        return TokenEvent(self.index, token, new, top)

    def final(self, prompt_tokens: int, queue_s: float, inference_s: float, prefill: bool, ids) -> FinalEvent:
        tail = self.text[len(self.sent):]
        return FinalEvent(
            index=self.index, finish_reason=self.reason, text=self.text, generated_tokens=len(self.tokens),
            prompt_tokens=prompt_tokens, seed=self.seed, tokens=self.tokens, top_tokens=self.tops,
            prefill=[Token(i, self.tok.token_text(i), None if k == 0 else -1.0) for k, i in enumerate(ids)]
            if prefill else None, text_tail=tail, queue_s=queue_s, inference_s=inference_s)
