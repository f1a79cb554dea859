"""A request inside the engine: what validation prepared, where its events go, and the state of
each of its sequences that the scheduler does not need."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

import torch

from parley.engine.drafts import PredictedOutput, PromptLookup
from parley.engine.sequence import Sequence
from parley.engine.thinking import ThinkingState
from parley.tokenization.detokenizer import IncrementalDetokenizer
from parley.types import GenerationRequest, Token


@dataclass(frozen=True)
class Sink:
    """Where a request's events go: `put` (a list of events, or an exception that ends the request)
    runs on `loop`."""

    loop: asyncio.AbstractEventLoop
    put: Callable[[object], None]

    def send(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.put, item)


def deliver(items: list[tuple[Callable[[object], None], object]]) -> None:
    """On one event loop: hands each request of a step its events (one wake-up for all of them)."""
    for put, item in items:
        put(item)


@dataclass
class PreparedRequest:
    """A validated request: prompt tokenized, seeds chosen, grammar compiled."""

    request: GenerationRequest
    prompt_ids: list[int]
    seeds: list[int | None]
    matchers: list  # one grammar matcher per sequence, or empty
    draft_ids: list[int] = field(default_factory=list)  # predicted output, verified as draft tokens
    cache_salt: int = 0  # prefix-cache namespace: one per LoRA adapter load, 0 for the base model
    lora_id: int = 0  # the LoRA adapter load it runs with (LoRARegistry); 0: the base model


@dataclass
class SequenceState:
    """Everything about one sequence's output that the scheduler does not need."""

    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    seed: int | None
    matcher: object | None = None
    tokens: list[Token] = field(default_factory=list)
    top_tokens: list[list[Token]] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top: list[tuple[list[int], list[float]]] = field(default_factory=list)  # with prompt_top_tokens
    drafts: PredictedOutput | PromptLookup | None = None  # where its draft tokens come from, if it can use any
    drafts_kept: int = 0  # draft tokens verified and kept
    drafts_rejected: int = 0  # ... and not kept
    thinking: ThinkingState | None = None  # with GenerationRequest.reasoning


@dataclass
class RequestState:
    prepared: PreparedRequest
    sink: Sink
    arrival: float
    deadline: float | None
    sequences: list[Sequence] = field(default_factory=list)
    waiting_siblings: list[Sequence] = field(default_factory=list)  # started once the prompt is cached
    first_scheduled: float | None = None
    events: list = field(default_factory=list)

    @property
    def request(self) -> GenerationRequest:
        return self.prepared.request
