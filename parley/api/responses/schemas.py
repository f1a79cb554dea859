"""OpenAI's Responses API request body, as the openai SDK's `client.responses` sends it.

A field Parley does not know is refused by name, at the top or inside `input` items and their
content parts, `tools`, `tool_choice` and `text` (400 naming it as sent, `input.0.content.1.NAME`:
errors.refuse_unknown_fields; `--unknown-fields ignore` lets it through); an item, part or tool
type it does not know is a 422 naming where it is (images, files, built-in tools such as
web_search...). What the SDK sends back of an earlier answer is known: items' `id` and `status`,
`annotations` (empty only), `logprobs`, refusal parts, a call's `caller` when the model made it,
a reasoning item's `summary` beside its content; `encrypted_content` is refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator

from parley.api.openai.schemas import Citations, EndUser


class Strict(BaseModel):
    """Fields no schema here declares are kept only to be refused by name (errors.unknown_fields)."""

    model_config = ConfigDict(extra="allow")

    def declared(self, **options) -> dict:
        """The fields the schema declares, without the unknown ones `--unknown-fields ignore` let in."""
        return self.model_dump(include=set(type(self).model_fields), **options)


class CacheBreakpoint(Strict):
    """Keep the prompt's KV cache up to here for later requests: Parley's prefix cache does that
    for every prompt, always (engine/block_manager.py: each full block of KV is kept under the hash
    of the tokens up to it and reused by a later prompt that starts the same, until the memory is
    needed), so the answer is the same with or without it; `ttl` is OpenAI's promise of how long."""

    mode: Literal["explicit"]
    ttl: Literal["30m", "12h"] | None = None


class InputText(Strict):
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: CacheBreakpoint | None = None


class OutputText(Strict):  # an assistant message of an earlier answer, sent back as input
    type: Literal["output_text"]
    text: str
    annotations: Citations = None
    logprobs: list[Any] | None = None  # how likely that answer's tokens were: the template sees its text only


class OutputRefusal(Strict):
    """What an earlier answer said instead of answering: the template sees it as that turn's text
    (as a chat message's `refusal`)."""

    type: Literal["refusal"]
    refusal: str

    @property
    def text(self) -> str:
        return self.refusal


Part = Annotated[InputText | OutputText | OutputRefusal, Field(discriminator="type")]


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    id: str | None = None
    status: str | None = None


class DirectCaller(Strict):
    """Who made a function call: the model itself, as every call Parley's models make (not a
    program of OpenAI's, `{"type": "program"}`)."""

    type: Literal["direct"]


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None
    caller: DirectCaller | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]  # a list: its texts, one after the other
    id: str | None = None
    status: str | None = None
    caller: DirectCaller | None = None


class ReasoningText(Strict):
    type: Literal["reasoning_text"]
    text: str


class ReasoningSummary(Strict):
    type: Literal["summary_text"]
    text: str


class ReasoningItem(Strict):
    """An earlier answer's reasoning, sent back: the chat template gets its `content` as the
    `reasoning_content` of the assistant turn that follows it (Qwen3's shows the latest turn's
    only). A `summary` is the reasoning shortened for the reader: beside the reasoning itself it
    adds nothing, alone it would stand for reasoning the model never sees, so it is refused. The
    `encrypted_content` is OpenAI's, which Parley cannot read (it writes none)."""

    type: Literal["reasoning"]
    id: str | None = None
    content: list[ReasoningText] | None = None
    summary: list[ReasoningSummary] = []  # after `content`, which its check reads
    encrypted_content: str | None = None
    status: str | None = None

    @field_validator("summary")
    @classmethod
    def _no_summary_alone(cls, value, info: ValidationInfo):
        if value and not info.data.get("content"):
            raise ValueError("a summary without the reasoning's `content` cannot be given to the model; send the "
                             "reasoning's text as `content` (reasoning_text parts) or leave the item out")
        return value

    @field_validator("encrypted_content")
    @classmethod
    def _not_encrypted(cls, value):
        if value is not None:
            raise ValueError("OpenAI's encrypted reasoning cannot be read here; send the reasoning's text as "
                             "`content` (reasoning_text parts) or leave the item out")
        return value


def _item_type(value: Any) -> str | None:
    """An item's `type`; a message may leave it out (OpenAI's EasyInputMessage). None: not an item."""
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", None)


Item = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                 | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                 | Annotated[ReasoningItem, Tag("reasoning")], Discriminator(_item_type)]


class FunctionTool(Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(Strict):
    type: Literal["function"]
    name: str


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(Strict):
    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[Item]
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "required", "none"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    store: bool | None = True
    user: EndUser | None = None
    safety_identifier: EndUser | None = None  # OpenAI's newer name for `user`
