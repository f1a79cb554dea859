"""Leaf values passed between layers: what a request asks for and what the engine answers.

Stdlib only. Every API dialect is translated into a `GenerationRequest`; the engine answers with
`TokenEvent`s and one `FinalEvent` per generated sequence. `Engine` is all the HTTP layer may ask
of an engine (engine/async_engine.py's, or the API tests' fake).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass
class SamplingParams:
    """How the next token is chosen. Defaults are neutral (greedy, no penalties)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    typical_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/TGI: divides positive logits of seen tokens (prompt included)
    frequency_penalty: float = 0.0  # OpenAI: subtract penalty * count of the token in the output
    presence_penalty: float = 0.0  # OpenAI: subtract penalty once if the token is in the output
    logit_bias: dict[int, float] = field(default_factory=dict)
    watermark: bool = False
    top_n_tokens: int = 0  # how many most likely alternatives to report per generated token


@dataclass
class StoppingCriteria:
    max_new_tokens: int = 100
    min_new_tokens: int = 0  # EOS and stop tokens are masked until this many tokens exist
    stop_sequences: list[str] = field(default_factory=list)
    extra_eos_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # the model's end-of-sequence tokens do not end it (they are generated as any token)
    keep_stop: bool = False  # the stop sequence or token that ended it stays in its text


@dataclass(frozen=True)
class CallFormat:
    """How a tool-call grammar writes its calls, as text: any free text, then `opening`, then the
    calls, each `start` + a JSON object + `end`, joined by `separator`, then `closing`.

    `whole`: calls, when made, are the whole output (Llama 3's JSON, Mistral's `[TOOL_CALLS]`),
    and free text never begins as calls do (`opening` + `start` + "{"); otherwise free text never
    holds `opening` + `start`. `marker_token`: a special token (it writes no text) the grammar puts
    before `opening`."""

    start: str
    end: str
    separator: str
    opening: str = ""
    closing: str = ""
    whole: bool = False
    marker_token: int | None = None

    @property
    def lead(self) -> str:
        """The text before the first call's JSON."""
        return self.opening + self.start

    @property
    def between(self) -> str:
        """The text from one call's JSON to the next one's."""
        return self.end + self.separator + self.start


@dataclass
class Grammar:
    """A constraint on the output. kind: "json" (value = JSON Schema text), "regex", "lark",
    or "json_object" (any JSON object, value unused).

    `calls` marks a tool-call grammar (a "lark" one): the engine then also bounds the numbers in
    its calls as in JSON answers, keeps each call from repeating an earlier one, and begins no call
    the tokens left are unlikely to hold."""

    kind: str
    value: str = ""
    calls: CallFormat | None = None


@dataclass
class Reasoning:
    """A model that thinks between two marker tokens before it answers (`<think>` ... `</think>`).

    The engine follows where each sequence stands: a grammar constrains the answer only; past
    `budget` tokens of thinking, `close_ids` (ending with `end_id`) are forced so the model answers;
    `max_answer_tokens` caps the tokens after the thinking (an answer budget apart from the thinking's)."""

    start_id: int
    end_id: int
    close_ids: list[int]
    phase: str = "maybe"  # where the prompt leaves the model: "thinking", "answer" or "maybe" (it may open one)
    budget: int | None = None  # thinking tokens, markers and close included; None: no bound
    max_answer_tokens: int | None = None


@dataclass(frozen=True)
class Infill:
    """A model that fills in the middle (tokenization/infill.py): its three markers, as text and as
    token ids, and the tokens that end the middle besides its end-of-sequence token."""

    prefix: str
    suffix: str
    middle: str
    prefix_id: int
    suffix_id: int
    middle_id: int
    end_ids: tuple[int, ...]

    def text(self, before: str, after: str) -> str:
        """The prompt, markers as text (the tokenizer reads them as their tokens)."""
        return f"{self.prefix}{before}{self.suffix}{after}{self.middle}"

    def ids(self, before: list[int], after: list[int]) -> list[int]:
        return [self.prefix_id, *before, self.suffix_id, *after, self.middle_id]


@dataclass
class GenerationRequest:
    prompt: str | list[int]  # text, or token ids already encoded
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingCriteria = field(default_factory=StoppingCriteria)
    n: int = 1  # independent sequences generated for the prompt (OpenAI n, TGI best_of)
    seeds: int | list[int] | None = None  # one seed (sequence i gets seed + i) or one per sequence; None: random, reported back
    add_special_tokens: bool = True  # False for prompts rendered by a chat template
    truncate: int | None = None  # keep only the last `truncate` prompt tokens
    decoder_input_details: bool = False  # report the prompt tokens with their logprobs
    prompt_top_tokens: bool = False  # with decoder_input_details: and each one's sampling.top_n_tokens alternatives
    grammar: Grammar | None = None
    adapter_id: str | None = None
    timeout_s: float | None = None  # a request still queued or running past it fails with TimeoutError
    draft_text: str | None = None  # predicted output, verified as speculative draft tokens
    reasoning: Reasoning | None = None  # the model thinks first (see Reasoning)
    user: str | None = None  # whom it is for: waiting requests are admitted by turns among users (scheduler.py)
    cache_salt: str | None = None  # requests share cached prompt blocks only with requests of the same salt
    skip_special_tokens: bool = True  # False: special tokens write their text into the output
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Token:
    id: int
    text: str
    logprob: float | None
    special: bool = False


