"""OpenAI-style request bodies for chat and completions.

Every optional field accepts null and unknown fields are ignored, since every SDK sends some of
its own (SDK-WIRE §1.4). Vendor dialects extend these models with their fields (Mistral's
random_seed, Friendli's seed lists, Azure's extra parameters...) and map them in their convert.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError, WrapValidator

Bias = Annotated[float, Field(ge=-100, le=100)]
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]  # a u64 as TGI's; torch's generators take 64 bits
# an end user's id (OpenAI's `user` and `safety_identifier`, Anthropic's `metadata.user_id`)
EndUser = Annotated[str, Field(max_length=256, description="the end user: waiting requests are admitted by turns "
                                                           "among users")]


def _none_given(value: list | None) -> list | None:
    if value:
        raise ValueError("an answer's citations cannot be given to the model; send an empty list or none")
    return value


# An earlier answer's citations, echoed back by an SDK (OpenAI's annotations, Anthropic's citations):
# the template sees text only, so only an empty list (or none) is taken at its word.
Citations = Annotated[list[Any] | None, AfterValidator(_none_given)]


def _one_prompt_form(value: Any, handler) -> Any:
    """One message for a prompt none of the four forms takes, not one per form and item."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError("must be a text, a list of texts, a list of token ids (integers) or a list of such lists")


# OpenAI's /v1/completions prompt: a text, a batch of texts, a prompt's token ids, or a batch of them
Prompt = Annotated[str | list[str] | list[StrictInt] | list[list[StrictInt]], WrapValidator(_one_prompt_form)]


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class ContentPart(BaseModel):
    """A chunk of a message's content; the chat template decides which types the model takes (it
    gets every field, so none is unknown)."""

    model_config = ConfigDict(extra="allow")
    passes_extras: ClassVar[bool] = True  # errors.unknown_fields does not look inside
    type: str
    text: str | None = None
    image_url: dict | None = None


class ChatMessage(BaseModel):
    """One turn. Fields no schema here declares are kept only to be refused by name (as the body's
    are: `messages.N.NAME`), since SDKs echo an earlier answer's fields back (OpenAI's `audio`,
    `annotations`...) and a dropped one would change the conversation unseen."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = Field(None, description="an earlier answer's reasoning, handed to the chat "
                                          "template (Qwen3's shows it in the latest turn only)")
    reasoning: str | None = Field(None, description="Friendli's (and vLLM's) other name for reasoning_content")
    refusal: str | None = Field(None, description="OpenAI: what an earlier answer said instead of content; the "
                                "template sees it as that turn's content")
    annotations: Citations = Field(None, description="OpenAI echoes an answer's citations: only an empty list")
    prefix: bool | None = Field(None, description="Mistral: true on the last message, an assistant's, to have the "
                                "model continue it (the answer holds only the continuation)")


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of these (response_format.py)."""

    model_config = ConfigDict(extra="forbid")  # whitespace_pattern, structural_tag...: a 422 naming them
    json_schema: dict[str, Any] | str | None = Field(None, alias="json", description="JSON valid against this schema")
    regex: str | None = Field(None, description="text fully matching this pattern")
    choice: list[str] | None = Field(None, min_length=1, description="exactly one of these strings")
    grammar: str | None = Field(None, description="text of this grammar, in Lark's syntax as llguidance reads it")
    json_object: bool | None = Field(None, description="true: any JSON object")


class SamplingFields(BaseModel):
    """What chat and completions share: the output budget, sampling and stopping."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0: off")
    min_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    logit_bias: dict[str, Bias] | list[Bias] | None = Field(
        None, description="token id (as a string) -> bias added to its logit (OpenAI's form); or TGI's form, an array "
        "whose element i is token i's bias")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | str | None = Field(
        None, description="text, json_object, json_schema, TGI's json/regex, Friendli's regex (see docs/API.md)")
    user: EndUser | None = None
    safety_identifier: EndUser | None = None  # OpenAI's newer name for `user`
    # vLLM's own fields, as its users send them through the openai SDK's extra_body (docs/API.md)
    ignore_eos: bool | None = Field(None, description="vLLM: the model's end-of-sequence token does not end the "
                                    "answer (it is generated as any token)")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="vLLM: tokens that end "
                                                                     "the answer")
    include_stop_str_in_output: bool | None = Field(None, description="vLLM: the stop string or stop token that "
                                                    "ended the answer stays in its text")
    skip_special_tokens: bool | None = Field(None, description="vLLM: false writes special tokens' text into the "
                                             "answer (default true)")
    truncate_prompt_tokens: int | None = Field(None, ge=1, description="vLLM: only the prompt's last this many "
                                               "tokens are read (TGI's truncate)")
    structured_outputs: StructuredOutputs | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=256, description="vLLM: prompts share the prefix "
                                   "cache only with requests of the same salt (so that one tenant cannot time "
                                   "another's prompts)")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's older structured_outputs.json")
    guided_regex: str | None = Field(None, description="vLLM's older structured_outputs.regex")
    guided_choice: list[str] | None = Field(None, min_length=1, description="vLLM's older structured_outputs.choice")
    guided_grammar: str | None = Field(None, description="vLLM's older structured_outputs.grammar")


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='none, auto (default), required (Mistral: any), {"type": "function", "function": {"name"}}, '
                          "or a bare function name (text-generation)")
    parallel_tool_calls: bool | None = None
    tool_prompt: str | None = Field(None, description="TGI: instructions shown before the tool definitions")


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="allow")  # kept only to be refused by name (errors.refuse_unknown_fields)

    prompt: Prompt
    logprobs: int | None = Field(None, ge=0, le=20, description="how many alternatives to report per token")
    echo: bool | None = Field(None, description="the prompt before the completion in `text`, and with `logprobs` "
                                                "its tokens' logprobs and alternatives first (the first token's null)")
    suffix: str | None = Field(None, description="the text after the gap: the model writes what goes between "
                               "`prompt` and it (a model that fills in the middle only; docs/API.md)")
    seed: Seed | list[Seed] | None = Field(None, description="Friendli: a list gives one seed per choice")


class InfillRequest(SamplingFields):
    """Mistral's fill-in-the-middle (`client.fim.complete`): the completion of `prompt`, or with
    `suffix` what goes between the two; answered in chat's shape."""

    model_config = ConfigDict(extra="allow")  # kept only to be refused by name (errors.refuse_unknown_fields)

    prompt: str
    suffix: str | None = None
    random_seed: Seed | None = Field(None, description="Mistral's seed")
