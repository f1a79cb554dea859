"""Vendor chat dialects, translated at the edge into the one internal request (GenerationRequest).

Every chat route takes one body, `ChatBody`: the OpenAI-style superset of openai/schemas.py plus
the fields only some vendors send. Fields that every dialect spells and means alike (temperature,
top_p, n, stop, logprobs...) map in openai/convert.py. Fields that a vendor spells or shapes
differently, or that only vendors send, map through `FIELDS`, the one table of wire field ->
internal field. What is not a field mapping is a small per-vendor rule in `normalize`. The engine
never learns which dialect a request came through.

Each route is bound to its dialect once, when it is registered (`speaking`): `OPENAI`, `FRIENDLI`,
`SILICONFLOW`, `TGI` or `ANTHROPIC`. Its errors take that dialect's form (errors.py), and the chat
rules below follow it; nothing reads the dialect off the URL again.

Which rules apply where:
- Mistral's and Friendli's own fields (random_seed, safe_prompt, prediction, eos_token, seed lists,
  timeout_microseconds...) have names no other dialect gives another meaning, so every chat route
  honors them.
- vLLM's fields (structured_outputs and its older guided_*, ignore_eos, stop_token_ids,
  include_stop_str_in_output, skip_special_tokens, truncate_prompt_tokens, cache_salt), which its
  users send through the openai SDK's extra_body, are taken on every chat and completions route
  (openai/schemas.py's SamplingFields; the grammars in openai/response_format.py).
- Friendli (/dedicated/v1/...): `model` is "ENDPOINT_ID[:ADAPTER_ROUTE]". The adapter part selects
  the LoRA adapter; the endpoint id is not checked and alone means the base model. The
  `X-Friendli-Team` header is accepted and ignored (one server, one team). Every choice returns
  the seed it was sampled with (`FriendliChoices`).
- Unknown fields: without Azure's `extra-parameters` header, a field no dialect here declares is
  refused with OpenAI's 400 ("Unrecognized request argument supplied"), naming it (null ones count
  as absent); `--unknown-fields ignore` relaxes that for clients that send fields of their own.
  With the header, Azure's modes: `error` answers 422 naming every parameter Parley does not know;
  `pass-through` and `drop` honor the known parameters and ignore unknown ones (Parley is both the
  service and the model, so passing an extra parameter on to a model that ignores it and dropping
  it come to the same thing; Azure's SDK sends `pass-through` with its `model_extras`).
- Azure's clients send `?api-version=` on every route they call: a version not in
  `AZURE_API_VERSIONS` (what the Azure AI model inference API here implements) is refused with 400
  naming `api-version`, on any route (`check_api_version`, an app-wide dependency).
- SiliconFlow (/siliconflow/v1/..., chosen by the client's base URL): its documented limits
  (1 < max_tokens < 4096, at most 4 stop sequences, 128 <= thinking_budget <= 32768) and its finish
  reason "eos" for a choice that the model's end-of-sequence token ended. Other routes say "stop"
  there: Friendli and text-generation reject any finish reason but stop/length/tool_calls. For a
  thinking model, its `max_tokens` bounds the answer alone and `thinking_budget` (default 4096) the
  thinking, as its documents say; elsewhere max_tokens bounds both, as OpenAI's and vLLM's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from pydantic import ValidationError as SchemaError

from parley.api.errors import (ANTHROPIC_ERRORS, OPENAI_ERRORS, TGI_ERRORS, ApiError, ErrorForm, refuse_unknown_fields,
                               require, validation_error)
from parley.api.openai.response_format import grammar_field
from parley.api.openai.schemas import ChatMessage, ChatRequest, ContentPart, Seed
from parley.api.state import server_of
from parley.types import FinalEvent, FinishReason, GenerationRequest


# -- the dialect of each route --------------------------------------------------------------------
@dataclass(frozen=True)
class Dialect:
    name: str
    errors: ErrorForm


TGI, ANTHROPIC = Dialect("tgi", TGI_ERRORS), Dialect("anthropic", ANTHROPIC_ERRORS)
OPENAI, FRIENDLI, SILICONFLOW = (Dialect(name, OPENAI_ERRORS) for name in ("openai", "friendli", "siliconflow"))


@functools.cache
def speaking(route_class: type[APIRoute], dialect: Dialect) -> type[APIRoute]:
    """`route_class` for the routes that speak `dialect` (a router's `route_class`, or a route's
    `route_class_override`): its instances carry the dialect, which `dialect_of` and the error
    handlers read from the matched route."""
    return type(f"{route_class.__name__}[{dialect.name}]", (route_class,), {"dialect": dialect})


def dialect_of(http: Request) -> Dialect:
    return http.scope["route"].dialect

# Mistral's guardrail prompt, prepended when a request sets `safe_prompt`.
SAFE_PROMPT = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
               "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness "
               "and positivity.")

EXTRA_PARAMETERS_MODES = ("pass-through", "drop", "error")
AZURE_API_VERSIONS = ("2024-05-01-preview",)  # the azure-ai-inference SDK's (1.0.0b9) and its seed document's
SILICONFLOW_MAX_STOP = 4
SILICONFLOW_THINKING_BUDGET = (128, 32768)  # its documented range; its default is 4096



class Prediction(BaseModel):
    """A predicted output (Mistral, OpenAI): verified as speculative draft tokens, so a right
    prediction makes decoding faster, greedy or sampled, and a wrong one costs little; the output is
    unchanged (with a thinking budget, or a grammar on a thinking model, it is not used)."""

    type: Literal["content"] = "content"
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class ChatBody(ChatRequest):
    """The chat body of every dialect. Unknown fields are kept (`model_extra`) only to be refused by
    name (see "Unknown fields" above); nothing else reads them."""

    model_config = ConfigDict(extra="allow")

    seed: Seed | list[Seed] | None = Field(None, description="Friendli: a list gives one seed per choice")
    random_seed: Seed | None = Field(None, description="Mistral's seed")
    max_new_tokens: int | None = Field(None, ge=1, description="Hugging Face's name for max_tokens")
    eos_token: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Friendli: token ids that end the output like the model's own end-of-sequence token")
    prediction: Prediction | None = None
    timeout_microseconds: int | None = Field(None, ge=1, description="Friendli: past it, the request fails with 429")
    safe_prompt: bool | None = Field(False, description="Mistral: prepend its safety system prompt")
    adapter_id: str | None = Field(None, description="TGI's name; Friendli's model suffix `:ADAPTER_ROUTE` sets it")
    # reasoning (docs/API.md, "Reasoning"): every dialect's fields, honored on every chat route
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM, Friendli: extra variables for the chat template, e.g. enable_thinking")
    enable_thinking: bool | None = Field(None, description="SiliconFlow: let a thinking model think (default true)")
    thinking_budget: int | None = Field(None, ge=0, description="SiliconFlow: at most this many tokens of thinking")
    reasoning_budget: int | None = Field(None, ge=1, description="Friendli's thinking_budget")
    parse_reasoning: bool | None = Field(
        None, description="Friendli: a thinking model's reasoning goes to `reasoning_content` (default: the "
                          "server's --reasoning-format)")
    include_reasoning: bool | None = Field(None, description="Friendli: false leaves the parsed reasoning out")
    _max_tokens_counts_thinking: bool = PrivateAttr(True)  # SiliconFlow: max_tokens bounds the answer only


# -- the one table: wire field -> internal field --------------------------------------------------
@dataclass(frozen=True)
class FieldMapping:
    wire: str  # the body field
    internal: str  # the GenerationRequest attribute it sets (dotted path)
    sent_by: str  # who sends it (documentation)
    convert: Callable[[Any], Any] = lambda value: value


def _prediction_text(prediction: Prediction) -> str | None:
    return prediction.text() or None


def _microseconds_to_s(microseconds: int) -> float:
    return microseconds / 1e6


# Where one body sets several wire fields of one internal field, the later row wins.
FIELDS: tuple[FieldMapping, ...] = (
    #            wire field               internal field                  sent by                 convert
    FieldMapping("max_tokens",            "stopping.max_new_tokens",      "every chat SDK"),
    FieldMapping("max_new_tokens",        "stopping.max_new_tokens",      "hf spelling (extra_body)"),
    FieldMapping("max_completion_tokens", "stopping.max_new_tokens",      "openai (newer spelling)"),
    FieldMapping("min_tokens",            "stopping.min_new_tokens",      "mistral, friendli"),
    FieldMapping("eos_token",             "stopping.extra_eos_token_ids", "friendli",             list),
    FieldMapping("seed",                  "seeds",                        "all (friendli: list)"),
    FieldMapping("random_seed",           "seeds",                        "mistral"),
    FieldMapping("top_k",                 "sampling.top_k",               "mistral, friendli, siliconflow"),
    FieldMapping("repetition_penalty",    "sampling.repetition_penalty",  "mistral, friendli, tgi"),
    FieldMapping("prediction",            "draft_text",                   "mistral, openai",      _prediction_text),
    FieldMapping("timeout_microseconds",  "timeout_s",                    "friendli",             _microseconds_to_s),
    FieldMapping("adapter_id",            "adapter_id",                   "tgi; friendli's model suffix"),
    FieldMapping("user",                  "user",                         "openai; anthropic's metadata.user_id"),
    FieldMapping("safety_identifier",     "user",                         "openai (newer spelling)"),
    FieldMapping("stop_token_ids",        "stopping.extra_eos_token_ids", "vllm",                 list),
    FieldMapping("ignore_eos",            "stopping.ignore_eos",          "vllm"),
    FieldMapping("cache_salt",            "cache_salt",                   "vllm"),
    FieldMapping("include_stop_str_in_output", "stopping.keep_stop",      "vllm"),
    FieldMapping("skip_special_tokens",   "skip_special_tokens",          "vllm"),
    FieldMapping("truncate_prompt_tokens", "truncate",                    "vllm"),
)


# What the engine's errors call a field (its GenerationRequest name, engine/validation.py) where every
# chat body spells it alike; the fields vendors spell their own way are named through FIELDS.
CHAT_NAMES = {"prompt": "messages", "stop_sequences": "stop", "top_n_tokens": "top_logprobs"}


def engine_names(body: BaseModel, translated: dict[str, str] | None = None, *, tools: bool = False,
                 **route_names: str) -> dict[str, str]:
    """The engine's field names -> `body`'s, for the engine's errors (errors.fields_named): through
    FIELDS, the wire field `body` gave (when it gave none, the first row's); CHAT_NAMES; the grammar
    as the field that gave it (response_format.grammar_field), or `tools`; then the route's own. `translated`: for a chat body made
    from another API's request, its `wire_names` (`translated_chat_body`), which take the names on
    to that API's."""
    names = {**CHAT_NAMES, "grammar": "tools" if tools else grammar_field(body)}
    for row in FIELDS:
        names.setdefault(row.internal.rpartition(".")[2], wire_name(body, row.internal) or row.wire)
    names.update(route_names)
    return {engine_name: (translated or {}).get(name, name) for engine_name, name in names.items()}


def wire_name(body: BaseModel, internal: str) -> str | None:
    """The wire field that sets `internal` in `body` (the later row, as `apply`); None if none does."""
    given = [row.wire for row in FIELDS if row.internal == internal and getattr(body, row.wire, None) is not None]
    return given[-1] if given else None


def apply(body: BaseModel, request: GenerationRequest) -> set[str]:
    """Sets the internal field of every `FIELDS` row whose wire field `body` gives (null: not
    given). Returns the internal fields set."""
    given = set()
    for row in FIELDS:
        value = getattr(body, row.wire, None)
        if value is None:
            continue
        owner, _, name = row.internal.rpartition(".")
        setattr(attrgetter(owner)(request) if owner else request, name, row.convert(value))
        given.add(row.internal)
    return given


# -- per-vendor rules -----------------------------------------------------------------------------
def normalize(body: ChatBody, http: Request, enforce_known: bool = True) -> None:
    """Applies, in place, the rules of the dialect `http`'s route speaks (module docstring).
    `enforce_known`: unknown fields are refused unless a header says otherwise (--unknown-fields)."""
    _check_extra_parameters(body, http.headers.get("extra-parameters"), enforce_known)
    if body.safe_prompt:
        body.messages = _with_safety_prompt(body.messages)
    dialect = dialect_of(http)
    if dialect is FRIENDLI:
        _, _, adapter = (body.model or "").partition(":")
        body.adapter_id = adapter or body.adapter_id
    elif dialect is SILICONFLOW:
        _check_siliconflow_limits(body)


# What TGI's own clients send as `model` (SDK-WIRE.md): text-generation always "tgi" (TGI's docs use it
# too), huggingface_hub "dummy" when given a URL. TGI serves any name; so do we for these.
TGI_CLIENT_MODELS = ("tgi", "dummy")


def check_model(http: Request, model: str | None) -> None:
    """A `model` this server does not serve gets the 404 OpenAI and vLLM give, naming what it serves.
    Served: the --served-model-name names (default the model's id), a LoRA adapter's name (which
    selects it), TGI's clients' names, no name at all (Azure's may leave it out) and on Friendli's
    routes any "ENDPOINT_ID[:ADAPTER]" (the URL picks the endpoint; `normalize` takes the adapter)."""
    if model is None or model in TGI_CLIENT_MODELS or dialect_of(http) is FRIENDLI:
        return
    server = server_of(http)
    if model in server.model_names or server.ready_engine().has_adapter(model):
        return
    served = ", ".join(f"`{name}`" for name in server.model_names)
    raise ApiError(404, f"The model `{model}` does not exist: this server serves {served} and its LoRA adapters "
                   "(GET /v1/models lists them)", "model_not_found", "model")


def translated_chat_body(fields: dict, wire_names: dict[str, str]) -> ChatBody:
    """The chat body another API's request (Anthropic's, the Responses API) translates into. What
    the chat body refuses is refused naming the field as that API's client sent it (`wire_names`:
    chat field -> the API's)."""
    try:
        return ChatBody.model_validate(fields)
    except SchemaError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "body"
        wire = wire_names.get(field, field)
        raise validation_error(f"Input validation error: `{wire}`: {error['msg']}", wire) from exc


def check_api_version(http: Request) -> None:
    version = http.query_params.get("api-version")
    if version is not None and version not in AZURE_API_VERSIONS:
        raise ApiError(400, f"Unsupported `api-version` {version!r}: this server implements "
                       f"{', '.join(AZURE_API_VERSIONS)}", "unsupported_api_version", "api-version")


def response_shape(shape, http: Request):
    """`shape` (a ChatShape or CompletionShape) as the dialect of `http`'s route speaks it:
    SiliconFlow's finish reasons, Friendli's seeds."""
    dialect = dialect_of(http)
    if dialect is SILICONFLOW:
        return EosFinishReasons(shape)
    if dialect is FRIENDLI:
        return FriendliChoices(shape)
    return shape


def mistral_model_card(max_context_length: int, fills_in_middle: bool) -> dict:
    """What Mistral's `models.list()` needs besides OpenAI's model object (its BaseModelCard)."""
    return {"type": "base", "capabilities": {"completion_chat": True, "function_calling": True,
                                             "completion_fim": fills_in_middle},
            "max_context_length": max_context_length}


def _check_extra_parameters(body: ChatBody, header: str | None, enforce_known: bool) -> None:
    if header is None:
        refuse_unknown_fields(body, 400, enforce_known)
        return
    mode = header.strip().lower()
    require(mode in EXTRA_PARAMETERS_MODES, "Input validation error: header `extra-parameters` must be one of "
            f"{', '.join(EXTRA_PARAMETERS_MODES)}. Given: {header!r}", "extra-parameters")
    unknown = sorted(body.model_extra or {})
    if mode == "error" and unknown:
        names = ", ".join(f"`{name}`" for name in unknown)
        raise validation_error(f"Input validation error: unknown parameters {names} (header `extra-parameters: "
                               "error` refuses parameters this server does not know)", unknown[0])


def _with_safety_prompt(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Mistral's safety prompt, before the client's own system text or as a new system message."""
    first, rest = messages[0], messages[1:]
    if first.role != "system":
        return [ChatMessage(role="system", content=SAFE_PROMPT), *messages]
    if isinstance(first.content, list):
        content = [ContentPart(type="text", text=SAFE_PROMPT + "\n\n"), *first.content]
    else:
        content = SAFE_PROMPT + ("\n\n" + first.content if first.content else "")
    return [first.model_copy(update={"content": content}), *rest]


def _check_siliconflow_limits(body: ChatBody) -> None:
    body._max_tokens_counts_thinking = False
    if body.thinking_budget is not None:
        require(SILICONFLOW_THINKING_BUDGET[0] <= body.thinking_budget <= SILICONFLOW_THINKING_BUDGET[1],
                f"Input validation error: `thinking_budget` must be between {SILICONFLOW_THINKING_BUDGET[0]} and "
                f"{SILICONFLOW_THINKING_BUDGET[1]}. Given: {body.thinking_budget}", "thinking_budget")
    if body.max_tokens is not None:
        require(1 < body.max_tokens < 4096, "Input validation error: `max_tokens` must be greater than 1 and "
                f"less than 4096. Given: {body.max_tokens}", "max_tokens")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    require(len(stops) <= SILICONFLOW_MAX_STOP, f"Input validation error: `stop` takes up to "
            f"{SILICONFLOW_MAX_STOP} sequences. Given: {len(stops)}", "stop")


class EosFinishReasons:
    """A chat shape speaking SiliconFlow's finish reasons: "eos" for a choice that ended on an
    end-of-sequence token (which other dialects call "stop"). The rest is the wrapped shape's."""

    def __init__(self, shape):
        self._shape = shape

    def __getattr__(self, name: str):
        return getattr(self._shape, name)

    def choice(self, index: int, final: FinalEvent) -> dict:
        return _eos(self._shape.choice(index, final), final)

    def final_choice(self, index: int, final: FinalEvent) -> dict:
        return _eos(self._shape.final_choice(index, final), final)


class FriendliChoices:
    """Friendli's choices: each ends with the `seed` it was sampled with (its documents: "If nothing
    is given, random seed is used for sampling, and return the seed along with the generated
    result"), so any answer can be drawn again; a greedy one says 0, as any seed gives it. Its
    completions choices also carry the generated token ids (`tokens`), which its SDK requires."""

    def __init__(self, shape):
        self._shape = shape

    def __getattr__(self, name: str):
        return getattr(self._shape, name)

    def choice(self, index: int, final: FinalEvent) -> dict:
        return self._with_seed(self._shape.choice(index, final), final)

    def final_choice(self, index: int, final: FinalEvent) -> dict:
        return self._with_seed(self._shape.final_choice(index, final), final)

    def _with_seed(self, choice: dict, final: FinalEvent) -> dict:
        choice["seed"] = final.seed if final.seed is not None else 0
        if "text" in choice:  # completions
            choice["tokens"] = [t.id for t in final.tokens]
        return choice


def _eos(choice: dict, final: FinalEvent) -> dict:
    if final.finish_reason is FinishReason.EOS_TOKEN and choice["finish_reason"] == "stop":
        choice["finish_reason"] = "eos"
    return choice