@dataclass
class TokenEvent:
    """One generated token of sequence `index`."""

    index: int
    token: Token
    text: str  # the output text that may be shown now (stop-string prefixes are held back)
    top_tokens: list[Token] = field(default_factory=list)


@dataclass
class FinalEvent:
    """Sequence `index` ended. `text` is its whole output, stop sequence excluded."""

    index: int
    finish_reason: FinishReason
    text: str
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    tokens: list[Token] = field(default_factory=list)
    top_tokens: list[list[Token]] = field(default_factory=list)
    prefill: list[Token] | None = None  # with decoder_input_details
    prefill_top: list[list[Token]] | None = None  # with prompt_top_tokens: the alternatives at each prompt token
    text_tail: str = ""  # output text held back until the end and not yet sent in a TokenEvent
    stop_sequence: str | None = None  # with FinishReason.STOP_SEQUENCE: which one
    reasoning_tokens: int = 0  # of generated_tokens, those of the thinking (with GenerationRequest.reasoning)
    queue_s: float = 0.0  # seconds between arrival and the first scheduled step
    cached_tokens: int = 0  # prompt tokens whose K/V the prefix cache already held
    inference_s: float = 0.0  # seconds between the first scheduled step and the end
    prediction_tokens: tuple[int, int] | None = None  # with a prediction used as drafts: its tokens kept, and
    #                                                   verified and not kept


@dataclass
class ToolCall:
    """A function call the model made; `arguments` is the JSON text of the arguments."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class EngineInfo:
    """What the engine serves and the limits it was started with (resolved: no None left)."""

    model_id: str
    dtype: str
    device: str
    max_input_tokens: int
    max_total_tokens: int
    max_batch_total_tokens: int
    max_batch_size: int
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    waiting_served_ratio: float
    max_waiting_tokens: int
    chat_template: str | None  # the template's source; None: the default (ChatML)
    template_variables: frozenset[str]  # the variables the chat template reads
    reasoning: Reasoning | None  # the model's thinking markers (phase and budget unset); None: it does not think
    tool_format: object  # how the model writes tool calls: a parley.tools.ToolFormat (types imports no higher layer)
    infill: Infill | None = None  # its fill-in-the-middle markers; None: it does not fill in the middle


@dataclass
class EngineStats:
    kv_blocks_used: int
    kv_blocks_total: int
    waiting: int
    running: int
    adapter_requests: dict[str, int] = field(default_factory=dict)  # adapter name -> requests so far
    generated_tokens: int = 0  # tokens generated since the start, every request's
    prefix_cache_queried_tokens: int = 0  # prompt tokens of every sequence admitted, looked up in the prefix cache
    prefix_cache_hit_tokens: int = 0  # ... and found there
    requests_waiting: int = 0  # requests none of whose sequences runs yet (`waiting` counts sequences)
    requests_running: int = 0  # requests with a sequence in the running batch
    adapters_loaded: int = 0  # LoRA adapters served now
    running_adapters: tuple[str, ...] = ()  # LoRA adapters of the sequences running now
    waiting_adapters: tuple[str, ...] = ()  # ... and of those waiting
    max_adapters_per_batch: int = 0  # how many adapters one step can run: one per sequence of the batch
    compute_threads: int = 0  # the threads its steps run on now (fewer than --num-threads while others hold cores)
    draft_tokens: int = 0  # draft tokens verified since the start (a prediction's, or --speculate's)
    draft_accepted_tokens: int = 0  # ... and kept


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    rank: int


@runtime_checkable
class Engine(Protocol):
    """The engine as the HTTP layer sees it. A prompt is rendered and tokenized once, here, and
    handed to `generate` as token ids; the engine's limits (prompt and output length, n, seeds,
    stop sequences...) are checked in `generate` only, the dialects' own rules at the edge."""

    info: EngineInfo
    failure: str | None  # why the engine loop stopped, if it did

    def render(self, messages: list[dict], continue_final_message: bool = False, **variables) -> str:
        """The chat template applied to `messages` (with the generation prompt; or, with
        `continue_final_message`, ending right after the last message's content, so the model
        continues that turn); ValueError when the template refuses them."""

    async def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """`text`'s token ids; ValidationError about `prompt` when it is empty."""

    def tokenize_with_offsets(self, text: str, add_special_tokens: bool) -> list[tuple[int, int, int]]:
        """(id, start, stop) per token: the characters of `text` each stands for."""

    def token_bytes(self, token_id: int) -> bytes:
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinalEvent]:
        """Events of all `request.n` sequences; ValidationError before any event. Closing the
        iterator early aborts the request and frees its KV blocks."""

    def stats(self) -> EngineStats:
        ...

    def has_adapter(self, name: str | None) -> bool:
        ...

    def list_adapters(self) -> list[AdapterInfo]:
        ...

    async def load_adapter(self, name: str, path: str) -> None:
        ...

    async def unload_adapter(self, name: str) -> int:
        ...

    def start(self) -> None:
        ...

    async def shutdown(self) -> None:
        ...


class ParleyError(Exception):
    """Base of the errors the engine raises to the API layer."""


class ValidationError(ParleyError):
    """The request breaks a rule or a limit; `field` names the offending field (422)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class OverloadedError(ParleyError):
    """Too many requests at once (429); `retry_after`: seconds until it is likely not, if known."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(ParleyError):
    """The request outlived its `timeout_s` (429)."""


class GenerationError(ParleyError):
    """The engine failed while running this request (424)."""


class NotFoundError(ParleyError):
    """The request names something that does not exist, e.g. an unknown adapter (404)."""
